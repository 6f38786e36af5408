"""The run directory: checkpoint generations survive a writer killed at every file boundary; layout and names."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from routesae import SAESpec, TrainConfig, train
from routesae.checkpoint import load_sae
from routesae.errors import RouteSAEError
from routesae.rundir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    MANIFEST_FILE,
    RNG_FILE,
    TRAINER_STATE_FILE,
    WEIGHTS_FILE,
    RunDirectory,
    check_sae_name,
    expand_dirs,
)

NAMES = ("topk-L1-k4-F64", "routesae-L0-3-hard-sum-k4-F64")


class Killed(BaseException):
    """What the injected fault raises: like SIGKILL, nothing of ours catches it."""


class FileBoundaries:
    """Counts the renames and replaces that end every durable write into a run, and kills the process at one of them.

    Every file routesae writes into a run becomes visible through ``os.replace`` (atomic writes,
    published links) or ``os.rename`` (a generation put in place), so these calls are the boundaries
    between files. Only those under ``run`` count (libraries write their own caches elsewhere).
    """

    def __init__(self, monkeypatch) -> None:
        self.count, self.kill_at, self.run, self.targets = 0, None, None, []
        for name in ("replace", "rename"):
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def watch(self, run, kill_at=None):
        self.count, self.kill_at, self.run, self.targets = 0, kill_at, str(run), []
        return run

    def checkpoints(self) -> list[range]:
        """The boundaries (1-based) of each checkpoint seen: from its first file into a staging generation to its last publication."""
        starts = [i for i, t in enumerate(self.targets, 1) if "/.step-" in t and "/.step-" not in self.targets[i - 2]]
        return [range(a, b) for a, b in zip(starts, [*starts[1:], len(self.targets) + 1])]

    def _wrap(self, real):
        def boundary(source, target, *args, **kwargs):
            if self.run is not None and str(target).startswith(self.run):
                self.count += 1
                self.targets.append(str(target))
                if self.count == self.kill_at:
                    raise Killed(f"killed before boundary {self.count}: {target}")
            return real(source, target, *args, **kwargs)

        return boundary


@pytest.fixture
def setup(tiny_model_dir, text_corpus_dir):
    # AuxK acts on latents dead for 128 tokens (two steps), so resuming also needs the dead-latent counters back
    cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(text_corpus_dir), tokens=768, batch_size=4, context_length=32,
                      sae_batch_tokens=64, buffer_tokens=256, log_every=100, checkpoint_every=4, dead_after_tokens=128)
    specs = [SAESpec.build("topk", k=4, latent_size=64, layer=1, auxk=1 / 32),
             SAESpec.build("routesae", k=4, latent_size=64, layers="0:3")]
    return cfg, specs


def weights(out):
    return {name: load_file(out / name / WEIGHTS_FILE) for name in NAMES}


def assert_same_weights(a, b):
    for name in NAMES:
        assert a[name].keys() == b[name].keys() and all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


def finish(specs, out, cfg):
    """What a user does after a crash: resume the run if its manifest says one is under way, else start it."""
    manifest = out / MANIFEST_FILE
    resume = manifest.is_file() and json.loads(manifest.read_text())["status"] == "running"
    return train(specs, out, cfg, resume=resume, reporters=[])


def test_a_checkpoint_is_a_generation_and_the_sae_directories_publish_it(setup, tmp_path):
    cfg, specs = setup
    out = tmp_path / "run"
    train(specs, out, cfg, reporters=[])
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    generation = out / manifest["checkpoint"]
    assert manifest["checkpoint"] == f"{CHECKPOINTS_DIR}/step-{manifest['progress']['step']:06d}"
    assert [p.name for p in (out / CHECKPOINTS_DIR).iterdir()] == [generation.name], "only the current generation is kept"
    assert (generation / RNG_FILE).is_file() and not (out / RNG_FILE).exists()
    for name in NAMES:
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            assert (out / name / file).read_bytes() == (generation / name / file).read_bytes()
        assert (generation / name / TRAINER_STATE_FILE).is_file() and not (out / name / TRAINER_STATE_FILE).exists()
        load_sae(out / name)
    assert expand_dirs([out]) == [out / name for name in NAMES]
    assert not list(out.rglob(".*.tmp")), "no temp files are left behind"


def test_killed_at_every_file_boundary_of_a_checkpoint_resumes_to_the_uninterrupted_weights(setup, tmp_path, monkeypatch):
    cfg, specs = setup
    counter = FileBoundaries(monkeypatch)
    reference = counter.watch(tmp_path / "reference")
    train(specs, reference, cfg, reporters=[])
    expected = weights(reference)
    checkpoints = counter.checkpoints()  # steps 4, 8, 12 and the finished 13th
    # per checkpoint: 3 files per SAE, the RNG, the rename into place, run.json, and 2 published files per SAE
    assert len(checkpoints) == 4 and all(len(c) == 3 * 2 + 1 + 1 + 1 + 2 * 2 for c in checkpoints)
    for kill_at in [*checkpoints[1], *checkpoints[-1]]:  # every boundary of a middle checkpoint and of the final one
        out = counter.watch(tmp_path / f"killed-{kill_at}", kill_at)
        with pytest.raises(Killed):
            train(specs, out, cfg, reporters=[])
        counter.watch(out)
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        for name in NAMES:  # the SAE directories hold one whole checkpoint at any moment, or a load error that says so
            try:
                load_sae(out / name)
            except RouteSAEError as e:
                assert "belong to different checkpoints" in str(e)
        assert (out / manifest["checkpoint"]).is_dir(), "run.json points at a complete generation"
        finish(specs, out, cfg)
        assert_same_weights(weights(out), expected)
        assert [p.name for p in (out / CHECKPOINTS_DIR).iterdir()] == ["step-000013"], kill_at
        for name in NAMES:
            load_sae(out / name)


def test_a_run_from_before_generations_resumes(setup, tmp_path, monkeypatch):
    """Runs written by the earlier layout (trainer state beside each SAE, rng.safetensors in the run) still continue."""
    cfg, specs = setup
    reference = tmp_path / "reference"
    counter = FileBoundaries(monkeypatch)
    train(specs, counter.watch(reference), cfg, reporters=[])
    expected = weights(reference)
    second_checkpoint = counter.checkpoints()[1]

    out = counter.watch(tmp_path / "legacy", kill_at=second_checkpoint[0])  # killed as the second generation begins
    with pytest.raises(Killed):
        train(specs, out, cfg, reporters=[])
    counter.watch(out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    generation = out / manifest.pop("checkpoint")
    for name in NAMES:
        shutil.copy(generation / name / TRAINER_STATE_FILE, out / name / TRAINER_STATE_FILE)
    shutil.copy(generation / RNG_FILE, out / RNG_FILE)
    shutil.rmtree(out / CHECKPOINTS_DIR)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))

    train(specs, out, cfg, resume=True, reporters=[])
    assert_same_weights(weights(out), expected)
    assert not (out / RNG_FILE).exists() and not any((out / name / TRAINER_STATE_FILE).exists() for name in NAMES)


def test_a_run_recorded_by_an_earlier_version_is_the_same_run(setup, tmp_path):
    """run.json's request holds each SAE's settings as that version wrote them (TopK had ``dead_tokens``)."""
    cfg, specs = setup
    out = tmp_path / "run"
    summary = train(specs, out, cfg, reporters=[])
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["request"]["saes"][0]["config"]["dead_tokens"] = 100_000
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(RouteSAEError, match="already holds this finished run"):
        train(specs, out, cfg, reporters=[])
    assert summary["saes"][0]["final"]["auxk"] > 0, "AuxK acted in this run"


def test_sae_names_must_be_one_plain_path_component():
    for bad in ("../x", "/abs/dir", "a/b", "a\\b", ".hidden", "..", "", CHECKPOINTS_DIR):
        with pytest.raises(RouteSAEError, match="cannot name an SAE"):
            check_sae_name(bad)
    assert check_sae_name("topk-L21-k32-F4096") == "topk-L21-k32-F4096"


def test_a_fresh_run_replaces_the_manifest_and_keeps_later_sections_on_resume(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.start({"request": 1, "status": "running"})
    run.update_manifest({"pipeline": {"stages": {}}})
    assert run.update_manifest({"status": "finished"}) == {"request": 1, "status": "finished", "pipeline": {"stages": {}}}
    run.start({"request": 2, "status": "running"})
    assert run.read_manifest() == {"request": 2, "status": "running"}
