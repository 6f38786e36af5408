"""Steering by clamping latents: the latent-edit contract for every registered architecture, clamp
parsing and semantics, and generation on a tiny Llama (no clamps change nothing; a clamp moves the
logits at every step; RouteSAE edits only each token's routed block; chat template; seeds; CLI)."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner

import routesae
from routesae.activations import training_positions
from routesae.architectures.base import SAEOutput, SingleLayerConfig, SingleLayerSAE
from routesae.architectures.topk import TopKSAE
from routesae.checkpoint import save_sae
from routesae.cli import make_cli
from routesae.errors import ConfigError, RouteSAEError
from routesae.latent_scales import LatentScale, measure_latent_scales
from routesae.lm import LanguageModel
from routesae.plugins import get_plugin_manager
from routesae.steering import (
    Clamp,
    ClampSpec,
    Relative,
    block_changes,
    clamp_edit,
    parse_clamps,
    render_prompt,
    steer,
    steered_logits,
    steered_positions,
    sweep_clamps,
)

N_LAYERS, D_MODEL, LATENTS = 6, 16, 64
ARCHITECTURES = get_plugin_manager().names("architecture")
PROMPT = "The quick brown fox"


def build(name, n_layers=N_LAYERS, d_model=D_MODEL, seed=0, **settings):
    arch = get_plugin_manager().get("architecture", name)
    cfg = arch.build_config({"latent_size": LATENTS, **settings}).resolve(n_layers)
    torch.manual_seed(seed)
    return arch(cfg, d_model).eval()


def activations(sae, n, d_model=D_MODEL, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(sae.layers), d_model, generator=generator) * 3 + 0.5


# -- the architecture contract ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_honours_latent_edits(name):
    sae, j, v = build(name), 5, 1000.0
    acts = activations(sae, 12)
    with torch.no_grad():
        plain = sae(acts)
        plain_recon = sae.reconstruction(plain)
        with sae.edit_latents(clamp_edit([Clamp(j, "set", v)])):
            edited = sae(acts)
            edited_recon = sae.reconstruction(edited)
            encoded = sae.encode_standardized(plain.target)
        direction = sae.decode_standardized(torch.eye(LATENTS)[j : j + 1]) - sae.decode_standardized(torch.zeros(1, LATENTS))
    assert (edited.latents[:, j] == v).all() and (encoded[:, j] == v).all()
    others = torch.arange(LATENTS) != j
    assert torch.equal(edited.latents[:, others], plain.latents[:, others])
    # x_hat moves by (v - z_j) times latent j's decoder direction, in the SAE's input space
    expected = plain.x_hat + (v - plain.latents[:, j]).view(-1, *[1] * (plain.x_hat.ndim - 1)) * direction
    torch.testing.assert_close(edited.x_hat, expected, rtol=1e-4, atol=1e-3)
    # and the residual-stream reconstruction moves along that direction at every token it replaces
    for i, (block, (x_hat, mask)) in enumerate(plain_recon.items()):
        d = direction[:, sae.layers.index(block)] if direction.ndim == 3 else direction
        delta = (edited_recon[block][0] - x_hat)[mask]
        assert delta.norm(dim=-1).min() > 0
        cosine = torch.nn.functional.cosine_similarity(delta, d.expand_as(delta), dim=-1)
        torch.testing.assert_close(cosine, torch.ones_like(cosine), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_no_edit_is_set_after_the_block(name):
    sae = build(name)
    acts = activations(sae, 8)
    with torch.no_grad():
        before = sae(acts).latents
        with sae.edit_latents(clamp_edit([Clamp(1, "set", 9.0)])):
            pass
        assert sae.latent_edit is None and torch.equal(sae(acts).latents, before)


def test_set_add_and_mul_act_on_latents_exactly():
    sae = build("topk", k=8)
    acts = activations(sae, 10)
    clamps = parse_clamps(["3=2.5", "4=+1.5", "5=-0.25", "6=*3", "7=*0"], LATENTS)
    with torch.no_grad(), sae.edit_latents(_identity_edit()):
        z = sae(acts).latents
    with torch.no_grad(), sae.edit_latents(clamp_edit(clamps)):
        edited = sae(acts).latents
    assert (edited[:, 3] == 2.5).all()
    assert torch.equal(edited[:, 4], z[:, 4] + 1.5) and torch.equal(edited[:, 5], z[:, 5] - 0.25)
    assert torch.equal(edited[:, 6], z[:, 6] * 3) and (edited[:, 7] == 0).all()
    assert torch.equal(edited[:, 8:], z[:, 8:]) and torch.equal(edited[:, :3], z[:, :3])


def _identity_edit():
    return clamp_edit([])


def test_topk_sparse_and_dense_decodes_agree_under_an_identity_edit():
    sae = build("topk", k=8)
    acts = activations(sae, 10)
    with torch.no_grad():
        sparse = sae(acts)
        with sae.edit_latents(_identity_edit()):
            dense = sae(acts)
    assert torch.equal(sparse.latents, dense.latents)
    torch.testing.assert_close(sparse.x_hat, dense.x_hat)


def test_an_override_and_an_edit_compose():
    sae = build("topk", k=8)
    acts = activations(sae, 10)
    from routesae.architectures.base import Inference

    with torch.no_grad(), sae.inference(Inference(k=2)), sae.edit_latents(clamp_edit([Clamp(0, "set", 4.0)])):
        z = sae(acts).latents
    assert (z[:, 0] == 4.0).all() and ((z[:, 1:] != 0).sum(-1) <= 2).all()


# -- clamps ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "clamp", "written"),
    [
        ("123=20", Clamp(123, "set", 20.0), "123=20"),
        ("123=+15", Clamp(123, "add", 15.0), "123=+15"),
        ("123=-15", Clamp(123, "add", -15.0), "123=-15"),
        ("123=*2", Clamp(123, "mul", 2.0), "123=*2"),
        (" 7 = *0.5 ", Clamp(7, "mul", 0.5), "7=*0.5"),
        ("0=0", Clamp(0, "set", 0.0), "0=0"),
        ("9=1e3", Clamp(9, "set", 1000.0), "9=1000"),
    ],
)
def test_clamps_parse_and_print(text, clamp, written):
    assert Clamp.parse(text) == clamp
    assert str(clamp) == written and Clamp.parse(str(clamp)) == clamp


@pytest.mark.parametrize("text", ["", "12", "12=", "x=3", "-1=3", "12=abc", "12=+-3", "12=**2", "1.5=2", "12=3=4"])
def test_unreadable_clamps_say_how_to_write_one(text):
    with pytest.raises(RouteSAEError, match="LATENT=VALUE"):
        Clamp.parse(text)


def test_non_finite_values_and_negative_sets_are_refused():
    with pytest.raises(RouteSAEError, match="finite"):
        Clamp.parse("3=inf")
    with pytest.raises(RouteSAEError, match=r"set takes a value >= 0.*3=-2"):
        Clamp(3, "set", -2.0)


def test_latents_out_of_range_and_twice_are_refused():
    with pytest.raises(RouteSAEError, match=r"latent 64 is out of range; this SAE has 64 latents, numbered 0 to 63"):
        parse_clamps(["64=1"], LATENTS)
    with pytest.raises(RouteSAEError, match="latent 3 is clamped twice"):
        parse_clamps(["3=1", Clamp(3, "add", 2.0)], LATENTS)
    assert parse_clamps([], LATENTS) == ()


# -- on a tiny language model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return LanguageModel.load(str(tiny_model_dir))


def tiny_sae(lm, name, seed=0, **settings):
    return build(name, n_layers=lm.n_layers, d_model=lm.d_model, seed=seed, **settings)


def prompt_ids(lm, text=PROMPT):
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_no_clamps_change_nothing(lm, name):
    sae = tiny_sae(lm, name)
    ids = prompt_ids(lm)
    steer_BT = steered_positions(ids.shape[1], ids.shape[1], "all", lm.device)
    logits, changes = steered_logits(lm, sae, ids, steer_BT, [])
    assert torch.equal(logits, lm.logits(ids, torch.ones_like(ids)))
    assert all((change.delta_norm_BT() == 0).all() for change in changes.values())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_a_clamp_moves_the_steered_logits_and_leaves_the_attention_sink_alone(lm, name):
    sae = tiny_sae(lm, name)
    ids = prompt_ids(lm)
    clean = lm.logits(ids, torch.ones_like(ids))
    steer_BT = steered_positions(ids.shape[1], ids.shape[1], "all", lm.device)
    logits, _ = steered_logits(lm, sae, ids, steer_BT, parse_clamps(["7=200"], LATENTS))
    assert torch.equal(logits[:, 0], clean[:, 0]), "position 0 is not steered, and nothing before it is"
    assert (logits[:, 1:] - clean[:, 1:]).abs().amax(-1).min() > 1e-3, "every steered position's distribution moves"


ONE_BLOCK = [n for n in ARCHITECTURES if issubclass(get_plugin_manager().get("architecture", n).Config, SingleLayerConfig)]


@pytest.mark.parametrize("name", ONE_BLOCK)
def test_the_single_pass_for_one_block_agrees_with_capture_then_splice(lm, name):
    sae = tiny_sae(lm, name)
    ids = prompt_ids(lm)
    steer_BT = steered_positions(ids.shape[1], ids.shape[1], "all", lm.device)
    clamps = parse_clamps(["7=200", "2=*3"], LATENTS)
    for replace in (False, True):
        fast, fast_changes = steered_logits(lm, sae, ids, steer_BT, clamps, replace)
        slow, slow_changes = steered_logits(lm, sae, ids, steer_BT, clamps, replace, single_pass=False)
        torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
        (block, change), = fast_changes.items()
        torch.testing.assert_close(change.delta_norm_BT(), slow_changes[block].delta_norm_BT())


def test_generation_positions_steer_only_the_tokens_that_pick_new_ones(lm):
    sae = tiny_sae(lm, "topk")
    ids = prompt_ids(lm)
    T = ids.shape[1]
    steer_BT = steered_positions(T + 2, T, "generation", lm.device)
    assert steer_BT[0].tolist() == [False] * (T - 1) + [True] * 3
    longer = torch.cat([ids, ids[:, 1:3]], dim=1)
    clean = lm.logits(longer, torch.ones_like(longer))
    logits, _ = steered_logits(lm, sae, longer, steer_BT, parse_clamps(["7=200"], LATENTS))
    assert torch.equal(logits[:, : T - 1], clean[:, : T - 1])
    assert (logits[:, T - 1 :] - clean[:, T - 1 :]).abs().amax(-1).min() > 1e-3


def test_replace_puts_the_edited_reconstruction_in_the_stream(lm):
    sae = tiny_sae(lm, "topk", k=8)
    ids = prompt_ids(lm)
    steer_BT = steered_positions(ids.shape[1], ids.shape[1], "all", lm.device)
    acts = lm.capture(ids, torch.ones_like(ids), sae.layers)
    (change,) = block_changes(sae, acts, steer_BT, []).values()
    resid = acts[:, :, 0]
    replaced = change.edit(replace=True)(resid)
    assert torch.equal(replaced[:, 0], resid[:, 0]) and torch.equal(replaced[:, 1:], change.edited_BTD[:, 1:])
    # without clamps, --replace is the evaluator's splice: the SAE's error reaches the model
    logits, _ = steered_logits(lm, sae, ids, steer_BT, [], replace=True)
    assert not torch.equal(logits, lm.logits(ids, torch.ones_like(ids)))


def test_routesae_edits_only_each_tokens_routed_block(lm):
    sae = tiny_sae(lm, "routesae", k=4)
    ids = prompt_ids(lm, "Paris is the capital of France. Berlin is the capital of Germany.")
    T = ids.shape[1]
    acts = lm.capture(ids, torch.ones_like(ids), sae.layers)
    steer_BT = steered_positions(T, T, "all", lm.device)
    changes = block_changes(sae, acts, steer_BT, parse_clamps(["7=50"], LATENTS))
    with torch.no_grad():
        chosen = sae(acts.reshape(T, len(sae.layers), -1)).extras["chosen"]
    assert len(set(chosen[1:].tolist())) > 1, "the test needs tokens routed to different blocks"
    assert set(changes) == set(sae.layers)
    for i, block in enumerate(sae.layers):
        moved = changes[block].delta_norm_BT()[0] > 0
        assert moved.tolist() == ((chosen == i) & steer_BT[0]).tolist()


def test_soft_routing_is_refused_unless_asked_for(lm):
    sae = tiny_sae(lm, "routesae", router="soft", k=4)
    with pytest.raises(RouteSAEError, match="mix of blocks.*--soft-at-argmax"):
        steer(sae, PROMPT, ["3=10"], lm=lm, max_new_tokens=2)
    result = steer(sae, PROMPT, ["3=10"], lm=lm, max_new_tokens=2, soft_at_argmax=True)
    assert result.settings["soft_at_argmax"] and len(result.steered_ids) >= 1
    assert tiny_sae(lm, "routesae", k=4).steering_caveat() is None


def test_an_architecture_that_ignores_edits_is_refused(lm):
    class Unsteerable(SingleLayerSAE):
        name = "test-unsteerable"

        def forward(self, acts_NLD):
            x = acts_NLD[:, 0]
            return SAEOutput(latents=x.clone(), x_hat=x, target=x)

    from routesae.architectures.base import SingleLayerConfig

    sae = Unsteerable(SingleLayerConfig(layer=1, latent_size=lm.d_model, normalize="none"), lm.d_model)
    ids = prompt_ids(lm)
    acts = lm.capture(ids, torch.ones_like(ids), sae.layers)
    with pytest.raises(RouteSAEError, match="does not apply latent edits"):
        block_changes(sae, acts, steered_positions(ids.shape[1], ids.shape[1], "all", lm.device), parse_clamps(["1=5"], 64))


@pytest.mark.parametrize("name", ["topk", "crosscoder", "routesae"])
def test_steering_acts_at_every_generated_step(lm, name):
    sae = tiny_sae(lm, name)
    result = steer(sae, PROMPT, ["7=200"], lm=lm, max_new_tokens=6, temperature=0, chat=False)
    assert len(result.delta_norms) == len(result.steered_ids) >= 1
    assert all(norm > 0 for norm in result.delta_norms), "the position that picks each new token is edited"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_empty_clamps_give_the_original_continuation(lm, temperature):
    sae = tiny_sae(lm, "routesae")
    result = steer(sae, PROMPT, [], lm=lm, max_new_tokens=8, temperature=temperature, seed=3, top_p=0.9)
    assert result.steered_ids == result.original_ids and result.steered == result.original
    assert len(result.original_ids) >= 1 and result.delta_norms == [0.0] * len(result.steered_ids)


def test_the_same_seed_reproduces_both_continuations(lm):
    sae = tiny_sae(lm, "topk")
    runs = [steer(sae, PROMPT, ["7=20", "9=*2"], lm=lm, max_new_tokens=8, temperature=1.0, seed=11) for _ in range(2)]
    assert runs[0].to_dict()["original_ids"] == runs[1].to_dict()["original_ids"]
    assert runs[0].steered_ids == runs[1].steered_ids and runs[0].settings == runs[1].settings


def test_chat_template_wraps_the_prompt(lm):
    text, ids, used = render_prompt(lm.tokenizer, "hello", None, "be brief")
    assert used and text == "<|bos|>system\nbe brief<|eos|>\n<|bos|>user\nhello<|eos|>\n<|bos|>assistant\n"
    assert ids[0] == lm.tokenizer.bos_token_id and ids.count(lm.tokenizer.bos_token_id) == 3, "no extra BOS"
    text, ids, used = render_prompt(lm.tokenizer, "hello", False, None)
    assert not used and text == "hello" and ids == lm.tokenizer("hello")["input_ids"]
    result = steer(tiny_sae(lm, "topk"), "hello", ["1=3"], lm=lm, max_new_tokens=2)
    assert result.settings["chat"] and result.prompt.endswith("<|bos|>assistant\n")


def test_chat_options_that_cannot_work_are_refused(lm):
    with pytest.raises(RouteSAEError, match="system message needs the chat template"):
        render_prompt(lm.tokenizer, "hello", False, "be brief")
    plain = copy.deepcopy(lm.tokenizer)
    plain.chat_template = None
    assert render_prompt(plain, "hello", None, None)[2] is False
    with pytest.raises(RouteSAEError, match="no chat template"):
        render_prompt(plain, "hello", True, None)


def test_bad_settings_are_refused_before_generating(lm):
    sae = tiny_sae(lm, "topk")
    for kwargs, message in [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"positions": "prompt"}, "positions"),
    ]:
        with pytest.raises(RouteSAEError, match=message):
            steer(sae, PROMPT, [], lm=lm, **kwargs)
    with pytest.raises(RouteSAEError, match="needs its language model"):
        steer(sae, PROMPT, [])
    with pytest.raises(ConfigError, match="gated does not support"):
        steer(tiny_sae(lm, "gated"), PROMPT, [], lm=lm, infer_k=4)


def test_infer_k_reads_the_sae_with_an_override(lm):
    sae = tiny_sae(lm, "topk", k=8)
    result = steer(sae, PROMPT, ["7=50"], lm=lm, max_new_tokens=3, temperature=0, infer_k=2)
    assert result.settings["infer_k"] == 2 and all(n > 0 for n in result.delta_norms)
    assert sae.inference_override.k is None, "the override ends with the call"


# -- the command line --------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(lm, tmp_path):
    directory = tmp_path / "topk"
    save_sae(tiny_sae(lm, "topk", k=4), directory, {"name": "topk", "model": lm.describe()})
    return directory


def test_cli_prints_both_continuations_and_the_json_record(checkpoint):
    args = ["steer", str(checkpoint), "--clamp", "7=200", "--clamp", "3=*2", "--prompt", PROMPT, "--max-new-tokens", "4",
            "--temperature", "0", "--no-chat"]
    result = CliRunner().invoke(make_cli(), [*args, "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["settings"]["clamps"] == ["7=200", "3=*2"] and record["settings"]["chat"] is False
    assert record["prompt"] == PROMPT and 1 <= len(record["steered_ids"]) <= 4 and record["settings"]["architecture"] == "topk"
    table = CliRunner().invoke(make_cli(), args)
    assert table.exit_code == 0, table.output
    assert "original" in table.stdout and "steered" in table.stdout and "7=200 3=*2" in table.stdout


@pytest.mark.parametrize(
    ("clamp", "message"),
    [("64=1", "out of range"), ("7", "LATENT=VALUE"), ("7=1", "clamped twice")],
)
def test_cli_bad_clamps_exit_2_with_a_message(checkpoint, clamp, message):
    result = CliRunner().invoke(make_cli(), ["steer", str(checkpoint), "--clamp", clamp, "--clamp", "7=2", "--prompt", "hi"])
    assert result.exit_code == 2 and message in result.output


# -- the embedded model --------------------------------------------------------------------------


@pytest.mark.embedded
def test_steering_smollm2(embedded_home, monkeypatch):
    monkeypatch.setenv("ROUTESAE_HOME", str(embedded_home))
    lm = LanguageModel.load("smollm2")
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAE.build_config({"layer": 21, "latent_size": 256, "k": 16}).resolve(lm.n_layers), lm.d_model)
    result = steer(sae, "Name a colour.", ["5=40"], lm=lm, max_new_tokens=2, seed=1)
    assert "<|im_start|>user\nName a colour.<|im_end|>" in result.prompt and result.settings["chat"]
    assert len(result.delta_norms) == len(result.steered_ids) and all(n > 0 for n in result.delta_norms)
    ids = torch.tensor([result.prompt_ids])
    steer_BT = steered_positions(ids.shape[1], ids.shape[1], "all", lm.device)
    unclamped, _ = steered_logits(lm, sae, ids, steer_BT, [])
    assert torch.equal(unclamped, lm.logits(ids, torch.ones_like(ids)))


# -- aiming: how latents fire, relative values, sweeps, records --------------------------------------------------


@pytest.fixture(scope="module")
def trained_topk(tiny_model_dir, text_corpus_dir, tmp_path_factory):
    """A tiny TopK trained by the real CLI, so its config.json names the data its scales are measured on."""
    out = tmp_path_factory.mktemp("steer-run") / "run"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), "--k", "4", "--latent-size", "64",
            "--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "64", "--buffer-tokens", "256",
            "--layer", "2", "--tokens", "1024", "--report", "jsonl", "--out", str(out)]
    assert CliRunner().invoke(make_cli(), args).exit_code == 0
    return out / "topk-L2-k4-F64"


def firing_latent(directory):
    """A latent that fires on held-out text (so its scale has a positive maximum)."""
    sae = routesae.load(directory)
    scales = measure_latent_scales(sae, LanguageModel.load(sae.checkpoint["model"]["spec"]), sae.checkpoint,
                                   list(range(sae.cfg.latent_size)), tokens=256)
    return max(scales.values(), key=lambda s: (s.fire_rate, s.max))


def test_latent_scales_match_the_latents_on_held_out_text(trained_topk):
    scale = firing_latent(trained_topk)
    sae = routesae.load(trained_topk)
    lm = LanguageModel.load(sae.checkpoint["model"]["spec"])
    ids, mask = next(load_corpus_of(sae, lm).split("apply").batches(64))
    acts = lm.capture(ids, mask, [2], keep=training_positions(mask, keep_bos=False))[:256]
    with torch.no_grad():
        column = sae(acts).latents[:, scale.latent]
    assert scale.tokens == len(column) and scale.fire_rate == pytest.approx(float((column != 0).float().mean()))
    assert scale.max == pytest.approx(float(column.max())) and scale.typical == pytest.approx(float(column[column != 0].mean()))


def load_corpus_of(sae, lm):
    from routesae.loading import corpus_for

    return corpus_for(sae.checkpoint, lm)


@pytest.mark.parametrize(
    ("text", "op", "values"),
    [("5=x2max", "set", (Relative(2.0, "max"),)), ("5=+x0.5typical", "add", (Relative(0.5, "typical"),)),
     ("5=-x1max", "add", (Relative(-1.0, "max"),)), ("5=5,10,20", "set", (5.0, 10.0, 20.0)),
     ("5=*-1,2", "mul", (-1.0, 2.0)), ("5=20", "set", (20.0,))],
)
def test_clamp_specs_parse_relative_values_and_sweeps(text, op, values):
    spec = ClampSpec.parse(text)
    assert (spec.latent, spec.op, spec.values) == (5, op, values)


def test_relative_values_resolve_against_the_latents_scale():
    scale = LatentScale(5, 100, 0.1, typical=2.0, max=8.0)
    assert ClampSpec.parse("5=x2max").clamps(scale) == [Clamp(5, "set", 16.0)]
    assert ClampSpec.parse("5=-x1typical").clamps(scale) == [Clamp(5, "add", -2.0)]
    with pytest.raises(RouteSAEError, match="it does not multiply"):
        ClampSpec.parse("5=*x2max")
    with pytest.raises(RouteSAEError, match="never fired"):
        ClampSpec.parse("5=x2max").clamps(LatentScale(5, 100, 0.0, 0.0, 0.0))
    with pytest.raises(RouteSAEError, match="sweep one clamp at a time"):
        sweep_clamps([ClampSpec.parse("1=1,2"), ClampSpec.parse("2=3,4")], {})


def test_cli_shows_how_latents_fire_sweeps_side_by_side_and_records(trained_topk):
    latent = firing_latent(trained_topk).latent
    args = ["steer", str(trained_topk), "--clamp", f"{latent}=x1max,x3max", "--prompt", PROMPT, "--max-new-tokens", "3",
            "--temperature", "0", "--no-chat", "--scale-tokens", "256", "--record"]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    assert f"latent {latent}: fires on" in result.stdout and "at most" in result.stdout
    assert result.stdout.count("steered") == 2 and "original" in result.stdout
    record = json.loads((trained_topk / "steering.json").read_text())["results"]
    scale = record[0]["settings"]["scales"][str(latent)]
    assert [r["settings"]["clamps"] for r in record] == [[f"{latent}={scale['max']:g}"], [f"{latent}={3 * scale['max']:g}"]]
    assert record[0]["original"] == record[1]["original"] and record[0]["settings"]["asked"] == [f"{latent}=x1max,x3max"]
    assert "wrote 2 steering result(s) to steering.json" in result.stderr


def test_relative_values_need_the_data_the_sae_was_trained_on(checkpoint):
    result = CliRunner().invoke(make_cli(), ["steer", str(checkpoint), "--clamp", "7=x2max", "--prompt", "hi"])
    assert result.exit_code == 2 and "needs the SAE's training data" in result.output
