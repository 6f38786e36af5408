"""The SAE base class and the TopK architecture: invariants with exact expectations."""

import json

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from routesae.architectures.base import Inference, default_single_layer, normalized_mse, standardize
from routesae.architectures.topk import TopKConfig, TopKEncode, TopKSAE
from routesae.checkpoint import load_sae
from routesae.errors import ConfigError


def make(k=4, latent_size=32, d=16, relu=False, layer=1):
    torch.manual_seed(0)
    return TopKSAE(TopKConfig(k=k, latent_size=latent_size, relu=relu, layer=layer), d)


def test_exactly_k_signed_latents_per_token():
    sae = make()
    with torch.no_grad():
        sae.b_enc.fill_(-10.0)  # every pre-activation negative
    out = sae(torch.randn(50, 1, 16) * 5)
    assert ((out.latents != 0).sum(-1) == 4).all()
    assert (out.latents < 0).sum() == 50 * 4, "the reference keeps signed values"
    relu_sae = make(relu=True)
    with torch.no_grad():
        relu_sae.b_enc.fill_(-10.0)
    assert (relu_sae(torch.randn(50, 1, 16)).latents == 0).all()


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_both_decode_paths_match_the_dense_reference_and_its_gradients(path):
    sae = make()
    sae.decode_path = path
    x = torch.randn(20, 1, 16)
    out = sae(x)
    dense = sae.decode_standardized(out.latents)
    torch.testing.assert_close(out.x_hat, dense)
    out.x_hat.pow(2).sum().backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    sae.decode_standardized(sae.encode_standardized(out.target)).pow(2).sum().backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_sparse_and_dense_training_steps_agree_at_a_real_size():
    """A step of the SmolLM2-sized SAE (d 576, 4,096 latents, k 32) through each path: same loss, same update."""
    results = []
    for path in ("sparse", "dense"):
        torch.manual_seed(0)
        sae = TopKSAE(TopKConfig(k=32, latent_size=4096, layer=0), 576)
        sae.decode_path = path
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
        x = torch.randn(256, 1, 576, generator=torch.Generator().manual_seed(1))
        loss, _ = sae.loss(sae(x))
        loss.backward()
        optimizer.step()
        results.append((loss.detach(), {n: p.detach().clone() for n, p in sae.named_parameters()}))
    (sparse_loss, sparse), (dense_loss, dense) = results
    torch.testing.assert_close(sparse_loss, dense_loss)
    for name in sparse:
        torch.testing.assert_close(sparse[name], dense[name], msg=name)


@pytest.mark.parametrize(("k", "latent_size", "sparse"), [(32, 4096, True), (128, 4096, True), (256, 4096, False),
                                                         (64, 1024, False), (32, 65536, True), (4, 32, False)])
def test_auto_decode_gathers_rows_only_where_measured_to_pay(k, latent_size, sparse):
    assert TopKSAE(TopKConfig(k=k, latent_size=latent_size, layer=0), 8).uses_sparse_decode() is sparse


def test_reconstruction_maps_back_to_the_residual_stream():
    sae = make()
    acts = torch.randn(10, 1, 16) * 30 + 7
    out = sae(acts)
    (layer, (x_hat, mask)), = sae.reconstruction(out).items()
    assert layer == 1 and mask.all() and x_hat.shape == (10, 16)
    torch.testing.assert_close(x_hat, out.x_hat * (acts.std(-1) + 1e-6) + acts.mean(-1, keepdim=True)[:, 0])


def test_initialisation_is_tied_and_unit_norm():
    sae = make()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(32))
    torch.testing.assert_close(sae.W_dec, sae.W_enc / sae.W_enc.norm(dim=-1, keepdim=True))
    assert (sae.b_enc == 0).all() and (sae.b_dec == 0).all()
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(32))


@given(st.integers(2, 64), st.floats(0.1, 1e3), st.floats(-1e3, 1e3))
@example(2, 0.1, -763.9847066799591)  # a mean 7,600 x its spread: a one-pass variance loses it (docs/speed.md)
@settings(max_examples=30, deadline=None)
def test_standardize_gives_zero_mean_unit_std(d, scale, shift):
    acts = torch.randn(5, 2, d, dtype=torch.float64) * scale + shift
    x, norm = standardize(acts, "token")
    torch.testing.assert_close(x.mean(-1), torch.zeros(5, 2, dtype=torch.float64), atol=1e-9, rtol=0)
    std = acts.std(-1)
    torch.testing.assert_close(x.std(-1), std / (std + 1e-6))  # unit std up to the reference's epsilon
    torch.testing.assert_close(norm.undo(x), acts)


def test_normalized_mse_of_perfect_and_zero_reconstruction():
    x = torch.randn(8, 16)
    assert normalized_mse(x, x).item() == 0
    torch.testing.assert_close(normalized_mse(torch.zeros_like(x), x), torch.tensor(1.0))


@pytest.mark.parametrize(("k", "latent_size"), [(0, 8), (-1, 8), (8, 8), (9, 8)])
def test_k_out_of_range_is_a_config_error(k, latent_size):
    with pytest.raises(ConfigError, match="0 < k < latent size"):
        TopKConfig(k=k, latent_size=latent_size)


def test_unknown_and_mistyped_settings_are_rejected():
    with pytest.raises(ConfigError, match="unknown setting.*kk.*known:.*k"):
        TopKConfig.from_dict({"kk": 3})
    with pytest.raises(ConfigError, match="k must be int"):
        TopKConfig.from_dict({"k": "3"})
    with pytest.raises(ConfigError, match="normalize='layer' is not one of"):
        TopKConfig.from_dict({"normalize": "layer"})


@given(st.integers(1, 63), st.booleans(), st.sampled_from(["token", "none"]), st.none() | st.integers(0, 40))
def test_config_round_trips_through_json(k, relu, normalize, layer):
    cfg = TopKConfig(k=k, latent_size=64, relu=relu, normalize=normalize, layer=layer)
    assert TopKConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_default_layer_is_the_top_of_the_routed_range():
    assert default_single_layer(16) == 11 and default_single_layer(30) == 21
    assert TopKConfig().resolve(30).layer == 21
    with pytest.raises(ConfigError, match="it has 30 blocks, numbered 0 to 29"):
        TopKConfig(layer=30).resolve(30)
    assert TopKConfig(k=32, latent_size=4096).resolve(30).name_parts() == ["L21", "k32", "F4096"]


def encoder_grads(sae, x, path):
    """Gradients of the NMSE loss (parameters and input) through the given encoder path."""
    sae.encoder_path = path
    sae.zero_grad()
    x = x.clone().requires_grad_(True)
    loss, _ = sae.loss(sae(x))
    loss.backward()
    return {"x": x.grad, **{name: p.grad.clone() for name, p in sae.named_parameters()}}


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("decode_path", ["sparse", "dense"])
def test_sparse_encoder_backward_matches_the_dense_gradients(relu, decode_path):
    sae = make(k=4, latent_size=64, relu=relu)
    sae.decode_path = decode_path
    with torch.no_grad():
        sae.b_enc.normal_()  # some kept pre-activations negative, so relu=True zeroes their gradient
    x = torch.randn(40, 1, 16, generator=torch.Generator().manual_seed(1))
    sparse, dense = encoder_grads(sae, x, "sparse"), encoder_grads(sae, x, "dense")
    assert sparse["W_enc"].abs().sum() > 0
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], msg=name)


def test_sparse_encoder_backward_passes_gradcheck():
    xc = torch.randn(7, 5, dtype=torch.double, requires_grad=True)
    W = torch.randn(12, 5, dtype=torch.double, requires_grad=True)
    b = torch.randn(12, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *args: TopKEncode.apply(*args, 3)[0], (xc, W, b))


def test_training_steps_through_either_encoder_path_give_the_same_weights():
    results = []
    for path in ("sparse", "dense"):
        sae = make(k=8, latent_size=512, d=64)
        sae.encoder_path = path
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
        for step in range(3):
            x = torch.randn(128, 1, 64, generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            loss, _ = sae.loss(sae(x))
            loss.backward()
            sae.remove_parallel_gradient()
            optimizer.step()
            sae.normalize_decoder()
        results.append({n: p.detach().clone() for n, p in sae.named_parameters()})
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], msg=name)


def test_overrides_and_edits_bypass_the_sparse_encoder():
    sae = make(k=4, latent_size=64)
    sae.encoder_path = "sparse"
    x = torch.randn(10, 1, 16)
    with sae.inference(Inference(k=2)):
        assert ((sae(x).latents != 0).sum(-1) == 2).all()
    with sae.edit_latents(torch.zeros_like):
        out = sae(x)
    assert (out.latents == 0).all()
    torch.testing.assert_close(out.x_hat, sae.b_dec.detach().expand(10, 16))


@pytest.mark.parametrize(("k", "latent_size", "sparse"), [(32, 4096, True), (256, 4096, True), (128, 1024, True),
                                                         (256, 1024, False), (4, 16, False)])
def test_auto_encoder_backward_is_sparse_only_where_measured_to_pay(k, latent_size, sparse):
    assert TopKSAE(TopKConfig(k=k, latent_size=latent_size, layer=0), 8).uses_sparse_encoder_backward() is sparse


@pytest.mark.parametrize(("encoder_path", "auxk", "has_pre"), [("sparse", 0.0, False), ("dense", 0.0, True), ("sparse", 1 / 32, True)])
def test_pre_activations_are_given_except_on_the_sparse_encoder_path(encoder_path, auxk, has_pre):
    """TopKEncode keeps only the top k per token, so there are no dense pre-activations to give; AuxK never takes it."""
    sae = TopKSAE(TopKConfig(k=4, latent_size=64, layer=0, auxk=auxk), 16)
    sae.encoder_path = encoder_path
    x = torch.randn(10, 1, 16)
    out = sae(x)
    if has_pre:
        torch.testing.assert_close(out.pre, sae.preactivations(out.target))
    else:
        assert out.pre is None
    with sae.inference(Inference(k=2)):
        torch.testing.assert_close(sae(x).pre, sae.preactivations(out.target))


def write_v1_topk_checkpoint(directory, auxk):
    """A TopK checkpoint as routesae wrote it while AuxK kept its own dead-latent counter (setting and buffer)."""
    torch.manual_seed(3)
    weights = {"W_enc": torch.randn(32, 16), "W_dec": torch.randn(32, 16), "b_enc": torch.randn(32), "b_dec": torch.randn(16)}
    if auxk:
        weights["tokens_since_fired"] = torch.arange(32)
    settings_ = {"latent_size": 32, "normalize": "token", "layer": 1, "k": 4, "relu": False, "auxk": auxk, "auxk_k": None,
                 "dead_tokens": 100_000}
    directory.mkdir()
    save_file(weights, directory / "weights.safetensors")
    config = {"format_version": 1, "routesae_version": "0.1.0", "architecture": "topk", "config": settings_, "d_model": 16,
              "layers": [1]}
    (directory / "config.json").write_text(json.dumps(config))
    return weights


def test_upgrade_drops_the_old_dead_latent_setting_and_buffer():
    config = {"k": 4, "auxk": 0.5, "dead_tokens": 128}
    state = {"W_enc": torch.zeros(1), "tokens_since_fired": torch.zeros(1, dtype=torch.long)}
    new_config, new_state = TopKSAE.upgrade(config, state)
    assert new_config == {"k": 4, "auxk": 0.5} and set(new_state) == {"W_enc"}
    assert TopKSAE.upgrade(new_config, new_state) == (new_config, new_state), "a current checkpoint passes unchanged"


@pytest.mark.parametrize("auxk", [0.0, 1 / 32])
def test_a_checkpoint_with_the_old_dead_latent_counter_loads(tmp_path, auxk):
    weights = write_v1_topk_checkpoint(tmp_path / "topk", auxk)
    sae, _ = load_sae(tmp_path / "topk")
    assert isinstance(sae, TopKSAE) and sae.cfg.auxk == auxk and sae.cfg.k == 4
    assert set(sae.state_dict()) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    for name, value in sae.state_dict().items():
        assert torch.equal(value, weights[name]), name
