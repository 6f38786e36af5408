"""What sae-lens 6 computes from a directory, re-implemented in torch from its source (sae_lens 6.54.12,
``saes/sae.py``, ``standard_sae.py``, ``topk_sae.py``, ``jumprelu_sae.py``, ``gated_sae.py``).

routesae's environment cannot hold sae-lens (it pins transformer-lens < 4), so the tests check exports
against this; ``tests/test_saelens.py`` first checks it against the outputs real sae-lens gave on the golden
directories (``tests/data/saelens/reference``), and ``make interop`` runs the real thing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor


def read(directory: Path) -> tuple[dict, dict[str, Tensor]]:
    directory = Path(directory)
    cfg = json.loads((directory / "cfg.json").read_text())
    return cfg, load_file(directory / "sae_weights.safetensors")


def saelens_encode_decode(directory: Path, x: Tensor) -> tuple[Tensor, Tensor]:
    """(feature_acts, sae_out) = (sae.encode(x), sae(x)) of ``SAE.load_from_disk(directory)``."""
    cfg, w = read(directory)
    x = x.to(torch.float32)
    mu = std = None
    if cfg["normalize_activations"] == "layer_norm":  # run_time_activation_ln_in / _out
        mu = x.mean(dim=-1, keepdim=True)
        x = x - mu
        std = x.std(dim=-1, keepdim=True)
        x = x / (std + 1e-5)
    else:
        assert cfg["normalize_activations"] == "none", cfg["normalize_activations"]
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]  # process_sae_in
    architecture = cfg["architecture"]
    if architecture == "gated":
        active = (sae_in @ w["W_enc"] + w["b_gate"] > 0).to(torch.float32)
        z = active * torch.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    else:
        pre = sae_in @ w["W_enc"] + w["b_enc"]
        if architecture == "standard":
            z = torch.relu(pre)
        elif architecture == "topk":
            assert not cfg.get("rescale_acts_by_decoder_norm", False)
            values, indices = torch.topk(pre, k=cfg["k"], dim=-1, sorted=False)
            z = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
        elif architecture == "jumprelu":
            z = torch.relu(pre) * (pre > w["threshold"]).to(pre.dtype)
        else:
            raise AssertionError(f"no formula for {architecture}")
    out = z @ w["W_dec"] + w["b_dec"]
    if mu is not None:
        out = out * std + mu
    return z, out
