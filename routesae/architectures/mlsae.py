"""MLSAE (Lawson et al. 2024; the RouteSAE paper's multi-layer baseline): one TopK SAE trained on every layer of a range.

Each token contributes its L residual vectors, each standardised, encoded and reconstructed on its own by
the same dictionary::

    x_{n,l} = standardize(h_{n,l})          for every token n and block l of the range
    z_{n,l} = TopK_k(W_enc(x_{n,l} − b_dec) + b_enc),   x̂_{n,l} = W_dec z_{n,l} + b_dec
    loss = mean over the N·L vectors of NMSE(x, x̂)

so L0 and the NMSE are per (token, block) vector, and a training step of N tokens encodes N·L vectors.
Where RouteSAE lets a router pick one block per token, the MLSAE reads them all: it is the control that
asks whether one shared dictionary over the range is enough without routing.

Evaluation splices it at one block at a time, as the paper does: :meth:`MLSAE.splice_views` gives, per
block of the range, a TopK SAE on that block that shares these weights, and ``routesae evaluate``
reports each block's metrics and their mean. Steering clamps a latent at every block of the range at
once, as for a crosscoder (the decode of all blocks is :meth:`MLSAE.reconstruction`). Contexts rank one
activation per token, and the MLSAE has one per token and block, so ``routesae contexts`` refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from routesae.architectures.base import SAE, MultiLayerConfig, SAEConfig, SAEOutput, standardize
from routesae.architectures.topk import TopKConfig, TopKSAE, TopKSettings


@dataclass
class MLSAEConfig(TopKSettings, MultiLayerConfig):
    """TopK on every block of a range, with one dictionary."""


class MLSAE(TopKSAE):
    name = "mlsae"
    Config: ClassVar[type[SAEConfig]] = MLSAEConfig
    cfg: MLSAEConfig

    @property
    def vectors_per_token(self) -> int:
        return len(self.layers)

    def forward(self, acts_NLD: Tensor) -> SAEOutput:
        """Each of the N·L vectors on its own; ``latents``, ``x_hat`` and ``target`` are ``[N·L, ·]``, token-major."""
        acts_NLD = self._as_NLD(acts_NLD)
        x_NLD, norm = standardize(acts_NLD, self.cfg.normalize)
        x_RD = x_NLD.reshape(-1, self.d_model)
        pre_RF, z_RF, x_hat_RD, codes, extras = self.encode_output(x_RD)
        return SAEOutput(latents=z_RF, x_hat=x_hat_RD, target=x_RD, pre=pre_RF, norm=norm, extras=extras or {}, codes=codes)

    def reconstruction(self, out: SAEOutput) -> dict[int, tuple[Tensor, Tensor]]:
        """Every block at once (what ``decode`` returns); ``evaluate`` splices one block at a time through :meth:`splice_views`."""
        x_hat_NLD = out.x_hat.view(-1, len(self.layers), self.d_model)
        if out.norm is not None:
            x_hat_NLD = out.norm.undo(x_hat_NLD)
        mask = torch.ones(x_hat_NLD.shape[0], dtype=torch.bool, device=x_hat_NLD.device)
        return {block: (x_hat_NLD[:, i], mask) for i, block in enumerate(self.layers)}

    def splice_views(self) -> dict[int, SAE]:
        """Per block of the range, the TopK SAE on that block alone, sharing this one's parameters (and so its training)."""
        settings = {k: v for k, v in self.cfg.to_dict().items() if k != "layers"}
        views = {}
        for block in self.layers:
            with torch.device("meta"):  # no weights of its own: it takes these
                view = TopKSAE(TopKConfig(**settings, layer=block), self.d_model)
            for name, parameter in self.named_parameters():
                setattr(view, name, parameter)
            view.decode_path, view.encoder_path = self.decode_path, self.encoder_path
            views[block] = view.train(self.training)
        return views
