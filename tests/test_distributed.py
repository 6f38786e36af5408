"""Data-parallel work under ``torchrun``: two CPU ranks (gloo, one thread each) train, evaluate and extract contexts
as one process does.

Every test starts the real launcher, ``python -m torch.distributed.run --nproc-per-node 2 -m routesae
train ...``, as a user would, and compares with ``routesae train`` in one process. The ranks' shares
of a batch are summed in another order than one process sums the whole batch, so weights agree to
float tolerance (``TOLERANCE``), while steps, tokens and routing-count totals agree exactly.

Why ``atol`` is 1e-4: Adam divides each gradient by its running RMS, so where a weight's gradient is
near zero (RouteSAE's router, early on) a last-bit difference in the summed gradient moves the weight
by a visible fraction of the learning rate (5e-4); measured on SmolLM2, router weights differed by up
to 3e-5 after two steps, every other weight by under 3e-7.

Hard routing is discontinuous: a token whose two most probable blocks are within float noise of each
other can go to either, and once the two runs' routers differ by an Adam step, more tokens are that
close. On SmolLM2 over 16 blocks, 1 to 9 tokens of 8,192 did (how many, and which, depends on the CPU's
float kernels and on the standardisation's: the same command passed a 2 x lr bound on one machine and
came to 3.1 x lr on another), so up to ``NEAR_TIES`` (a quarter of a percent) may. From the step a token goes elsewhere, the two runs' router
gradients differ and Adam, whose step is about lr whatever the gradient's size, can move them apart by
up to 2 x lr a step: that is the elementwise bound for a routed SAE with such tokens (``adam_bound``).
The bulk must still agree: each of its tensors differs by at most ``ROUTED_RELATIVE`` of its norm
(measured: 1.2% for the router, 0.4% for the inner SAE). Routing-count totals (every token is
routed once) are always identical.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from routesae.rundir import CHECKPOINTS_DIR, MANIFEST_FILE, WEIGHTS_FILE

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
LR = 5e-4  # TrainConfig's default, which these runs use
ROUTED_RELATIVE = 0.02
NEAR_TIES = 8192 // 400  # tokens of the 8,192 routed to another block than in one process, at most
TINY = ["--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "64", "--buffer-tokens", "256",
        "--k", "4", "--latent-size", "64", "--device", "cpu", "--report", "jsonl"]


def routesae(*args, ranks=1, env=None, home):
    """``routesae ARGS`` in one process, or under ``torchrun`` with ``ranks`` processes; returns the finished process."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "routesae"]
    command = launcher if ranks > 1 else [sys.executable, "-m", "routesae"]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "ROUTESAE_HOME": str(home), **(env or {})}
    return subprocess.run([*command, *args], check=False, capture_output=True, text=True, env=environ, timeout=600)


def weights(run):
    manifest = json.loads((run / MANIFEST_FILE).read_text())
    return {sae["name"]: load_file(run / sae["path"] / WEIGHTS_FILE) for sae in manifest["saes"]}


def routing_counts(run, name):
    counts = json.loads((run / name / "config.json").read_text())["training"]["statistics"].get("routing_counts", {})
    return {block: int(count) for block, count in counts.items()}


def adam_bound(steps):
    """How far apart two Adam runs can move a weight in ``steps`` steps of about ``LR`` each."""
    return 2 * LR * steps


def assert_same_training(single, ddp, near_ties=0):
    """Same steps, tokens and routing-count totals; weights within TOLERANCE; with ``near_ties``, a routed SAE may
    send up to that many tokens elsewhere and its weights stay within the Adam bound elementwise and within
    ROUTED_RELATIVE of their norm (see the module docstring)."""
    one, two = (json.loads((run / MANIFEST_FILE).read_text()) for run in (single, ddp))
    assert one["progress"] == two["progress"] and two["world_size"] == 2 and one["world_size"] == 1
    for name, expected in weights(single).items():
        got = weights(ddp)[name]
        assert expected.keys() == got.keys()
        counts = [routing_counts(run, name) for run in (single, ddp)]
        assert sum(counts[0].values()) == sum(counts[1].values()), name
        moved = sum(abs(counts[0][b] - counts[1][b]) for b in counts[0]) // 2
        assert moved <= near_ties, (name, counts)
        tolerance = {**TOLERANCE, "atol": adam_bound(one["progress"]["step"])} if moved else TOLERANCE
        for key in expected.keys() - {"routing_counts"}:  # compared as counts above
            torch.testing.assert_close(got[key], expected[key], **tolerance, msg=lambda m: f"{name} {key}: {m}")
            relative = ((got[key] - expected[key]).norm() / expected[key].norm()).item()
            assert not moved or relative <= ROUTED_RELATIVE, (name, key, relative)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("routesae-home")


@pytest.fixture
def tiny(tiny_model_dir, text_corpus_dir):
    return ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), *TINY]


def test_two_ranks_train_the_weights_one_process_trains(tiny, tmp_path, home):
    args = [*tiny, "--arch", "topk", "--arch", "routesae", "--tokens", "2048", "--json"]
    single = routesae(*args, "--out", str(tmp_path / "single"), home=home)
    ddp = routesae(*args, "--out", str(tmp_path / "ddp"), ranks=2, home=home)
    assert single.returncode == 0, single.stderr
    assert ddp.returncode == 0, ddp.stderr
    assert json.loads(ddp.stdout)["tokens"] == json.loads(single.stdout)["tokens"] == 2048, "rank 0 alone prints"
    assert_same_training(tmp_path / "single", tmp_path / "ddp")
    logged = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in logged].count("start") == 1, "rank 0 alone reports"


def test_two_ranks_train_two_epochs_as_one_process_does(tiny_model_dir, text_corpus_dir, tmp_path, home):
    """--epochs 2 on one file: the second epoch's reshuffled groups split between the ranks as the first's do."""
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir / "a.txt"), *TINY,
            "--arch", "topk", "--epochs", "2", "--json"]
    single = routesae(*args, "--out", str(tmp_path / "single"), home=home)
    ddp = routesae(*args, "--out", str(tmp_path / "ddp"), ranks=2, home=home)
    assert single.returncode == 0, single.stderr
    assert ddp.returncode == 0, ddp.stderr
    assert json.loads(ddp.stdout)["tokens"] == json.loads(single.stdout)["tokens"]
    assert json.loads((tmp_path / "ddp" / MANIFEST_FILE).read_text())["progress"]["epoch"] == 1
    assert_same_training(tmp_path / "single", tmp_path / "ddp")


@pytest.mark.embedded
@pytest.mark.parametrize("archs", [["topk"], ["routesae", "topk"]], ids=["topk", "routesae+topk"])
def test_two_ranks_on_the_embedded_model(archs, tmp_path, embedded_home):
    args = ["train", "--tokens", "8192", "--batch-size", "8", "--sae-batch-tokens", "1024", "--buffer-tokens", "4096",
            "--k", "32", "--latent-size", "1024", "--device", "cpu", "--report", "jsonl",
            *[a for arch in archs for a in ("--arch", arch)]]
    single = routesae(*args, "--out", str(tmp_path / "single"), home=embedded_home)
    ddp = routesae(*args, "--out", str(tmp_path / "ddp"), ranks=2, home=embedded_home)
    assert single.returncode == 0, single.stderr
    assert ddp.returncode == 0, ddp.stderr
    assert_same_training(tmp_path / "single", tmp_path / "ddp", near_ties=NEAR_TIES)


@pytest.mark.embedded
def test_two_ranks_evaluate_and_extract_contexts_on_the_embedded_model(tmp_path, embedded_home):
    run = tmp_path / "run"
    train = routesae("train", "--tokens", "4096", "--batch-size", "8", "--sae-batch-tokens", "1024", "--buffer-tokens",
                     "4096", "--k", "32", "--latent-size", "1024", "--device", "cpu", "--report", "jsonl", "--arch",
                     "routesae", "--arch", "topk", "--out", str(run), home=embedded_home)
    assert train.returncode == 0, train.stderr
    options = ["--tokens", "1024", "--batch-size", "4"]
    assert_same_evaluation(evaluated(run, *options, ranks=1, home=embedded_home),
                           evaluated(run, *options, ranks=2, home=embedded_home))
    options = ["--tokens", "4096", "--threshold", "2", "--batch-size", "4"]
    single = extracted_contexts(run, *options, ranks=1, home=embedded_home)
    ddp = extracted_contexts(run, *options, ranks=2, home=embedded_home)
    assert len(single) == 2 and all(r["interpretable_latents"] > 0 for r in single.values())
    assert ddp == single


@pytest.fixture(scope="module")
def killer_site(tmp_path_factory):
    """A reporter plugin, as an installed distribution on a path of its own, that SIGKILLs its process at a step."""
    site = tmp_path_factory.mktemp("killer-site")
    (site / "routesae_killer.py").write_text(textwrap.dedent("""
        import os, signal
        from routesae.hookspecs import hookimpl
        from routesae.reporters import Reporter

        class Killer(Reporter):
            name = "killer"

            def step(self, report):
                if report.step >= int(os.environ["KILL_AT_STEP"]):
                    os.kill(os.getpid(), signal.SIGKILL)

        @hookimpl
        def register_reporters(register):
            register(Killer)
    """))
    info = site / "routesae_killer-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: routesae-killer\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[routesae]\nkiller = routesae_killer\n")
    return site


def test_a_killed_run_resumes_to_the_weights_of_the_uninterrupted_one(tiny, tmp_path, home, killer_site):
    """Rank 0 is killed (SIGKILL, mid-run, after a checkpoint): the other rank stops, nothing is corrupt, and
    ``--resume`` on two ranks ends with the weights of a run that was never interrupted."""
    args = [*tiny, "--arch", "routesae", "--tokens", "2048", "--checkpoint-every", "4", "--log-every", "2"]
    whole = routesae(*args, "--out", str(tmp_path / "whole"), ranks=2, home=home)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    plugin = {"PYTHONPATH": str(killer_site), "KILL_AT_STEP": "10"}
    killed = routesae(*args, "--out", str(out), "--report", "killer", ranks=2, home=home, env=plugin)
    assert killed.returncode != 0
    # torchrun names the rank that died; the other stops either on its own, saying why (when it reaches a
    # collective first), or because torchrun stops it: never by hanging.
    assert f"exitcode  : {-signal.SIGKILL}" in killed.stderr or "SIGKILL" in killed.stderr, killed.stderr[-2000:]
    assert "rank      : 0" in killed.stderr
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["status"] == "running" and manifest["progress"]["step"] == 8, "the last complete checkpoint"
    assert [p.name for p in (out / CHECKPOINTS_DIR).iterdir()] == ["step-000008"]

    one_rank = routesae(*args, "--out", str(out), "--resume", home=home)
    assert one_rank.returncode == 2 and "trained by 2 process(es), this is 1" in one_rank.stderr, one_rank.stderr

    resumed = routesae(*args, "--out", str(out), "--resume", ranks=2, home=home)
    assert resumed.returncode == 0, resumed.stderr
    for name, expected in weights(tmp_path / "whole").items():
        got = weights(out)[name]
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], **TOLERANCE, msg=lambda m: f"{name} {key}: {m}")


def test_a_world_size_that_cannot_split_the_work_is_a_clear_error(tiny, tmp_path, home):
    args = [*tiny, "--tokens", "512", "--buffer-tokens", "64", "--out", str(tmp_path / "run")]
    result = routesae(*args, ranks=2, home=home)
    assert result.returncode != 0
    assert "Error: 2 ranks cannot split the work" in result.stderr, result.stderr[-2000:]
    assert "raise --buffer-tokens to at least 256" in result.stderr
    assert "routesae/" not in "".join(line for line in result.stderr.splitlines() if line.lstrip().startswith("File ")), (
        "routesae's own error is a message, not a traceback (torchrun adds its own)"
    )
    assert not (tmp_path / "run" / MANIFEST_FILE).exists(), "nothing is written"


def test_commands_that_run_in_one_process_refuse_torchrun(tmp_path, home):
    result = routesae("report", str(tmp_path), ranks=2, home=home)
    assert result.returncode != 0
    assert "Error: routesae report runs in one process; under torchrun only train, evaluate, contexts run" in result.stderr


def evaluated(run, *options, ranks, home):
    """``routesae evaluate RUN --json`` on ``ranks`` processes: its records by SAE name."""
    result = routesae("evaluate", str(run), "--device", "cpu", "--json", *options, ranks=ranks, home=home)
    assert result.returncode == 0, result.stderr[-3000:]
    return {Path(d).name: record for d, record in json.loads(result.stdout).items()}


def extracted_contexts(run, *options, ranks, home):
    """``routesae contexts RUN`` on ``ranks`` processes: the contexts.json it wrote, by SAE name."""
    result = routesae("contexts", str(run), "--device", "cpu", *options, ranks=ranks, home=home)
    assert result.returncode == 0, result.stderr[-3000:]
    return {d.name: json.loads((d / "contexts.json").read_text()) for d in sorted(run.iterdir()) if (d / "contexts.json").exists()}


def assert_same_evaluation(single, ddp):
    """The same SAEs, tokens and settings; every metric within 1e-5 relative (sums are added in another order)."""
    assert single.keys() == ddp.keys() and single
    for name, one in single.items():
        two = ddp[name]
        assert (two["tokens"], two["settings"]) == (one["tokens"], one["settings"]), name
        assert (one["pass"]["world_size"], two["pass"]["world_size"]) == (1, 2)
        assert one["metrics"].keys() == two["metrics"].keys() and len(one["metrics"]) >= 8
        for metric, value in one["metrics"].items():
            assert two["metrics"][metric] == pytest.approx(value, rel=1e-5, abs=1e-9, nan_ok=True), (name, metric)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, text_corpus_dir, tmp_path_factory, home):
    """A TopK and a RouteSAE trained in one process on the tiny model."""
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), *TINY, "--arch", "topk",
            "--arch", "routesae", "--tokens", "2048", "--out", str(out)]
    result = routesae(*args, home=home)
    assert result.returncode == 0, result.stderr
    return out


def test_two_ranks_evaluate_what_one_process_evaluates(tiny_run, home):
    """The eval split in batches of 2 sequences: an odd number of batches, so the ranks read unequal shares."""
    single = evaluated(tiny_run, "--batch-size", "2", ranks=1, home=home)
    ddp = evaluated(tiny_run, "--batch-size", "2", ranks=2, home=home)
    assert_same_evaluation(single, ddp)
    written = json.loads((tiny_run / next(iter(ddp)) / "eval.json").read_text())
    assert written["pass"]["world_size"] == 2, "rank 0 writes eval.json"
    reference = evaluated(tiny_run, "--batch-size", "2", "--reference-metrics", "--metric", "kldiv", ranks=2, home=home)
    assert all(r["settings"]["reference_metrics"] for r in reference.values())


def test_two_ranks_extract_the_contexts_one_process_extracts(tiny_run, home):
    options = ["--threshold", "0.5", "--window", "12", "--max-classes", "8", "--min-contexts", "2", "--held-out", "3",
               "--pool", "20", "--batch-size", "2"]
    single = extracted_contexts(tiny_run, *options, ranks=1, home=home)
    ddp = extracted_contexts(tiny_run, *options, ranks=2, home=home)
    assert single.keys() == ddp.keys() and len(single) == 2
    for name, record in single.items():
        assert record["interpretable_latents"] > 0 and record["hits"] > 0, f"{name}: the comparison is not empty"
        assert any(latent["held_out"] for latent in record["latents"].values())
        assert ddp[name] == record, name


def test_too_few_batches_for_the_ranks_is_a_clear_error(tiny_run, home):
    result = routesae("evaluate", str(tiny_run), "--device", "cpu", "--tokens", "20", ranks=2, home=home)
    assert result.returncode != 0
    assert "Error: 2 ranks cannot split 1 batch(es) of the eval split: each needs one" in result.stderr, result.stderr[-2000:]


def test_the_readme_gives_the_torchrun_commands():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "## Multi-GPU and multi-node" in readme
    assert "torchrun --standalone --nproc-per-node" in readme and "torchrun --nnodes" in readme
