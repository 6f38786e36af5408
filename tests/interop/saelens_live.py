"""``make interop``: the round trip both ways with the real sae-lens, which cannot live in routesae's environment.

Run in a virtualenv with sae-lens (``make interop`` builds ``.venv-interop``); routesae's own Python does
routesae's half through ``routesae_side.py`` (``--routesae-python``, default ``.venv/bin/python``):

1. routesae -> SAELens: routesae SAEs of every exportable architecture (the example plugin's too, if
   installed), normalize none and layer_norm, are exported; ``sae_lens.SAE.load_from_disk`` must load
   each as the expected class and reconstruct the same activations as routesae (max abs difference
   <= 1e-5 x the activation's norm, token by token), with the same latents firing. Read back, each is the
   SAE that was exported, bit for bit; and after a load + ``save_model`` in sae-lens, still the same SAE
   but for what only ``routesae_exact.safetensors`` held, which sae-lens does not carry along (JumpReLU's
   log θ, then exact up to float rounding; BatchTopK's count of threshold updates).
2. SAELens -> routesae: sae-lens SAEs of every architecture routesae reads, seeded, are saved with
   ``save_model``; routesae must reconstruct as sae-lens does, and its export of them must load in
   sae-lens with the same tensors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import sae_lens
import torch
from sae_lens import SAE
from sae_lens.registry import get_sae_class
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
# routesae architecture -> the sae-lens class its export loads as
EXPECTED_CLASS = {"vanilla": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE", "gated": "GatedSAE",
                  "batchtopk": "JumpReLUSAE"}
NATIVE = {"standard": {}, "topk": {"k": 8}, "jumprelu": {}, "gated": {}}  # sae-lens architecture -> config fields
ULPS = 4 * torch.finfo(torch.float32).eps
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)


def within_rule(ours: torch.Tensor, theirs: torch.Tensor, acts: torch.Tensor) -> tuple[bool, float]:
    """The issue's rule, and the largest difference as a share of its tolerance."""
    share = ((ours - theirs).abs() / (1e-5 * acts.norm(dim=-1, keepdim=True))).max().item()
    return share <= 1.0, share


def routesae(python: str, *args: str) -> str:
    result = subprocess.run([python, str(HERE / "routesae_side.py"), *args], check=True, capture_output=True, text=True)
    return result.stdout


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        torch.equal(a[k], b[k]) or (k == "threshold" and torch.allclose(a[k], b[k], rtol=ULPS, atol=0)) for k in a
    )


def routesae_to_saelens(python: str, work: Path) -> None:
    print("routesae -> SAELens")
    routesae(python, "export", str(work))
    cases = json.loads((work / "cases.json").read_text())
    for name, arch in cases.items():
        sae = SAE.load_from_disk(work / "saelens" / name)
        ref = load_file(work / "routesae-out" / f"{name}.safetensors")
        with torch.no_grad():
            z, out = sae.encode(ref["acts"]), sae(ref["acts"])
        ok, share = within_rule(ref["x_hat"], out, ref["acts"])
        check(type(sae).__name__ == EXPECTED_CLASS[arch], f"{name}: sae-lens loads it as {type(sae).__name__}")
        check(ok, f"{name}: same reconstructions ({share:.3f} of the tolerance)")
        check(bool(((z != 0) == (ref["latents"] != 0)).all()) and torch.allclose(z, ref["latents"], atol=1e-5),
              f"{name}: same latents")
        exact = json.loads(routesae(python, "compare", str(work), f"routesae/{name}", f"saelens/{name}"))
        check(exact == [], f"{name}: read back by routesae, bit for bit {exact or ''}")
        sae.save_model(work / "resaved" / name)  # through sae-lens and out again
        resaved = json.loads(routesae(python, "compare", str(work), f"routesae/{name}", f"resaved/{name}"))
        # what only routesae_exact.safetensors held, which sae-lens does not carry along: back up to float rounding
        # (JumpReLU's log θ, the SAELens θ being exact) or at its default (BatchTopK's count of θ updates)
        expected = {"jumprelu": ["log_threshold"], "batchtopk": ["threshold_count"]}.get(arch, [])
        check(set(resaved) <= set(expected), f"{name}: after sae-lens's save_model, the same SAE {resaved or ''}")


def saelens_to_routesae(python: str, work: Path) -> None:
    print("SAELens -> routesae")
    for seed, (name, fields) in enumerate(NATIVE.items()):
        cls, cfg_cls = get_sae_class(name)
        for normalize in ("none", "layer_norm"):
            case = f"{name}-{normalize}"
            g = torch.Generator().manual_seed(100 + seed)
            metadata = SAEMetadata(model_name="interop-model", hook_name="blocks.3.hook_resid_post", context_size=128)
            sae = cls(cfg_cls(d_in=48, d_sae=96, normalize_activations=normalize, metadata=metadata, **fields))
            with torch.no_grad():
                for pname, p in sae.named_parameters():
                    noise = torch.randn(p.shape, generator=g)
                    p.copy_(0.1 + 0.4 * noise.abs() if pname == "threshold" else noise * (0.15 if pname.startswith("W") else 0.1))
            sae.save_model(work / "native" / case)
            acts = torch.randn(64, 48, generator=g) * (0.5 + 3 * torch.rand(64, 1, generator=g))
            with torch.no_grad():
                loaded = SAE.load_from_disk(work / "native" / case)
                (work / "native-out").mkdir(exist_ok=True)
                save_file({"acts": acts, "feature_acts": loaded.encode(acts), "sae_out": loaded(acts)},
                          work / "native-out" / f"{case}.safetensors")
    routesae(python, "import", str(work))
    for case in sorted(p.name for p in (work / "native").iterdir()):
        theirs = load_file(work / "native-out" / f"{case}.safetensors")
        ours = load_file(work / "native-routesae-out" / f"{case}.safetensors")
        ok, share = within_rule(ours["x_hat"], theirs["sae_out"], theirs["acts"])
        check(ok, f"{case}: routesae reconstructs as sae-lens ({share:.3f} of the tolerance)")
        check(bool(((ours["latents"] != 0) == (theirs["feature_acts"] != 0)).all()), f"{case}: the same latents fire")
        again = SAE.load_from_disk(work / "native-again" / case)
        original = load_file(work / "native" / case / "sae_weights.safetensors")
        check(same_tensors(again.state_dict(), original), f"{case}: exported again, sae-lens loads the same tensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routesae-python", default=".venv/bin/python", help="a Python with routesae installed")
    args = parser.parse_args()
    print(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="routesae-interop-") as tmp:
        routesae_to_saelens(args.routesae_python, Path(tmp))
        saelens_to_routesae(args.routesae_python, Path(tmp))
    if failures:
        print(f"{len(failures)} check(s) failed:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("interop: every check passed")


if __name__ == "__main__":
    main()
