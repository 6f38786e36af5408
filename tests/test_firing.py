"""The trainer's dead-latent counter: ageing, resets, the dead mask, and what a TopK SAE no longer counts itself."""

import torch
from safetensors.torch import load_file, save_file

from routesae.architectures.topk import TopKConfig, TopKSAE
from routesae.firing import FiringCounter

D, F = 16, 64


def topk(seed=0):
    torch.manual_seed(seed)
    return TopKSAE(TopKConfig(k=4, latent_size=F, layer=0, auxk=1 / 32), D)


def test_batches_age_latents_and_firing_resets_them():
    sae, counter = topk(), FiringCounter(F, dead_after_tokens=100)
    assert counter.tokens_since_fired.dtype == torch.long and (counter.tokens_since_fired == 0).all()
    x = torch.randn(10, 1, D)
    fired = sae(x).latents.ne(0).any(0)
    counter.update(sae(x).latents)
    counter.update(sae(x).latents)  # a second forward before the step (gradient accumulation): its tokens count too
    assert torch.equal(counter.tokens_since_fired, torch.where(fired, 0, 20))
    sae.eval()
    sae(torch.randn(50, 1, D))  # forwards the trainer does not count (eval mode, analysis) are not training tokens
    assert torch.equal(counter.tokens_since_fired, torch.where(fired, 0, 20))


def test_a_latent_is_dead_from_dead_after_tokens_on():
    counter = FiringCounter(4, dead_after_tokens=20)
    latents = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 10)
    counter.update(latents)
    assert not counter.dead().any() and counter.dead_fraction() == 0
    counter.update(latents)
    assert torch.equal(counter.dead(), torch.tensor([False, True, True, True]))
    assert counter.dead_fraction() == 0.75
    counter.update(torch.tensor([[0.0, -2.0, 0.0, 0.0]]))  # signed TopK: a negative latent fired too
    assert torch.equal(counter.tokens_since_fired, torch.tensor([1, 0, 21, 21]))


def test_the_counter_state_round_trips_through_safetensors(tmp_path):
    """The trainer checkpoints ``tokens_since_fired`` (safetensors) and restores it into a fresh counter."""
    counter = FiringCounter(F, dead_after_tokens=30)
    counter.tokens_since_fired.copy_(torch.arange(F))
    save_file({"since_fired": counter.tokens_since_fired}, tmp_path / "state.safetensors")
    fresh = FiringCounter(F, dead_after_tokens=30)
    fresh.tokens_since_fired = load_file(tmp_path / "state.safetensors")["since_fired"]
    assert fresh.tokens_since_fired.dtype == torch.long and torch.equal(fresh.tokens_since_fired, torch.arange(F))
    assert torch.equal(fresh.dead(), torch.arange(F) >= 30)


def test_a_topk_sae_counts_nothing_itself():
    sae = topk().train()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    sae(torch.randn(10, 1, D))
    sae.after_step(0)
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())
