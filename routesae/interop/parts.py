"""A RouteSAE's parts in routesae's own format (``routesae export DIR --format routesae-parts``).

SAELens hosts SAEs that read one hook and reconstruct it; a RouteSAE reads a range of blocks,
routes each token to one of them and splices its reconstruction there, so no SAELens directory
can hold it as a whole. What can travel are its parts: the inner single-layer SAE (a routesae
checkpoint), the router's weights and the per-block statistics, with a README that says how they
combine and why SAELens cannot host them together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routesae.architectures.base import SAE
from routesae.files import write_json, write_safetensors, write_text
from routesae.interop.base import Exporter
from routesae.version import __version__

INNER_DIR = "inner"
ROUTER_FILE = "router.safetensors"
STATISTICS_FILE = "statistics.json"
README_FILE = "README.md"

README = """# {name}: the parts of a RouteSAE

routesae exported this routed SAE (RouteSAE, Shi et al. 2025) as its parts.
**SAELens cannot host a routed SAE as a whole**: a SAELens SAE reads one hook and reconstructs it,
while this one reads blocks {first}..{last} of `{model}` and chooses, per token, the block whose
activation it encodes and where its reconstruction goes. The parts, in routesae's own formats:

- `{inner}/`: the inner `{inner_arch}` SAE ({latent_size} latents on d_model {d_model}), a routesae
  checkpoint (`routesae.load_sae("{inner}")`). It encodes *routed* vectors, not one block's
  activations, so it is not an SAE of any single hook and must not be spliced on its own.
- `{router}`: the router, `router_weight_LD` ({n_layers} x {d_model}), bias-free.
- `{statistics}`: the routed blocks and their hooks, the routing counts of training, the router
  rule, the aggregation and the normalisation, the model and the data.

How they combine, per token (x_l = the `{normalize}` normalisation of block l's output, {first} <= l <= {last}):

    v = {aggregate} over l of x_l;   p = softmax(router_weight_LD v)
    {rule}
    z = inner.encode(x_route),  x_hat = inner.decode(z)

For splicing, routesae reconstructs x_(i*) itself (i* = argmax p), unscaled, and maps it back to the
residual stream with that block's mean and std. Exported by routesae {version}.
"""

RULES = {
    "hard": "i* = argmax p;   x_route = p_(i*) x_(i*)",
    "soft": "x_route = sum over l of p_l x_l",
}


class RouteSAEParts(Exporter):
    """RouteSAE -> inner SAE + router + statistics + README (see the module docstring)."""

    format = "routesae-parts"
    architecture = "routesae"

    def export(self, sae: SAE, config: dict[str, Any], out: Path) -> None:
        from routesae.checkpoint import save_sae  # checkpoint imports interop, not the reverse at import time

        name = config.get("name", sae.name)
        layers = list(sae.layers)
        statistics = {
            "routesae_version": __version__,
            "name": name,
            "layers": layers,
            "hooks": config.get("hooks", []),
            "router": sae.cfg.router,
            "aggregate": sae.cfg.aggregate,
            "normalize": sae.cfg.normalize,
            "inner": sae.cfg.inner,
            "statistics": sae.statistics(),
            "model": config.get("model"),
            "data": config.get("data"),
        }
        write_safetensors(out / ROUTER_FILE, {"router_weight_LD": sae.router.weight}, {"layers": ",".join(map(str, layers))})
        write_json(out / STATISTICS_FILE, statistics)
        save_sae(sae.sae, out / INNER_DIR, {"name": f"{name}-inner", "inner_of": name, "layers": []})
        model = (config.get("model") or {}).get("spec", "?")
        write_text(
            out / README_FILE,
            README.format(
                name=name,
                first=layers[0],
                last=layers[-1],
                model=model,
                inner=INNER_DIR,
                inner_arch=sae.cfg.inner,
                latent_size=sae.cfg.latent_size,
                d_model=sae.d_model,
                router=ROUTER_FILE,
                n_layers=len(layers),
                statistics=STATISTICS_FILE,
                normalize=sae.cfg.normalize,
                aggregate=sae.cfg.aggregate,
                rule=RULES.get(sae.cfg.router, f"x_route = the {sae.cfg.router!r} router's choice"),
                version=__version__,
            ),
        )
