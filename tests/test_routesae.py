"""RouteSAE: composition (router + aggregation + any single-layer inner), settings routing, splicing, statistics."""

import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from routesae.architectures.base import STANDARDIZE_EPS, SingleLayerSAE, TrainingState, normalized_mse, standardize
from routesae.architectures.routesae import RouteSAE, RouteSAEConfig, single_layer_architectures
from routesae.architectures.topk import TopKSAE
from routesae.checkpoint import load_sae, save_sae
from routesae.cli import make_cli
from routesae.errors import ConfigError
from routesae.firing import FiringCounter

D = 16


def make(layers="1:3", latent_size=64, seed=0, **settings_):
    torch.manual_seed(seed)
    return RouteSAE(RouteSAE.build_config({"layers": layers, "latent_size": latent_size, **settings_}), D)


def acts(n, n_layers=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n_layers, D, generator=g) * torch.linspace(1, 20, n_layers)[:, None] + 3


# -- settings ----------------------------------------------------------------------------------------


def test_build_config_routes_own_settings_and_inner_settings():
    cfg = RouteSAE.build_config({"layers": "1:3", "latent_size": 64, "k": 4, "relu": True, "router": "soft"})
    assert (cfg.layers, cfg.latent_size, cfg.router, cfg.aggregate, cfg.inner) == ("1:3", 64, "soft", "sum", "topk")
    assert cfg.inner_settings["k"] == 4 and cfg.inner_settings["relu"] is True
    assert not {"latent_size", "layer", "normalize"} & set(cfg.inner_settings), "derived settings are not stored twice"
    inner = cfg.inner_config()
    assert (inner.latent_size, inner.k, inner.relu, inner.normalize) == (64, 4, True, "none")
    assert RouteSAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    sae = RouteSAE(cfg.resolve(4), D)
    assert isinstance(sae.sae, TopKSAE) and sae.sae.cfg.k == 4 and sae.sae.W_enc.shape == (64, D)


def test_build_config_rejects_settings_the_inner_does_not_take():
    with pytest.raises(ConfigError, match=r"inner='topk' does not take the setting 'threshold_momentum'.*topk's settings are: .*k, relu"):
        RouteSAE.build_config({"threshold_momentum": 0.9})
    cfg = RouteSAE.build_config({"inner": "batchtopk", "threshold_momentum": 0.9, "k": 8})
    assert cfg.inner_settings == {"k": 8, "threshold_momentum": 0.9}
    with pytest.raises(ConfigError, match=r"'relu'.*batchtopk's settings are: k, threshold_momentum"):
        RouteSAE.build_config({"inner": "batchtopk", "relu": True})
    with pytest.raises(ConfigError, match=r"'layer' \(RouteSAE reads a range: use layers=A:B\)"):
        RouteSAE.build_config({"layer": 2})
    with pytest.raises(ConfigError, match="'bogus'"):
        RouteSAE.build_config({"bogus": 1})
    with pytest.raises(ConfigError, match="0 < k < latent size"):
        RouteSAE.build_config({"k": 64, "latent_size": 64})
    with pytest.raises(ConfigError, match="k must be int"):
        RouteSAE.build_config({"k": "4"})
    with pytest.raises(ConfigError, match="inner_settings may not set latent_size"):
        RouteSAEConfig(inner_settings={"latent_size": 8})
    with pytest.raises(ConfigError, match="inner architecture 'topk' does not take bogus; its settings are: "):
        RouteSAEConfig(inner_settings={"bogus": 1})


def test_inner_must_be_a_registered_single_layer_architecture():
    valid = sorted(single_layer_architectures())
    assert {"topk", "batchtopk"} <= set(valid) and "routesae" not in valid
    message = "is not a registered single-layer architecture; choose one of: " + ", ".join(valid)
    for bad in ("routesae", "nope"):
        with pytest.raises(ConfigError, match=message):
            RouteSAE.build_config({"inner": bad})


def test_setting_names_are_own_fields_and_every_single_layer_architectures_settings():
    names = RouteSAE.setting_names()
    assert {"layers", "latent_size", "normalize", "router", "aggregate", "inner", "k", "relu", "threshold_momentum"} <= names
    assert "layer" not in names and "inner_settings" not in names
    for cls in single_layer_architectures().values():
        assert cls.setting_names() - {"layer"} <= names


def test_default_layers_are_the_reference_range_and_names_are_readable():
    assert RouteSAE.build_config({}).resolve(16).layers == "3:11"
    assert RouteSAE.build_config({}).resolve(30).layers == "6:21"
    assert RouteSAE.build_config({"k": 32, "latent_size": 4096}).resolve(30).name_parts() == ["L6-21", "hard", "sum", "k32", "F4096"]
    soft = RouteSAE.build_config({"inner": "batchtopk", "router": "soft", "aggregate": "mean", "k": 8, "layers": "1:3"})
    assert soft.name_parts() == ["L1-3", "soft", "mean", "batchtopk", "k8", "F4096"]


# -- forward and loss --------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 60), st.integers(1, 8), st.sampled_from(["hard", "soft"]), st.integers(0, 1000))
def test_topk_inner_gives_exactly_k_latents_per_token(n, k, router, seed):
    sae = make(k=k, router=router, seed=seed)
    with torch.no_grad():
        sae.sae.b_enc.fill_(-5.0)  # signed TopK: still exactly k, even when all are negative
    out = sae(acts(n, seed=seed))
    assert out.latents.shape == (n, 64)
    assert ((out.latents != 0).sum(-1) == k).all()


@pytest.mark.parametrize("router", ["hard", "soft"])
def test_forward_is_the_routed_input_through_the_inner(router):
    sae = make(k=4, router=router)
    a = acts(20)
    out = sae(a)
    x, _ = standardize(a, "token")
    torch.testing.assert_close(out.extras["x_chosen"], x[torch.arange(20), out.extras["chosen"]])
    probs = (sae.router(x.sum(1))).softmax(-1)
    torch.testing.assert_close(out.extras["router_probs"], probs)
    if router == "hard":
        chosen = probs.argmax(-1)
        expected = probs.max(-1).values[:, None] * x[torch.arange(20), chosen]
    else:
        expected = (probs[:, :, None] * x).sum(1)
    torch.testing.assert_close(out.target, expected)
    _, z, x_hat = sae.sae.encode_decode(expected)
    torch.testing.assert_close(out.latents, z)
    torch.testing.assert_close(out.x_hat, x_hat)
    loss, terms = sae.loss(out)
    torch.testing.assert_close(loss, normalized_mse(x_hat, expected))
    assert {"nmse", "l0", "router_entropy", "router_p_max"} <= set(terms)
    torch.testing.assert_close(terms["router_p_max"], probs.max(-1).values.mean())


@pytest.mark.parametrize("router", ["hard", "soft"])
def test_the_router_weight_receives_gradient(router):
    sae = make(k=4, router=router)
    loss, _ = sae.loss(sae(acts(32)))
    loss.backward()
    grad = sae.router.weight.grad
    assert grad is not None and grad.shape == (3, D) and grad.abs().sum() > 0


@pytest.mark.parametrize("inner", sorted(single_layer_architectures()))
def test_every_registered_single_layer_architecture_works_as_the_inner(inner):
    arch = single_layer_architectures()[inner]
    defaults = arch.Config(layer=0, latent_size=64)
    inner_settings = {"k": 4} if hasattr(defaults, "k") else {}
    sae = make(inner=inner, **inner_settings)
    assert type(sae.sae) is arch and isinstance(sae.sae, SingleLayerSAE)
    a = acts(40)
    sae.train()
    out = sae(a)
    loss, terms = sae.loss(out)
    _, standalone_terms = sae.sae.loss(sae.sae(out.target.detach()[:, None]))
    assert set(standalone_terms) <= set(terms), "every inner term is logged"
    loss.backward()
    assert torch.isfinite(loss) and sae.router.weight.grad is not None
    for p in sae.sae.parameters():
        p.grad = None
    sae.after_step(0)
    sae.eval()
    with torch.no_grad():
        recon = sae.reconstruction(sae(a))
    assert sorted(recon) == [1, 2, 3] and all(torch.isfinite(x).all() for x, _ in recon.values())


def test_inner_sparsity_terms_apply():
    if "vanilla" not in single_layer_architectures():
        pytest.skip("no vanilla architecture registered")
    sae = make(inner="vanilla", l1=2.0)
    out = sae(acts(30))
    torch.testing.assert_close(out.pre, sae.sae.preactivations(out.target))  # the inner's, passed through
    loss, terms = sae.loss(out)
    torch.testing.assert_close(loss, normalized_mse(out.x_hat, out.target) + 2.0 * out.latents.abs().mean())
    torch.testing.assert_close(terms["l1"], 2.0 * out.latents.abs().mean())


def test_batchtopk_inner_keeps_k_per_token_on_average_and_calibrates_through_after_step():
    sae = make(inner="batchtopk", k=4)
    sae.train()
    out = sae(acts(50))
    assert (out.latents != 0).sum() == 4 * 50 and (out.latents >= 0).all()
    assert not sae.sae.calibrated
    sae.after_step(0)
    assert sae.sae.calibrated
    torch.testing.assert_close(sae.sae.threshold, out.latents[out.latents > 0].min())
    sae.eval()
    eval_out = sae(acts(50, seed=2))
    assert ((eval_out.latents == 0) | (eval_out.latents > sae.sae.threshold)).all()


def test_topk_inner_with_auxk_gets_its_pre_activations_and_the_trainers_dead_latents():
    if "auxk" not in TopKSAE.setting_names():
        pytest.skip("this TopK has no AuxK")
    sae = make(k=2, auxk=1 / 32, auxk_k=4)
    firing = FiringCounter(64, dead_after_tokens=1)
    sae.train()
    out = sae(acts(30))
    assert out.pre is not None
    firing.update(out.latents)
    assert firing.dead().any()
    loss, terms = sae.loss(sae(acts(30, seed=3)), TrainingState(step=1, dead_F=firing.dead()))
    assert terms["auxk"] > 0
    loss.backward()


# -- splicing ----------------------------------------------------------------------------------------


def reference_splice(sae, a):
    """The reference's evaluation hook (§3.6), written out: unscaled x_{i*} through the inner, de-standardised."""
    mean, std = a.mean(-1, keepdim=True), a.std(-1, keepdim=True)
    x = (a - mean) / (std + STANDARDIZE_EPS)
    chosen = sae.router(x.sum(1)).softmax(-1).argmax(-1)  # the reference aggregates by sum
    rows = torch.arange(a.shape[0])
    x_hat = sae.sae.decode_standardized(sae.sae.encode_standardized(x[rows, chosen]))
    return chosen, x_hat * (std[rows, chosen] + STANDARDIZE_EPS) + mean[rows, chosen]


@pytest.mark.parametrize("router", ["hard", "soft"])
def test_reconstruction_writes_each_token_once_at_its_chosen_block_from_the_unscaled_input(router):
    sae = make(layers="2:5", k=4, router=router).eval()
    a = acts(200, n_layers=4)
    with torch.no_grad():
        out = sae(a)
        recon = sae.reconstruction(out)
        chosen, expected = reference_splice(sae, a)
    assert sorted(recon) == [2, 3, 4, 5]
    masks = torch.stack([recon[block][1] for block in (2, 3, 4, 5)], 1)
    assert masks.dtype == torch.bool and (masks.sum(1) == 1).all(), "each token at exactly one block"
    assert torch.equal(masks.int().argmax(1), chosen) and torch.equal(chosen, out.extras["chosen"])
    assert len(set(chosen.tolist())) > 1, "the test should route tokens to several blocks"
    for i, block in enumerate((2, 3, 4, 5)):
        x_hat, mask = recon[block]
        torch.testing.assert_close(x_hat[mask], expected[chosen == i])
    if router == "hard":
        # not the trained reconstruction: training encodes p·x (reference §12.5)
        trained = out.norm.undo(out.x_hat[:, None].expand(-1, 4, -1))[torch.arange(200), chosen]
        assert not torch.allclose(trained, expected)


def test_reconstruction_without_normalisation_is_the_inner_reconstruction_as_is():
    sae = make(k=4, normalize="none").eval()
    a = acts(30)
    with torch.no_grad():
        recon = sae.reconstruction(sae(a))
        chosen = sae.router(a.sum(1)).argmax(-1)
        expected = sae.sae.decode_standardized(sae.sae.encode_standardized(a[torch.arange(30), chosen]))
    for i, block in enumerate((1, 2, 3)):
        torch.testing.assert_close(recon[block][0][recon[block][1]], expected[chosen == i])


# -- statistics and state ------------------------------------------------------------------------------


def test_routing_counts_accumulate_in_train_mode_only():
    sae = make(k=4)
    assert sae.routing_counts.dtype == torch.float64 and "routing_counts" in sae.state_dict()
    sae.eval()
    sae(acts(17))
    assert sae.statistics() == {"routing_counts": {"1": 0.0, "2": 0.0, "3": 0.0}}
    sae.train()
    chosen = torch.cat([sae(acts(n, seed=n)).extras["chosen"] for n in (17, 40, 3)])
    counts = list(sae.statistics()["routing_counts"].values())
    assert sum(counts) == 60.0
    assert counts == torch.bincount(chosen, minlength=3).double().tolist()
    sae.eval()
    sae(acts(100))
    assert list(sae.statistics()["routing_counts"].values()) == counts


def test_soft_routing_counts_are_probability_mass():
    sae = make(k=4, router="soft").train()
    out = sae(acts(25))
    torch.testing.assert_close(sae.routing_counts, out.extras["router_probs"].detach().double().sum(0))
    assert sum(list(sae.statistics()["routing_counts"].values())) == pytest.approx(25.0)


def test_counts_are_sized_by_the_routed_range_for_every_depth():
    for n_layers in (4, 16, 19, 30):  # 19 ≡ 3 (mod 4) broke the reference's n//2+1 accumulator
        cfg = RouteSAE.build_config({"k": 4, "latent_size": 64}).resolve(n_layers)
        sae = RouteSAE(cfg, D)
        routed = len(cfg.resolved_layers())
        assert sae.routing_counts.shape == (routed,) and sae.router.weight.shape == (routed, D)
        sae.train()(torch.randn(5, routed, D))
        assert sae.routing_counts.sum() == 5


def test_decoder_directions_are_the_inners():
    sae = make(k=4)
    assert sae.decoder_directions() == [sae.sae.W_dec]
    with torch.no_grad():
        sae.sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.sae.W_dec.norm(dim=-1), torch.ones(64))
    assert set(sae.state_dict()) == {"router.weight", "routing_counts", "sae.W_enc", "sae.W_dec", "sae.b_enc", "sae.b_dec"}


def test_encode_and_decode_work_in_the_routed_space():
    sae = make(k=4).eval()
    a = acts(10)
    out = sae(a)
    torch.testing.assert_close(sae.encode_standardized(out.target), out.latents)
    torch.testing.assert_close(sae.decode_standardized(out.latents), out.x_hat)
    assert out.target.shape == (10, a.shape[-1]), "the SAE's input space is the routed vector"


@pytest.mark.parametrize("settings_", [{"k": 4}, {"k": 4, "router": "soft", "aggregate": "mean"}, {"inner": "batchtopk", "k": 4}])
def test_save_and_load_give_identical_outputs(tmp_path, settings_):
    sae = make(**settings_).train()
    for seed in range(3):
        sae(acts(20, seed=seed))
        sae.after_step(seed)
    sae.eval()
    save_sae(sae, tmp_path / "sae", {"name": "x"})
    loaded, _ = load_sae(tmp_path / "sae")
    assert type(loaded) is RouteSAE and loaded.cfg == sae.cfg and not loaded.training
    assert loaded.statistics() == sae.statistics() and sum(loaded.statistics()["routing_counts"].values()) == pytest.approx(60)
    a = acts(30, seed=9)
    with torch.no_grad():
        out, again = sae(a), loaded(a)
        for key in ("latents", "x_hat", "target"):
            assert torch.equal(getattr(out, key), getattr(again, key))
        r1, r2 = sae.reconstruction(out), loaded.reconstruction(again)
    assert all(torch.equal(r1[b][0], r2[b][0]) and torch.equal(r1[b][1], r2[b][1]) for b in r1)


def test_upgrade_is_the_inners_on_its_settings_and_weights():
    config = {"layers": "1:3", "inner": "topk", "inner_settings": {"k": 4, "auxk": 0.5, "dead_tokens": 128}}
    state = {"router.weight": torch.zeros(1), "sae.W_enc": torch.zeros(1), "sae.tokens_since_fired": torch.zeros(1)}
    new_config, new_state = RouteSAE.upgrade(config, state)
    assert new_config == {"layers": "1:3", "inner": "topk", "inner_settings": {"k": 4, "auxk": 0.5}}
    assert set(new_state) == {"router.weight", "sae.W_enc"}
    batchtopk = {"inner": "batchtopk", "inner_settings": {"k": 4}}
    assert RouteSAE.upgrade(batchtopk, new_state) == (batchtopk, new_state)


def test_a_checkpoint_with_the_old_dead_latent_counter_loads(tmp_path):
    """Written while TopK kept its own counter: ``dead_tokens`` among the inner settings, ``sae.tokens_since_fired``."""
    sae = make(k=4, auxk=1 / 32).eval()
    save_sae(sae, tmp_path / "sae", {"name": "x"})
    config = json.loads((tmp_path / "sae" / "config.json").read_text())
    config["config"]["inner_settings"]["dead_tokens"] = 100_000
    (tmp_path / "sae" / "config.json").write_text(json.dumps(config))
    save_file({**sae.state_dict(), "sae.tokens_since_fired": torch.zeros(64, dtype=torch.long)}, tmp_path / "sae" / "weights.safetensors")
    loaded, _ = load_sae(tmp_path / "sae")
    assert loaded.cfg == sae.cfg
    a = acts(30, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(a).x_hat, sae(a).x_hat)


# -- the real CLI -------------------------------------------------------------------------------------


def test_train_routesae_beside_topk_through_the_cli_and_load_it(tiny_model_dir, text_corpus_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), "--arch", "routesae", "--arch", "topk",
            "--k", "4", "--latent-size", "64", "--layers", "1:3", "--layer", "2", "--batch-size", "4", "--context-length", "32",
            "--sae-batch-tokens", "64", "--buffer-tokens", "256", "--tokens", "640", "--out", str(out), "--json", "--report", "jsonl"]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    names = [s["name"] for s in json.loads(result.stdout)["saes"]]
    assert names == ["routesae-L1-3-hard-sum-k4-F64", "topk-L2-k4-F64"]
    sae, config = load_sae(out / names[0])
    assert isinstance(sae, RouteSAE) and sae.layers == (1, 2, 3) and sae.cfg.inner_settings["k"] == 4
    assert config["hooks"] == [f"blocks.{i}.hook_resid_post" for i in (1, 2, 3)]
    assert sum(list(sae.statistics()["routing_counts"].values())) == 640.0
    assert config["training"]["statistics"] == sae.statistics()
    topk, _ = load_sae(out / names[1])
    assert topk.layers == (2,)
    a = torch.randn(8, 3, sae.d_model)
    out_ = sae(a)
    assert ((out_.latents != 0).sum(-1) == 4).all()
    torch.testing.assert_close(sae.sae.W_dec.norm(dim=-1), torch.ones(64))
