"""Latent dashboards: the logit lens against a hand computation from the Hugging Face weights, and the firing
frequency and activation histogram against a brute force over the whole apply split, on a tiny Llama whose final
norm has a non-trivial gain."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, LlamaForCausalLM

from routesae.activations import training_positions
from routesae.architectures.base import SAE
from routesae.architectures.topk import TopKSAE
from routesae.checkpoint import load_sae, read_sae_config, save_sae
from routesae.contexts import extract_contexts, read_contexts
from routesae.contexts.dashboard import HISTOGRAM_BINS, FiringHistogram, LogitLens
from routesae.contexts.windows import Vocabulary
from routesae.data import load_corpus
from routesae.files import write_json
from routesae.lm import LanguageModel
from routesae.loading import corpus_for
from routesae.plugins import get_plugin_manager

NAMES = ("topk", "routesae", "crosscoder")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with a random final-norm gain (its init is all ones, which would hide a missing gain)."""
    path = tmp_path_factory.mktemp("gain-llama")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    model = LlamaForCausalLM.from_pretrained(path)
    torch.manual_seed(3)
    with torch.no_grad():
        model.model.norm.weight.copy_(1 + 0.5 * torch.randn_like(model.model.norm.weight))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("dashboards-home")


@pytest.fixture(autouse=True)
def _shared_home(home, monkeypatch):
    monkeypatch.setenv("ROUTESAE_HOME", str(home))


@pytest.fixture(scope="module")
def lm(model_dir):
    return LanguageModel.load(str(model_dir))


def build(arch: str, settings: dict, lm: LanguageModel, seed: int) -> SAE:
    torch.manual_seed(seed)
    cls = get_plugin_manager().get("architecture", arch)
    sae = cls(cls.build_config({"latent_size": 48, **settings}).resolve(lm.n_layers), lm.d_model)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae.eval()


@pytest.fixture(scope="module")
def saes(lm, text_corpus_dir, home, tmp_path_factory):
    """A TopK, a RouteSAE and a crosscoder (random weights), saved as checkpoints of the tiny model."""
    root = tmp_path_factory.mktemp("dashboards")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROUTESAE_HOME", str(home))
        corpus = load_corpus(str(text_corpus_dir), lm.tokenizer, context_length=32, seed=0)
    data = {**corpus.describe(), "split": "train", "keep_bos": False}
    built = {
        "topk": build("topk", {"layer": 2, "k": 4}, lm, 0),
        "routesae": build("routesae", {"layers": "1:2", "k": 4}, lm, 1),
        "crosscoder": build("crosscoder", {"layers": "1:2", "k": 4}, lm, 2),
    }
    for name, sae in built.items():
        save_sae(sae, root / name, {"name": name, "model": lm.describe(), "data": data})
    return root


@pytest.fixture(scope="module")
def extracted(saes, lm, home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROUTESAE_HOME", str(home))
        return extract_contexts([saes / n for n in NAMES], threshold=0.5, min_contexts=1, max_classes=0, held_out=0,
                                pool=0, batch_size=3, logit_lens=7, lm=lm)


@pytest.mark.parametrize("name", NAMES)
def test_logit_lens_is_the_direction_times_the_norm_gain_through_the_unembedding(extracted, saes, model_dir, name):
    record = extracted[str(saes / name)]
    hf = LlamaForCausalLM.from_pretrained(model_dir)  # the weights as Hugging Face reads them, not through lm.py
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sae, _ = load_sae(saes / name)
    W_dec = {"topk": lambda: sae.W_dec, "routesae": lambda: sae.sae.W_dec, "crosscoder": lambda: sae.W_dec[:, -1]}[name]()
    gain, W_U = hf.model.norm.weight, hf.lm_head.weight.T
    assert not torch.allclose(gain, torch.ones_like(gain))
    assert record["logit_lens"] == {"tokens": 7, "final_norm": "gain", "note": None}
    assert record["latents"]
    for latent, r in record["latents"].items():
        logits = (W_dec[int(latent)] * gain) @ W_U
        for key, top in (("promoted", logits.topk(7)), ("suppressed", logits.topk(7, largest=False))):
            shown = r["logit_lens"][key]
            assert [t["id"] for t in shown] == top.indices.tolist()
            assert [t["logit"] for t in shown] == pytest.approx(top.values.tolist(), rel=1e-5, abs=1e-6)
            assert [t["token"] for t in shown] == [tokenizer.decode([i]) for i in top.indices.tolist()]


@pytest.mark.parametrize("name", NAMES)
def test_frequency_and_histogram_match_a_brute_force_over_the_split(extracted, saes, lm, name):
    record = extracted[str(saes / name)]
    sae, _ = load_sae(saes / name)
    blocks = corpus_for(read_sae_config(saes / name), lm).split("apply")
    ids, mask = blocks.input_ids, blocks.attention_mask
    special = Vocabulary.build(lm.tokenizer, max(lm.vocab_size, len(lm.tokenizer))).special
    counted = (training_positions(mask, keep_bos=False) & ~special[ids]).reshape(-1)
    acts = lm.capture(ids, mask, list(sae.layers))
    with torch.no_grad():
        z = sae(acts.reshape(-1, len(sae.layers), lm.d_model)).latents[counted]
    assert record["counted_tokens"] == int(counted.sum())
    for latent, r in record["latents"].items():
        values = z[:, int(latent)][z[:, int(latent)] > 0]
        assert r["firings"] == len(values) == sum(r["histogram"]["counts"])
        assert r["frequency"] == pytest.approx(len(values) / int(counted.sum()))
        width = r["histogram"]["bin_width"]
        assert width * HISTOGRAM_BINS / 2 <= values.max() < width * HISTOGRAM_BINS, "the top bin is the smallest power of two"
        expected = torch.bincount((values / width).floor().long(), minlength=len(r["histogram"]["counts"]))
        assert r["histogram"]["counts"] == expected.tolist()
        assert r["histogram"]["counts"][-1] > 0 and (len(r["histogram"]["counts"]) - 1) * width <= r["max_activation"]


def test_the_dashboards_do_not_depend_on_the_batch_size(extracted, saes, lm):
    again = extract_contexts([saes / n for n in NAMES], threshold=0.5, min_contexts=1, max_classes=0, held_out=0, pool=0,
                             batch_size=1, logit_lens=7, lm=lm)
    assert again == extracted


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 3), st.floats(1e-3, 1e3)), max_size=20), min_size=1, max_size=5))
def test_histogram_rescaling_is_exact_whatever_the_batching(batches):
    """Binning batch by batch, widening as larger values come, equals binning everything at the final width."""
    histogram = FiringHistogram(4, "cpu")
    for batch in batches:
        z = torch.zeros(max(len(batch), 1), 4)
        for row, (latent, value) in enumerate(batch):
            z[row, latent] = value
        histogram.update(z, torch.ones(len(z), dtype=torch.bool))
    values = torch.tensor([v for batch in batches for _, v in batch], dtype=torch.float32)
    latents = torch.tensor([f for batch in batches for f, _ in batch], dtype=torch.long)
    for f, record in histogram.records(list(range(4))).items():
        mine = values[latents == f]
        assert record["firings"] == len(mine)
        if len(mine):
            width = record["histogram"]["bin_width"]
            expected = torch.bincount((mine / width).floor().long(), minlength=len(record["histogram"]["counts"]))
            assert record["histogram"]["counts"] == expected.tolist()
        else:
            assert record["histogram"] == {"bin_width": 0.0, "counts": []}


def test_an_sae_without_directions_gets_a_note_not_a_crash(lm):
    class Directionless(TopKSAE):
        def latent_directions(self):
            return None

    sae = Directionless(TopKSAE.build_config({"layer": 2, "k": 4, "latent_size": 8}).resolve(lm.n_layers), lm.d_model)
    about, directions = LogitLens(lm, [], 5).setting(sae)
    assert directions is None and "no logit lens" in about["note"]
    plain = TopKSAE(TopKSAE.build_config({"layer": 2, "k": 4, "latent_size": 8}).resolve(lm.n_layers), lm.d_model)
    assert LogitLens(lm, [], 0).setting(plain) == ({"tokens": 0, "final_norm": "gain", "note": "logit_lens is 0: no tokens asked for"}, None)


def test_an_older_contexts_file_is_still_read(extracted, saes, tmp_path):
    record = read_contexts(saes / "topk")
    old = {**record, "format_version": 1}
    del old["counted_tokens"], old["logit_lens"]
    for r in old["latents"].values():
        for key in ("firings", "frequency", "histogram", "logit_lens"):
            del r[key]
    write_json(tmp_path / "contexts.json", old)
    assert read_contexts(tmp_path)["format_version"] == 1
