"""LanguageModel on tiny random Llamas: capture, early stop, padding, edits, errors."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from routesae.embedded import resolve_model
from routesae.errors import RouteSAEError
from routesae.lm import LanguageModel

TEXTS = ["Paris is the capital of France.", "The quick brown fox jumps over the lazy dog. Rivers flow to the sea."]


@pytest.fixture(scope="module")
def lm(tiny_model_dir) -> LanguageModel:
    return LanguageModel.load(str(tiny_model_dir))


def encode(lm: LanguageModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def hf_hidden_states(model_dir: Path, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """From a fresh HF model: booting the bridge mutates the model it wraps."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids, attention_mask=mask, output_hidden_states=True).hidden_states


def test_load_sizes_and_tokenizer_policy(lm):
    assert (lm.n_layers, lm.d_model, lm.vocab_size) == (4, 64, len(lm.tokenizer))
    assert lm.tokenizer.padding_side == "right"
    assert lm.tokenizer.pad_token_id == lm.tokenizer.eos_token_id
    assert lm.tokenizer is not lm.bridge.tokenizer  # we own tokenisation
    assert not any(p.requires_grad for p in lm.bridge.parameters())
    assert lm.hook_name(2) == "blocks.2.hook_resid_post"


def test_capture_equals_hf_hidden_states(lm, tiny_model_dir):
    ids, mask = encode(lm, TEXTS)
    hs = hf_hidden_states(tiny_model_dir, ids, mask)
    real = mask.bool()

    acts = lm.capture(ids, mask, [0, 2])  # stops early, after block 2
    assert acts.shape == (2, ids.shape[1], 2, 64)
    torch.testing.assert_close(acts[:, :, 0][real], hs[1][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(acts[:, :, 1][real], hs[3][real], atol=1e-5, rtol=0)

    acts = lm.capture(ids, mask, [1, 3])  # the last block: runs the whole model
    torch.testing.assert_close(acts[:, :, 0][real], hs[2][real], atol=1e-5, rtol=0)
    # HF's last hidden state is after the final norm, so block 3 is checked against a full bridge run.
    _, cache = lm.bridge.run_with_cache(ids, attention_mask=mask, names_filter=[lm.hook_name(3)])
    torch.testing.assert_close(acts[:, :, 1], cache[lm.hook_name(3)], atol=1e-6, rtol=0)
    assert not torch.allclose(acts[:, :, 1][real], hs[4][real], atol=1e-2)


def test_routesae_forwards_equal_a_plain_hugging_face_forward_bit_for_bit(lm, tiny_model_dir):
    """Attention runs on Hugging Face's own sdpa kernel (NativeAttention), not the bridge's eager re-implementation."""
    ids, mask = encode(lm, TEXTS)
    real = mask.bool()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert plain.config._attn_implementation == "sdpa" and lm.describe()["attention"] == "sdpa"
    with torch.no_grad():
        out = plain(ids, attention_mask=mask, output_hidden_states=True)
    acts = lm.capture(ids, mask, [0, 2])
    assert torch.equal(acts[:, :, 0][real], out.hidden_states[1][real])
    assert torch.equal(acts[:, :, 1][real], out.hidden_states[3][real])
    assert torch.equal(lm.logits(ids, mask)[real], out.logits[real])


def test_the_bridge_used_directly_keeps_its_attention_hooks(lm):
    ids, mask = encode(lm, TEXTS[:1])
    lm.capture(ids, mask, [1])
    patterns = []
    lm.bridge.run_with_hooks(ids, attention_mask=mask, return_type=None,
                             fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, hook: patterns.append(t.shape))])
    assert patterns == [(1, 4, ids.shape[1], ids.shape[1])], "the eager re-implementation is back outside our forwards"


def test_forwards_in_two_threads_share_the_native_path(lm):
    """--overlap-harvest captures in a thread while another thread's forward may end first: the native path stays in
    place until the last of them leaves (the first to leave used to restore it under the other, then crash)."""
    ids, mask = encode(lm, TEXTS)
    expected = lm.capture(ids, mask, [1])
    entered, release = threading.Event(), threading.Event()
    results: list[torch.Tensor] = []

    def capture_in_a_thread():
        with lm.native.active():
            entered.set()
            release.wait(timeout=60)
            results.append(lm.capture(ids, mask, [1]))

    parent, name, component = lm.native.slots[0]
    with lm.native.active():
        worker = threading.Thread(target=capture_in_a_thread)
        worker.start()
        assert entered.wait(timeout=60)
    assert parent._modules[name] is component.original_component, "the worker is still inside: the native path must stay"
    release.set()
    worker.join(timeout=60)
    assert results and torch.equal(results[0], expected)
    assert lm.native.users == 0 and parent._modules[name] is component
    test_the_bridge_used_directly_keeps_its_attention_hooks(lm)
    assert torch.equal(lm.capture(ids, mask, [1]), expected)


def test_a_splice_resumed_from_the_clean_stream_equals_the_full_forward(lm):
    """Evaluation passes the captured stream: the spliced forward starts at the first edited block, same logits."""
    ids, mask = encode(lm, TEXTS)
    acts = lm.capture(ids, mask, [0, 1, 2])
    after = {block: acts[:, :, i] for i, block in enumerate([0, 1, 2])}
    assert lm.resumed.enabled and lm.describe()["resumed_splices"]
    for edits in ({1: lambda r: r * 0.5}, {2: lambda r: r + 1.0, 3: lambda r: -r}, {3: lambda r: r * 2}, {0: torch.tanh}):
        torch.testing.assert_close(lm.splice(ids, mask, edits, after), lm.splice(ids, mask, edits), rtol=0, atol=1e-6)
    ran: list[int] = []
    watch = [(lm.hook_name(layer), lambda t, hook, layer=layer: ran.append(layer)) for layer in range(4)]
    with lm.bridge.hooks(fwd_hooks=watch):
        lm.splice(ids, mask, {2: lambda r: r}, after)
        assert ran == [2, 3], "the blocks below the edit ran again"
        lm.splice(ids, mask, {2: lambda r: r}, {0: after[0]})  # the stream after block 1 is not there: from the start
    assert ran == [2, 3, 0, 1, 2, 3]


def test_a_resumed_splice_waits_for_forwards_in_other_threads(lm):
    """It changes the model's list of blocks while it runs: a capture in flight elsewhere finishes first."""
    ids, mask = encode(lm, TEXTS)
    expected = lm.splice(ids, mask, {2: torch.tanh})
    after = {1: lm.capture(ids, mask, [1])[:, :, 0]}
    done, results = threading.Event(), []

    def resumed_splice():
        results.append(lm.splice(ids, mask, {2: torch.tanh}, after))
        done.set()

    with lm.native.active():  # another forward is inside
        worker = threading.Thread(target=resumed_splice)
        worker.start()
        assert not done.wait(timeout=0.5), "the resumed splice ran while another forward was inside"
    worker.join(timeout=60)
    assert done.is_set() and torch.equal(results[0], expected)
    assert lm.native.users == 0


def test_a_model_that_transforms_its_input_embeddings_splices_from_the_start(tmp_path):
    """GPT-2 adds position embeddings to ``inputs_embeds``: resuming there would be wrong, so the probe refuses it."""
    from tiny_models import make_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=3, n_head=4, n_positions=256,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    gpt2 = LanguageModel.load(str(tmp_path))
    assert not gpt2.resumed.enabled
    ids, mask = encode(gpt2, TEXTS)
    after = {0: gpt2.capture(ids, mask, [0])[:, :, 0]}
    torch.testing.assert_close(gpt2.splice(ids, mask, {1: torch.tanh}, after), gpt2.splice(ids, mask, {1: torch.tanh}))


def test_capture_stops_after_deepest_layer(lm):
    ids, mask = encode(lm, TEXTS[:1])
    fired: list[str] = []
    watch = [(lm.hook_name(layer), lambda t, hook, layer=layer: fired.append(layer)) for layer in (2, 3)]
    with lm.bridge.hooks(fwd_hooks=watch):
        lm.capture(ids, mask, [1])
        assert fired == []
        lm.capture(ids, mask, [3])  # control: the watch hooks do fire when the model runs that far
    assert fired == [2, 3]


def test_capture_order_follows_request(lm):
    ids, mask = encode(lm, TEXTS)
    alone = {layer: lm.capture(ids, mask, [layer])[:, :, 0] for layer in range(4)}
    acts = lm.capture(ids, mask, [3, 0, 2, 0])  # duplicates repeat the slot
    for slot, layer in enumerate([3, 0, 2, 0]):
        torch.testing.assert_close(acts[:, :, slot], alone[layer], atol=1e-6, rtol=0)


def test_captured_activations_can_train_an_sae(lm):
    ids, mask = encode(lm, TEXTS[:1])
    acts = lm.capture(ids, mask, [1])
    assert not acts.requires_grad and not acts.is_inference()
    w = torch.zeros(64, 8, requires_grad=True)
    (acts[:, :, 0] @ w).pow(2).sum().backward()
    assert w.grad is not None


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_model_dir_no_bos"])
def test_right_padding_does_not_change_real_tokens(model_fixture, request):
    lm = LanguageModel.load(str(request.getfixturevalue(model_fixture)))
    short_ids, short_mask = encode(lm, TEXTS[:1])
    ids, mask = encode(lm, [TEXTS[0], TEXTS[1]])
    n = short_ids.shape[1]
    assert mask[0].sum() == n < ids.shape[1]  # the short row really is padded
    alone = lm.capture(short_ids, short_mask, [0, 2, 3])
    batched = lm.capture(ids, mask, [0, 2, 3])
    torch.testing.assert_close(batched[:1, :n], alone, atol=1e-4, rtol=0)


def test_identity_edit_leaves_logits_unchanged(lm):
    ids, mask = encode(lm, TEXTS)
    clean = lm.logits(ids, mask)
    assert clean.shape == (*ids.shape, lm.vocab_size)
    torch.testing.assert_close(lm.splice(ids, mask, {1: lambda t: t, 3: lambda t: t.clone()}), clean)


def test_zero_edit_changes_logits(lm):
    ids, mask = encode(lm, TEXTS)
    clean = lm.logits(ids, mask)
    edited = lm.splice(ids, mask, {2: torch.zeros_like})
    assert not torch.allclose(edited, clean, atol=1e-3)


def test_edit_is_causal(lm):
    ids, mask = encode(lm, TEXTS[1:])
    clean = lm.logits(ids, mask)
    first_edited = 5

    def zero_from(t: torch.Tensor) -> torch.Tensor:
        keep = (torch.arange(t.shape[1]) < first_edited).to(t.dtype)[None, :, None]
        return t * keep

    edited = lm.splice(ids, mask, {1: zero_from})
    torch.testing.assert_close(edited[:, :first_edited], clean[:, :first_edited], atol=1e-5, rtol=0)
    assert (edited[:, first_edited:] - clean[:, first_edited:]).abs().amax(-1).min() > 1e-3


def test_edits_apply_only_inside_the_context(lm):
    ids, mask = encode(lm, TEXTS)
    clean = lm.logits(ids, mask)
    with lm.edits({0: torch.zeros_like}):
        assert not torch.allclose(lm.logits(ids, mask), clean, atol=1e-3)
        # capture sees the edit too, downstream of the edited block
        assert lm.capture(ids, mask, [0]).abs().max() == 0
    torch.testing.assert_close(lm.logits(ids, mask), clean)

    with pytest.raises(KeyError):
        with lm.edits({0: torch.zeros_like}):
            raise KeyError("boom")
    torch.testing.assert_close(lm.logits(ids, mask), clean)


def test_gradients_flow_through_an_edit(lm):
    ids, mask = encode(lm, TEXTS[:1])
    scale = torch.tensor(1.0, requires_grad=True)
    with lm.edits({1: lambda t: t * scale}):
        lm.bridge(ids, attention_mask=mask).sum().backward()
    assert scale.grad is not None and scale.grad != 0


@pytest.mark.parametrize("layers", [[4], [-1], [0, 7], ["1"], [True], []])
def test_bad_layers_are_rejected(lm, layers):
    ids, mask = encode(lm, TEXTS[:1])
    with pytest.raises(RouteSAEError, match="4 blocks|integer|at least one"):
        lm.capture(ids, mask, layers)


def test_bad_edit_layer_is_rejected_and_installs_nothing(lm):
    ids, mask = encode(lm, TEXTS[:1])
    clean = lm.logits(ids, mask)
    with pytest.raises(RouteSAEError, match=r"4 blocks, numbered 0\.\.3"):
        with lm.edits({0: torch.zeros_like, 4: torch.zeros_like}):
            pass
    torch.testing.assert_close(lm.logits(ids, mask), clean)


def test_mismatched_inputs_are_rejected(lm):
    ids, mask = encode(lm, TEXTS)
    with pytest.raises(RouteSAEError, match="same shape"):
        lm.logits(ids, mask[:, :-1])


def test_describe_is_json(lm, tiny_model_dir):
    info = json.loads(json.dumps(lm.describe()))
    assert info["path"] == str(Path(tiny_model_dir).resolve())
    assert info["architecture"] == "LlamaForCausalLM"
    assert (info["n_layers"], info["d_model"], info["dtype"]) == (4, 64, "float32")
    assert "hidden_states[i+1]" in info["layer_convention"]


def test_missing_pad_token_becomes_eos(tiny_model_dir, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "nopad")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = None
    tok.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).pad_token is None
    lm = LanguageModel.load(str(model_dir))
    assert lm.tokenizer.pad_token_id == lm.tokenizer.eos_token_id


@pytest.mark.parametrize("spec", ["./no-such-model", "/no/such/model", "~/no-such-model", "a/b/c"])
def test_missing_directory_is_an_error(spec):
    with pytest.raises(RouteSAEError, match="no such model directory"):
        LanguageModel.load(spec)


def test_non_model_directory_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(RouteSAEError, match="not a Hugging Face model directory"):
        LanguageModel.load(str(tmp_path))
    with pytest.raises(RouteSAEError, match="not a Hugging Face model directory"):
        LanguageModel.load(str(tmp_path / "notes.txt"))


def test_unreachable_hub_name_is_an_error():
    source = resolve_model("some-org/no-such-model")
    assert (source.path, source.hub_name, source.embedded) == (None, "some-org/no-such-model", False)
    with pytest.raises(RouteSAEError, match="hub.*local model directory or 'smollm2'"):
        LanguageModel.load("some-org/no-such-model")  # tests run with HF_HUB_OFFLINE=1
