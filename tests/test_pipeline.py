"""`routesae pipeline`: every stage on a tiny model, one run manifest, and resumable stages.

The interpreter is the real ``openai`` backend talking HTTP to a local OpenAI-compatible server,
so the whole chain (train → evaluate → contexts → interpret → report) runs on real files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from openai_server import FakeOpenAI

from routesae import SAESpec, TrainConfig
from routesae.cli import make_cli
from routesae.contexts import ContextsConfig
from routesae.errors import ConfigError
from routesae.files import read_json
from routesae.pipeline import STAGES, PipelineConfig, pipeline

SECRET = "sk-pipeline-test-secret"


def train_cfg(tiny_model_dir: Path, text_corpus_dir: Path, **overrides) -> TrainConfig:
    settings = dict(
        model=str(tiny_model_dir),
        dataset=str(text_corpus_dir),
        tokens=512,
        batch_size=4,
        context_length=32,
        sae_batch_tokens=64,
        buffer_tokens=256,
        device="cpu",
    )
    return TrainConfig(**{**settings, **overrides})


SPECS = [SAESpec.build("routesae", k=4, latent_size=64), SAESpec.build("topk", k=4, latent_size=64)]


def stage_cfg(interpreter="openai", contexts: dict | None = None, interpret: dict | None = None) -> PipelineConfig:
    """The stages' settings for the tiny model, with ``contexts`` and ``interpret`` overrides."""
    return PipelineConfig.from_dict({
        "evaluate": {"tokens": 64},
        "contexts": {"threshold": 0.0, "tokens": 128, "max_classes": 0, "min_contexts": 1, **(contexts or {})},
        "interpreter": interpreter,
        "interpret": {"sample": 2, **(interpret or {})},
    })


def test_the_stage_configs_nest_and_round_trip_through_json():
    cfg = stage_cfg(interpret={"max_cost": 2.5})
    assert PipelineConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.contexts == ContextsConfig(threshold=0.0, tokens=128, max_classes=0, min_contexts=1)
    assert "max_cost" not in cfg.interpret.request() and "batch_size" not in cfg.contexts.request()
    with pytest.raises(ConfigError, match="unknown setting.*thresold"):
        PipelineConfig.from_dict({"contexts": {"thresold": 4}})
    with pytest.raises(ConfigError, match="sample must be at least 1"):
        PipelineConfig.from_dict({"interpret": {"sample": 0}})


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeOpenAI() as s:
        yield s


def run(out: Path, tiny_model_dir: Path, text_corpus_dir: Path, server: FakeOpenAI, **stage_overrides) -> dict:
    options = {"base_url": server.base_url, "price_input": 1.0, "price_output": 2.0}
    cfg = stage_cfg(**stage_overrides)
    return pipeline(SPECS, out, train_cfg(tiny_model_dir, text_corpus_dir), cfg, interpreter_options=options, reporters=[])


def test_every_stage_runs_and_is_recorded_in_one_manifest(tiny_model_dir, text_corpus_dir, server, tmp_path):
    out = tmp_path / "run"
    record = run(out, tiny_model_dir, text_corpus_dir, server)
    manifest = read_json(out / "run.json")
    assert manifest["pipeline"] == record and manifest["status"] == "finished"
    assert [s for s in STAGES if record["stages"][s]["status"] == "done"] == list(STAGES)
    assert all(record["stages"][s]["seconds"] >= 0 for s in STAGES)
    assert record["versions"]["torch"] and record["versions"]["transformer-lens"] and record["versions"]["routesae"]
    assert manifest["train"]["seed"] == 42 and manifest["data"]["fingerprint"]  # seed and data next to the stages
    for sae in manifest["saes"]:
        directory = out / sae["path"]
        for name in ("config.json", "eval.json", "contexts.json", "interpretations.json"):
            assert (directory / name).is_file(), name
        contexts = read_json(directory / "contexts.json")["settings"]
        assert (contexts["threshold"], contexts["max_classes"], contexts["min_contexts"]) == (0.0, 0, 1)
        interpreted = read_json(directory / "interpretations.json")
        assert interpreted["summary"]["features_scored"] == 2
        assert record["stages"]["interpret"]["result"][sae["path"]] == interpreted["summary"]["average_score"]
    assert Path(record["stages"]["report"]["result"]["report"]) == out / "report.html"
    assert SECRET not in (out / "run.json").read_text()


def test_rerunning_the_same_pipeline_redoes_nothing(tiny_model_dir, text_corpus_dir, server, tmp_path):
    out = tmp_path / "run"
    first = run(out, tiny_model_dir, text_corpus_dir, server)
    weights = {p: p.stat().st_mtime_ns for p in out.glob("*/sae.safetensors")}
    requests = len(server.log)
    second = run(out, tiny_model_dir, text_corpus_dir, server)
    assert second["stages"] == first["stages"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/sae.safetensors")} == weights
    assert len(server.log) == requests, "no interpreter request for finished latents"


def test_a_changed_stage_reruns_it_and_what_follows_but_not_training(tiny_model_dir, text_corpus_dir, server, tmp_path):
    out = tmp_path / "run"
    first = run(out, tiny_model_dir, text_corpus_dir, server)
    second = run(out, tiny_model_dir, text_corpus_dir, server, contexts={"threshold": 0.5})
    assert second["stages"]["train"] == first["stages"]["train"]
    assert second["stages"]["evaluate"] == first["stages"]["evaluate"]
    for stage in ("contexts", "interpret", "report"):
        assert second["stages"][stage]["finished_at"] >= first["stages"][stage]["finished_at"]
        assert second["stages"][stage]["request"] == first["stages"][stage]["request"] or stage == "contexts"
    contexts = read_json(next(out.glob("topk-*/contexts.json")))
    assert contexts["settings"]["threshold"] == 0.5


def test_an_interrupted_interpretation_continues_on_the_same_command(tiny_model_dir, text_corpus_dir, server, tmp_path):
    """A budget stop leaves the stage unfinished; the same command later finishes it without redoing anything."""
    from routesae.interpret import BudgetReached

    out = tmp_path / "run"
    with pytest.raises(BudgetReached):
        run(out, tiny_model_dir, text_corpus_dir, server, interpret={"max_cost": 1e-9})
    stages = read_json(out / "run.json")["pipeline"]["stages"]
    assert [stages[s]["status"] for s in ("train", "evaluate", "contexts")] == ["done"] * 3
    assert "interpret" not in stages
    weights = {p: p.stat().st_mtime_ns for p in out.glob("*/sae.safetensors")}
    record = run(out, tiny_model_dir, text_corpus_dir, server)
    assert record["stages"]["interpret"]["status"] == "done" and record["stages"]["report"]["status"] == "done"
    assert record["stages"]["contexts"] == stages["contexts"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/sae.safetensors")} == weights


def test_a_different_training_request_is_refused_without_overwrite(tiny_model_dir, text_corpus_dir, server, tmp_path):
    from routesae.errors import RouteSAEError

    out = tmp_path / "run"
    run(out, tiny_model_dir, text_corpus_dir, server)
    cfg = stage_cfg()
    with pytest.raises(RouteSAEError, match="different run"):
        pipeline(SPECS, out, train_cfg(tiny_model_dir, text_corpus_dir, lr=1e-3), cfg, reporters=[])


def test_interpreter_none_skips_interpretation(tiny_model_dir, text_corpus_dir, tmp_path):
    out = tmp_path / "run"
    cfg = stage_cfg(interpreter="none")
    record = pipeline(SPECS[1:], out, train_cfg(tiny_model_dir, text_corpus_dir), cfg, reporters=[])
    assert record["stages"]["interpret"]["status"] == "skipped" and record["stages"]["report"]["status"] == "done"
    assert not list(out.glob("*/interpretations.json"))


def cli_args(tiny_model_dir: Path, text_corpus_dir: Path, out: Path, interpreter: str) -> list[str]:
    """``routesae pipeline`` on the tiny model into ``out``, two latents interpreted by ``interpreter``."""
    return [
        "pipeline", "--arch", "topk", "--k", "4", "--latent-size", "64", "--model", str(tiny_model_dir),
        "--dataset", str(text_corpus_dir), "--tokens", "512", "--batch-size", "4", "--context-length", "32",
        "--sae-batch-tokens", "64", "--buffer-tokens", "256", "--device", "cpu", "--out", str(out),
        "--evaluate-tokens", "64", "--contexts-threshold", "0", "--contexts-tokens", "128",
        "--contexts-max-classes", "0", "--contexts-min-contexts", "1", "--interpreter", interpreter,
        "--interpret-sample", "2", "--report", "jsonl", "--json",
    ]  # fmt: skip


def test_cli_pipeline_prints_where_the_report_is(tiny_model_dir, text_corpus_dir, server, tmp_path):
    out = tmp_path / "run"
    args = [*cli_args(tiny_model_dir, text_corpus_dir, out, "openai"), "--interpreter-base-url", server.base_url,
            "--interpreter-price-input", "1", "--interpreter-price-output", "2"]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["stages"]["interpret"]["status"] == "done"
    assert f"report: {out / 'report.html'}" in result.stderr
    over_budget = [*args, "--interpreter-model", "other-model", "--interpret-max-cost", "1e-9"]
    budget = CliRunner().invoke(make_cli(), over_budget)
    assert budget.exit_code == 3 and "budget reached" in budget.stderr


def test_cli_pipeline_takes_the_azure_backend_options_prefixed(tiny_model_dir, text_corpus_dir, tmp_path, azure):
    """--interpreter-azure-endpoint/-api-version/-deployment reach the backend; a missing one fails before training."""
    out = tmp_path / "run"
    args = cli_args(tiny_model_dir, text_corpus_dir, out, "azure")
    missing = CliRunner().invoke(make_cli(), [*args, "--interpreter-api-version", azure.api_version])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert "--interpreter-azure-endpoint, --interpreter-deployment" in missing.stderr
    assert not (out / "run.json").exists(), "refused before training"
    backend = ["--interpreter-azure-endpoint", azure.endpoint, "--interpreter-api-version", azure.api_version,
               "--interpreter-deployment", azure.deployment, "--interpreter-backoff", "0.01"]
    result = CliRunner().invoke(make_cli(), [*args, *backend])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["stages"]["interpret"]["status"] == "done"
    assert record["stages"]["interpret"]["request"]["options"]["deployment"] == azure.deployment
    interpreted = read_json(out / "topk-L2-k4-F64" / "interpretations.json")
    assert interpreted["interpreter"]["name"] == "azure" and interpreted["summary"]["features_scored"] == 2
    assert len(azure.log) == interpreted["usage"]["requests"] >= 2
    assert all(e["status"] == 200 and e["api_key"] == azure.key for e in azure.log)
    assert all(azure.key not in p.read_text() for p in out.rglob("*.json"))
