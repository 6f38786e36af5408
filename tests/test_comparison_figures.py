"""The figures of ``routesae compare`` and the report's Comparison section, on a synthetic ``comparison.json`` with
every family, some values missing (null and NaN), drawn by real matplotlib; the report is checked on real runs
(tiny ones) laid out as compare lays them out, parsed and in headless Chromium."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_report import parse

from routesae import SAESpec, TrainConfig, train
from routesae.comparison_figures import (
    COMPARISON_FILE,
    FIGURES,
    FIGURES_DIR,
    build_figures,
    family_colours,
    inline_svg,
    main,
    write_figures,
)
from routesae.lm import LanguageModel
from routesae.report import FILTER_SCRIPT, render_report, write_report

NAMES = [spec.name for spec in FIGURES]
FAMILIES = ["routesae", "routesae-random", "routesae-uniform", "routesae-fixed@6", "mlsae", "topk@6", "topk@21"]
KS, SEEDS, BLOCKS = (16, 32, 64), (0, 1, 2), (6, 7, 8, 21)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SVG = "{http://www.w3.org/2000/svg}"


def synthetic_comparison() -> dict[str, Any]:
    """Every family at every k and seed, shaped as compare writes it; a few values null or NaN as a failed stage
    leaves them. Numbers vary smoothly with k, family and seed (no randomness: the figures must be reproducible)."""
    saes, summary = [], []
    for f, family in enumerate(FAMILIES):
        routed = family.startswith("routesae")
        for k in KS:
            for seed in SEEDS:
                wiggle = 0.01 * (seed - 1)
                weights = {b: 1 + ((b * (seed + 2) + k) % 5) for b in BLOCKS}
                saes.append({
                    "name": f"{family}-k{k}-s{seed}", "run": "routed" if routed or family == "mlsae" else "at-blocks",
                    "family": family, "architecture": "mlsae" if family == "mlsae" else "routesae" if routed else "topk",
                    "router": family.removeprefix("routesae-").partition("@")[0] if routed else None, "k": k, "seed": seed,
                    "block": int(family.partition("@")[2]) if "@" in family else None,
                    "metrics": {"kldiv": 2 / k + 0.01 * f + wiggle, "normmse": 4 / k + 0.02 * f, "l0": float(k)},
                    "per_block": {str(b): {"kldiv": 0.1, "normmse": 0.2} for b in (6, 21)} if family == "mlsae" else None,
                    "by_routed_block": {"6": {"tokens": 500, "normmse": 0.1 + wiggle, "kldiv": 0.2 + wiggle},
                                        "21": {"tokens": 300, "normmse": 0.3, "kldiv": None}} if routed else None,
                    "routing_shares": {str(b): w / sum(weights.values()) for b, w in weights.items()} if routed else None,
                    "features": None if family == "mlsae" else {"p75": 800 + k + seed, "scaled": 40 + seed},
                    "latent_density": {"tokens": 16384, "log10_edges": [e / 4 for e in range(-8, 1)],
                                       "latents": [(i * (f + 3) + k) % 50 for i in range(8)], "never_fired": f + seed},
                })
            summary.append({
                "family": family, "k": k, "n": 3,
                "metrics": {"kldiv": {"mean": 2 / k + 0.01 * f, "std": 0.008}, "normmse": {"mean": 4 / k + 0.02 * f, "std": 0.0},
                            "l0": {"mean": float(k), "std": 0.0}},
                "features": None if family == "mlsae" else {"p75": {"mean": 801 + k, "std": 0.8}, "scaled": {"mean": 41, "std": 0.8}},
            })
    by_name = {s["name"]: s for s in saes}
    by_name["routesae-k64-s2"]["metrics"]["kldiv"] = None
    by_name["routesae-k16-s1"]["routing_shares"] = None
    by_name["topk@6-k32-s0"]["latent_density"] = None
    rows = {(r["family"], r["k"]): r for r in summary}
    rows["routesae-random", 32]["metrics"]["kldiv"] = {"mean": math.nan, "std": math.nan}
    rows["routesae-uniform", 64]["features"] = None
    rows["topk@21", 16]["metrics"]["normmse"] = {"mean": None, "std": None}
    return {
        "format": "routesae-comparison", "format_version": 1, "routesae_version": "0.1.0",
        "grid": {"k": list(KS), "seeds": list(SEEDS), "layers": "6:21", "top_block": 21, "latent_size": 4096,
                 "blocks": [6, 21], "min_share": 0.05, "model": "tiny", "tokens": 650000, "threshold_rules": ["p75", "scaled"]},
        "saes": saes, "summary": summary,
    }


def svg_text(path: Path) -> str:
    """All the text an SVG draws (matplotlib keeps text as text with svg.fonttype none)."""
    return " ".join("".join(t.itertext()) for t in ET.parse(path).getroot().iter(f"{SVG}text"))


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> tuple[dict[str, Any], Path, list[Path]]:
    out = tmp_path_factory.mktemp("figures")
    comparison = synthetic_comparison()
    return comparison, out, write_figures(comparison, out)


# -- the figures --------------------------------------------------------------------------------------------------
def test_every_figure_is_written_as_svg_and_png(drawn):
    _, out, written = drawn
    assert written == [out / f"{name}.{fmt}" for name in NAMES for fmt in ("svg", "png")]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)  # no temporary files left
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes().startswith(PNG_SIGNATURE)
        else:
            root = ET.parse(path).getroot()
            assert root.tag == f"{SVG}svg" and not list(root.iter(f"{SVG}script"))


@pytest.mark.parametrize(("name", "expected"), [
    ("kl_vs_l0", ["KL divergence", "L0 (active latents per token, log scale)", *FAMILIES, "k=16", "k=64", "16", "64"]),
    ("normmse_vs_l0", ["NormMSE", "L0 (active latents per token, log scale)", *FAMILIES]),
    ("features_vs_k", ["threshold rule: p75", "threshold rule: scaled", "interpretable features (latents with contexts)",
                       *(f for f in FAMILIES if f != "mlsae")]),
    ("routing_per_k", ["RouteSAE (hard router): routing share per block", "share of evaluated tokens routed", "block",
                       "k=16", "k=32", "k=64", "21"]),
    ("per_block", ["NormMSE", "KL divergence", "routesae (tokens routed to the block)", "topk@6 (all tokens)",
                   "topk@21 (all tokens)", "k=32"]),
    ("latent_density", ["log10 firing frequency", "latents (summed over seeds)", "k=16",
                        *(f"{f} · never fired" for f in FAMILIES)]),
])
def test_each_figure_names_its_axes_and_families(drawn, name, expected):
    text = svg_text(drawn[1] / f"{name}.svg")
    for label in expected:
        assert label in text, (name, label)
    assert "mathdefault" not in text and "$" not in text  # tick labels are plain numbers, not TeX


def series(ax) -> dict[str, Any]:
    """An axes' error-bar series by legend label: the line through the points (x data, colour)."""
    return {c.get_label(): c.lines[0] for c in ax.containers if hasattr(c, "has_xerr")}


def test_null_and_nan_points_are_left_out_of_their_series():
    figures = build_figures(synthetic_comparison())
    kl = series(figures["kl_vs_l0"].axes[0])
    assert list(kl["routesae-random"].get_xdata()) == [16, 64]  # its k=32 KL is NaN
    assert list(kl["routesae"].get_xdata()) == [16, 32, 64]  # one seed's null KL does not drop the summary point
    assert list(series(figures["normmse_vs_l0"].axes[0])["topk@21"].get_xdata()) == [32, 64]
    p75 = series(figures["features_vs_k"].axes[0])
    assert list(p75["routesae-uniform"].get_xdata()) == [16, 32] and "mlsae" not in p75


def test_a_family_has_one_colour_in_every_figure():
    colours = family_colours(FAMILIES)
    assert len(set(colours.values())) == len(FAMILIES)
    assert family_colours(reversed(FAMILIES)) == colours
    figures = build_figures(synthetic_comparison())
    for name in ("kl_vs_l0", "normmse_vs_l0", "features_vs_k", "per_block"):
        found = {label: line.get_color() for ax in figures[name].axes for label, line in series(ax).items()}
        for label, colour in found.items():
            family = label.partition(" ")[0]
            assert colour == colours[family], (name, label)
        assert len(found) >= 3


def test_redrawing_gives_the_same_bytes(drawn, tmp_path):
    comparison, _, written = drawn
    again = write_figures(copy.deepcopy(comparison), tmp_path)
    for first, second in zip(written, again, strict=True):
        assert first.read_bytes() == second.read_bytes(), first.name


def _without(comparison: dict[str, Any], section: str, *names: str) -> dict[str, Any]:
    """The comparison with one kind of value gone everywhere (per SAE, or from the summary)."""
    comparison = copy.deepcopy(comparison)
    for record in comparison[section]:
        for name in names:
            record[name] = None
    return comparison


MISSING = {  # what to remove for each figure to have no data at all
    "kl_vs_l0": lambda c: _kill_metric(c, "kldiv"),
    "normmse_vs_l0": lambda c: _kill_metric(c, "normmse"),
    "features_vs_k": lambda c: _without(c, "summary", "features"),
    "routing_per_k": lambda c: _without(c, "saes", "routing_shares"),
    "per_block": lambda c: _kill_metric(_without(c, "saes", "by_routed_block"), "kldiv", "normmse", only="topk@"),
    "latent_density": lambda c: _without(c, "saes", "latent_density"),
}


def _kill_metric(comparison: dict[str, Any], *metrics: str, only: str = "") -> dict[str, Any]:
    comparison = copy.deepcopy(comparison)
    for row in comparison["summary"]:
        if row["family"].startswith(only):
            for metric in metrics:
                row["metrics"][metric] = {"mean": None, "std": None}
    return comparison


@pytest.mark.parametrize("name", NAMES)
def test_missing_data_skips_only_the_figure_that_needs_it(name):
    assert list(build_figures(MISSING[name](synthetic_comparison()))) == [n for n in NAMES if n != name]


def test_a_skipped_figure_removes_its_old_files(drawn, tmp_path):
    comparison, out, _ = drawn
    for path in out.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    written = write_figures(MISSING["routing_per_k"](comparison), tmp_path)
    assert not (tmp_path / "routing_per_k.svg").exists() and not (tmp_path / "routing_per_k.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    assert write_figures({**comparison, "saes": [], "summary": []}, tmp_path) == [] and not list(tmp_path.iterdir())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_values_missing_never_crash_and_a_drawn_figure_has_data(data):
    """Null or NaN anywhere in the per-SAE records or the summary: figures skip those points, never fail."""
    comparison = synthetic_comparison()
    paths = []
    for i, sae in enumerate(comparison["saes"]):
        paths += [(sae, key) for key in ("metrics", "by_routed_block", "routing_shares", "features", "latent_density")]
        paths += [(sae["metrics"], key) for key in sae["metrics"]]
    for row in comparison["summary"]:
        paths += [(row, "metrics"), (row, "features"), *((row["metrics"], m) for m in row["metrics"])]
    chosen = data.draw(st.lists(st.sampled_from(range(len(paths))), max_size=len(paths), unique=True))
    for index in chosen:
        container, key = paths[index]
        container[key] = data.draw(st.sampled_from([None, math.nan, {}]))
    for name, figure in build_figures(comparison).items():
        artists = [a for ax in figure.axes for a in (*ax.lines, *ax.patches, *ax.collections)]
        assert artists, f"{name} was drawn without data"


def test_inline_svg_keeps_the_drawing_and_drops_everything_that_runs_or_fetches():
    hostile = """<?xml version="1.0"?>
<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">
<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" onload="window.__xss=1" width="10pt">
 <metadata><x/></metadata><defs><style>* { color: red }</style><path id="m1" d="M 0 0 L 1 1"/>
  <clipPath id="c1"><rect x="0" y="0" width="5" height="5"/></clipPath></defs>
 <script>window.__xss=2</script>
 <foreignObject><div xmlns="http://www.w3.org/1999/xhtml">hi</div></foreignObject>
 <image href="https://example.com/x.png"/>
 <g onclick="window.__xss=3" clip-path="url(#c1)" style="fill: url(https://example.com/f)">
  <use xlink:href="#m1" x="1"/><use href="https://example.com/a#b"/><a href="javascript:alert(1)"><text>link</text></a>
  <text x="1" style="font: 9px 'DejaVu Sans'">a &lt;b&gt; &amp; c</text>
 </g>
</svg>"""
    markup = inline_svg(hostile, "fig-")
    assert not markup.startswith("<?xml") and "DOCTYPE" not in markup
    for banned in ("script", "onload", "onclick", "foreignObject", "image", "example.com", "javascript", "<style",
                   "metadata", "<a ", "xlink", "ns0"):
        assert banned not in markup, banned
    root = ET.fromstring(markup)
    uses = root.findall(f".//{SVG}use")
    assert [u.attrib for u in uses] == [{"href": "#fig-m1", "x": "1"}, {}]
    assert root.find(f".//{SVG}path").get("id") == "fig-m1"
    assert root.find(f".//{SVG}g").attrib == {"clip-path": "url(#fig-c1)"}  # the style with a remote url is gone
    assert [t.text for t in root.iter(f"{SVG}text")] == ["a <b> & c"]
    with pytest.raises(Exception, match="not an SVG file"):
        inline_svg("<html/>")
    with pytest.raises(Exception, match="not an SVG file"):
        inline_svg("<svg")


def test_importing_routesae_does_not_import_matplotlib():
    """Every CLI start imports routesae (and the report); matplotlib costs half a second and is needed only to draw."""
    code = "import sys, routesae, routesae.report, routesae.comparison_figures; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# -- the report of a compare directory ------------------------------------------------------------------------------
HOSTILE_FAMILY = "topk@<script>window.__xss=4</script>"


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory, tiny_model_dir, text_corpus_dir, drawn) -> Path:
    """What compare leaves: two runs (``routed/``, ``at-blocks/``), ``comparison.json`` (with NaN, as a stage that
    failed may leave it, and a hostile family name) and ``figures/``."""
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROUTESAE_HOME", str(root / "home"))
        lm = LanguageModel.load(str(tiny_model_dir))
        cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(text_corpus_dir), tokens=256, batch_size=4,
                          context_length=32, sae_batch_tokens=64, buffer_tokens=128, device="cpu")
        train([SAESpec.build("routesae", k=4, latent_size=32, layers="1:2")], root / "routed", cfg, reporters=[], lm=lm)
        train([SAESpec.build("topk", k=4, latent_size=32, layer=1)], root / "at-blocks", cfg, reporters=[], lm=lm)
    comparison, figures, _ = drawn
    comparison = copy.deepcopy(comparison)
    comparison["summary"].append({"family": HOSTILE_FAMILY, "k": 16, "n": 1, "metrics": {"l0": {"mean": 16, "std": 0}}})
    (root / COMPARISON_FILE).write_text(json.dumps(comparison))  # json.dumps writes NaN as NaN: the report reads it
    (root / FIGURES_DIR).mkdir()
    for path in figures.iterdir():
        (root / FIGURES_DIR / path.name).write_bytes(path.read_bytes())
    return root


def test_report_of_a_compare_directory_has_the_comparison_and_every_sae(compare_dir):
    path = write_report(compare_dir)
    assert path == compare_dir / "report.html"
    html = path.read_text(encoding="utf-8")
    dom = parse(html)
    assert "<?xml" not in html and "DOCTYPE svg" not in html and HOSTILE_FAMILY not in html
    assert [s.text().strip() for s in dom.find_all("script")] == [FILTER_SCRIPT.strip()]
    assert dom.find("h1").text() == f"routesae report · {compare_dir.name}"
    section = dom.find("section", id="comparison")
    figures = section.find_all("figure", "comparison-figure")
    assert [f.attrs["data-figure"] for f in figures] == NAMES
    for figure in figures:
        assert len(figure.find_all("svg")) == 1 and figure.find("h3").text()
    ids = [n.attrs["id"] for n in dom.iter() if "id" in n.attrs]
    assert len(ids) == len(set(ids)), "several figures on one page: no id twice"
    rows = section.find("table", "comparison").find("tbody").find_all("tr")
    comparison = json.loads((compare_dir / COMPARISON_FILE).read_text())
    assert len(rows) == len(comparison["summary"])
    assert [r.attrs["data-family"] for r in rows[:3]] == ["routesae"] * 3 and [r.attrs["data-k"] for r in rows[:3]] == ["16", "32", "64"]
    cells = {(r.attrs["data-family"], r.attrs["data-k"], td.attrs["data-column"]): td.text()
             for r in rows for td in r.find_all("td") if "data-column" in td.attrs}
    assert cells["routesae", "32", "kldiv"] == f"{2 / 32:.4g} ± 0.008"
    assert cells["routesae-random", "32", "kldiv"] == "–"  # NaN
    assert cells["mlsae", "16", "p75"] == "–" and cells["topk@6", "16", "scaled"] == "41 ± 0.8"
    assert (HOSTILE_FAMILY, "16", "l0") in cells  # the hostile name is text in the table, never markup
    saes = {s.attrs["data-sae"] for s in dom.find_all("section", "sae")}
    assert saes == {"routesae-L1-2-hard-sum-k4-F32", "topk-L1-k4-F32"}  # both runs' SAEs, listed as for any run


def test_comparison_notes_say_what_is_missing_and_how_to_make_it(compare_dir, tmp_path):
    copy_dir = tmp_path / "cmp"
    for run in ("routed", "at-blocks"):
        (copy_dir / run).mkdir(parents=True)
        for path in (compare_dir / run).rglob("*"):
            target = copy_dir / run / path.relative_to(compare_dir / run)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                target.write_bytes(path.read_bytes())
    (copy_dir / COMPARISON_FILE).write_text((compare_dir / COMPARISON_FILE).read_text())
    note = parse(render_report(copy_dir)).find("p", "stage-missing", data_stage="figures")
    assert "no figures" in note.text()
    assert note.find("code").text() == f"python -m routesae.comparison_figures {copy_dir}"
    assert main([str(copy_dir)]) == 0  # the redraw command the note names
    dom = parse(render_report(copy_dir))
    assert len(dom.find("section", id="comparison").find_all("svg")) == len(NAMES)
    assert not dom.find_all("p", "stage-missing", data_stage="figures")
    (copy_dir / COMPARISON_FILE).write_text("{ damaged")
    dom = parse(render_report(copy_dir))
    assert "not valid JSON" in dom.find("section", id="comparison").find("p", "stage-missing", data_stage="compare").text()
    assert len(dom.find_all("section", "sae")) == 2  # the runs are still reported


def test_comparison_in_chromium(compare_dir, browser):
    path = write_report(compare_dir)
    page = browser.open(path)
    assert page.errors == [], page.console
    assert page.requests == [path.resolve().as_uri()]  # the figures are inline: nothing else is fetched
    figures = page.evaluate("""[...document.querySelectorAll('#comparison figure.comparison-figure')].map(f => {
        const svg = f.querySelector(':scope > svg'), box = svg.getBoundingClientRect();
        return {name: f.dataset.figure, ns: svg.namespaceURI, width: box.width, height: box.height,
                texts: svg.querySelectorAll('text').length, drawn: svg.getBBox().width > 0};
    })""")
    assert [f["name"] for f in figures] == NAMES
    for figure in figures:
        assert figure["ns"] == "http://www.w3.org/2000/svg" and figure["drawn"] and figure["texts"] > 5, figure
        assert 100 < figure["width"] <= 1180 and figure["height"] > 100, figure  # scaled to the page, not clipped
    clip = page.evaluate("""(() => { const el = document.querySelector('#comparison svg [clip-path]');
        const id = el.getAttribute('clip-path').slice(5, -1); return document.getElementById(id)?.tagName; })()""")
    assert clip, "the figure's clip paths resolve inside the page"
    rows = page.evaluate("[...document.querySelectorAll('table.comparison tbody tr')].map(r => r.dataset.family)")
    assert rows[0] == "routesae" and HOSTILE_FAMILY in rows
    assert page.evaluate("window.__xss === undefined")
    assert page.evaluate("[...document.scripts].map(s => s.textContent.trim())") == [FILTER_SCRIPT.strip()]
    assert page.evaluate("document.querySelectorAll('section.sae').length") == 2
    assert page.errors == []
