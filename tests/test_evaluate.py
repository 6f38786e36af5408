"""Evaluation by splicing, on a tiny Llama: exact expectations for identity and zero SAEs, direct
KL/CE computations under both position conventions, RouteSAE's masked splice, multi-SAE passes,
the CLI and bad input."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from routesae import SAESpec, TrainConfig, train
from routesae.architectures.base import SAEOutput, SingleLayerConfig, SingleLayerSAE
from routesae.architectures.routesae import RouteSAE
from routesae.architectures.topk import TopKSAE
from routesae.checkpoint import save_sae
from routesae.cli import make_cli
from routesae.data import load_corpus
from routesae.errors import RouteSAEError
from routesae.evaluate import counted_positions, evaluate, splice_edits
from routesae.hookspecs import hookimpl
from routesae.lm import LanguageModel
from routesae.plugins import get_plugin_manager

CONTEXT = 32
SEED = 42


class IdentitySAE(SingleLayerSAE):
    """Reconstruction = input, exactly (no standardisation round trip)."""

    name = "test-identity"

    def forward(self, acts_NLD):
        x = acts_NLD[:, 0]
        return SAEOutput(latents=x.clone(), x_hat=x, target=x)


class ZeroSAE(SingleLayerSAE):
    name = "test-zero"

    def forward(self, acts_NLD):
        x = acts_NLD[:, 0]
        return SAEOutput(latents=torch.zeros_like(x), x_hat=torch.zeros_like(x), target=x)


class TestArchitectures:
    @hookimpl
    def register_architectures(self, register):
        register(IdentitySAE)
        register(ZeroSAE)


@pytest.fixture
def test_archs():
    pm = get_plugin_manager()
    pm.register(TestArchitectures(), name="test-evaluate-archs")
    try:
        yield
    finally:
        pm.unregister("test-evaluate-archs")


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return LanguageModel.load(str(tiny_model_dir))


@pytest.fixture
def corpus(lm, text_corpus_dir):
    return load_corpus(str(text_corpus_dir), lm.tokenizer, context_length=CONTEXT, seed=SEED)


@pytest.fixture
def save(lm, corpus, tmp_path):
    """Save an SAE with the metadata the trainer writes (model, data, seed) and return its directory."""

    def save_(sae, name):
        meta = {
            "name": name,
            "model": lm.describe(),
            "data": {**corpus.describe(), "split": "train", "keep_bos": False},
            "training": {"seed": SEED},
        }
        save_sae(sae, tmp_path / name, meta)
        return tmp_path / name

    return save_


def topk(layer, seed=0):
    torch.manual_seed(seed)
    return TopKSAE(TopKSAE.build_config({"layer": layer, "latent_size": 64, "k": 4}).resolve(4), 64)


def single(cls, layer):
    return cls(SingleLayerConfig(layer=layer, latent_size=64, normalize="none"), 64)


def test_identity_sae_changes_nothing(test_archs, lm, save):
    directory = save(single(IdentitySAE, 2), "identity")
    m = evaluate(directory, lm=lm)[str(directory)]["metrics"]
    assert m["normmse"] == 0 and m["fvu"] == 0
    assert m["kldiv"] == pytest.approx(0, abs=1e-6)
    assert m["deltace"] == pytest.approx(0, abs=1e-6)
    assert m["recovered"] == pytest.approx(1, abs=1e-5)
    assert m["recovered_mean_ablation"] == pytest.approx(1, abs=1e-5)
    assert m["cosine"] == pytest.approx(1, abs=1e-6)
    record = json.loads((directory / "eval.json").read_text())
    assert record["metrics"] == m and record["split"] == "eval" and record["tokens"] > 0
    assert record["routesae_version"] and record["settings"]["reference_metrics"] is False


def test_zero_reconstruction_recovers_nothing(test_archs, lm, save):
    directory = save(single(ZeroSAE, 1), "zero")
    m = evaluate(directory, ["recovered", "deltace", "l0", "dead_eval"], lm=lm)[str(directory)]["metrics"]
    # spliced == zero-ablated, so Recovered is 0 up to the reference's 1e-8 in the denominator
    delta = m["deltace"]
    assert abs(delta) > 1e-4
    assert m["recovered"] == pytest.approx(1 - delta / (delta + 1e-8), rel=1e-3, abs=1e-9)
    assert abs(m["recovered"]) < 1e-4
    assert m["l0"] == 0 and m["dead_eval"] == 1
    assert set(m) == {"recovered", "recovered_mean_ablation", "deltace", "l0", "dead_eval"}


def _direct(lm, sae, corpus, reference):
    """KL and CE on the whole eval split in one batch, computed without the evaluator's helpers."""
    blocks = corpus.split("eval")
    ids, mask = blocks.input_ids, blocks.attention_mask
    B, T = ids.shape
    layer = sae.layers[0]
    acts = lm.capture(ids, mask, [layer])
    with torch.no_grad():
        x_hat = sae.reconstruction(sae(acts.reshape(B * T, 1, -1)))[layer][0].view(B, T, -1)
    counted = torch.ones(B, T, dtype=torch.bool) if reference else mask.bool() & (torch.arange(T) > 0)
    clean = lm.logits(ids, mask)
    spliced = lm.splice(ids, mask, {layer: lambda h: torch.where(counted[..., None], x_hat, h)})
    kl = F.kl_div(spliced.log_softmax(-1), clean.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    labels = ids[:, 1:].clone()
    if not reference:
        labels[~(counted[:, :-1] & mask[:, 1:].bool())] = -100
    ce = [F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), labels.reshape(-1)) for lg in (clean, spliced)]
    kl_value = kl.sum() / B if reference else kl[counted].mean()
    return float(kl_value), float(ce[1] - ce[0]), int(counted.sum())


@pytest.mark.parametrize("reference", [False, True])
def test_kl_and_ce_match_a_direct_computation(lm, save, corpus, reference):
    sae = topk(2)
    directory = save(sae, "topk")
    blocks = corpus.split("eval")
    record = evaluate(directory, ["kldiv", "deltace"], batch_size=len(blocks), reference_metrics=reference, lm=lm)[str(directory)]
    kl, dce, counted = _direct(lm, sae, corpus, reference)
    assert record["metrics"]["kldiv"] == pytest.approx(kl, rel=1e-4)
    assert record["metrics"]["deltace"] == pytest.approx(dce, rel=1e-4, abs=1e-6)
    assert record["tokens"] == counted
    assert blocks.attention_mask.all(-1).logical_not().any(), "the eval split should end in a padded block"
    assert counted == (blocks.input_ids.numel() if reference else blocks.n_tokens - len(blocks))


def test_counted_positions_drop_position_zero_and_padding():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert counted_positions(mask, reference=False).tolist() == [[False, True, True, True], [False, True, False, False]]
    assert counted_positions(mask, reference=True).all()


def test_routesae_splice_changes_only_routed_tokens_at_routed_blocks(lm, corpus):
    torch.manual_seed(0)
    sae = RouteSAE(RouteSAE.build_config({"layers": "1:2", "latent_size": 64, "k": 4}).resolve(4), 64).eval()
    ids, mask = next(corpus.split("eval").batches(4))
    B, T = ids.shape
    clean = lm.capture(ids, mask, [0, 1, 2, 3])
    with torch.no_grad():
        recon = sae.reconstruction(sae(clean[:, :, 1:3].reshape(B * T, 2, -1)))
    counted = counted_positions(mask, reference=False)
    edits = splice_edits(recon, counted, "spliced", {1: clean[:, :, 1], 2: clean[:, :, 2]})
    with lm.edits(edits):
        edited = lm.capture(ids, mask, [0, 1, 2, 3])
    replaced = {block: (m.view(B, T) & counted) for block, (_, m) in recon.items()}
    assert replaced[1].any() and replaced[2].any(), "an untrained router should use both blocks"
    assert not (replaced[1] & replaced[2]).any(), "each token is replaced at one block at most"
    torch.testing.assert_close(edited[:, :, 0], clean[:, :, 0], rtol=0, atol=0)
    for i, block in enumerate((1, 2)):
        at = replaced[block]
        torch.testing.assert_close(edited[:, :, block][at], recon[block][0].view(B, T, -1)[at])
        # untouched: not replaced here, and no token at or before it replaced at an earlier block
        earlier = replaced[1] if block == 2 else torch.zeros_like(at)
        upstream = earlier.cumsum(-1) > 0
        untouched = ~at & ~upstream
        assert untouched.any()
        torch.testing.assert_close(edited[:, :, block][untouched], clean[:, :, block][untouched], rtol=0, atol=0)
        assert not torch.equal(edited[:, :, block][at], clean[:, :, block][at])
    # position 0 and padding are never replaced, so they stay clean until a later real token is
    assert torch.equal(edited[:, 0], clean[:, 0])


def test_two_saes_in_one_pass_match_each_alone(lm, save):
    a, b = save(topk(1, seed=1), "a"), save(topk(2, seed=2), "b")
    together = evaluate([a, b], batch_size=3, tokens=300, lm=lm)
    alone = {**evaluate(a, batch_size=3, tokens=300, lm=lm), **evaluate(b, batch_size=3, tokens=300, lm=lm)}
    assert together.keys() == alone.keys()
    for key in together:
        assert together[key]["metrics"] == pytest.approx(alone[key]["metrics"], rel=1e-5, abs=1e-7)
        assert together[key]["tokens"] == alone[key]["tokens"] >= 300


def test_saes_on_one_block_share_their_ablated_forwards(lm, save, monkeypatch):
    """Zero- and mean-ablated forwards depend on the replaced positions only: one per batch for SAEs on one block."""
    forwards = []
    splice = LanguageModel.splice
    monkeypatch.setattr(LanguageModel, "splice", lambda self, *args: forwards.append(1) or splice(self, *args))
    dirs = [save(topk(2, seed=seed), f"sae{seed}") for seed in (1, 2, 3)]
    evaluate(dirs, ["recovered"], batch_size=4, tokens=4 * 15, lm=lm)  # one batch
    assert len(forwards) == 3 + 2  # a spliced forward per SAE, one zero- and one mean-ablated between them


def test_a_run_directory_expands_to_its_saes(lm, save, tmp_path):
    a, b = save(topk(1), "a"), save(topk(2), "b")
    (tmp_path / "run.json").write_text(json.dumps({"saes": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}]}))
    results = evaluate(tmp_path, ["l0"], tokens=100, lm=lm)
    assert list(results) == [str(a), str(b)]
    assert all(r["metrics"]["l0"] == pytest.approx(4) for r in results.values())


def test_bad_input_gets_clear_errors(lm, save, tmp_path):
    directory = save(topk(2), "topk")
    with pytest.raises(RouteSAEError, match="unknown metric 'nope'; installed: cosine, dead_eval"):
        evaluate(directory, ["nope"], lm=lm)
    with pytest.raises(RouteSAEError, match="eval split holds"):
        evaluate(directory, ["l0"], tokens=10**9, lm=lm)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RouteSAEError, match="holds no SAE checkpoint"):
        evaluate(tmp_path / "empty", lm=lm)
    config = json.loads((directory / "config.json").read_text())
    config["d_model"] = config["model"]["d_model"] = 32
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(RouteSAEError, match="not the model"):
        evaluate(directory, lm=lm)


def test_cli_prints_a_table_and_json(save, tmp_path):
    directory = save(topk(2), "topk")
    result = CliRunner().invoke(make_cli(), ["evaluate", str(directory), "--metric", "l0", "--metric", "normmse", "--tokens", "100", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)[str(directory)]
    assert set(record["metrics"]) == {"l0", "normmse"}
    assert record["sae"] in result.stderr and "eval tokens" in result.stderr, "the console reporter's table goes to stderr"
    bad = CliRunner().invoke(make_cli(), ["evaluate", str(directory), "--metric", "nope"])
    assert bad.exit_code == 2 and "installed:" in bad.output


@pytest.mark.parametrize("arch", ["topk", "routesae", "crosscoder", "vanilla", "gated", "jumprelu"])
def test_every_builtin_architecture_evaluates(lm, save, arch):
    cls = get_plugin_manager().get("architecture", arch)
    torch.manual_seed(0)
    sae = cls(cls.build_config({"latent_size": 64}).resolve(4), 64)
    directory = save(sae, arch)
    m = evaluate(directory, tokens=200, lm=lm)[str(directory)]["metrics"]
    assert set(m) >= {"normmse", "kldiv", "deltace", "recovered", "recovered_mean_ablation", "l0", "dead_eval", "fvu", "cosine"}
    assert all(math.isfinite(v) for v in m.values()), m
    assert m["kldiv"] >= 0


def test_cli_evaluates_a_trained_run_directory(tiny_model_dir, text_corpus_dir, tmp_path):
    """What ``make demo`` does: a TopK and a RouteSAE from one harvest, then ``routesae evaluate RUN``."""
    out = tmp_path / "run"
    specs = [SAESpec.build("topk", k=4, latent_size=64, layer=2), SAESpec.build("routesae", k=4, latent_size=64, layers="1:2")]
    cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(text_corpus_dir), tokens=640, batch_size=4, context_length=CONTEXT,
                      sae_batch_tokens=64, buffer_tokens=256, device="cpu")
    summary = train(specs, out, cfg, reporters=[])
    result = CliRunner().invoke(make_cli(), ["evaluate", str(out), "--tokens", "200", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    for sae in summary["saes"]:
        assert sae["name"] in result.output
        record = json.loads((out / sae["name"] / "eval.json").read_text())
        assert record["tokens"] >= 200 and record["metrics"]["l0"] == pytest.approx(4)
        assert record["settings"]["data"]["source"] == str(text_corpus_dir)
