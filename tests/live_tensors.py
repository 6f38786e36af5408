"""Count the multi-layer activations a piece of code keeps alive, exactly, by watching every tensor it creates.

Peak RSS mixes the activations with the SAEs' own memory and the allocator's slack, so it cannot
say whether a run holds one batch of multi-layer activations beyond the shuffle buffer or two.
:class:`MultiLayerTensors` can: a dispatch mode sees every tensor an operator returns (factories
such as ``torch.empty`` included), keeps those shaped ``[..., L, D]`` under watch, and counts
each underlying storage once while any tensor on it (the tensor or a view) is alive.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class MultiLayerTensors(TorchDispatchMode):
    """Peak bytes of live ``[..., n_layers, d_model]`` storages while the mode is active."""

    def __init__(self, n_layers: int, d_model: int) -> None:
        super().__init__()
        self.shape = (n_layers, d_model)
        self.watchers: dict[int, int] = {}  # storage address -> live tensors on it
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.ndim >= 3 and tuple(t.shape[-2:]) == self.shape:
                self._watch(t)
        return out

    def _watch(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.watchers:
            self.watchers[key], self.sizes[key] = 0, storage.nbytes()
            self.current += self.sizes[key]
            self.peak = max(self.peak, self.current)
        self.watchers[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.watchers[key] -= 1
        if not self.watchers[key]:
            del self.watchers[key]
            self.current -= self.sizes.pop(key)
