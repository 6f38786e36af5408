"""The notebook one-liners: a string's latents, and a model with SAEs spliced in (checked against evaluation)."""

import pytest
import torch
from click.testing import CliRunner

import routesae
from routesae.cli import make_cli
from routesae.data import leading_blocks
from routesae.errors import RouteSAEError
from routesae.evaluate import counted_positions
from routesae.lm import LanguageModel
from routesae.loading import corpus_for
from routesae.metrics.base import kl_BT

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def run(tiny_model_dir, text_corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("notebook") / "run"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), "--k", "4", "--latent-size", "64",
            "--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "64", "--buffer-tokens", "256",
            "--tokens", "1280", "--arch", "topk", "--arch", "routesae", "--report", "jsonl", "--out", str(out)]
    assert CliRunner().invoke(make_cli(), args).exit_code == 0
    return {"topk": out / "topk-L2-k4-F64", "routesae": out / "routesae-L0-2-hard-sum-k4-F64"}


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return LanguageModel.load(str(tiny_model_dir))


@pytest.mark.parametrize("name", ["topk", "routesae"])
def test_latents_of_a_string_are_the_saes_latents_on_its_raw_residuals(run, lm, name):
    found = routesae.latents(run[name], TEXT, model=lm)
    ids = lm.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert found.token_ids == ids[0].tolist() and len(found) == ids.shape[1]
    assert "".join(found.tokens) == lm.tokenizer.decode(ids[0])
    sae = routesae.load(run[name])
    with torch.no_grad():
        out = sae(lm.capture(ids, torch.ones_like(ids), list(sae.layers))[0])
    for n in range(len(found)):
        expected = {int(i): float(out.latents[n, i]) for i in out.latents[n].nonzero().squeeze(1)}
        assert dict(zip(found.latents[n], found.values[n])) == pytest.approx(expected)
        assert [abs(v) for v in found.values[n]] == sorted((abs(v) for v in found.values[n]), reverse=True)
        assert 0 < len(found.latents[n]) <= 4
    if name == "routesae":
        assert set(found.blocks) <= {0, 1, 2} and found.blocks == sae.routed_blocks(out).tolist()
    else:
        assert set(found.blocks) == {2}
    assert f"{found.latents[1][0]}:" in str(found)


@pytest.mark.parametrize("name", ["topk", "routesae"])
def test_spliced_logits_are_what_evaluation_measures(run, lm, name):
    """KL(clean || spliced) from logits inside ``spliced`` equals ``routesae evaluate``'s kldiv on the same tokens."""
    record = routesae.evaluate(run[name], ["kldiv"], tokens=200, batch_size=4, lm=lm, reporters=[])[str(run[name])]
    blocks = corpus_for(routesae.load(run[name]).checkpoint, lm).split("eval")
    n_blocks, _ = leading_blocks(counted_positions(blocks.attention_mask, False), 200, "eval")
    total = count = 0.0
    for start in range(0, n_blocks, 4):
        ids, mask = blocks.input_ids[start : min(start + 4, n_blocks)], blocks.attention_mask[start : min(start + 4, n_blocks)]
        clean = lm.logits(ids, mask)
        with routesae.spliced(lm, run[name]) as model:
            spliced = model.logits(ids, mask)
        counted = counted_positions(mask, False)
        total += float(kl_BT(clean, spliced)[counted].sum())
        count += int(counted.sum())
    assert total / count == pytest.approx(record["metrics"]["kldiv"], rel=1e-5)


def test_splicing_ends_with_the_block_and_leaves_position_0_alone(run, lm):
    ids = lm.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    clean = lm.logits(ids, torch.ones_like(ids))
    with routesae.spliced(lm, run["topk"]):
        inside = lm.logits(ids, torch.ones_like(ids))
        first = routesae.generate(lm, TEXT, max_new_tokens=1, temperature=0, chat=False)
    assert torch.equal(inside[0, 0], clean[0, 0]) and not torch.allclose(inside[0, 1:], clean[0, 1:])
    assert first == lm.tokenizer.decode([int(inside[0, -1].argmax())]), "greedy generation reads the spliced logits"
    assert torch.equal(lm.logits(ids, torch.ones_like(ids)), clean), "the plain model is back after the block"


def test_two_saes_writing_one_block_are_refused(run, lm):
    with pytest.raises(RouteSAEError, match="write the same block"), routesae.spliced(lm, run["topk"], run["routesae"]):
        pass
