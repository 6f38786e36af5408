"""A training step never reads a tensor back to the host: on a GPU each such read waits for the device.

Every way a value leaves a tensor for Python is counted (``item``, ``tolist``, ``cpu``, ``numpy``,
truth value, ``int``/``float``/``index``); on the CPU nothing waits, but the same calls would on a
GPU, so the count is the same. Losses, logged terms, the NaN/inf guard and the dead-latent
counters stay on the device and are read every ``log_every`` steps and before checkpoints.

The language model's own forward is left out of the count: Hugging Face and TransformerLens read
a value of the attention mask per forward (whether it can be skipped, whether positions move), as a
plain Hugging Face forward does too.
"""

import pytest
import torch

from routesae import SAESpec, TrainConfig, train
from routesae.lm import LanguageModel
from routesae.trained_sae import TrainedSAE

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
SPECS = {
    "topk": {"k": 4},
    "topk-auxk": {"k": 4, "auxk": 1 / 32},
    "routesae": {"k": 4, "layers": "0:3"},
    "vanilla": {},
    "gated": {},
    "jumprelu": {},
    "crosscoder": {"k": 4, "layers": "1:2"},
    "batchtopk": {"k": 4},
}


class ReadBacks:
    """Counts reads of tensor values into Python outside the language model's forward, in total and inside
    ``TrainedSAE.step``."""

    def __init__(self, monkeypatch):
        self.total = self.in_step = 0
        self.where: str | None = None
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))
        self._mark(monkeypatch, TrainedSAE, "step")
        self._mark(monkeypatch, LanguageModel, "capture")

    def _mark(self, monkeypatch, owner, method):
        real = getattr(owner, method)

        def marked(*args, **kwargs):
            self.where = method
            try:
                return real(*args, **kwargs)
            finally:
                self.where = None

        monkeypatch.setattr(owner, method, marked)

    def _counting(self, read):
        def counted(tensor, *args, **kwargs):
            if self.where != "capture":
                self.total += 1
                self.in_step += self.where == "step"
            return read(tensor, *args, **kwargs)

        return counted


@pytest.fixture
def config(tiny_model_dir, text_corpus_dir):
    def make(tokens, **settings):
        return TrainConfig(model=str(tiny_model_dir), dataset=str(text_corpus_dir), tokens=tokens, batch_size=4,
                           context_length=32, sae_batch_tokens=64, buffer_tokens=256, checkpoint_every=0, **settings)

    return make


@pytest.mark.parametrize("name", sorted(SPECS))
def test_no_training_step_reads_a_tensor_back(name, config, tmp_path, monkeypatch):
    arch = name.split("-")[0]
    settings = dict(SPECS[name])
    if arch not in ("routesae", "crosscoder"):
        settings["layer"] = 2
    spec = SAESpec.build(arch, latent_size=64, **settings)
    reads = ReadBacks(monkeypatch)
    summary = train([spec], tmp_path / "run", config(1280, log_every=5, dead_after_tokens=128), reporters=["jsonl"])
    assert summary["steps"] > 10 and reads.total > 0, "the counter sees the reads at log steps and checkpoints"
    assert reads.in_step == 0


def test_reads_do_not_grow_with_the_steps_between_logs(config, tmp_path, monkeypatch):
    spec = SAESpec.build("routesae", k=4, latent_size=64, layers="0:3")
    train([spec], tmp_path / "warm-up", config(640), reporters=["jsonl"])  # tokenises the corpus once
    reads = ReadBacks(monkeypatch)
    counts = []
    steps = []
    for tokens in (640, 1280):  # about 10 and 20 steps, no log step, one checkpoint at the end of each
        reads.total = 0
        steps.append(train([spec], tmp_path / f"run-{tokens}", config(tokens, log_every=1000), reporters=["jsonl"])["steps"])
        counts.append(reads.total)
    assert steps[1] > steps[0] and counts[0] == counts[1], (steps, counts)
