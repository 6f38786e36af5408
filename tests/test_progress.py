"""Progress of every long job: plain periodic lines when stderr is a log, a live bar with an ETA on a terminal,
and a last line saying where the files went."""

import json
import os
import pty
import re
import select
import subprocess
import sys

import pytest
from click.testing import CliRunner
from openai_server import FakeOpenAI
from tiny_models import TRAINING_TEXT

from routesae.cli import make_cli

TRAIN = ["--k", "4", "--latent-size", "64", "--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "64",
         "--buffer-tokens", "256"]
ETA = re.compile(r"ETA \d+:\d\d:\d\d")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Enough documents for an eval split that takes a few seconds to read."""
    path = tmp_path_factory.mktemp("progress-corpus") / "docs.txt"
    path.write_text("\n\n".join(f"Document {i}. " + TRAINING_TEXT[i % len(TRAINING_TEXT)] * (1 + i % 3) for i in range(600)))
    return path


@pytest.fixture(scope="module")
def run(tiny_model_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("progress") / "run"
    result = cli("train", "--model", tiny_model_dir, "--dataset", corpus, *TRAIN, "--tokens", "2048", "--arch", "topk",
                 "--arch", "routesae", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def cli(*args, env=None):
    return CliRunner(env={"ROUTESAE_PROGRESS_EVERY": "0", **(env or {})}).invoke(make_cli(), [str(a) for a in args])


def assert_plain(result, label, unit, wrote):
    """Plain progress lines (no carriage returns), one saying it finished, and the last line naming what was written."""
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "\r" not in err and "\x1b[" not in err, "no terminal control sequences in a log"
    progress = [line for line in err.splitlines() if line.startswith(f"{label} ")]
    assert len(progress) >= 2 and any(ETA.search(line) for line in progress), err
    assert re.search(rf"^{label} ([\d,]+)/\1 {unit} · [\d,]+ {unit}/s · done in \d+:\d\d:\d\d$", err, re.MULTILINE), err
    assert err.strip().splitlines()[-1].startswith(f"wrote {wrote}"), err


def test_training_says_what_it_does_before_the_first_step_and_shows_every_sae(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "run"
    result = cli("train", "--model", tiny_model_dir, "--dataset", corpus, *TRAIN, "--tokens", "1024", "--log-every", "2",
                 "--arch", "topk", "--arch", "routesae", "--out", out)
    assert_plain(result, "train", "tokens", "2 SAE checkpoint(s), run.json and metrics.jsonl in " + str(out))
    lines = result.stderr.splitlines()
    first = next(line for line in lines if line.startswith("train "))
    assert first.startswith("train 0/1,024 tokens") and first.endswith("harvesting the first shuffle group")
    assert any(line.strip().startswith("topk-L2-k4-F64  loss") for line in lines)
    assert any(line.strip().startswith("routesae-L0-2-hard-sum-k4-F64  loss") for line in lines)
    summary = json.loads((out / "run.json").read_text())
    done = next(line for line in lines if "done in" in line)
    assert done.startswith(f"train {summary['progress']['tokens']:,}/1,024 tokens")
    assert "dead_window" in result.stderr and "n/a" in result.stderr, "a run shorter than the window cannot measure it"


def test_evaluate_reads_a_modest_default_and_says_so(run):
    result = cli("evaluate", run)
    assert_plain(result, "evaluate", "tokens", f"eval.json (2 SAE(s)) in {run}")
    assert re.search(r"evaluating 2 SAE\(s\) on (all|the first [\d,]+) of the [\d,]+ counted tokens", result.stderr)
    assert "normmse = mean" in result.stderr and "fvu = " in result.stderr, "the table explains its two errors"
    record = json.loads((run / "topk-L2-k4-F64" / "eval.json").read_text())
    assert "dead_eval" in record["metrics"] and "dead" not in record["metrics"]


def test_contexts_and_cache_show_progress_and_where_they_wrote(run, tiny_model_dir, corpus, tmp_path):
    assert_plain(cli("contexts", run, "--threshold", "0.1"), "contexts", "tokens", f"contexts.json (2 SAE(s)) in {run}")
    cache = tmp_path / "cache"
    result = cli("cache", "--model", tiny_model_dir, "--dataset", corpus, "--context-length", "32", "--layer", "2",
                 "--tokens", "2048", "--out", cache)
    assert_plain(result, "cache", "tokens", "")
    assert f"in {cache}" in result.stderr.strip().splitlines()[-1]


def test_interpret_counts_latents(run, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    sae = run / "topk-L2-k4-F64"
    assert cli("contexts", sae, "--threshold", "0.1").exit_code == 0
    with FakeOpenAI() as server:
        result = cli("interpret", sae, "--interpreter", "openai", "--base-url", server.base_url, "--sample", "3")
    assert_plain(result, "interpret", "latents", f"interpretations.json in {sae}")


def test_the_pipeline_names_each_stage(tiny_model_dir, corpus, tmp_path):
    args = ["pipeline", "--model", tiny_model_dir, "--dataset", corpus, *TRAIN, "--tokens", "1024", "--out", tmp_path / "p",
            "--evaluate-tokens", "256", "--contexts-threshold", "0.1", "--interpreter", "none"]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    for number, stage in enumerate(["train", "evaluate", "contexts"], start=1):
        assert f"pipeline {number}/5: {stage}" in first.stderr
    assert "pipeline 4/5: interpret · skipped" in first.stderr
    again = cli(*args)
    assert "pipeline 1/5: train · done before with these settings, kept" in again.stderr


def on_a_terminal(*args, home):
    """Run ``python -m routesae ARGS`` with stderr on a pseudo-terminal; returns everything it drew."""
    leader, follower = pty.openpty()
    env = {**os.environ, "ROUTESAE_HOME": str(home), "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "50"}
    process = subprocess.Popen([sys.executable, "-m", "routesae", *map(str, args)], stdout=subprocess.DEVNULL,
                               stderr=follower, env=env)
    os.close(follower)
    drawn = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the process closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        elif process.poll() is not None:
            break
    assert process.wait(timeout=300) == 0, drawn.decode(errors="replace")[-3000:]
    os.close(leader)
    return drawn.decode(errors="replace")


def without_colours(drawn):
    return re.sub(r"\x1b\[[0-9;]*m", "", drawn)


def test_the_live_bar_shows_the_time_left_while_training_and_evaluating(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "run"
    drawn = on_a_terminal("train", "--model", tiny_model_dir, "--dataset", corpus, *TRAIN, "--tokens", "8192",
                          "--arch", "topk", "--out", out, home=tmp_path / "home")
    elapsed_then_left = re.compile(r"(\d+:\d\d:\d\d) (\d+:\d\d:\d\d)")
    assert "train" in drawn and "\x1b[2K" in drawn, "a live display, redrawn in place"
    assert elapsed_then_left.search(without_colours(drawn)), "the bar shows elapsed time and an ETA, not -:--:--"
    assert "topk-L2-k4-F64  loss" in drawn, "and a line per SAE under it"
    drawn = on_a_terminal("evaluate", out, "--tokens", "all", home=tmp_path / "home")
    assert "evaluate" in drawn and elapsed_then_left.search(without_colours(drawn))


def test_a_slow_job_shows_seconds_per_item_not_zero_per_second():
    from routesae.progress import JobProgress

    with JobProgress("interpret", 5, unit="latents", enabled=False) as bar:
        bar.update(1, rate=0.125)
        assert bar.rate_text() == "8.0 s per latent"
        bar.update(2, rate=1_305.4)
        assert bar.rate_text() == "1,305 latents/s"
