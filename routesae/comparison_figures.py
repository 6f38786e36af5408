"""The figures of ``routesae compare``: one picture per question the comparison asks, from ``comparison.json`` alone.

Each figure is drawn from the comparison file, never from checkpoints, so it can be redrawn
(``python -m routesae.comparison_figures DIR``) after the file is edited or merged, and it shows
exactly the numbers the report's summary table shows. Figures are written as SVG (for the report,
which embeds it inline, and for papers) and PNG (for slides and chat), atomically, and
byte-for-byte reproducibly: the same file gives the same bytes, so a figure in version control
changes only when its data does.

A value a stage did not produce (null or NaN) is a point left out; a figure with no point at all is
not written, and an older file of that name is removed so ``figures/`` never shows stale data.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from routesae.errors import RouteSAEError
from routesae.files import atomic_write, read_json

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn: `import routesae` (every CLI start) skips its 0.5 s
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

COMPARISON_FILE = "comparison.json"
FIGURES_DIR = "figures"
FORMAT = "routesae-comparison"
FORMATS = ("svg", "png")
PNG_DPI = 150
RC = {
    "svg.fonttype": "none",  # text stays text: searchable, selectable, and small
    "text.parse_math": False,  # a '$' in a label is a dollar sign, not a TeX error
    "font.size": 9,
    "axes.titlesize": 10,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
}

# Fixed colours per family so a family looks the same in every figure; the `@B` families get one shade per block.
FAMILY_ORDER = ("routesae", "routesae-random", "routesae-uniform", "routesae-fixed", "mlsae", "topk")
FAMILY_SHADES = {
    "routesae": ("#2456c7",),
    "routesae-random": ("#8a8f99",),
    "routesae-uniform": ("#b06a00",),
    "routesae-fixed": ("#7240b3", "#b48fe0", "#4a1f80", "#d4548a"),
    "mlsae": ("#c0392b",),
    "topk": ("#2c7a4b", "#6cc08e", "#0f8a8a", "#16452a"),
}
OTHER_SHADES = ("#555555", "#999999", "#333333")
K_SHADES = ("#9db8ef", "#5a86e0", "#2456c7", "#163a8a", "#0b1f4d")  # routing_per_k: one blue per k, light to dark


# -- reading the comparison ---------------------------------------------------------------------------------------
def read_comparison(path: Path) -> dict[str, Any]:
    """``comparison.json``, checked to be one (a report must say what is wrong, not draw nonsense)."""
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise RouteSAEError(f"{path} is not a routesae comparison file (format {found!r})")
    if not isinstance(doc.get("saes"), list) or not isinstance(doc.get("summary"), list):
        raise RouteSAEError(f"{path} has no 'saes' and 'summary' lists")
    return doc


def mapping(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else empty: a stage that did not run leaves null (or NaN) where one belongs."""
    return value if isinstance(value, dict) else {}


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def family_key(family: str) -> tuple[int, float, str]:
    """Sort key: the order of FAMILY_ORDER, then the block of an `@B` family, so tables and legends read alike."""
    base, _, block = family.partition("@")
    rank = FAMILY_ORDER.index(base) if base in FAMILY_ORDER else len(FAMILY_ORDER)
    return rank, float(block) if block.isdigit() else -1.0, family


def family_colours(families: Iterable[str]) -> dict[str, str]:
    """A colour per family: fixed per base family, shades in block order for the `@B` ones."""
    ordered = sorted(set(families), key=family_key)
    colours, used = {}, {}
    for family in ordered:
        base = family.partition("@")[0]
        shades = FAMILY_SHADES.get(base, OTHER_SHADES)
        colours[family] = shades[used.get(base, 0) % len(shades)]
        used[base] = used.get(base, 0) + 1
    return colours


def _families(comparison: dict[str, Any]) -> list[str]:
    names = [s.get("family") for s in comparison["saes"]] + [s.get("family") for s in comparison["summary"]]
    return sorted({n for n in names if isinstance(n, str)}, key=family_key)


def _summary(comparison: dict[str, Any], family: str) -> list[dict[str, Any]]:
    """The summary rows of one family in order of k."""
    rows = [r for r in comparison["summary"] if r.get("family") == family and finite(r.get("k"))]
    return sorted(rows, key=lambda r: r["k"])


def _stat(row: dict[str, Any], section: str, name: str) -> tuple[float, float] | None:
    """(mean, std) of a summary entry, std 0 when absent; None when the mean is missing."""
    entry = mapping(mapping(row.get(section)).get(name))
    mean, std = entry.get("mean"), entry.get("std")
    return (float(mean), float(std) if finite(std) else 0.0) if finite(mean) else None


def seed_statistics(values: Iterable[Any]) -> dict[str, float] | None:
    """Mean, sample std (0 for one value) and count of the finite values, or None without any: comparison.json's
    summary over seeds, and the figures' for the per-SAE breakdowns, which have no summary row of their own."""
    kept = [float(v) for v in values if finite(v)]
    if not kept:
        return None
    return {"mean": statistics.fmean(kept), "std": statistics.stdev(kept) if len(kept) > 1 else 0.0, "n": len(kept)}


def _mean_std(values: Iterable[Any]) -> tuple[float, float] | None:
    """(mean, std) of :func:`seed_statistics`, as the plots take them."""
    stats = seed_statistics(values)
    return None if stats is None else (stats["mean"], stats["std"])


def _saes(comparison: dict[str, Any], family: str, k: Any) -> list[dict[str, Any]]:
    return [s for s in comparison["saes"] if s.get("family") == family and s.get("k") == k]


def _ks(comparison: dict[str, Any]) -> list[int]:
    grid_k = mapping(comparison.get("grid")).get("k")
    found = grid_k if isinstance(grid_k, list) else [s.get("k") for s in comparison["saes"]]
    return sorted({k for k in found if finite(k)})


# -- the figures ----------------------------------------------------------------------------------------------
def _new_figure(width: float, height: float) -> Figure:
    """A figure outside pyplot (no global state, no display; savefig renders with Agg or the SVG backend)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _pareto(comparison: dict[str, Any], metric: str, label: str) -> Figure | None:
    """A metric against L0 per family, one point per k (mean over seeds, bars = std): the sparsity trade-off."""
    fig = _new_figure(7.2, 4.4)
    ax = fig.add_subplot()
    colours = family_colours(_families(comparison))
    drawn = False
    for family in _families(comparison):
        points = [(r["k"], _stat(r, "metrics", "l0"), _stat(r, "metrics", metric)) for r in _summary(comparison, family)]
        points = [(k, x, y) for k, x, y in points if x and y and x[0] > 0]
        if not points:
            continue
        drawn = True
        ax.errorbar([x[0] for _, x, _ in points], [y[0] for _, _, y in points], xerr=[x[1] for _, x, _ in points],
                    yerr=[y[1] for _, _, y in points], marker="o", markersize=4, capsize=2, linewidth=1.2,
                    color=colours[family], label=family)
        for k, x, y in points:
            ax.annotate(f"k={k:g}", (x[0], y[0]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=colours[family])
    if not drawn:
        return None
    _log2_axis(ax)
    ax.set_xlabel("L0 (active latents per token, log scale)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} against L0 (mean ± std over seeds)")
    fig.legend(loc="outside right upper", title="family")
    return fig


def kl_vs_l0(comparison: dict[str, Any]) -> Figure | None:
    return _pareto(comparison, "kldiv", "KL divergence")


def normmse_vs_l0(comparison: dict[str, Any]) -> Figure | None:
    return _pareto(comparison, "normmse", "NormMSE")


def threshold_rules(comparison: dict[str, Any]) -> list[str]:
    """The threshold rules contexts were kept by: the grid's list, else those the summary names."""
    rules = mapping(comparison.get("grid")).get("threshold_rules")
    if isinstance(rules, list) and rules:
        return [str(r) for r in rules]
    return sorted({rule for row in comparison["summary"] for rule in mapping(row.get("features"))})


def features_vs_k(comparison: dict[str, Any]) -> Figure | None:
    """Interpretable features (latents that kept contexts) against k, a panel per threshold rule."""
    rules = threshold_rules(comparison)
    if not rules:
        return None
    fig = _new_figure(3.6 * len(rules) + 1.8, 3.8)
    axes = fig.subplots(1, len(rules), squeeze=False)[0]
    colours = family_colours(_families(comparison))
    drawn = False
    for ax, rule in zip(axes, rules):
        for family in _families(comparison):
            points = [(r["k"], _stat(r, "features", rule)) for r in _summary(comparison, family)]
            points = [(k, s) for k, s in points if s and k > 0]
            if not points:
                continue
            drawn = True
            ax.errorbar([k for k, _ in points], [s[0] for _, s in points], yerr=[s[1] for _, s in points], marker="o",
                        markersize=4, capsize=2, linewidth=1.2, color=colours[family], label=family)
        _log2_axis(ax)
        ax.set_title(f"threshold rule: {rule}")
        ax.set_xlabel("k")
    if not drawn:
        return None
    axes[0].set_ylabel("interpretable features (latents with contexts)")
    _legend(fig, axes, "family")
    return fig


def routing_per_k(comparison: dict[str, Any]) -> Figure | None:
    """Share of tokens RouteSAE (hard router) sends to each block, a bar per k (mean ± std over seeds)."""
    series: dict[int, dict[int, tuple[float, float]]] = {}
    for k in _ks(comparison):
        shares = [mapping(s.get("routing_shares")) for s in _saes(comparison, "routesae", k)]
        blocks = {int(b) for share in shares for b in share if str(b).lstrip("-").isdigit()}
        stats = {b: _mean_std(share.get(str(b)) for share in shares) for b in blocks}
        if stats := {b: s for b, s in stats.items() if s}:
            series[k] = stats
    if not series:
        return None
    blocks = sorted({b for stats in series.values() for b in stats})
    fig = _new_figure(max(5.0, 0.45 * len(blocks) + 2.5), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (k, stats) in enumerate(series.items()):
        xs = [b for b in blocks if b in stats]
        ax.bar([b - 0.4 + width * (i + 0.5) for b in xs], [stats[b][0] for b in xs], width, yerr=[stats[b][1] for b in xs],
               capsize=1.5, color=K_SHADES[i % len(K_SHADES)], label=f"k={k:g}", error_kw={"linewidth": 0.8})
    ax.set_xticks(blocks, [str(b) for b in blocks])
    ax.set_xlabel("block")
    ax.set_ylabel("share of evaluated tokens routed")
    ax.set_title("RouteSAE (hard router): routing share per block")
    fig.legend(loc="outside right upper", title="k")
    return fig


PER_BLOCK_METRICS = (("normmse", "NormMSE"), ("kldiv", "KL divergence"))
NUDGE = 0.15  # per_block: RouteSAE left of the block, TopK right of it, so neither hides the other


def per_block(comparison: dict[str, Any]) -> Figure | None:
    """RouteSAE's error on the tokens it routed to each block beside TopK SAEs trained at those blocks, per k:
    whether routing does more than reading an earlier layer would."""
    ks = _ks(comparison)
    topk = [f for f in _families(comparison) if f.startswith("topk@") and f.partition("@")[2].isdigit()]
    colours = family_colours(_families(comparison))
    if not ks:
        return None
    fig = _new_figure(3.2 * len(ks) + 1.8, 5.6)
    axes = fig.subplots(len(PER_BLOCK_METRICS), len(ks), squeeze=False, sharex=True)
    drawn = False
    for col, k in enumerate(ks):
        routed = [mapping(s.get("by_routed_block")) for s in _saes(comparison, "routesae", k)]
        blocks = sorted({int(b) for r in routed for b in r if str(b).lstrip("-").isdigit()})
        for row, (metric, label) in enumerate(PER_BLOCK_METRICS):
            ax = axes[row][col]
            stats = {b: _mean_std(mapping(r.get(str(b))).get(metric) for r in routed) for b in blocks}
            xs = [b for b in blocks if stats[b]]
            if xs:
                drawn = True
                ax.errorbar([b - NUDGE for b in xs], [stats[b][0] for b in xs], yerr=[stats[b][1] for b in xs], marker="o",
                            markersize=5, capsize=2, linestyle="none", color=FAMILY_SHADES["routesae"][0],
                            label="routesae (tokens routed to the block)")
            for family in topk:
                row_k = next((r for r in _summary(comparison, family) if r["k"] == k), None)
                stat = _stat(row_k, "metrics", metric) if row_k else None
                if stat:
                    drawn = True
                    ax.errorbar([int(family.partition("@")[2]) + NUDGE], [stat[0]], yerr=[stat[1]], marker="s", markersize=5,
                                capsize=2, linestyle="none", color=colours[family], label=f"{family} (all tokens)")
            ticks = sorted({*blocks, *(int(f.partition("@")[2]) for f in topk)})
            ax.set_xticks(ticks)
            if len(ticks) > 8:  # a routed range's every block: upright labels would run into each other
                ax.tick_params(axis="x", labelsize=7, labelrotation=90)
            if row == 0:
                ax.set_title(f"k={k:g}")
            if col == 0:
                ax.set_ylabel(label)
            if row == len(PER_BLOCK_METRICS) - 1:
                ax.set_xlabel("block")
    if not drawn:
        return None
    fig.suptitle("Per block: RouteSAE on the tokens routed there vs TopK trained there")
    _legend(fig, axes.flat, "")
    return fig


def latent_density(comparison: dict[str, Any]) -> Figure | None:
    """Per k, each family's histogram of log10 latent firing frequency (summed over seeds); dead latents in the legend."""
    ks = _ks(comparison)
    colours = family_colours(_families(comparison))
    if not ks:
        return None
    fig = _new_figure(4.0 * len(ks), 5.2)
    axes = fig.subplots(1, len(ks), squeeze=False, sharey=True)[0]
    drawn = False
    for ax, k in zip(axes, ks):
        for family in _families(comparison):
            summed = _summed_density([s.get("latent_density") for s in _saes(comparison, family, k)])
            if summed is None:
                continue
            drawn = True
            edges, counts, never = summed
            ax.stairs(counts, edges, color=colours[family], linewidth=1.3, label=f"{family} · never fired: {never:g}")
        ax.set_title(f"k={k:g}")
        ax.set_xlabel("log10 firing frequency")
        if ax.get_legend_handles_labels()[0]:  # below the panel: the histograms fill the plot area
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=7, frameon=False)
    if not drawn:
        return None
    axes[0].set_ylabel("latents (summed over seeds)")
    fig.suptitle("Latent density: how often each latent fires on the evaluated tokens")
    return fig


def _summed_density(histograms: list[Any]) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The seeds' histograms added up; a histogram on other bin edges than the first valid one is left out."""
    edges, counts, never = None, None, 0.0
    for h in histograms:
        if not isinstance(h, dict):
            continue
        e, c = h.get("log10_edges"), h.get("latents")
        if not (isinstance(e, list) and isinstance(c, list) and len(e) == len(c) + 1 and c):
            continue
        if not all(finite(v) for v in e) or not all(finite(v) for v in c):
            continue
        if edges is None:
            edges, counts = np.asarray(e, dtype=float), np.zeros(len(c))
        elif not np.array_equal(edges, np.asarray(e, dtype=float)):
            continue
        counts = counts + np.asarray(c, dtype=float)
        never += h.get("never_fired") if finite(h.get("never_fired")) else 0
    return (edges, counts, never) if edges is not None else None


def _log2_axis(ax: Axes) -> None:
    """A log2 x axis labelled 16, 32, 64 (k and L0 double along the grid), not 2^4 (math text is off)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _legend(fig: Figure, axes: Iterable[Axes], title: str) -> None:
    """One legend for all panels, each label once."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", title=title or None)


@dataclass(frozen=True)
class FigureSpec:
    name: str
    title: str
    caption: str
    draw: Callable[[dict[str, Any]], Figure | None]


FIGURES = (
    FigureSpec("kl_vs_l0", "KL divergence against L0",
               "KL divergence of the next-token distribution with the reconstruction spliced in, against L0; "
               "one point per k, mean ± std over seeds. Lower and further left is better.", kl_vs_l0),
    FigureSpec("normmse_vs_l0", "NormMSE against L0",
               "Normalised reconstruction error against L0; one point per k, mean ± std over seeds.", normmse_vs_l0),
    FigureSpec("features_vs_k", "Interpretable features against k",
               "Latents that kept contexts under each threshold rule, mean ± std over seeds (MLSAE has no contexts).",
               features_vs_k),
    FigureSpec("routing_per_k", "RouteSAE routing per block",
               "Share of evaluated tokens the hard router sends to each block, per k, mean ± std over seeds.",
               routing_per_k),
    FigureSpec("per_block", "RouteSAE per routed block beside TopK at that block",
               "RouteSAE's NormMSE and KL on the tokens it routed to a block (mean ± std over seeds) beside a TopK SAE "
               "trained at that block (on all tokens): is routing more than reading an earlier layer?", per_block),
    FigureSpec("latent_density", "Latent density",
               "Histogram of log10 firing frequency per latent on the evaluated tokens, summed over seeds; latents "
               "that never fired are counted in the legend.", latent_density),
)


# -- writing and reading back ------------------------------------------------------------------------------------
def figure_paths(out_dir: Path, name: str) -> list[Path]:
    return [out_dir / f"{name}.{fmt}" for fmt in FORMATS]


def build_figures(comparison: dict[str, Any]) -> dict[str, Figure]:
    """Every figure that has data, by name, in FIGURES order (not yet saved)."""
    import matplotlib

    figures = {}
    for spec in FIGURES:
        with matplotlib.rc_context(RC):
            fig = spec.draw(comparison)
        if fig is not None:
            figures[spec.name] = fig
    return figures


def write_figures(comparison: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write each figure that has data as SVG and PNG into ``out_dir``; remove the files of those that have none.

    Returns the paths written. The SVG's ids are salted with the figure's name (the same each time, and
    different between figures, so several can sit inline in one page without clashing ids).
    """
    import matplotlib

    out_dir = Path(out_dir)
    written: list[Path] = []
    figures = build_figures(comparison)
    for spec in FIGURES:
        fig = figures.get(spec.name)
        if fig is None:
            for stale in figure_paths(out_dir, spec.name):
                stale.unlink(missing_ok=True)
            continue
        with matplotlib.rc_context({**RC, "svg.hashsalt": f"routesae-{spec.name}"}):
            for path in figure_paths(out_dir, spec.name):
                _save(fig, path)
                written.append(path)
    return written


def _save(fig: Figure, path: Path) -> None:
    """Atomically, in the format the suffix names, without the date and version stamps that would make bytes vary."""
    fmt = path.suffix[1:]
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=PNG_DPI, metadata=metadata))


SVG_NS = "http://www.w3.org/2000/svg"
SVG_ELEMENTS = {"svg", "g", "defs", "path", "use", "clipPath", "text", "tspan", "rect", "circle", "ellipse", "line",
                "polyline", "polygon", "title", "desc", "linearGradient", "radialGradient", "stop", "symbol", "mask"}
EXTERNAL_URL = re.compile(r"url\(\s*['\"]?(?!#)", re.IGNORECASE)
LOCAL_URL = re.compile(r"url\(\s*#")


def inline_svg(text: str, prefix: str = "") -> str:
    """An SVG file as markup to put inside HTML: no XML prolog or DOCTYPE, and nothing that runs or fetches.

    Matplotlib writes no script, but the report must not have to trust that: only plain SVG drawing elements
    are kept (no script, foreignObject, image, style, metadata), event-handler attributes are dropped, and a
    reference must point inside the figure (``#id``). The ``<style>`` matplotlib writes (``* {stroke-linejoin:
    round}``) would apply to the whole page inline, so it goes too; the page sets the same for its figures.
    Every id gets ``prefix`` (and every reference with it), so several figures share a page without clashing ids.
    """
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise RouteSAEError(f"not an SVG file ({e})") from None
    if root.tag != f"{{{SVG_NS}}}svg":
        raise RouteSAEError(f"not an SVG file (its root is {root.tag!r})")
    root.tag = "svg"
    _clean(root, prefix)
    root.set("xmlns", SVG_NS)
    return ET.tostring(root, encoding="unicode")


def _clean(element: ET.Element, prefix: str) -> None:
    for child in list(element):
        namespace, _, tag = child.tag.rpartition("}") if isinstance(child.tag, str) else ("", "", "")
        if namespace != f"{{{SVG_NS}" or tag not in SVG_ELEMENTS:
            element.remove(child)
        else:
            child.tag = tag  # unprefixed: the root declares the SVG namespace once
            _clean(child, prefix)
    attributes = dict(element.attrib)
    element.attrib.clear()
    for name, value in attributes.items():
        namespace, _, local = name.rpartition("}")
        if local.lower().startswith("on") or EXTERNAL_URL.search(value):
            continue
        if local == "href":
            if value.startswith("#"):
                element.set("href", f"#{prefix}{value[1:]}")  # SVG 2's plain href: no xlink prefix to carry through HTML
        elif local == "id" and not namespace:
            element.set("id", prefix + value)
        elif not namespace:
            element.set(local, LOCAL_URL.sub(f"url(#{prefix}", value))


def comparison_figures_for_report(directory: Path) -> list[dict[str, str]]:
    """The figures of a compare directory as the report embeds them: name, title, caption and inline SVG markup,
    in FIGURES order; a figure that was not drawn is simply absent (its data was missing)."""
    comparison = read_comparison(Path(directory) / COMPARISON_FILE)
    seeds = mapping(comparison.get("grid")).get("seeds")
    over = f" Seeds: {', '.join(map(str, seeds))}." if isinstance(seeds, list) and seeds else ""
    found = []
    for spec in FIGURES:
        path = Path(directory) / FIGURES_DIR / f"{spec.name}.svg"
        if path.is_file():
            found.append({"name": spec.name, "title": spec.title, "caption": spec.caption + over,
                          "svg": inline_svg(path.read_text(encoding="utf-8"), f"{spec.name}-")})
    return found


def main(argv: list[str] | None = None) -> int:
    """Redraw the figures of compare directories: ``python -m routesae.comparison_figures DIR...``."""
    directories = sys.argv[1:] if argv is None else argv
    if not directories:
        print("usage: python -m routesae.comparison_figures COMPARE_DIR...", file=sys.stderr)
        return 2
    for directory in map(Path, directories):
        for path in write_figures(read_comparison(directory / COMPARISON_FILE), directory / FIGURES_DIR):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
