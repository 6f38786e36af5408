"""What routesae promises when things go wrong: bad input ends in one short error, nothing is written outside
the run, one writer per run, crashes leave nothing half-done behind, and resumes follow their own advice.

The bad inputs go through the real CLI; the concurrency and crash tests start real ``routesae`` processes
and kill them with SIGKILL, as a machine that loses power or an out-of-memory killer would.
"""

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from routesae.cli import make_cli
from routesae.data import split_of
from routesae.files import TEMP_SUFFIX, write_json
from routesae.interpreters.base import public_url, recorded_options
from routesae.locks import lock_path
from routesae.rundir import CONFIG_FILE, MANIFEST_FILE, METRICS_FILE, WEIGHTS_FILE
from routesae.steering import Clamp

SMALL = ["--k", "4", "--latent-size", "64", "--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "64",
         "--buffer-tokens", "256", "--layer", "1", "--report", "jsonl"]
SAE = "topk-L1-k4-F64"


def cli(*args):
    return CliRunner().invoke(make_cli(), [str(a) for a in args])


def routesae_process(*args, home):
    """``python -m routesae ARGS`` as its own process (stdout and stderr to pipes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROUTESAE_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "routesae", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def assert_short_error(result, *named):
    """Exit 2, at most two lines on stderr, no traceback, and every one of ``named`` in the message."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) <= 2, result.stderr
    for text in named:
        assert str(text) in result.stderr, (text, result.stderr)


@pytest.fixture
def train_args(tiny_model_dir, text_corpus_dir):
    return ["train", "--model", tiny_model_dir, "--dataset", text_corpus_dir, *SMALL]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, text_corpus_dir, tmp_path_factory):
    """A finished tiny run, copied by the tests that damage it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = cli("train", "--model", tiny_model_dir, "--dataset", text_corpus_dir, *SMALL, "--tokens", "640", "--out", out)
    assert result.exit_code == 0, result.output
    return out


# -- bad input: one or two lines, exit 2 -------------------------------------------------------------------------


def _bad_dataset(tmp_path, kind):
    path = tmp_path / {"empty": "empty.txt", "latin1": "latin1.txt", "parquet": "fake.parquet"}[kind]
    path.write_bytes({"empty": b"", "latin1": "Ein Dokument über Äpfel.\n\n".encode("latin-1") * 50,
                      "parquet": b"this is plain text, not parquet\n" * 20}[kind])
    return path


@pytest.mark.parametrize("kind", ["empty", "latin1", "parquet"])
def test_a_dataset_that_cannot_be_read_is_named(kind, train_args, tmp_path):
    path = _bad_dataset(tmp_path, kind)
    result = cli(*train_args, "--dataset", path, "--tokens", "640", "--out", tmp_path / "run")
    assert_short_error(result, path)


def test_a_model_directory_with_a_junk_config_is_named(train_args, tiny_model_dir, tmp_path):
    junk = tmp_path / "junk-model"
    shutil.copytree(tiny_model_dir, junk)
    (junk / "config.json").write_text('{"model_type": "no-such-architecture", "hidden_size": "wide"}')
    result = cli(*train_args, "--model", junk, "--tokens", "640", "--out", tmp_path / "run")
    assert_short_error(result, junk)
    assert "sentencepiece" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", ["bogus", "cuda:99" if torch.cuda.is_available() else "cuda"])
def test_a_wrong_device_is_refused_before_anything_loads(device, train_args, tmp_path):
    result = cli(*train_args, "--device", device, "--tokens", "640", "--out", tmp_path / "run")
    assert_short_error(result, f"--device {device}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('sae = 3\n', "sae must be a table"),
        ('train = "fast"\n[sae.a]\narch = "topk"\n', "train must be a table"),
        ('[sae]\nx = 3\n', "sae.x must be a table"),
        ('[sae.a]\narch = "topk"\nk = 0\n', "[sae.a]: k must satisfy"),
        ('[sae.a]\narch = "nope"\n', "[sae.a]: unknown architecture 'nope'"),
        ('[sae.a]\narch = "topk"\ntemperature = 2\n', "[sae.a]: --temperature is not a setting"),
    ],
)
def test_run_file_errors_say_what_is_wrong_where(toml, message, tiny_model_dir, text_corpus_dir, tmp_path):
    run_file = tmp_path / "run.toml"
    run_file.write_text(toml)
    result = cli("train", "--config", run_file, "--model", tiny_model_dir, "--dataset", text_corpus_dir,
                 "--out", tmp_path / "run")
    assert_short_error(result, run_file, message)
    assert "sweeps" not in result.stderr


@pytest.mark.parametrize("name", ["../x", "/abs/dir", "a/b", "a\\b", "..", ".hidden", "tab\there", "new\nline", "x" * 256])
def test_sae_names_that_are_not_one_plain_name_are_refused_before_anything_is_written(name, tiny_model_dir,
                                                                                        text_corpus_dir, tmp_path):
    run_file = tmp_path / "run.toml"
    run_file.write_text(f'[sae.{json.dumps(name)}]\narch = "topk"\nk = 4\nlatent-size = 64\n')
    before = sorted(tmp_path.rglob("*"))
    result = cli("train", "--config", run_file, "--model", tiny_model_dir, "--dataset", text_corpus_dir,
                 "--out", tmp_path / "deep" / "run")
    assert_short_error(result, "cannot name an SAE")
    assert sorted(tmp_path.rglob("*")) == before, "nothing may be written, inside the run or outside it"


def test_damaged_checkpoints_are_named(trained, tmp_path):
    no_arch, truncated = tmp_path / "no-arch", tmp_path / "truncated"
    for target in (no_arch, truncated):
        shutil.copytree(trained / SAE, target)
    config = json.loads((no_arch / CONFIG_FILE).read_text())
    del config["architecture"]
    (no_arch / CONFIG_FILE).write_text(json.dumps(config))
    weights = (truncated / WEIGHTS_FILE).read_bytes()
    (truncated / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    assert_short_error(cli("evaluate", no_arch, "--tokens", "64"), no_arch / CONFIG_FILE, "architecture")
    assert_short_error(cli("evaluate", truncated, "--tokens", "64"), truncated / WEIGHTS_FILE, "damaged or truncated")


def test_debug_shows_the_traceback_of_the_error_behind_the_message(train_args, tmp_path):
    path = _bad_dataset(tmp_path, "parquet")
    result = CliRunner().invoke(make_cli(), ["--debug", *map(str, train_args), "--dataset", str(path),
                                             "--tokens", "640", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "Traceback" in result.stderr and str(path) in result.stderr.splitlines()[-1]


def test_a_single_document_source_is_reported_and_evaluating_its_empty_split_is_an_error(tiny_model_dir, tmp_path):
    text = next(t for i in range(100) if split_of(t := f"Document {i}: " + "a long story of many words. " * 400) == "train")
    (tmp_path / "one.txt").write_text(text)
    out = tmp_path / "run"
    trained = cli("train", "--model", tiny_model_dir, "--dataset", tmp_path / "one.txt", *SMALL, "--tokens", "640",
                  "--out", out)
    assert trained.exit_code == 0, trained.output
    assert "warning" in trained.stderr and "the eval split holds 0 of" in trained.stderr
    evaluated = cli("evaluate", out / SAE)
    assert_short_error(evaluated, "the eval split holds no tokens")
    assert not (out / SAE / "eval.json").exists()


def test_json_is_never_written_with_nan(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        write_json(tmp_path / "x.json", {"loss": float("nan")})
    assert not list(tmp_path.iterdir()), "neither the file nor a temp file"


def test_a_negative_multiplier_is_a_clamp():
    assert Clamp.parse("1=*-2") == Clamp(1, "mul", -2.0) and str(Clamp.parse("1=*-2")) == "1=*-2"
    assert Clamp.parse("7=-3") == Clamp(7, "add", -3.0)


def test_urls_are_recorded_without_their_secrets():
    url = "https://user:hunter2@api.example.com:8443/v1?api-key=s3cret#frag"
    assert public_url(url) == "https://api.example.com:8443/v1"
    assert recorded_options({"base_url": url, "model": "gpt"}) == {"base_url": "https://api.example.com:8443/v1",
                                                                   "model": "gpt"}


# -- one writer per run ---------------------------------------------------------------------------------------


def test_a_second_trainer_on_one_out_is_refused_and_the_first_finishes_intact(train_args, tmp_path):
    out = tmp_path / "run"
    first = routesae_process(*train_args, "--tokens", "4096", "--out", out, home=tmp_path / "home")
    lock = lock_path(out, "train")
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text()) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = cli(*train_args, "--tokens", "4096", "--seed", "7", "--out", out)
    assert_short_error(second, f"{out} is being written by another routesae train", f"pid {first.pid}")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["status"] == "finished" and manifest["train"]["seed"] == 42
    assert not lock.exists(), "a holder that ends removes its lock file"


def test_a_lock_left_by_a_dead_process_is_taken_over(train_args, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    lock_path(out, "train").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "since": "x"}))
    result = cli(*train_args, "--tokens", "640", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"took over the train lock on {out}" in result.stderr and f"pid {int(dead.stdout)}" in result.stderr


def test_a_refused_command_leaves_no_directory_behind(train_args, tmp_path):
    assert cli(*train_args, "--tokens", "640", "--resume", "--out", tmp_path / "new").exit_code == 2
    assert not (tmp_path / "new").exists()


# -- crashes and resumes ----------------------------------------------------------------------------------------


def test_kills_at_random_moments_resume_to_the_uninterrupted_weights_with_each_step_logged_once(train_args, tmp_path):
    """SIGKILL a run with a checkpoint after every step at random moments (mid-step, mid-checkpoint), resume each
    time, and end with the weights of a run never killed, every step in metrics.jsonl once, and no temp files."""
    args = [*train_args, "--tokens", "4096", "--checkpoint-every", "1", "--log-every", "1"]
    reference = routesae_process(*args, "--out", tmp_path / "reference", home=tmp_path / "home")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    out, rng, kills = tmp_path / "killed", random.Random(1234), 0
    metrics = out / METRICS_FILE

    def steps_logged():
        return metrics.read_text().count('"event": "step"') if metrics.is_file() else 0

    while True:
        resume = ["--resume"] if (out / MANIFEST_FILE).is_file() else []
        process = routesae_process(*args, *resume, "--out", out, home=tmp_path / "home")
        if kills < 8:
            logged = steps_logged()
            while process.poll() is None and steps_logged() <= logged:
                time.sleep(0.01)  # until this process trains: a kill during start-up tests nothing
            time.sleep(rng.uniform(0, 0.15))
            process.send_signal(signal.SIGKILL)
        if process.wait(timeout=300) == 0 or json.loads((out / MANIFEST_FILE).read_text())["status"] == "finished":
            break  # (a kill that came after the last checkpoint finds the run finished)
        assert process.returncode == -signal.SIGKILL, process.stderr.read()
        kills += 1
    assert kills >= 4, "the run should have been killed several times while it trained"
    expected = load_file(tmp_path / "reference" / SAE / WEIGHTS_FILE)
    got = load_file(out / SAE / WEIGHTS_FILE)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records if r["event"] == "step"]
    finished = json.loads((out / MANIFEST_FILE).read_text())["progress"]["step"]
    assert steps == list(range(1, finished + 1)), steps
    assert [r["event"] for r in records].count("finish") == 1
    assert not [p for p in out.rglob(f"*{TEMP_SUFFIX}")], "orphan temp files"


def test_resume_may_change_the_schedule_and_cadence_and_records_it(train_args, tmp_path):
    out = tmp_path / "run"
    args = [*train_args, "--tokens", "1280", "--checkpoint-every", "4", "--out", out]
    process = routesae_process(*args, home=tmp_path / "home")
    while process.poll() is None and not ((out / MANIFEST_FILE).is_file()
                                          and json.loads((out / MANIFEST_FILE).read_text())["progress"]["step"] >= 8):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    step = json.loads((out / MANIFEST_FILE).read_text())["progress"]["step"]
    assert 0 < step < 20
    refused = cli(*args, "--resume", "--k", "8")
    assert_short_error(refused, "cannot resume", "k of SAE 1 (topk) 4 -> 8")
    assert "lr" not in refused.stderr
    resumed = cli(*args, "--resume", "--lr", "0.0001", "--log-every", "3", "--checkpoint-every", "5", "--device", "cpu")
    assert resumed.exit_code == 0, resumed.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["status"] == "finished" and manifest["train"]["lr"] == 0.0001
    assert manifest["resumes"] == [{"step": step, "changes": {"lr": {"from": 0.0005, "to": 0.0001}}}]


def test_a_file_is_on_disk_before_its_name_and_its_name_before_the_write_returns(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    write_json(tmp_path / "run.json", {"status": "running"})
    assert len(synced) == 2 and Path(synced[0]).name.startswith(".run.json.") and synced[1] == str(tmp_path)


def test_files_keep_the_umask_mode(trained):
    mask = os.umask(0)
    os.umask(mask)
    for path in [trained / MANIFEST_FILE, trained / SAE / CONFIG_FILE, trained / SAE / WEIGHTS_FILE]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_orphan_temp_files_are_removed_by_the_next_writer(trained, train_args, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    orphans = [run / f".{MANIFEST_FILE}.abc123{TEMP_SUFFIX}", run / SAE / f".{WEIGHTS_FILE}{TEMP_SUFFIX}",
               run / SAE / f".eval.json.x1{TEMP_SUFFIX}"]
    for orphan in orphans:
        orphan.write_text("half")
    keep = run / SAE / "notes.tmp"  # not ours
    keep.write_text("mine")
    assert cli("evaluate", run, "--tokens", "64").exit_code == 0
    assert not orphans[2].exists() and orphans[0].exists(), "evaluate clears its own temp files only"
    assert cli(*train_args, "--tokens", "640", "--out", run, "--overwrite").exit_code == 0
    assert not any(o.exists() for o in orphans) and keep.read_text() == "mine"
