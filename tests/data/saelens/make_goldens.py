"""Write the golden SAELens directories with the real sae-lens (it cannot live in routesae's environment).

Run it in a virtualenv that has sae-lens (``make saelens-goldens`` builds ``.venv-interop`` and runs it):

    .venv-interop/bin/python tests/data/saelens/make_goldens.py

For each golden SAE it seeds the weights, lets sae-lens write the directory (``save_model``: ``cfg.json`` +
``sae_weights.safetensors``), then loads it back with ``SAE.load_from_disk`` and records that SAE's
outputs on seeded activations in ``reference/NAME.safetensors`` (``acts`` [N, d_in], ``feature_acts``
[N, d_sae] = ``sae.encode(acts)``, ``sae_out`` [N, d_in] = ``sae(acts)``). ``versions.json`` records the
versions that made them. routesae's tests read these files only; they never import sae_lens.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
from pathlib import Path

import sae_lens
import torch
from sae_lens import (
    SAE,
    AbsTopKSAE,
    AbsTopKSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent
TOKENS = 16
TINY_D_MODEL = 64  # the tiny Llama of tests/tiny_models.py, so the big goldens can be spliced into it


def metadata(hook_name: str) -> SAEMetadata:
    return SAEMetadata(
        model_name="tiny-llama",
        hook_name=hook_name,
        hook_head_index=None,
        context_size=32,
        prepend_bos=True,
        seqpos_slice=(1, None),
        dataset_path="corpus",
    )


# name -> (SAE class, config class, d_in, d_sae, config fields, hook_name, seed)
GOLDENS = {
    "standard": (StandardSAE, StandardSAEConfig, TINY_D_MODEL, 64, {}, "blocks.2.hook_resid_post", 1),
    "standard-layer-norm": (
        StandardSAE, StandardSAEConfig, TINY_D_MODEL, 64, {"normalize_activations": "layer_norm"}, "blocks.2.hook_resid_post", 2,
    ),
    "topk": (TopKSAE, TopKSAEConfig, TINY_D_MODEL, 64, {"k": 8}, "blocks.2.hook_resid_post", 3),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, TINY_D_MODEL, 64, {}, "blocks.3.hook_resid_pre", 4),
    "gated": (GatedSAE, GatedSAEConfig, TINY_D_MODEL, 64, {}, "blocks.2.hook_resid_post", 5),
    # small ones for what routesae folds or refuses
    "standard-no-input-bias": (StandardSAE, StandardSAEConfig, 16, 24, {"apply_b_dec_to_input": False}, "blocks.1.hook_resid_post", 6),
    "gated-no-input-bias": (GatedSAE, GatedSAEConfig, 16, 24, {"apply_b_dec_to_input": False}, "blocks.1.hook_resid_post", 7),
    "topk-rescaled": (TopKSAE, TopKSAEConfig, 16, 24, {"k": 4, "rescale_acts_by_decoder_norm": True}, "blocks.1.hook_resid_post", 8),
    "abstopk": (AbsTopKSAE, AbsTopKSAEConfig, 16, 24, {"k": 4}, "blocks.1.hook_resid_post", 9),
}


@torch.no_grad()
def randomize(sae: SAE, generator: torch.Generator) -> None:
    """Seeded weights with every tensor non-trivial (biases included), and positive JumpReLU thresholds."""
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    for name, param in sae.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if name == "W_enc":
            param.copy_(noise / d_in**0.5)
        elif name == "W_dec":
            param.copy_(noise / d_sae**0.5)
        elif name == "threshold":
            param.copy_(0.1 + 0.4 * torch.rand(param.shape, generator=generator))
        else:
            param.copy_(0.1 * noise)


def activations(d_in: int, generator: torch.Generator) -> torch.Tensor:
    """Tokens with their own mean and scale, so a per-token normalisation has something to do."""
    scale = 0.5 + 3.5 * torch.rand(TOKENS, 1, generator=generator)
    offset = torch.rand(TOKENS, 1, generator=generator) * 2 - 1
    return torch.randn(TOKENS, d_in, generator=generator) * scale + offset


def main() -> None:
    (ROOT / "reference").mkdir(exist_ok=True)
    for name, (sae_cls, cfg_cls, d_in, d_sae, fields, hook_name, seed) in GOLDENS.items():
        generator = torch.Generator().manual_seed(seed)
        sae = sae_cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=metadata(hook_name), **fields))
        randomize(sae, generator)
        directory = ROOT / name
        shutil.rmtree(directory, ignore_errors=True)
        sae.save_model(directory)
        loaded = SAE.load_from_disk(directory)  # what a user of sae-lens gets from the directory
        acts = activations(d_in, generator)
        with torch.no_grad():
            tensors = {"acts": acts, "feature_acts": loaded.encode(acts), "sae_out": loaded(acts)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, ROOT / "reference" / f"{name}.safetensors")
        print(f"{name}: {type(loaded).__name__}, d_in {d_in}, d_sae {d_sae}")
    versions = {
        "sae_lens": sae_lens.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    (ROOT / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(json.dumps(versions))


if __name__ == "__main__":
    main()
