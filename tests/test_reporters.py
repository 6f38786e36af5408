"""Reporters: the always-on metrics.jsonl, and the real wandb client in offline mode."""

import json

from click.testing import CliRunner
from wandb_records import finished_run_records

from routesae.cli import make_cli

SMALL = ["--k", "4", "--latent-size", "64", "--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "64",
         "--tokens", "640", "--log-every", "2"]


def test_wandb_reporter_logs_an_offline_run(tiny_model_dir, text_corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), *SMALL, "--out", str(out),
            "--report", "wandb", "--arch", "topk", "--arch", "routesae", "--layers", "1:3"]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = finished_run_records(run_file)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")]
    assert [h["_step"] for h in history] == [2, 4, 6, 8, 10]
    assert all(h["topk-L2-k4-F64/l0"] == 4 and h["topk-L2-k4-F64/loss"] > 0 for h in history)
    summary = {}
    for r in records:
        if r.HasField("summary"):
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    assert summary["tokens"] == 640 and 0 <= summary["topk-L2-k4-F64/dead_fraction"] <= 1
    (config,) = [r.run.config for r in records if r.HasField("run")]
    assert str(tiny_model_dir) in str(config)
    chart_keys = {i.key or "/".join(i.nested_key) for r in records if r.HasField("history") for i in r.history.item}
    routing = {k for k in chart_keys if k.startswith("routesae-L1-3-hard-sum-k4-F64/routing_counts_table/")}
    assert routing, "the routing histogram is logged as a chart"
    assert not any("topk-L2-k4-F64/" in k and "_table" in k for k in chart_keys), "TopK has no histogram"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in logged][0] == "start" and logged[-1]["event"] == "finish"


def test_report_wandb_without_wandb_installed_says_how_to_install(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    shadow = tmp_path / "no-wandb"
    (shadow / "wandb").mkdir(parents=True)
    (shadow / "wandb" / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    result = subprocess.run(
        [sys.executable, "-m", "routesae", "train", "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"),
         "--report", "wandb"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(shadow)},
    )
    assert result.returncode == 2
    assert "--report wandb needs the wandb package: pip install 'routesae[wandb]'" in result.stderr
    assert not (tmp_path / "r").exists()


def test_evaluation_results_reach_the_reporters(tiny_model_dir, text_corpus_dir, tmp_path, capsys):
    from routesae import SAESpec, TrainConfig, train
    from routesae.evaluate import evaluate

    cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(text_corpus_dir), tokens=256, batch_size=4,
                      context_length=32, sae_batch_tokens=64)
    train([SAESpec.build("topk", k=4, latent_size=64, layer=2)], tmp_path / "run", cfg, reporters=[])
    results = evaluate([tmp_path / "run"], ["l0", "normmse"], tokens=64, batch_size=4, reporters=["console"])
    (record,) = results.values()
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "evaluate" and events[-1]["results"] == [record]
    table = capsys.readouterr().err
    assert "topk-L2-k4-F64" in table and "normmse" in table and f"{record['metrics']['l0']:.4g}" in table
