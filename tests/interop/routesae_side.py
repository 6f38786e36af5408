"""routesae's half of ``make interop``, run by routesae's Python (sae-lens cannot live beside it).

``saelens_live.py`` runs in a virtualenv with the real sae-lens and calls this script for what routesae does:

    python routesae_side.py export WORK     routesae SAEs -> WORK/routesae/*, exported to WORK/saelens/*, with
                                            routesae's outputs on seeded activations in WORK/routesae-out/*
    python routesae_side.py import WORK     SAELens SAEs in WORK/native/* read by routesae: outputs in
                                            WORK/native-routesae-out/*, exported again to WORK/native-again/*
    python routesae_side.py compare WORK A B    routesae checkpoints A and B (relative to WORK) are one SAE:
                                            exact tensors and config; prints JSON of any difference
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from routesae import export_sae, load_sae
from routesae.checkpoint import save_sae
from routesae.interop.saelens import LOCAL_KEYS
from routesae.plugins import get_plugin_manager

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for its helpers
from random_saes import random_sae

D_MODEL, LATENTS, TOKENS = 48, 96, 64
CASES = {  # name -> (architecture, settings); each with normalize none and layer_norm
    "vanilla": ("vanilla", {}),
    "topk": ("topk", {"k": 8, "relu": True}),
    "jumprelu": ("jumprelu", {}),
    "gated": ("gated", {}),
    "batchtopk": ("batchtopk", {"k": 8}),  # the example plugin, when it is installed
}
META = {
    "model": {"spec": "interop-model", "d_model": D_MODEL},
    "data": {"source": "interop-corpus", "text_field": "text", "context_length": 128, "has_bos": False, "keep_bos": False},
    "training": {"seed": 0},
}


def activations(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = 0.5 + 3 * torch.rand(TOKENS, 1, generator=g)
    return torch.randn(TOKENS, d, generator=g) * scale + torch.rand(TOKENS, 1, generator=g)


def calibrated_random_sae(arch: str, settings: dict, normalize: str, seed: int):
    sae = random_sae(arch, settings, normalize, d=D_MODEL, latent_size=LATENTS, layer=3, n_layers=8, seed=seed)
    if arch == "batchtopk":  # calibrated, as after training
        with torch.no_grad():
            sae.threshold.fill_(0.25)
            sae.threshold_count.fill_(3)
    return sae


def outputs(sae, acts: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = sae(acts[:, None])
        ((_, (x_hat, _)),) = sae.reconstruction(out).items()
    return {"acts": acts, "latents": out.latents, "x_hat": x_hat}


def export(work: Path) -> None:
    cases = {}
    installed = get_plugin_manager().names("architecture")
    for seed, (case, (arch, settings)) in enumerate(CASES.items()):
        if arch not in installed:
            continue
        for normalize in ("none", "layer_norm"):
            name = f"{case}-{normalize}"
            sae = calibrated_random_sae(arch, settings, normalize, seed)
            save_sae(sae, work / "routesae" / name, {"name": name, **META})
            if name == "topk-none":  # one through the command line, as a user would
                command = [sys.executable, "-m", "routesae", "export", str(work / "routesae" / name), "--format",
                           "saelens", "--out", str(work / "saelens" / name)]
                subprocess.run(command, check=True)
            else:
                export_sae(work / "routesae" / name, work / "saelens" / name)
            (work / "routesae-out").mkdir(exist_ok=True)
            save_file(outputs(sae, activations(D_MODEL, seed)), work / "routesae-out" / f"{name}.safetensors")
            cases[name] = arch
    (work / "cases.json").write_text(json.dumps(cases, indent=2))


def import_(work: Path) -> None:
    (work / "native-routesae-out").mkdir(exist_ok=True)
    for directory in sorted((work / "native").iterdir()):
        sae, config = load_sae(directory)
        acts = load_file(work / "native-out" / f"{directory.name}.safetensors")["acts"]
        save_file(outputs(sae, acts), work / "native-routesae-out" / f"{directory.name}.safetensors",
                  {"architecture": config["architecture"]})
        export_sae(directory, work / "native-again" / directory.name)


def compare(work: Path, a: str, b: str) -> None:
    sae_a, config_a = load_sae(work / a)
    sae_b, config_b = load_sae(work / b)
    state_a, state_b = sae_a.state_dict(), sae_b.state_dict()
    differences = sorted(k for k in state_a.keys() | state_b.keys() if k not in state_a or k not in state_b
                         or not torch.equal(state_a[k], state_b[k]))
    keys = (config_a.keys() | config_b.keys()) - set(LOCAL_KEYS)
    differences += sorted(f"config.{k}" for k in keys if config_a.get(k) != config_b.get(k))
    if type(sae_a) is not type(sae_b):
        differences.append(f"class {type(sae_a).__name__} != {type(sae_b).__name__}")
    print(json.dumps(differences))


if __name__ == "__main__":
    command, work, *rest = sys.argv[1:]
    {"export": export, "import": import_, "compare": compare}[command](Path(work), *rest)
