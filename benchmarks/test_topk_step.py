"""TopK encode / decode / training-step cost at SmolLM2 size (d=576) — run with `make bench`.

These are the SAE-side costs that sit beside the language-model forward in every training step;
the trainer's throughput target is stated relative to that forward, so the numbers that matter
are ratios, not absolute seconds.
"""

import pytest
import torch

from routesae.architectures.topk import TopKConfig, TopKSAE

TOKENS = 2048  # one SAE step of the default --sae-batch-tokens
D_MODEL = 576


@pytest.fixture(params=[4096, 16384], ids=lambda f: f"F{f}")
def sae_and_batch(request):
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(k=32, latent_size=request.param, layer=0), D_MODEL)
    return sae, torch.randn(TOKENS, 1, D_MODEL)


def test_encode(benchmark, sae_and_batch):
    sae, acts = sae_and_batch
    x = acts[:, 0]
    with torch.no_grad():
        benchmark(sae.encode, x)


def test_forward_with_sparse_decode(benchmark, sae_and_batch):
    sae, acts = sae_and_batch
    with torch.no_grad():
        benchmark(sae, acts)


def test_training_step(benchmark, sae_and_batch):
    sae, acts = sae_and_batch
    optimizer = torch.optim.Adam(sae.parameters(), lr=5e-4)

    def step():
        loss, _ = sae.loss(sae(acts))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    benchmark(step)
