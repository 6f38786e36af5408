"""Context extraction on a tiny Llama with really trained SAEs: every context is recomputed from the
model, the top contexts are compared with a brute-force reference written here, and the top-N
routine is property-tested against a brute force."""

import json
import random
from collections import defaultdict

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import TRAINING_TEXT

from routesae import SAESpec, TrainConfig, train
from routesae.activations import training_positions
from routesae.architectures.base import NO_INFERENCE, Inference
from routesae.architectures.topk import TopKSAE
from routesae.checkpoint import load_sae, read_sae_config, save_sae
from routesae.cli import make_cli
from routesae.contexts import ContextsConfig, extract_contexts, read_contexts, render_context
from routesae.contexts.extract import PERCENTILE_TOKENS, threshold_rule
from routesae.contexts.topn import TopN, top_per_group
from routesae.contexts.windows import Vocabulary, crop, sentence_bounds, token_class, window_tokens
from routesae.data import load_corpus
from routesae.errors import RouteSAEError
from routesae.lm import LanguageModel
from routesae.loading import corpus_for

CONTEXT = 32
THRESHOLD = 1.0
NAMES = ("topk-L2-k4-F64", "routesae-L1-2-hard-sum-k4-F64", "crosscoder-L1-2-k4-F64")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("contexts-home")


@pytest.fixture(autouse=True)
def _shared_home(home, monkeypatch):
    """The module's tests share one token cache (conftest gives each test its own)."""
    monkeypatch.setenv("ROUTESAE_HOME", str(home))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Short documents of varied sentences (., ! and ? endings, a non-ASCII word), one blank line apart."""
    rng = random.Random(0)
    sentences = [s.strip() for text in TRAINING_TEXT for s in text.replace("\n", " ").split(". ") if s.strip()]
    sentences += ["Is this a question?", "What a day!", "Café au lait is served."]
    docs = [" ".join(rng.choice(sentences) for _ in range(rng.randint(1, 4))) + f" Item {i}!" for i in range(300)]
    root = tmp_path_factory.mktemp("contexts-corpus")
    (root / "docs.txt").write_text("\n\n".join(docs))
    return root


@pytest.fixture(scope="module")
def run(tiny_model_dir, corpus_dir, home, tmp_path_factory):
    """A TopK, a RouteSAE and a Crosscoder trained from one harvest of the tiny model."""
    out = tmp_path_factory.mktemp("contexts-run") / "run"
    specs = [
        SAESpec.build("topk", k=4, latent_size=64, layer=2),
        SAESpec.build("routesae", k=4, latent_size=64, layers="1:2"),
        SAESpec.build("crosscoder", latent_size=64, layers="1:2", k=4),
    ]
    cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(corpus_dir), tokens=2048, batch_size=8,
                      context_length=CONTEXT, sae_batch_tokens=128, buffer_tokens=512, device="cpu", seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROUTESAE_HOME", str(home))
        summary = train(specs, out, cfg, reporters=[])
    assert [s["name"] for s in summary["saes"]] == list(NAMES)
    return out


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return LanguageModel.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def blocks(lm, run, home):
    """The apply split the SAEs' training data leaves (same source, context length and split seed)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROUTESAE_HOME", str(home))
        return corpus_for(read_sae_config(run / NAMES[0]), lm).split("apply")


@pytest.fixture(scope="module")
def extracted(run, lm, home):
    """Every SAE of the run in one pass, with settings that keep a fair share of latents."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROUTESAE_HOME", str(home))
        return extract_contexts(run, threshold=THRESHOLD, window=12, max_classes=8, min_contexts=3, held_out=3, pool=20,
                                batch_size=4, lm=lm)


def latents_of(lm, run, name, blocks, infer=NO_INFERENCE):
    """z ``[B, T, F]`` and the per-token routed block of SAE ``name`` on the whole apply split, in one batch."""
    sae, _ = load_sae(run / name)
    ids, mask = blocks.input_ids, blocks.attention_mask
    B, T = ids.shape
    acts = lm.capture(ids, mask, list(sae.layers))
    with torch.no_grad(), sae.inference(infer):
        out = sae(acts.reshape(B * T, len(sae.layers), -1))
    chosen = out.extras.get("chosen")
    return out.latents.view(B, T, -1), None if chosen is None else torch.tensor(sae.layers)[chosen].view(B, T)


def all_contexts(record):
    for latent, r in record["latents"].items():
        for cls, contexts in r["classes"].items():
            for c in contexts:
                yield int(latent), cls, c
        for c in r["held_out"]:
            yield int(latent), None, c


# --- the top-N routine ------------------------------------------------------------------------------------


def brute_top(groups, scores, n):
    by_group = defaultdict(list)
    for i, (g, s) in enumerate(zip(groups, scores)):
        by_group[g].append((-s, i))
    return [i for g in sorted(by_group) for _, i in sorted(by_group[g])[:n]]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.sampled_from([0.0, 0.5, 1.0, 2.5, -1.0, 7.0])), max_size=60),
    st.integers(1, 4),
    st.integers(1, 5),
)
def test_top_per_group_matches_a_brute_force_whatever_the_batching(rows, n, n_batches):
    groups, scores = [g for g, _ in rows], [s for _, s in rows]
    expected = brute_top(groups, scores, n)
    got = top_per_group(torch.tensor(groups, dtype=torch.long), torch.tensor(scores), n)
    assert got.tolist() == expected
    table = TopN(n, {"index": torch.long})
    cuts = sorted(random.Random(len(rows)).sample(range(len(rows) + 1), min(n_batches, len(rows) + 1)))
    for lo, hi in zip([0, *cuts], [*cuts, len(rows)]):
        table.update(torch.tensor(groups[lo:hi], dtype=torch.long), torch.tensor(scores[lo:hi]),
                     index=torch.arange(lo, hi))
    assert table.rows["index"].tolist() == expected, "ties keep the earliest row, batches or not"


# --- windows ----------------------------------------------------------------------------------------------


def test_sentence_bounds_stop_at_sentence_ends_and_boundaries():
    texts = ["a", " b", ".", '."', "?\n", "<s>", "</s>", " c"]
    ender = torch.tensor([False, False, True, True, True, False, False, False])
    special = torch.tensor([False, False, False, False, False, True, True, False])
    vocab = Vocabulary(texts, torch.arange(8), texts, ender, special)
    ids = torch.tensor([[5, 0, 1, 3, 1, 0, 2, 1, 6, 0, 1, 7]])
    mask = torch.tensor([[1] * 10 + [0] * 2])
    start, end = sentence_bounds(ids, mask, vocab)
    # BOS | a b ." | b a . | b EOS | a b(pad) c(pad)
    assert start[0, 1:8].tolist() == [1, 1, 1, 4, 4, 4, 7] and end[0, 1:8].tolist() == [3, 3, 3, 6, 6, 6, 7]
    assert start[0, 9].item() == 9 and end[0, 9].item() == 9, "a window never runs into padding"
    lo, hi = crop(torch.tensor([0, 0]), torch.tensor([20, 3]), torch.tensor([10, 2]), 4)
    assert lo.tolist() == [8, 0] and hi.tolist() == [11, 3]


def test_window_tokens_join_to_the_decoded_text_even_when_characters_split(lm):
    ids = lm.tokenizer("Café ἴσος. Done", add_special_tokens=False).input_ids
    vocab = Vocabulary.build(lm.tokenizer, len(lm.tokenizer))
    pieces = [vocab.texts[i] for i in ids]
    assert "".join(pieces) != lm.tokenizer.decode(ids), "byte-level pieces of a split character do not join"
    (tokens,) = window_tokens(lm.tokenizer, vocab, [ids])
    assert "".join(tokens) == "Café ἴσος. Done" and len(tokens) == len(ids)
    assert token_class(" Paris ") == "paris" and token_class("\n") == "\n"


# --- the file ---------------------------------------------------------------------------------------------


def test_the_file_has_the_agreed_schema(extracted, run, lm, blocks):
    record = read_contexts(run / NAMES[0])
    assert record == json.loads((run / NAMES[0] / "contexts.json").read_text()) == extracted[str(run / NAMES[0])]
    assert record["format"] == "routesae.contexts" and record["format_version"] == 2
    assert record["sae"] == NAMES[0] and record["architecture"] == "topk" and record["latent_size"] == 64
    assert record["model"] == str(lm.spec)
    s = record["settings"]
    assert (s["threshold"], s["window"], s["top_per_class"], s["max_classes"], s["min_contexts"], s["held_out"]) == (
        THRESHOLD, 12, 2, 8, 3, 3)
    assert s["infer_k"] is None and s["theta"] is None
    assert s["tokens"] == int(training_positions(blocks.attention_mask, False).sum())
    assert s["data"]["split"] == "apply" and len(s["data"]["fingerprint"]) == 32
    assert 0 < record["interpretable_latents"] == len(record["latents"]) < 64
    keys = list(record["latents"])
    assert keys == [str(k) for k in sorted(map(int, keys))]
    for r in record["latents"].values():
        assert isinstance(r["activations"], int) and r["max_activation"] > THRESHOLD
        assert list(r["classes"]) == sorted(r["classes"])
        assert all(isinstance(p, int) for p in r["non_activating"])
        assert isinstance(r["firings"], int) and r["firings"] >= r["activations"]
        assert set(r["histogram"]) == {"bin_width", "counts"} and set(r["logit_lens"]) == {"promoted", "suppressed"}
    assert len(record["pool"]) == 20
    for latent, _, c in all_contexts(record):
        assert set(c) == {"tokens", "index", "activation", "layer", "document", "position"}
        assert all(isinstance(t, str) for t in c["tokens"]) and isinstance(c["index"], int)
        assert isinstance(c["activation"], float) and c["layer"] == 2
    for c in record["pool"]:
        assert c["index"] is None and c["activation"] == 0.0 and c["layer"] is None


@pytest.mark.parametrize("name", NAMES)
def test_every_context_really_activates_when_recomputed(extracted, run, lm, blocks, name):
    record = extracted[str(run / name)]
    z, routed = latents_of(lm, run, name, blocks)
    assert record["latents"], "the settings should keep some latents"
    for latent, cls, c in all_contexts(record):
        row, t = c["document"], c["position"]
        assert z[row, t, latent].item() == pytest.approx(c["activation"], rel=1e-4, abs=1e-5)
        assert c["activation"] > THRESHOLD
        token = lm.tokenizer.decode([blocks.input_ids[row, t]])
        if "\ufffd" not in token:  # else a split character: the piece holds what the byte completes
            assert c["tokens"][c["index"]] == token
        if cls is not None:
            assert cls == token_class(token)
        expected_layer = {"topk": 2, "crosscoder": None}.get(record["architecture"])
        if record["architecture"] == "routesae":
            expected_layer = int(routed[row, t])
        assert c["layer"] == expected_layer, "RouteSAE records the routed block, single-layer SAEs theirs"


def test_windows_stay_in_one_document_without_padding(extracted, run, lm, blocks):
    special = set(lm.tokenizer.all_special_ids)
    cropped = False
    for record in extracted.values():
        windows = [c for _, _, c in all_contexts(record)] + record["pool"]
        for c in windows:
            row, first = c["document"], c["position"] - (c["index"] or 0)
            ids = blocks.input_ids[row, first : first + len(c["tokens"])].tolist()
            assert 0 < len(c["tokens"]) <= 12
            assert "".join(c["tokens"]) == lm.tokenizer.decode(ids)
            assert not special & set(ids), "no BOS/EOS: a window never crosses into another document"
            assert blocks.attention_mask[row, first : first + len(ids)].all(), "and never into padding"
            assert not any(t.strip().endswith((".", "!", "?")) for t in c["tokens"][:-1]), "one sentence at most"
            cropped |= len(c["tokens"]) == 12
    assert cropped, "some sentence should be longer than the 12-token window"


def brute_force(z, ids, mask, lm, threshold, top, max_classes, min_contexts):
    """The reference algorithm, one Python loop over every (position, latent) hit."""
    special = set(lm.tokenizer.all_special_ids)
    hits = defaultdict(lambda: defaultdict(list))
    counts = defaultdict(int)
    B, T, F = z.shape
    values = z.tolist()
    for row in range(B):
        for t in range(1, T):
            if not mask[row, t] or int(ids[row, t]) in special:
                continue
            cls = token_class(lm.tokenizer.decode([ids[row, t]]))
            for f in range(F):
                if values[row][t][f] > threshold:
                    hits[f][cls].append((-values[row][t][f], row, t))
                    counts[f] += 1
    kept = {}
    for f, by_class in hits.items():
        shown = {cls: [(row, t) for _, row, t in sorted(h)[:top]] for cls, h in by_class.items()}
        if (max_classes and len(shown) > max_classes) or sum(map(len, shown.values())) < min_contexts:
            continue
        kept[f] = (counts[f], dict(sorted(shown.items())))
    return kept


@pytest.mark.parametrize(("top", "max_classes", "min_contexts"), [(2, 8, 3), (1, 0, 1), (3, 4, 5)])
def test_top_contexts_and_filters_match_a_brute_force(run, lm, blocks, top, max_classes, min_contexts):
    name = NAMES[0]
    record = extract_contexts(run / name, threshold=THRESHOLD, top_per_class=top, max_classes=max_classes,
                              min_contexts=min_contexts, held_out=0, pool=0, batch_size=3, lm=lm)[str(run / name)]
    z, _ = latents_of(lm, run, name, blocks)
    expected = brute_force(z, blocks.input_ids, blocks.attention_mask, lm, THRESHOLD, top, max_classes, min_contexts)
    assert expected, "the brute force should keep some latents"
    got = {
        int(f): (r["activations"], {cls: [(c["document"], c["position"]) for c in cs] for cls, cs in r["classes"].items()})
        for f, r in record["latents"].items()
    }
    assert got == expected
    assert record["interpretable_latents"] == len(expected)
    for r in record["latents"].values():
        for contexts in r["classes"].values():
            activations = [c["activation"] for c in contexts]
            assert activations == sorted(activations, reverse=True)
        assert r["held_out"] == [] and r["non_activating"] == []


def test_held_out_contexts_are_random_activating_ones_not_shown(extracted, run):
    for record in extracted.values():
        for r in record["latents"].values():
            shown = {(c["document"], c["position"]) for cs in r["classes"].values() for c in cs}
            held = [(c["document"], c["position"]) for c in r["held_out"]]
            assert not shown & set(held) and len(set(held)) == len(held)
            assert len(held) == min(3, r["activations"] - len(shown))
            assert all(c["activation"] > THRESHOLD for c in r["held_out"])


@pytest.mark.parametrize("name", NAMES[:2])
def test_pool_negatives_are_really_inactive(extracted, run, lm, blocks, name):
    record = extracted[str(run / name)]
    z, _ = latents_of(lm, run, name, blocks)
    counted = training_positions(blocks.attention_mask, False)
    listed = 0
    for latent, r in record["latents"].items():
        assert len(r["non_activating"]) <= 3 and r["non_activating"] == sorted(set(r["non_activating"]))
        for p in r["non_activating"]:
            c = record["pool"][p]
            row, lo, n = c["document"], c["position"], len(c["tokens"])
            inside = counted[row, lo : lo + n]
            assert (z[row, lo : lo + n, int(latent)][inside] <= 0).all()
            listed += 1
    assert listed, "some pool windows should be negatives"
    windows = {(c["document"], c["position"], len(c["tokens"])) for c in record["pool"]}
    assert len(windows) == len(record["pool"]), "pool windows are distinct"


def test_several_saes_in_one_pass_give_the_same_files_as_one_at_a_time(extracted, run, lm):
    for name in NAMES:
        alone = extract_contexts(run / name, threshold=THRESHOLD, window=12, max_classes=8, min_contexts=3, held_out=3,
                                 pool=20, batch_size=4, lm=lm)
        assert alone[str(run / name)] == extracted[str(run / name)]


def test_inference_override_is_applied(run, lm, blocks):
    name = NAMES[0]
    record = extract_contexts(run / name, threshold=1.0, infer_k=2, min_contexts=1, held_out=0, pool=0, tokens=300, lm=lm)[str(run / name)]
    assert record["settings"]["infer_k"] == 2
    z, _ = latents_of(lm, run, name, blocks, Inference(k=2))
    for latent, _, c in all_contexts(record):
        assert z[c["document"], c["position"], latent].item() == pytest.approx(c["activation"], rel=1e-4)
    assert (z != 0).sum(-1).max() == 2


def test_render_context():
    context = {"tokens": ["The", " capital", " of", " France"], "index": 3, "activation": 2.0}
    assert render_context(context) == "The capital of<< France>>"
    assert render_context(context, open="<ACTIVATED>", close="</ACTIVATED>") == "The capital of<ACTIVATED> France</ACTIVATED>"
    assert render_context({"tokens": ["a", "b"], "index": None}) == "ab"


def test_read_contexts_errors(tmp_path, extracted, run):
    with pytest.raises(RouteSAEError, match=r"run `routesae contexts .*` first"):
        read_contexts(tmp_path)
    bad = tmp_path / "contexts.json"
    bad.write_text(json.dumps({"format": "routesae.interpretations", "format_version": 1}))
    with pytest.raises(RouteSAEError, match="is not a routesae contexts file"):
        read_contexts(bad)
    record = json.loads((run / NAMES[0] / "contexts.json").read_text())
    bad.write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(RouteSAEError, match="format version 99"):
        read_contexts(bad)
    latent = next(iter(record["latents"]))
    del record["latents"][latent]["held_out"]
    bad.write_text(json.dumps(record))
    with pytest.raises(RouteSAEError, match=f"latent {latent} lacks held_out"):
        read_contexts(bad)
    bad.write_text("{not json")
    with pytest.raises(RouteSAEError, match="not valid JSON"):
        read_contexts(bad)


def test_bad_input_gets_clear_errors(run, lm, tmp_path):
    sae = run / NAMES[0]
    with pytest.raises(RouteSAEError, match="holds no SAE checkpoint"):
        extract_contexts(tmp_path, lm=lm)
    with pytest.raises(RouteSAEError, match="apply split holds"):
        extract_contexts(sae, tokens=10**7, lm=lm)
    with pytest.raises(RouteSAEError, match="exclude each other"):
        extract_contexts(sae, infer_k=2, theta=1.0, lm=lm)
    with pytest.raises(RouteSAEError, match="can never be met"):
        extract_contexts(sae, min_contexts=10, max_classes=2, top_per_class=2, lm=lm)
    with pytest.raises(RouteSAEError, match="window must be at least 1"):
        extract_contexts(sae, window=0, lm=lm)
    before = (sae / "contexts.json").read_bytes()
    with pytest.raises(RouteSAEError, match="infer_k=1000 exceeds"):
        extract_contexts(sae, infer_k=1000, lm=lm)
    assert (sae / "contexts.json").read_bytes() == before, "a failed run leaves the file alone"


def test_no_latent_left_warns_and_still_writes(run, lm, tmp_path):
    sae = run / NAMES[1]
    with pytest.warns(UserWarning, match="0 interpretable latents; no activation exceeded the threshold"):
        record = extract_contexts(sae, threshold=1e6, tokens=100, pool=5, lm=lm)[str(sae)]
    assert record["interpretable_latents"] == 0 and record["latents"] == {} and len(record["pool"]) == 5
    assert read_contexts(sae)["settings"]["threshold"] == 1e6


def test_cli_writes_files_and_reports(run):
    result = CliRunner().invoke(make_cli(), ["contexts", str(run), "--threshold", str(THRESHOLD), "--min-contexts", "2",
                                             "--tokens", "300", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert list(summary) == [str(run / name) for name in NAMES]
    for directory, s in summary.items():
        assert s["interpretable_latents"] == read_contexts(directory)["interpretable_latents"]
        assert s["settings"]["tokens"] >= 300 and s["settings"]["min_contexts"] == 2
        assert f"{s['sae']}: {s['hits']:,} activations > {THRESHOLD:g}" in " ".join(result.stderr.split())
    bad = CliRunner().invoke(make_cli(), ["contexts", str(run), "--infer-k", "2", "--theta", "1"])
    assert bad.exit_code == 2 and "exclude each other" in bad.output


@pytest.mark.embedded
def test_contexts_on_smollm2_and_wiki(embedded_home, tmp_path, monkeypatch):
    """The real tokenizer (no BOS, pad == EOS between documents, byte-level pieces) on an SAE at block 3."""
    monkeypatch.setenv("ROUTESAE_HOME", str(embedded_home))
    lm = LanguageModel.load("smollm2")
    corpus = load_corpus("wiki", lm.tokenizer, context_length=128, seed=0)
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAE.build_config({"layer": 3, "latent_size": 256, "k": 8}).resolve(lm.n_layers), lm.d_model)
    meta = {"name": "topk", "model": lm.describe(), "data": {**corpus.describe(), "split": "train", "keep_bos": False}}
    save_sae(sae, tmp_path / "topk", meta)
    record = extract_contexts(tmp_path / "topk", threshold=1.0, tokens=2048, held_out=2, pool=10, lm=lm)[str(tmp_path / "topk")]
    assert record["interpretable_latents"] > 0 and record["settings"]["data"]["source"] == "wiki"
    blocks = corpus.split("apply")
    eos = lm.tokenizer.eos_token_id
    for _, _, c in all_contexts(record):
        first = c["position"] - c["index"]
        ids = blocks.input_ids[c["document"], first : first + len(c["tokens"])].tolist()
        assert eos not in ids and "".join(c["tokens"]) == lm.tokenizer.decode(ids) and c["layer"] == 3
        assert c["position"] > 0, "position 0 (the attention sink) never activates"


# -- thresholds that mean the same at any width ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "rule"),
    [(4, ("number", 4.0)), ("4.5", ("number", 4.5)), ("scaled", ("scaled", 15.0)), ("p75", ("percentile", 75.0)),
     ("p99.9", ("percentile", 99.9))],
)
def test_threshold_rules_parse(given, rule):
    assert threshold_rule(given) == rule


@pytest.mark.parametrize("given", ["p0", "p100", "p-3", "top", "nan", float("inf")])
def test_a_threshold_that_is_no_number_and_no_rule_is_refused(given):
    with pytest.raises(RouteSAEError, match="threshold"):
        ContextsConfig(threshold=given)


def test_scaled_and_percentile_thresholds_are_resolved_per_sae_and_recorded(run, lm, blocks):
    records = extract_contexts(run / NAMES[0], threshold="scaled", window=12, held_out=0, pool=0, lm=lm)
    settings = next(iter(records.values()))["settings"]
    assert settings["threshold"] == pytest.approx(15 * (lm.d_model / 2048) ** 0.5) and settings["threshold_rule"] == "scaled"
    record = next(iter(extract_contexts(run / NAMES[1], threshold="p60", window=12, held_out=0, pool=0, lm=lm).values()))
    z, _ = latents_of(lm, run, NAMES[1], blocks)  # [B, T, F] on the whole apply split
    special = Vocabulary.build(lm.tokenizer, max(lm.vocab_size, len(lm.tokenizer), int(blocks.input_ids.max()) + 1)).special
    counted = (training_positions(blocks.attention_mask, keep_bos=False) & ~special[blocks.input_ids]).reshape(-1)
    active = z.reshape(-1, z.shape[-1])[counted][:PERCENTILE_TOKENS]
    assert record["settings"]["threshold"] == pytest.approx(float(torch.quantile(active[active != 0], 0.6)), rel=1e-5)
    assert record["settings"]["threshold_rule"] == "p60" and record["hits"] > 0


def test_the_default_rule_keeps_latents(run, lm):
    records = extract_contexts(run, window=12, max_classes=8, min_contexts=3, held_out=0, pool=0, lm=lm)
    assert all(r["settings"]["threshold_rule"] == "p75" and r["interpretable_latents"] > 0 for r in records.values())
