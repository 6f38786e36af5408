"""TopK SAE (Gao et al. 2024) as in the RouteSAE reference: keep each token's k largest pre-activations.

The reference keeps the selected values signed (no ReLU); ``relu=True`` gives Gao et al.'s
variant. The decode gathers only the k selected decoder rows (``embedding_bag``), so its cost
and its gradient scale with k, not with the dictionary size — where that pays. The dense decode
(scatter the k values into [N, F], multiply by W_dec) is the reference and gives the same result
within float tolerance; :func:`sparse_decode_pays` picks between them from k and the latent size.
Likewise the encoder: in training (no override, no edit, no AuxK) :class:`TopKEncode` builds the
encoder's gradient from the k kept pre-activations per token instead of a dense [N, F] one, where
:func:`sparse_encoder_backward_pays`; that path keeps no dense pre-activations, so its
``SAEOutput.pre`` is None.

AuxK (Gao et al. 2024; off by default, as in the reference): with ``auxk`` > 0 the loss adds
``auxk · NMSE(e, ê)``, where e = x − x̂ is the main reconstruction's (detached) residual and ê =
W_dec z_aux, z_aux keeping the ``auxk_k`` largest pre-activations among dead latents only (no
b_dec), through the same rule as the main TopK: ReLU'd when ``relu`` is on, as in Gao et al.,
signed otherwise. Dead latents get a gradient from explaining what the live ones miss, which
brings them back into the top k. (Forcing the ReLU on signed TopK left more latents dead in the
revival toy of tests/test_auxk.py: 27 vs 20 of 32 on average over three seeds.) It acts only once
latents are dead, so it needs runs much longer than the trainer's ``dead_after_tokens``: in a
400k-token run on SmolLM2 block 21 (4,096 latents, k 32, auxk 1/32) the dead fraction was 35%,
against 30% without it.

Which latents are dead is the trainer's knowledge, not the SAE's: its dead-latent counter
(:class:`~routesae.firing.FiringCounter`) passes them to :meth:`TopKSAE.loss` as
``TrainingState.dead_F``; without one (outside training) none is dead and the AuxK term is 0.
AuxK always takes the dense encoder path, whose pre-activations the term reads. It adds no
state: with ``auxk=0`` the module is exactly the plain TopK SAE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from routesae.architectures.base import (
    Encoded,
    SAEConfig,
    SAEOutput,
    SingleLayerConfig,
    SingleLayerSAE,
    TrainingState,
    normalized_mse,
)
from routesae.architectures.codes import SparseCodes
from routesae.config import setting
from routesae.errors import ConfigError


def check_k(k: int, latent_size: int) -> None:
    """The k of any top-k style architecture must leave some latents unselected."""
    if not 0 < k < latent_size:
        raise ConfigError(f"k must satisfy 0 < k < latent size; got k={k}, latent size {latent_size}")


def name_parts_with_k(parts: list[str], k: int) -> list[str]:
    """Insert ``k{k}`` after the layer tag: ``["L21", "k32", "F4096"]``."""
    return [parts[0], f"k{k}", *parts[1:]]


SPARSE_DECODE_MIN_RATIO = 32
"""The gather decode is used when latent size >= this x k; at 16 x k and below the dense matmul ties or wins
(the measurements behind the rule: docs/speed.md)."""


def sparse_decode_pays(k: int, latent_size: int) -> bool:
    """Whether gathering k decoder rows beats the dense matmul (the rule: :data:`SPARSE_DECODE_MIN_RATIO`)."""
    return latent_size >= SPARSE_DECODE_MIN_RATIO * k


SPARSE_ENCODER_MIN_RATIO = 8
"""The sparse encoder backward (:class:`TopKEncode`) is used when latent size >= this x k.

The dense backward is two more [N, F] x D matmuls, the sparse one ~2·N·k·D work at a worse rate,
so it loses only when k is a large share of F (the measurements behind the rule: docs/speed.md).
"""


def sparse_encoder_backward_pays(k: int, latent_size: int) -> bool:
    """Whether :class:`TopKEncode`'s backward beats the dense one (the rule: :data:`SPARSE_ENCODER_MIN_RATIO`)."""
    return latent_size >= SPARSE_ENCODER_MIN_RATIO * k


ComputePath = Literal["auto", "sparse", "dense"]


def path_taken(path: ComputePath, sparse_pays: bool) -> bool:
    """Whether the sparse path runs: forced by ``path`` (tests compare the two), or on ``"auto"`` where it pays."""
    return sparse_pays if path == "auto" else path == "sparse"


class TopKEncode(torch.autograd.Function):
    """(values, indices) of the k largest of ``xc @ W_enc.T + b_enc``, with a backward over the kept entries only.

    Autograd through the dense pre-activations would spend two [N, F] x D matmuls on a gradient
    that is zero outside the k kept latents per token. Here dW_enc is a sparse [F, N] x [N, D]
    product (``torch.sparse.mm`` of a COO matrix was the fastest of COO, CSR, ``index_add_`` and
    ``embedding_bag``'s backward), grad_xc is an ``embedding_bag`` of the kept encoder rows and
    grad_b_enc an ``index_add_``. Neither the [N, F] pre-activations nor their gradient is kept.
    """

    @staticmethod
    def forward(ctx, xc_ND: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
        pre_NF = torch.addmm(b_enc, xc_ND, W_enc.T)
        values, indices = pre_NF.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(xc_ND, W_enc, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_indices: Tensor | None) -> tuple[Tensor | None, ...]:
        xc_ND, W_enc, indices = ctx.saved_tensors
        grad_values = grad_values.to(W_enc.dtype).contiguous()  # under autocast the values were bf16
        rows = indices.reshape(-1)
        grad_xc = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_xc = F.embedding_bag(indices, W_enc, per_sample_weights=grad_values, mode="sum")
        if ctx.needs_input_grad[1]:
            tokens = torch.arange(xc_ND.shape[0], device=rows.device).repeat_interleave(indices.shape[1])
            shape = (W_enc.shape[0], xc_ND.shape[0])
            coords = torch.stack([rows, tokens])
            grad_FN = torch.sparse_coo_tensor(coords, grad_values.reshape(-1), shape, check_invariants=False)
            grad_W = torch.sparse.mm(grad_FN, xc_ND)
        if ctx.needs_input_grad[2]:
            grad_b = grad_values.new_zeros(W_enc.shape[0]).index_add_(0, rows, grad_values.reshape(-1))
        return grad_xc, grad_W, grad_b, None


@dataclass
class TopKSettings(SAEConfig):
    """The settings of TopK's activation, on whatever layers the SAE reads (one block: :class:`TopKConfig`; a range:
    the MLSAE's)."""

    k: int = setting(32, "Latents kept per token (0 < k < latent size).")
    relu: bool = setting(False, "Apply ReLU to the kept values (Gao et al.); the reference keeps them signed.")
    auxk: float = setting(
        0.0,
        "Coefficient of the AuxK dead-latent loss (Gao et al. use 1/32); 0 turns it off, as in the reference.",
    )
    auxk_k: int | None = setting(
        None, "Dead latents the AuxK loss reconstructs with per token. Default: d_model // 2 (Gao et al.)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_k(self.k, self.latent_size)
        if not (math.isfinite(self.auxk) and self.auxk >= 0):
            raise ConfigError(f"auxk must be a finite number >= 0 (0 turns AuxK off), got {self.auxk}")
        if self.auxk_k is not None and not 0 < self.auxk_k <= self.latent_size:
            raise ConfigError(f"auxk_k must satisfy 0 < auxk_k <= latent size; got {self.auxk_k}, latent size {self.latent_size}")

    def name_parts(self) -> list[str]:
        return name_parts_with_k(super().name_parts(), self.k)


@dataclass
class TopKConfig(TopKSettings, SingleLayerConfig):
    """TopK on one block."""


class TopKSAE(SingleLayerSAE):
    name = "topk"
    Config: ClassVar[type[SAEConfig]] = TopKConfig
    cfg: TopKSettings
    decode_path: ComputePath = "auto"  # tests force a path to compare the two
    encoder_path: ComputePath = "auto"  # likewise for the encoder's backward

    def __init__(self, cfg: TopKSettings, d_model: int) -> None:
        super().__init__(cfg, d_model)
        if cfg.auxk > 0:
            self.aux_latents = min(cfg.auxk_k or max(1, d_model // 2), cfg.latent_size)

    @classmethod
    def upgrade(cls, config: dict[str, Any], state_dict: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Checkpoints from before the trainer kept the dead-latent counter: drop AuxK's own ``dead_tokens``
        setting and ``tokens_since_fired`` buffer (now ``TrainConfig.dead_after_tokens`` and the trainer's
        :class:`~routesae.firing.FiringCounter`)."""
        config = {k: v for k, v in config.items() if k != "dead_tokens"}
        state_dict = {k: v for k, v in state_dict.items() if k != "tokens_since_fired"}
        return config, state_dict

    def select(self, pre_NF: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices) of the kept latents, [N, k] each."""
        values, indices = pre_NF.topk(self.cfg.k, dim=-1, sorted=False)
        return self.kept(values), indices

    def kept(self, values: Tensor) -> Tensor:
        """The selected pre-activations as latents: ReLU'd with ``relu``, signed as in the reference otherwise."""
        return values.relu() if self.cfg.relu else values

    def uses_sparse_encoder_backward(self) -> bool:
        return path_taken(self.encoder_path, sparse_encoder_backward_pays(self.cfg.k, self.cfg.latent_size))

    def encode_decode(self, x_ND: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """(pre-activations, latents, x_hat): :meth:`encode_output`'s."""
        pre_NF, z_NF, x_hat_ND, _, _ = self.encode_output(x_ND)
        return pre_NF, z_NF, x_hat_ND

    def encode_output(self, x_ND: Tensor) -> Encoded:
        """The encoding with the kept latents as codes: :meth:`encode_codes`, then the decode of the codes.

        Overrides and edits take the dense path of :class:`SingleLayerSAE` (they read all pre-activations;
        no codes). An architecture built on TopK codes overrides this to decode them its own way.
        """
        if self.inference_override.active or self.latent_edit is not None:
            return Encoded(*super().encode_decode(x_ND))  # SingleLayerSAE's dense path
        pre_NF, codes = self.encode_codes(x_ND)
        return Encoded(pre_NF, *self.decode_selected(*codes), codes)

    def encode_codes(self, x_ND: Tensor) -> tuple[Tensor | None, SparseCodes]:
        """(pre-activations, the kept latents): the trained activation's encoder, whose backward touches only the
        kept latents where that pays, and then there are no pre-activations to give (None). AuxK keeps the dense
        pre-activations (its loss reads those of dead latents)."""
        if self.cfg.auxk > 0 or not self.uses_sparse_encoder_backward():
            pre_NF = self.preactivations(x_ND)
            return pre_NF, SparseCodes(*self.select(pre_NF))
        values, indices = TopKEncode.apply(x_ND - self.b_dec, self.W_enc, self.b_enc, self.cfg.k)
        return None, SparseCodes(self.kept(values), indices)

    def activation(self, pre_NF: Tensor) -> Tensor:
        values, indices = self.select(pre_NF)
        return torch.zeros_like(pre_NF).scatter(-1, indices, values)

    def uses_sparse_decode(self) -> bool:
        return path_taken(self.decode_path, sparse_decode_pays(self.cfg.k, self.cfg.latent_size))

    def activate_decode(self, pre_NF: Tensor) -> tuple[Tensor, Tensor]:
        """(latents, x_hat) from pre-activations, gathering only the kept decoder rows where that pays."""
        return self.decode_selected(*self.select(pre_NF))

    def decode_selected(self, values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """(latents, x_hat) from the kept (values, indices), [N, k] each."""
        codes = SparseCodes(values, indices)
        z_NF = codes.dense(self.cfg.latent_size)
        if not self.uses_sparse_decode():
            return z_NF, self.decode_standardized(z_NF)
        return z_NF, codes.decode(self.W_dec, self.b_dec)

    # -- AuxK ---------------------------------------------------------------------------------------
    def dead_latents(self, state: TrainingState) -> Tensor:
        """[F] bool: the trainer's dead latents, or none outside training."""
        if state.dead_F is not None:
            return state.dead_F
        return torch.zeros(self.cfg.latent_size, dtype=torch.bool, device=self.W_dec.device)

    def auxk_loss(self, out: SAEOutput, dead_F: Tensor) -> Tensor:
        """NMSE of the residual's reconstruction from the top ``auxk_k`` dead latents; 0 when none is dead."""
        pre_NF = torch.where(dead_F, out.pre, -torch.inf)
        values, indices = pre_NF.topk(self.aux_latents, dim=-1, sorted=False)
        values = torch.where(dead_F[indices], values, 0.0)  # fewer dead latents than auxk_k: drop the -inf picks
        if self.cfg.relu:
            values = values.relu()
        e_hat = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")
        aux = normalized_mse(e_hat, (out.target - out.x_hat).detach())
        return torch.where(dead_F.any(), aux, 0.0)

    def loss_terms(self, out: SAEOutput, state: TrainingState) -> dict[str, Tensor]:
        """``auxk`` · the AuxK loss, when on."""
        if self.cfg.auxk == 0:
            return {}
        return {"auxk": self.cfg.auxk * self.auxk_loss(out, self.dead_latents(state))}

    def diagnostics(self, out: SAEOutput, state: TrainingState) -> dict[str, Tensor]:
        """With AuxK, the fraction of dead latents it acts on."""
        if self.cfg.auxk == 0:
            return {}
        return {"dead_window": self.dead_latents(state).float().mean()}
