"""The activation stream: every kept token is served exactly once, shuffled, without BOS or padding."""

import pytest
import torch
from transformers import AutoTokenizer

from routesae.activations import ActivationStream, training_positions
from routesae.data import load_corpus
from routesae.lm import LanguageModel


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return LanguageModel.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def blocks(tiny_model_dir, text_corpus_dir, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return load_corpus(str(text_corpus_dir), tok, context_length=32, cache=False).split("train")


def test_training_positions_drop_position_zero_and_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert training_positions(mask, keep_bos=False).tolist() == [[False, True, True, False], [False, True, True, True]]
    assert training_positions(mask, keep_bos=True).tolist() == mask.tolist()


@pytest.mark.parametrize("keep_bos", [False, True])
def test_stream_serves_each_kept_token_exactly_once(lm, blocks, keep_bos):
    layers = [1, 3]
    stream = ActivationStream(lm, blocks, layers, lm_batch_size=4, sae_batch_tokens=50, buffer_tokens=200, keep_bos=keep_bos)
    served = list(stream)
    assert all(b.shape[1:] == (2, lm.d_model) for b in served)
    assert all(b.shape[0] == 50 for b in served[:-1]) and 0 < served[-1].shape[0] <= 50
    got = torch.cat(served)
    expected = torch.cat(
        [lm.capture(ids, mask, layers)[training_positions(mask, keep_bos)] for ids, mask in blocks.batches(4)]
    )
    assert got.shape == expected.shape == (int(training_positions(blocks.attention_mask, keep_bos).sum()), 2, lm.d_model)
    # Same multiset of rows: sort both by a per-row key.
    def canonical(x):
        return x[torch.argsort(x[:, 0, 0] * 1e3 + x[:, 1, 1])]

    torch.testing.assert_close(canonical(got), canonical(expected))
    assert not torch.equal(got, expected), "the stream must shuffle"
    assert stream.blocks_consumed == len(blocks)


def test_stream_is_deterministic_and_resumes_from_a_block(lm, blocks):
    def run(**kw):
        return torch.cat(list(ActivationStream(lm, blocks, [2], lm_batch_size=4, sae_batch_tokens=32, buffer_tokens=128, seed=7, **kw)))

    torch.testing.assert_close(run(), run())
    later = run(start_block=8)
    expected_rows = int(training_positions(blocks.attention_mask[8:], keep_bos=False).sum())
    assert later.shape[0] == expected_rows
