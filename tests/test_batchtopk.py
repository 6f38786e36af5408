"""The example third-party plugin ``plugins/routesae-batchtopk``: discovery and the BatchTopK architecture.

Needs the plugin installed (``pip install --no-deps -e plugins/routesae-batchtopk``; ``make`` does it).
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routesae import export_sae, load_sae
from routesae.architectures.base import standardize
from routesae.architectures.topk import TopKConfig
from routesae.checkpoint import save_sae
from routesae.errors import ConfigError, RouteSAEError
from routesae.plugins import PluginManager

try:
    import routesae_batchtopk
    from routesae_batchtopk import BatchTopKConfig, BatchTopKSAE
except ImportError as e:  # pragma: no cover - a setup problem, not a test failure to debug
    raise ImportError("install the plugin first: pip install --no-deps -e plugins/routesae-batchtopk") from e

D = 16


def make_sae(latent_size: int = 64, k: int = 4, d_model: int = D, seed: int = 0, **kw) -> BatchTopKSAE:
    torch.manual_seed(seed)
    return BatchTopKSAE(BatchTopKConfig(latent_size=latent_size, k=k, layer=0, **kw), d_model)


def acts(n: int, d_model: int = D, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, d_model, generator=torch.Generator().manual_seed(seed))


def kept_min(latents: torch.Tensor) -> float:
    return latents[latents > 0].min().item()


# -- discovery ---------------------------------------------------------------------------------------


@pytest.fixture
def default_plugin_env(monkeypatch):
    for var in ("ROUTESAE_LOAD_PLUGINS", "ROUTESAE_STRICT_PLUGINS", "ROUTESAE_TRACE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)


def test_discovered_through_its_entry_point(default_plugin_env):
    pm = PluginManager()
    assert pm.get("architecture", "batchtopk") is BatchTopKSAE
    info = pm.provider("architecture", "batchtopk")
    assert info.distribution == "routesae-batchtopk"
    assert info.version == "0.1.0"
    assert info.name == "batchtopk"
    assert info.error is None
    assert info.registered == {"architecture": ["batchtopk"], "exporter": ["saelens:batchtopk"]}
    assert pm.provider("architecture", "topk").distribution == "routesae"


def test_load_plugins_switch_selects_it(monkeypatch):
    monkeypatch.setenv("ROUTESAE_LOAD_PLUGINS", "")
    assert "batchtopk" not in PluginManager().names("architecture")
    monkeypatch.setenv("ROUTESAE_LOAD_PLUGINS", "Routesae_BatchTopK")  # names are canonicalised
    assert "batchtopk" in PluginManager().names("architecture")


def test_hook_registers_the_class_and_contract_holds():
    registered = []
    routesae_batchtopk.register_architectures(registered.append)
    assert registered == [BatchTopKSAE]
    BatchTopKSAE.check_contract()
    assert BatchTopKSAE.name == "batchtopk"
    assert BatchTopKSAE.Config is BatchTopKConfig


# -- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"k": 0}, "0 < k < latent size"),
        ({"k": -3}, "0 < k < latent size"),
        ({"k": 64}, "0 < k < latent size"),
        ({"k": 100}, "0 < k < latent size"),
        ({"threshold_momentum": 0.0}, "strictly between 0 and 1"),
        ({"threshold_momentum": 1.0}, "strictly between 0 and 1"),
        ({"threshold_momentum": 1.5}, "strictly between 0 and 1"),
        ({"k": "4"}, "k must be int"),
        ({"latent_size": 0}, "latent_size must be positive"),
    ],
)
def test_config_validation(changes, message):
    with pytest.raises(ConfigError, match=message):
        BatchTopKConfig(**{"latent_size": 64, "k": 4, **changes})


def test_config_round_trips_and_rejects_unknown_keys():
    cfg = BatchTopKConfig(latent_size=64, k=4, threshold_momentum=0.9, layer=3)
    assert cfg.to_dict() == {
        "latent_size": 64,
        "normalize": "token",
        "layer": 3,
        "k": 4,
        "threshold_momentum": 0.9,
    }
    assert BatchTopKConfig.from_dict(cfg.to_dict()) == cfg
    assert BatchTopKConfig(latent_size=64, k=4, threshold_momentum=1 - 1e-9).threshold_momentum < 1
    with pytest.raises(ConfigError, match="unknown setting.*thresold_momentum"):
        BatchTopKConfig.from_dict({**cfg.to_dict(), "thresold_momentum": 0.5})
    with pytest.raises(ConfigError, match="needs a BatchTopKConfig"):
        BatchTopKSAE(TopKConfig(latent_size=64, k=4, layer=0), D)


# -- training mode: batch top-k×N ---------------------------------------------------------------------


def test_train_mode_keeps_exactly_k_times_n_with_variable_counts():
    sae = make_sae(k=4).train()
    out = sae(acts(32))
    active = out.latents != 0
    assert active.sum().item() == 4 * 32
    per_token = active.sum(-1)
    assert per_token.float().mean().item() == 4.0
    assert per_token.unique().numel() > 1  # variable, unlike TopK
    assert (out.latents >= 0).all()
    # the kept set is the top of the batch: nothing dropped is larger than anything kept
    torch.testing.assert_close(out.pre, sae.preactivations(out.target))
    pre = out.pre.relu()
    assert pre[~active].max() <= out.latents[active].min()
    assert torch.equal(out.latents[active], pre[active])


def test_sparse_decode_matches_dense_and_gradients_flow():
    sae = make_sae(k=4).train()
    out = sae(acts(32))
    torch.testing.assert_close(out.x_hat, sae.decode_standardized(out.latents))
    sae.loss(out)[0].backward()
    for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_a_token_may_get_no_latents():
    sae = make_sae(k=1, latent_size=8, d_model=4).train()
    x = acts(64, d_model=4)
    with torch.no_grad():
        x[:32] *= 1e-3  # with normalize="none" these tokens lose every batch-wide contest
    sae.cfg = sae.cfg.replace(normalize="none")
    out = sae(x)
    assert (out.latents != 0).sum().item() == 64
    assert (out.latents[:32] != 0).sum().item() == 0
    torch.testing.assert_close(out.x_hat[:32], sae.b_dec.expand(32, 4))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 48),
    latent_size=st.integers(2, 96),
    k_frac=st.floats(0.0, 1.0),
    d_model=st.integers(2, 24),
    seed=st.integers(0, 2**16),
)
def test_property_active_count_is_k_times_n(n, latent_size, k_frac, d_model, seed):
    k = 1 + int(k_frac * (latent_size - 2))
    sae = make_sae(latent_size=latent_size, k=k, d_model=d_model, seed=seed).train()
    x = acts(n, d_model=d_model, seed=seed + 1)
    with torch.no_grad():
        out = sae(x)
        pre = sae.preactivations(out.target)
    positives = int((pre > 0).sum())
    active = out.latents != 0
    # exactly k×N whenever the batch has that many positive pre-activations (ReLU keeps no negatives)
    assert active.sum().item() == min(k * n, positives)
    assert (out.latents >= 0).all()
    if active.any() and not active.all():
        assert pre.relu()[~active].max() <= out.latents[active].min()


# -- θ -------------------------------------------------------------------------------------------------


def test_threshold_starts_unset_and_is_in_the_state_dict():
    sae = make_sae()
    state = sae.state_dict()
    assert {"threshold", "threshold_count"} <= set(state)
    assert state["threshold"].item() == 0.0 and state["threshold_count"].item() == 0
    assert not sae.calibrated


def test_training_steps_update_threshold_running_mean_then_ema():
    sae = make_sae(threshold_momentum=0.5).train()  # running mean for 2 updates, then weight 0.5
    expected = 0.0
    for t, weight in enumerate([1.0, 1 / 2, 1 / 2, 1 / 2], start=1):
        out = sae(acts(32, seed=10 + t))
        assert sae.threshold_count.item() == t - 1  # forward alone changes nothing
        batch_threshold = kept_min(out.latents)
        sae.after_step(t)
        expected = expected + weight * (batch_threshold - expected)
        assert sae.threshold_count.item() == t
        assert sae.threshold.item() == pytest.approx(expected, rel=1e-6)
    assert sae.calibrated and sae.threshold.item() > 0


def test_first_update_sets_threshold_to_the_batch_min_exactly():
    sae = make_sae().train()
    out = sae(acts(32))
    sae.after_step(0)
    assert sae.threshold.item() == kept_min(out.latents)


def test_several_forwards_per_step_fold_their_mean():
    sae = make_sae().train()
    a, b = kept_min(sae(acts(32, seed=2)).latents), kept_min(sae(acts(32, seed=3)).latents)
    sae.after_step(0)
    assert sae.threshold_count.item() == 1
    assert sae.threshold.item() == pytest.approx((a + b) / 2, rel=1e-6)


def test_eval_forwards_and_idle_steps_leave_threshold_alone():
    sae = make_sae().train()
    sae(acts(32))
    sae.after_step(0)
    theta = sae.threshold.clone()
    sae.after_step(1)  # no forward since the last step
    sae.eval()
    sae(acts(32, seed=5))
    sae.after_step(2)
    assert torch.equal(sae.threshold, theta) and sae.threshold_count.item() == 1


def test_non_finite_batch_threshold_is_ignored():
    sae = make_sae().train()
    sae(acts(32))
    sae.after_step(0)
    theta = sae.threshold.clone()
    x = acts(32, seed=4)
    x[0, 0, 0] = float("nan")
    sae.cfg = sae.cfg.replace(normalize="none")
    sae(x)
    sae.after_step(1)
    assert torch.equal(sae.threshold, theta) and sae.threshold_count.item() == 1


def test_threshold_survives_state_dict_round_trip():
    sae = make_sae().train()
    for step in range(3):
        sae(acts(32, seed=step))
        sae.after_step(step)
    loaded = make_sae(seed=99)
    loaded.load_state_dict(sae.state_dict())
    assert torch.equal(loaded.threshold, sae.threshold)
    assert loaded.threshold_count.item() == 3 and loaded.calibrated
    sae.eval(), loaded.eval()
    x = acts(16, seed=7)
    assert torch.equal(loaded(x).latents, sae(x).latents)


# -- eval mode: JumpReLU with the global θ --------------------------------------------------------------


def test_eval_mode_is_jumprelu_with_the_global_threshold():
    sae = make_sae().train()
    for step in range(5):
        sae(acts(64, seed=step))
        sae.after_step(step)
    sae.eval()
    theta = sae.threshold
    x = acts(40, seed=123)
    x_ND, _ = standardize(x, "token")
    pre = sae.preactivations(x_ND[:, 0])
    expected = pre * (pre > theta)
    assert torch.equal(sae.encode_standardized(x_ND[:, 0]), expected)
    out = sae(x)
    assert torch.equal(out.latents, expected)
    torch.testing.assert_close(out.x_hat, sae.decode_standardized(expected))
    # batch-independent: one token alone encodes as inside the batch (up to matmul rounding)
    torch.testing.assert_close(sae(x[:1]).latents, expected[:1])


def test_eval_before_any_step_falls_back_to_batch_topk():
    sae = make_sae(k=4).eval()
    out = sae(acts(32))
    assert not sae.calibrated
    assert (out.latents != 0).sum().item() == 4 * 32


def test_reconstruction_goes_to_the_configured_layer():
    torch.manual_seed(0)
    sae = BatchTopKSAE(BatchTopKConfig(latent_size=64, k=4, layer=2), D)
    x = acts(10)
    spliced = sae.reconstruction(sae(x))
    assert set(spliced) == {2}
    x_hat, mask = spliced[2]
    assert x_hat.shape == (10, D) and mask.all()


# -- a real training loop -----------------------------------------------------------------------------


def test_short_training_loop_reduces_loss_and_calibrates_threshold():
    torch.manual_seed(0)
    d_model, n_features, k = 32, 128, 4
    dictionary = torch.nn.functional.normalize(torch.randn(256, d_model), dim=-1)

    def batch(n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        codes = torch.rand(n, 256, generator=g) * (torch.rand(n, 256, generator=g) < 3 / 256)
        return (codes @ dictionary + 0.01 * torch.randn(n, d_model, generator=g))[:, None]

    sae = make_sae(latent_size=n_features, k=k, d_model=d_model, threshold_momentum=0.9).train()
    held_out = batch(512, seed=10_000)
    with torch.no_grad():
        before = sae.loss(sae(held_out))[0].item()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(150):
        loss, terms = sae.loss(sae(batch(256, seed=step)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sae.after_step(step)
        sae.normalize_decoder()
    assert set(terms) == {"nmse", "l0", "threshold"}
    with torch.no_grad():
        after = sae.loss(sae(held_out))[0].item()
        sae.eval()
        eval_out = sae(held_out)
    assert after < 0.6 * before
    assert sae.threshold_count.item() == 150 and sae.threshold.item() > 0
    # the estimated θ gives about k latents per token at inference, without looking at the batch
    eval_l0 = (eval_out.latents != 0).sum(-1).float().mean().item()
    assert 0.75 * k <= eval_l0 <= 1.25 * k
    assert sae.loss(eval_out)[0].item() < 0.6 * before


# -- SAELens ----------------------------------------------------------------------------------------------


def test_a_calibrated_batchtopk_is_a_saelens_jumprelu_with_one_threshold_and_comes_back_exact(tmp_path):
    from saelens_formulas import saelens_encode_decode
    from safetensors.torch import load_file

    sae = make_sae(latent_size=48, k=4, normalize="layer_norm")
    with pytest.raises(RouteSAEError, match="no inference threshold"):
        export_sae(_saved(sae, tmp_path / "uncalibrated"), tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        sae.threshold.fill_(0.2)
        sae.threshold_count.fill_(7)
    sae.eval()
    export_sae(_saved(sae, tmp_path / "sae"), tmp_path / "saelens")
    assert json.loads((tmp_path / "saelens" / "cfg.json").read_text())["architecture"] == "jumprelu"
    assert torch.equal(load_file(tmp_path / "saelens" / "sae_weights.safetensors")["threshold"], torch.full((48,), 0.2))
    x = acts(32)[:, 0] * 3
    with torch.no_grad():
        out = sae(x[:, None])
        ours = sae.reconstruction(out)[0][0]
    z, theirs = saelens_encode_decode(tmp_path / "saelens", x)
    assert torch.equal(out.latents, z) and torch.equal(ours, theirs) and (z != 0).any()
    again, config = load_sae(tmp_path / "saelens")
    assert isinstance(again, BatchTopKSAE) and config["config"] == sae.cfg.to_dict()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in sae.state_dict().items())


def _saved(sae, directory):
    save_sae(sae, directory, {"name": directory.name, "model": {"spec": "tiny", "d_model": D}})
    return directory
