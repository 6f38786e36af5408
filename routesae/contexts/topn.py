"""Top-N per group with tensor ops: the core of context extraction, kept free of any model code.

The reference keeps a Python min-heap per (latent, token class) and loops over every
above-threshold hit (docs/reference.md §12.27). Here a batch's hits and the running candidates are concatenated
and sorted once by (group, score descending); a candidate's rank inside its group is its
position minus the group's first position, and rows with rank < N survive. Sorts are stable
and old candidates come before new ones, so ties keep the earliest hit: the result depends on
the order of the hits, never on how they were split into batches.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_per_group(group: Tensor, score: Tensor, n: int) -> Tensor:
    """Indices of the ``n`` highest ``score`` rows of every ``group``, ordered by (group, score descending).

    Ties keep the lower index. ``group`` is any integer tensor ``[M]``, ``score`` a float tensor ``[M]``.
    """
    if group.shape != score.shape or group.ndim != 1:
        raise ValueError(f"group and score must be 1-d and alike, got {tuple(group.shape)} and {tuple(score.shape)}")
    by_score = torch.sort(score, descending=True, stable=True).indices
    order = by_score[torch.sort(group[by_score], stable=True).indices]
    sorted_group = group[order]
    starts = torch.ones_like(sorted_group, dtype=torch.bool)
    starts[1:] = sorted_group[1:] != sorted_group[:-1]
    position = torch.arange(len(order), device=group.device)
    first = torch.cummax(torch.where(starts, position, 0), dim=0).values
    return order[position - first < n]


class TopN:
    """The ``n`` best rows per group seen so far, with any number of payload columns.

    ``update`` takes a batch of rows (a group id, a score and one tensor ``[M]`` per payload column);
    :attr:`rows` holds the retained ones sorted by (group, score descending).
    """

    def __init__(self, n: int, payload: dict[str, torch.dtype], device: torch.device | str = "cpu") -> None:
        self.n = n
        self.group = torch.zeros(0, dtype=torch.long, device=device)
        self.score = torch.zeros(0, device=device)
        self.rows = {name: torch.zeros(0, dtype=dtype, device=device) for name, dtype in payload.items()}

    def clear(self) -> None:
        """Forget every retained row (the table starts over)."""
        self.keep(torch.zeros_like(self.group, dtype=torch.bool))

    def update(self, group: Tensor, score: Tensor, **payload: Tensor) -> None:
        if self.n <= 0 or len(group) == 0:
            return
        group = torch.cat([self.group, group])
        score = torch.cat([self.score, score.to(self.score.dtype)])
        keep = top_per_group(group, score, self.n)
        self.group, self.score = group[keep], score[keep]
        self.rows = {name: torch.cat([old, payload[name].to(old.dtype)])[keep] for name, old in self.rows.items()}

    def keep(self, keep: Tensor) -> None:
        """Keep only the retained rows where the boolean ``keep`` (one entry per row) is true."""
        self.group, self.score = self.group[keep], self.score[keep]
        self.rows = {name: column[keep] for name, column in self.rows.items()}
