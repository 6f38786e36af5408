"""``routesae compare``: the routing claim under controls, from one harvest, with error bars and figures.

RouteSAE beats a TopK SAE on the top block of its range, but its router sends many tokens to the
bottom of the range, where the residual stream is simpler: is routing more than reading an earlier
block? This trains, from ONE activation cache, for every k and seed of the grid:

* ``routed/`` (one run): RouteSAE with each router of ``routers`` (``hard`` is the method; ``random``
  and ``uniform`` are controls that learn no routing), the MLSAE (one TopK dictionary over every
  block of the range) and TopK on the top block;
* ``at-blocks/`` (a second run from the same cache, once the first has shown where the hard router
  sends tokens): TopK, and RouteSAE with the ``fixed`` router, at every block that received at least
  ``min_share`` of the hard RouteSAEs' routed tokens: what reading that block alone achieves, with
  and without RouteSAE's pipeline around it.

Then it evaluates them all in one pass (the MLSAE one block at a time), extracts contexts at the
``scaled`` threshold and at the configured rule (the files left on disk are the latter's), and
writes ``comparison.json`` (every SAE's numbers, and their mean and standard deviation over seeds
per family and k) and the figures of :mod:`routesae.comparison_figures`.

Seeds change the SAEs' initialisation only: every SAE is initialised from (the run's seed, its
name), and the names differ by ``-sS``; all of them read the same batches in the same order, which
is what lets one harvest feed the grid. The cache makes the language model run once per batch for
the whole grid, however many SAEs and phases there are. Every step resumes: a finished cache or run
with the same settings is kept, an interrupted one continued.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routesae.activations import HarvestConfig
from routesae.architectures.base import default_layer_range, parse_layer_range
from routesae.cache import ActivationCache, CacheConfig, CacheDtype, cache_activations
from routesae.comparison_figures import COMPARISON_FILE, FIGURES_DIR, FORMAT, seed_statistics, write_figures
from routesae.config import Config, setting
from routesae.contexts import ContextsConfig, extract_contexts
from routesae.errors import ConfigError
from routesae.evaluate import EvaluateConfig, evaluate
from routesae.files import read_json, write_json
from routesae.lm import LanguageModel
from routesae.locks import writing
from routesae.pipeline import train_or_continue
from routesae.reporters.console import stderr_console
from routesae.rundir import CONFIG_FILE, MANIFEST_FILE
from routesae.specs import SAESpec
from routesae.train_config import TrainConfig, compare_requests, run_request
from routesae.version import __version__

FORMAT_VERSION = 1
CACHE_DIR = "activations"
ROUTED_RUN = "routed"
BLOCKS_RUN = "at-blocks"
METHOD_ROUTER = "hard"  # the router whose routing decides which single blocks the grid reads
STEPS = ("cache", "train routed", "train at blocks", "evaluate", "contexts", "comparison")


@dataclass
class CompareConfig(Config):
    """The grid ``routesae compare`` trains and how it judges it; training settings are a :class:`TrainConfig`."""

    k: tuple[int, ...] = setting((16, 32, 64), "TopK k of every SAE in the grid, one SAE per value.")
    seeds: tuple[int, ...] = setting((0, 1, 2), "Seeds: one SAE per seed for every family and k (initialisation only).")
    layers: str | None = setting(
        None, "The routed range A:B (0-based, inclusive). Default: the reference's floor(n/4)-1 : floor(3n/4)-1."
    )
    latent_size: int = setting(4096, "Latents of every SAE in the grid.")
    routers: tuple[str, ...] = setting(
        ("hard", "random", "uniform"),
        "RouteSAE routers on the routed range: 'hard' is the method and decides the single blocks; the others are controls.",
    )
    mlsae: bool = setting(True, "Train the MLSAE baseline (one TopK dictionary over every block of the range).")
    min_share: float = setting(
        0.05, "Train TopK and fixed-router RouteSAEs at every block that gets at least this share of the hard router's tokens."
    )
    metrics: tuple[str, ...] = setting(
        ("kldiv", "normmse", "deltace", "l0", "dead_eval", "fvu", "cosine"),
        "Metrics to evaluate (see `routesae plugins`); 'recovered' costs two more forwards per SAE and batch.",
    )
    cache_dtype: CacheDtype = setting("bfloat16", "Storage dtype of the one activation cache the grid trains from (see `routesae cache`).")
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig, metadata={"help": "Evaluation of every SAE of the grid."})
    contexts: ContextsConfig = field(default_factory=ContextsConfig, metadata={"help": "Contexts of every SAE of the grid."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.k or not self.seeds:
            raise ConfigError("compare needs at least one k and one seed (--k 16,32,64 --seeds 0,1,2)")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.k)) != len(self.k):
            raise ConfigError(f"k {list(self.k)} and seeds {list(self.seeds)} must not repeat a value")
        if not 0 < self.min_share <= 1:
            raise ConfigError(f"min-share must be in (0, 1], got {self.min_share}")
        if self.layers is not None:
            parse_layer_range(self.layers)

    def threshold_rules(self) -> list[str | float]:
        """The contexts thresholds features are counted at: ``scaled``, then the configured rule (its files stay)."""
        return list(dict.fromkeys(["scaled", self.contexts.threshold]))


@dataclass(frozen=True)
class GridSAE:
    """One SAE of the grid: its spec and where it sits in the comparison."""

    spec: SAESpec
    run: str
    family: str
    k: int
    seed: int
    block: int | None = None
    router: str | None = None


def routed_grid(cfg: CompareConfig, layers: str, top: int) -> list[GridSAE]:
    """The first run: RouteSAE with each router, the MLSAE, TopK on the top block; per k and seed."""
    grid = []
    for k in cfg.k:
        for seed in cfg.seeds:
            common = {"latent_size": cfg.latent_size, "k": k}
            for router in cfg.routers:
                family = "routesae" if router == METHOD_ROUTER else f"routesae-{router}"
                spec = SAESpec.build("routesae", f"routesae-{router}-k{k}-s{seed}", layers=layers, router=router, **common)
                grid.append(GridSAE(spec, ROUTED_RUN, family, k, seed, router=router))
            if cfg.mlsae:
                grid.append(GridSAE(SAESpec.build("mlsae", f"mlsae-k{k}-s{seed}", layers=layers, **common), ROUTED_RUN,
                                    "mlsae", k, seed))
            grid.append(GridSAE(SAESpec.build("topk", f"topk-L{top}-k{k}-s{seed}", layer=top, **common), ROUTED_RUN,
                                f"topk@{top}", k, seed, block=top))
    return grid


def block_grid(cfg: CompareConfig, layers: str, top: int, blocks: Sequence[int]) -> list[GridSAE]:
    """The second run: at each of ``blocks``, TopK (the top block's is in the first run) and fixed-router RouteSAE."""
    grid = []
    for k in cfg.k:
        for seed in cfg.seeds:
            common = {"latent_size": cfg.latent_size, "k": k}
            for block in blocks:
                if block != top:
                    grid.append(GridSAE(SAESpec.build("topk", f"topk-L{block}-k{k}-s{seed}", layer=block, **common),
                                        BLOCKS_RUN, f"topk@{block}", k, seed, block=block))
                spec = SAESpec.build("routesae", f"routesae-fixed-L{block}-k{k}-s{seed}", layers=layers, router="fixed",
                                     route_block=block, **common)
                grid.append(GridSAE(spec, BLOCKS_RUN, f"routesae-fixed@{block}", k, seed, block=block, router="fixed"))
    return grid


def routing_shares(run_dir: Path, saes: Sequence[GridSAE]) -> dict[int, float]:
    """Each block's share of the tokens the hard-routed RouteSAEs of ``saes`` routed in training, pooled over the grid."""
    totals: dict[int, float] = {}
    for s in saes:
        if s.router == METHOD_ROUTER:
            for block, count in _routing_counts(read_json(run_dir / s.spec.name / CONFIG_FILE)).items():
                totals[int(block)] = totals.get(int(block), 0.0) + count
    return {int(block): share for block, share in sorted((_shares(totals) or {}).items())}


def _routing_counts(config: dict[str, Any]) -> dict[str, float]:
    """A routed SAE's training routing counts by block (``config.json``), empty for any other SAE."""
    return config.get("training", {}).get("statistics", {}).get("routing_counts") or {}


def _shares(counts: dict[Any, float]) -> dict[Any, float] | None:
    """Counts as shares of their sum; None when nothing was counted."""
    whole = sum(counts.values())
    return {block: count / whole for block, count in counts.items()} if whole else None


def sae_record(s: GridSAE, directory: Path, evaluation: dict[str, Any], features: dict[str, int | None]) -> dict[str, Any]:
    """One SAE's entry of ``comparison.json`` (the schema: docs/compare.md)."""
    details = evaluation.get("details", {})
    by_block: dict[str, dict[str, float]] = {}
    for metric in ("normmse", "kldiv"):
        for block, entry in details.get(f"{metric}_by_routed_block", {}).items():
            by_block.setdefault(block, {"tokens": entry["tokens"]})[metric] = entry["mean"]
    per_block = evaluation.get("per_block")
    density = details.get("latent_density")
    if density is None and per_block:  # the MLSAE: every block's firings on the same tokens, summed
        densities = [b["details"]["latent_density"] for b in per_block.values() if "latent_density" in b.get("details", {})]
        density = _summed_density(densities) if densities else None
    return {
        "name": s.spec.name,
        "run": s.run,
        "family": s.family,
        "architecture": s.spec.architecture,
        "router": s.router,
        "k": s.k,
        "seed": s.seed,
        "block": s.block,
        "metrics": evaluation["metrics"],
        "per_block": {b: {k: v for k, v in m.items() if k != "details"} for b, m in per_block.items()} if per_block else None,
        "by_routed_block": by_block or None,
        "routing_shares": _shares(_routing_counts(read_json(directory / CONFIG_FILE))),
        "features": features or None,
        "latent_density": density,
    }


def _summed_density(densities: list[dict[str, Any]]) -> dict[str, Any]:
    first = densities[0]
    return {
        "tokens": sum(d["tokens"] for d in densities),
        "log10_edges": first["log10_edges"],
        "latents": [sum(column) for column in zip(*(d["latents"] for d in densities))],
        "never_fired": sum(d["never_fired"] for d in densities),
    }


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per family and k: the mean and (sample) standard deviation over seeds of every metric and feature count."""
    summary = []
    for family, k in dict.fromkeys((r["family"], r["k"]) for r in records):
        group = [r for r in records if r["family"] == family and r["k"] == k]
        metrics = {name: seed_statistics([r["metrics"].get(name) for r in group]) for name in group[0]["metrics"]}
        rules = {rule for r in group for rule in (r["features"] or {})}
        features = {rule: seed_statistics([(r["features"] or {}).get(rule) for r in group]) for rule in sorted(rules)}
        summary.append({"family": family, "k": k, "n": len(group), "metrics": metrics, "features": features or None})
    return summary


def compare(
    out: Path | str,
    cfg: CompareConfig | None = None,
    train_cfg: TrainConfig | None = None,
    *,
    overwrite: bool = False,
    reporters: Sequence[str] = ("console",),
    lm: LanguageModel | None = None,
) -> dict[str, Any]:
    """Train, evaluate and compare the grid of :class:`CompareConfig` into ``out``; returns ``comparison.json``'s record.

    ``train_cfg`` gives the model, data and optimisation (its ``from_cache`` names an existing cache
    to use instead of harvesting one into ``out/activations``); ``lm``: that model, already loaded.

    >>> compare("runs/controls", CompareConfig(k=(32,), seeds=(0, 1)), TrainConfig(tokens=650_000))
    """
    cfg, train_cfg, out = cfg or CompareConfig(), train_cfg or TrainConfig(), Path(out)
    with writing(out, "compare"):
        return _Comparison(out, cfg, train_cfg, overwrite, list(reporters)).run(lm)


class _Comparison:
    """The steps of :func:`compare`, each announced with a header as the pipeline's stages are."""

    def __init__(self, out: Path, cfg: CompareConfig, train_cfg: TrainConfig, overwrite: bool, reporters: list[str]) -> None:
        self.out, self.cfg, self.train_cfg, self.overwrite, self.reporters = out, cfg, train_cfg, overwrite, reporters
        self.console = stderr_console()
        self.step = 0

    def header(self, text: str) -> None:
        self.step += 1
        self.console.rule(f"compare {self.step}/{len(STEPS)}: {text}", align="left", style="bold")

    def run(self, lm: LanguageModel | None) -> dict[str, Any]:
        train_cfg = self.train_cfg
        self.header(STEPS[0])
        if train_cfg.from_cache:
            cache = Path(train_cfg.from_cache)
            self.console.print(f"training from the cache {cache}", highlight=False)
        else:
            lm = lm or LanguageModel.load(train_cfg.model, device=train_cfg.resolved_device())
            first, last = self._range(lm.n_layers)
            cache = cache_activations(self.out / CACHE_DIR, self._cache_config(), range(first, last + 1), lm=lm,
                                      overwrite=self.overwrite)
        activations = ActivationCache(cache)
        cached = TrainConfig.for_cache(activations, **{k: v for k, v in train_cfg.to_dict().items() if k != "from_cache"})
        first, last = self._range(activations.model.n_layers)
        layers = f"{first}:{last}"

        self.header(STEPS[1])
        routed = routed_grid(self.cfg, layers, last)
        self._refuse_another_grid(ROUTED_RUN, routed, cached, "its SAEs come from --k, --seeds, --routers and --mlsae")
        train_or_continue([s.spec for s in routed], self.out / ROUTED_RUN, cached, overwrite=self.overwrite,
                          reporters=self.reporters)
        shares = routing_shares(self.out / ROUTED_RUN, routed)
        blocks = [b for b, share in shares.items() if share >= self.cfg.min_share] or [last]

        self.header(STEPS[2])
        self.console.print(f"blocks with at least {self.cfg.min_share:.0%} of the hard router's tokens: "
                           + ", ".join(f"{b} ({shares.get(b, 0):.0%})" for b in blocks), highlight=False)
        at_blocks = block_grid(self.cfg, layers, last, blocks)
        self._refuse_another_grid(BLOCKS_RUN, at_blocks, cached, f"its blocks ({', '.join(map(str, blocks))} here) are "
                                  f"those with at least --min-share ({self.cfg.min_share:g}) of the hard router's tokens")
        train_or_continue([s.spec for s in at_blocks], self.out / BLOCKS_RUN, cached, overwrite=self.overwrite,
                          reporters=self.reporters)
        grid = routed + at_blocks
        directories = {s.spec.name: self.out / s.run / s.spec.name for s in grid}

        self.header(STEPS[3])
        lm = lm or LanguageModel.load(cached.model, device=cached.resolved_device())
        evaluations = evaluate([self.out / ROUTED_RUN, self.out / BLOCKS_RUN], list(self.cfg.metrics),
                               cfg=self.cfg.evaluate, lm=lm, reporters=self.reporters)

        self.header(STEPS[4])
        features: dict[str, dict[str, int]] = {s.spec.name: {} for s in grid}
        single = [directories[s.spec.name] for s in grid if s.spec.architecture != "mlsae"]
        for rule in self.cfg.threshold_rules():
            with warnings.catch_warnings():  # an SAE with no latent over a rule's threshold is a result here, counted below
                warnings.filterwarnings("ignore", message=".*: 0 interpretable latents")
                records = extract_contexts(single, self.cfg.contexts.replace(threshold=rule), lm=lm)
            for directory, record in records.items():
                features[Path(directory).name][str(rule)] = record["interpretable_latents"]
            counts = sorted(record["interpretable_latents"] for record in records.values())
            self.console.print(f"threshold {rule}: {counts[len(counts) // 2]:,} interpretable latents per SAE (median), "
                               f"{counts.count(0)} of {len(counts)} SAE(s) with none", highlight=False)

        self.header(STEPS[5])
        records = [sae_record(s, directories[s.spec.name], evaluations[str(directories[s.spec.name])],
                              features[s.spec.name]) for s in grid]
        comparison = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "routesae_version": __version__,
            "grid": {
                **{k: v for k, v in self.cfg.to_dict().items() if k not in ("evaluate", "contexts", "cache_dtype")},
                "layers": layers,
                "top_block": last,
                "blocks": blocks,
                "hard_router_shares": {str(b): share for b, share in shares.items()},
                "model": cached.model,
                "dataset": cached.dataset,
                "tokens": cached.tokens,
                "threshold_rules": [str(rule) for rule in self.cfg.threshold_rules()],
                "evaluate": self.cfg.evaluate.request(),
                "contexts": self.cfg.contexts.request(),
            },
            "saes": records,
            "summary": summarize(records),
        }
        figures = write_figures(comparison, self.out / FIGURES_DIR)
        comparison["figures"] = [str(path.relative_to(self.out)) for path in figures]
        write_json(self.out / COMPARISON_FILE, comparison)
        self.console.print(f"wrote {self.out / COMPARISON_FILE} and {len(figures)} figure file(s) in "
                           f"{self.out / FIGURES_DIR}", highlight=False)
        return comparison

    def _refuse_another_grid(self, run: str, grid: list[GridSAE], cfg: TrainConfig, why: str) -> None:
        """A run of another grid is refused with what to do: ``--overwrite`` would re-create the cache and both runs."""
        manifest = self.out / run / MANIFEST_FILE
        if self.overwrite or not manifest.is_file():
            return
        request = read_json(manifest).get("request", {})
        changes = compare_requests(request, run_request([s.spec for s in grid], cfg))
        if changes.resumable:  # the same grid (reused or resumed), or one train() explains itself
            return
        recorded = [sae.get("name") for sae in request.get("saes", [])]
        raise ConfigError(
            f"{self.out / run} holds SAEs of another grid ({len(recorded)} SAEs: {', '.join(map(str, recorded[:4]))}"
            f"{', ...' if len(recorded) > 4 else ''}); {why}. Remove {self.out / run} to train this grid's there "
            f"(the activation cache and the other run are kept), give the settings that grid had, or choose another "
            f"--out; --overwrite would re-create the activation cache too"
        )

    def _range(self, n_layers: int) -> tuple[int, int]:
        first, last = default_layer_range(n_layers) if self.cfg.layers is None else parse_layer_range(self.cfg.layers)
        if last >= n_layers:
            raise ConfigError(f"--layers {self.cfg.layers}: the model has {n_layers} blocks, numbered 0 to {n_layers - 1}")
        return first, last

    def _cache_config(self) -> CacheConfig:
        """The cache of what the training settings would harvest (so training from it reads the same batches)."""
        harvest = {f.name: getattr(self.train_cfg, f.name) for f in dataclasses.fields(HarvestConfig)}
        return CacheConfig.from_dict({**harvest, "dtype": self.cfg.cache_dtype})
