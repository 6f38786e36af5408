"""``routesae compare`` (issue 14): one harvest feeds the whole grid, whose numbers are separate evaluations', with figures."""

import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from routesae.cli import make_cli
from routesae.compare import BLOCKS_RUN, CACHE_DIR, COMPARISON_FILE, ROUTED_RUN, CompareConfig
from routesae.errors import ConfigError
from routesae.evaluate import evaluate
from routesae.files import read_json

GRID = ["--k", "4,8", "--seeds", "0,1", "--latent-size", "64", "--layers", "0:2", "--evaluate-tokens", "128",
        "--contexts-min-contexts", "1"]
TRAIN = ["--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "64", "--buffer-tokens", "256",
         "--tokens", "640", "--report", "jsonl"]


@pytest.fixture(scope="module")
def compared(tiny_model_dir, text_corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "grid"
    args = ["compare", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), *GRID, *TRAIN, "--out", str(out)]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    return out, args, result.output


def test_the_grid_has_every_family_for_every_k_and_seed(compared):
    out, _, output = compared
    comparison = read_json(out / COMPARISON_FILE)
    grid = comparison["grid"]
    assert grid["layers"] == "0:2" and grid["top_block"] == 2 and grid["threshold_rules"] == ["scaled", "p75"]
    assert 2 in grid["blocks"] or grid["blocks"], "at least one block is read alone"
    families = {r["family"] for r in comparison["saes"]}
    expected = {"routesae", "routesae-random", "routesae-uniform", "mlsae", "topk@2",
                *(f"routesae-fixed@{b}" for b in grid["blocks"]), *(f"topk@{b}" for b in grid["blocks"])}
    assert families == expected
    for family in families:
        cells = sorted((r["k"], r["seed"]) for r in comparison["saes"] if r["family"] == family)
        assert cells == [(4, 0), (4, 1), (8, 0), (8, 1)], family
    shares = grid["hard_router_shares"]
    assert math.isclose(sum(shares.values()), 1.0)
    assert {int(b) for b, s in shares.items() if s >= 0.05} == set(grid["blocks"])
    for step in ("compare 1/6: cache", "compare 4/6: evaluate", "compare 6/6: comparison"):
        assert step in output


def test_one_cache_feeds_both_runs(compared):
    out, _, _ = compared
    for run in (ROUTED_RUN, BLOCKS_RUN):
        assert read_json(out / run / "run.json")["request"]["train"]["from_cache"] == str(out / CACHE_DIR)
    manifest = read_json(out / CACHE_DIR / "manifest.json")
    assert manifest["layers"] == [0, 1, 2]


def test_its_numbers_are_those_of_a_separate_evaluation(compared):
    out, _, _ = compared
    comparison = read_json(out / COMPARISON_FILE)
    chosen = [next(r for r in comparison["saes"] if r["family"] == family) for family in ("routesae", "mlsae", "topk@2")]
    alone = evaluate([out / r["run"] / r["name"] for r in chosen], list(CompareConfig().metrics), tokens=128, reporters=())
    for r in chosen:
        separate = alone[str(out / r["run"] / r["name"])]["metrics"]
        assert r["metrics"].keys() == separate.keys()
        for name, value in r["metrics"].items():
            assert value == pytest.approx(separate[name], rel=1e-5, abs=1e-7), (r["name"], name)


def test_each_record_carries_what_its_figures_need(compared):
    out, _, _ = compared
    comparison = read_json(out / COMPARISON_FILE)
    by_family = {r["family"]: r for r in comparison["saes"]}
    hard, mlsae, topk = by_family["routesae"], by_family["mlsae"], by_family["topk@2"]
    assert set(hard["routing_shares"]) <= {"0", "1", "2"} and math.isclose(sum(hard["routing_shares"].values()), 1.0)
    assert hard["by_routed_block"] and all({"tokens", "normmse", "kldiv"} <= set(v) for v in hard["by_routed_block"].values())
    assert sorted(mlsae["per_block"]) == ["0", "1", "2"] and mlsae["features"] is None
    assert topk["routing_shares"] is None and set(topk["features"]) == {"scaled", "p75"}
    density = topk["latent_density"]
    assert sum(density["latents"]) + density["never_fired"] == 64
    mlsae_density = mlsae["latent_density"]
    assert sum(mlsae_density["latents"]) + mlsae_density["never_fired"] == 3 * 64, "its three blocks' latents"
    for entry in comparison["summary"]:
        group = [r for r in comparison["saes"] if r["family"] == entry["family"] and r["k"] == entry["k"]]
        kl = [r["metrics"]["kldiv"] for r in group]
        assert entry["n"] == 2 and entry["metrics"]["kldiv"]["mean"] == pytest.approx(sum(kl) / 2)


def test_it_writes_its_figures(compared):
    out, _, _ = compared
    comparison = read_json(out / COMPARISON_FILE)
    names = {path.rsplit("/", 1)[-1] for path in comparison["figures"]}
    for figure in ("kl_vs_l0", "normmse_vs_l0", "features_vs_k", "routing_per_k", "per_block", "latent_density"):
        assert {f"{figure}.svg", f"{figure}.png"} <= names, figure
    assert all((out / path).stat().st_size > 0 for path in comparison["figures"])


def test_running_it_again_reuses_the_cache_and_the_runs(compared):
    out, args, _ = compared
    weights = sorted((out / ROUTED_RUN).glob("*/weights.safetensors"))
    before = {w: w.stat().st_mtime_ns for w in weights}
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    assert {w: w.stat().st_mtime_ns for w in weights} == before, "nothing retrained"


def test_another_grid_in_the_same_directory_is_refused_with_what_to_do(compared):
    """A higher --min-share picks fewer blocks: at-blocks/ holds another grid, and nothing is lost or re-created."""
    out, args, _ = compared
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    result = CliRunner().invoke(make_cli(), [*args, "--min-share", "0.99"])
    assert result.exit_code != 0
    message = " ".join(result.output.split())
    assert f"{out / BLOCKS_RUN} holds SAEs of another grid" in message and "--min-share (0.99)" in message
    assert f"Remove {out / BLOCKS_RUN}" in message and "--overwrite would re-create the activation cache too" in message
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before
    result = CliRunner().invoke(make_cli(), [*args[:args.index("--k") + 1], "4", *args[args.index("--k") + 2:]])
    assert result.exit_code != 0 and "its SAEs come from --k, --seeds" in " ".join(result.output.split())


def test_a_run_file_gives_the_grid(tiny_model_dir, text_corpus_dir, tmp_path):
    run_file = tmp_path / "grid.toml"
    run_file.write_text('[train]\ntokens = 640\n[compare]\nk = [4]\nseeds = [0]\n[compare.contexts]\nthreshold = "p90"\n')
    from routesae.cli.comparison import read_run_file

    train, grid = read_run_file(str(run_file))
    cfg = CompareConfig.from_dict(grid)
    assert train == {"tokens": 640} and cfg.k == (4,) and cfg.contexts.threshold == "p90"
    assert cfg.threshold_rules() == ["scaled", "p90"]
    repo_file = Path(__file__).resolve().parents[1] / "experiments" / "routing-controls.toml"
    train, grid = read_run_file(str(repo_file))
    assert train["tokens"] == 650_000 and CompareConfig.from_dict(grid).k == (16, 32, 64)
    bad = tmp_path / "bad.toml"
    bad.write_text("[sae.x]\narch = 'topk'\n")
    result = CliRunner().invoke(make_cli(), ["compare", "--config", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "a [train] and a [compare] table" in result.output


def test_bad_grids_are_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="must not repeat"):
        CompareConfig(seeds=(0, 0))
    with pytest.raises(ConfigError, match="min-share"):
        CompareConfig(min_share=0)
    with pytest.raises(ConfigError, match="A:B"):
        CompareConfig(layers="5")


def test_its_report_shows_the_figures_beside_every_sae(compared):
    out, _, _ = compared
    result = CliRunner().invoke(make_cli(), ["report", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    assert "Comparison" in page and page.count("<svg") >= 6
    comparison = read_json(out / COMPARISON_FILE)
    assert all(r["name"] in page for r in comparison["saes"])
