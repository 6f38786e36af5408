"""SparseCodes, the kept latents of TopK-style SAEs: their sparse decodes equal the dense ones, gradients included."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routesae import SparseCodes, TopKConfig, TopKSAE


def random_codes(n, latent_size, k, seed):
    generator = torch.Generator().manual_seed(seed)
    pre_NF = torch.randn(n, latent_size, generator=generator, dtype=torch.float64)
    values, indices = pre_NF.topk(k, dim=-1, sorted=False)
    W_FD = torch.randn(latent_size, 6, generator=generator, dtype=torch.float64)
    b_D = torch.randn(6, generator=generator, dtype=torch.float64)
    return SparseCodes(values.requires_grad_(), indices), W_FD.requires_grad_(), b_D


@given(n=st.integers(1, 20), latent_size=st.integers(2, 40), data=st.data(), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_decode_and_every_prefix_decode_equal_the_dense_products(n, latent_size, data, seed):
    k = data.draw(st.integers(1, latent_size - 1))
    sizes = sorted(data.draw(st.sets(st.integers(1, latent_size), min_size=1, max_size=4)))
    codes, W_FD, b_D = random_codes(n, latent_size, k, seed)
    z_NF = codes.dense(latent_size)
    assert ((z_NF != 0).sum(-1) <= k).all()
    torch.testing.assert_close(codes.decode(W_FD, b_D), z_NF @ W_FD + b_D)
    index_F = torch.arange(latent_size)
    dense = [(z_NF * (index_F < m)) @ W_FD + b_D for m in sizes]
    sparse = codes.decode_prefixes(W_FD, b_D, sizes)
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b)
    grads = [torch.autograd.grad(sum(x.pow(2).sum() for x in xs), (codes.values_NK, W_FD)) for xs in (sparse, dense)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_topk_gives_its_kept_latents_as_codes_on_both_encoder_paths():
    sae = TopKSAE(TopKConfig(k=4, latent_size=64, layer=0), 16)
    x = torch.randn(10, 1, 16)
    for path in ("sparse", "dense"):
        sae.encoder_path = path
        out = sae(x)
        assert out.codes is not None and out.codes.indices_NK.shape == (10, 4)
        torch.testing.assert_close(out.codes.dense(64), out.latents)
    with sae.edit_latents(lambda z: z * 2):
        assert sae(x).codes is None, "an edit changes the latents: no codes"


def test_matryoshka_prefix_loss_is_the_nmse_of_each_nested_dictionary():
    matryoshka = pytest.importorskip("routesae_matryoshka")
    sae = matryoshka.MatryoshkaSAE(matryoshka.MatryoshkaConfig(k=6, latent_size=64, layer=0, prefixes=(8, 32)), 16)
    out = sae.train()(torch.randn(40, 1, 16) * 3)
    index_F = torch.arange(64)
    norm_N = out.target.pow(2).mean(-1)
    prefixes = [(out.latents * (index_F < m)) @ sae.W_dec + sae.b_dec for m in (8, 32)]
    expected = sum(((x_hat - out.target).pow(2).mean(-1) / norm_N).mean() for x_hat in prefixes)
    _, terms = sae.loss(out)
    torch.testing.assert_close(terms["prefixes"], expected.detach())
    torch.testing.assert_close(out.x_hat, out.latents @ sae.W_dec + sae.b_dec)
