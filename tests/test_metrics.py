"""Metric plugins on hand-made batches: each definition, its position conventions, and that
accumulating over batches gives the same number as one batch."""

import bisect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routesae.architectures.base import SAEOutput
from routesae.metrics.base import EvalBatch, cross_entropy_BT, kl_BT
from routesae.metrics.downstream import DeltaCE, KLDiv, Recovered
from routesae.metrics.reconstruction import FVU, L0, Cosine, Dead, NormMSE, density_histogram
from routesae.plugins import get_plugin_manager

B, T, D, F_, V = 2, 5, 4, 6, 7


def make_batch(seed=0, counted=None, reference=False, x_hat_scale=0.5, rows=slice(None)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)[rows]
    b = ids.shape[0]
    counted = torch.ones(B, T, dtype=torch.bool)[rows] if counted is None else counted[rows]
    clean_BTD = torch.randn(B, T, D, generator=g)[rows]
    x_hat_ND = (clean_BTD * x_hat_scale + 0.1).reshape(b * T, D)
    latents = torch.relu(torch.randn(B * T, F_, generator=g)).view(B, T, F_)[rows].reshape(b * T, F_)
    logits = {k: torch.randn(B, T, V, generator=g)[rows] for k in ("clean", "spliced", "zero", "mean")}
    return EvalBatch(
        input_ids_BT=ids,
        counted_BT=counted,
        ce_mask_BT=counted[:, :-1],
        reference=reference,
        out=SAEOutput(latents=latents, x_hat=x_hat_ND, target=clean_BTD.reshape(b * T, D)),
        reconstruction={3: (x_hat_ND, torch.ones(b * T, dtype=torch.bool))},
        clean={3: clean_BTD},
        logits=logits,
    )


def run(metric_cls, *batches):
    metric = metric_cls()
    for batch in batches:
        metric.update(batch)
    return metric.result()


def test_every_builtin_metric_is_registered():
    names = get_plugin_manager().names("metric")
    assert {"normmse", "kldiv", "deltace", "recovered", "l0", "dead_eval", "fvu", "cosine"} <= set(names)


def test_fvu_cosine_and_normmse_follow_their_definitions():
    batch = make_batch()
    x, x_hat = batch.clean[3].reshape(-1, D), batch.reconstruction[3][0]
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert run(FVU, batch)["fvu"] == pytest.approx(float(fvu), rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean()
    assert run(Cosine, batch)["cosine"] == pytest.approx(float(cos), rel=1e-5)
    nmse = ((x_hat - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean()
    assert run(NormMSE, batch)["normmse"] == pytest.approx(float(nmse), rel=1e-5)


def test_a_block_that_replaces_nothing_is_skipped():
    """A RouteSAE block that no token of the batch was routed to."""
    batch = make_batch()
    x_hat_ND, _ = batch.reconstruction[3]
    batch.reconstruction[5] = (x_hat_ND, torch.zeros(B * T, dtype=torch.bool))
    batch.clean[5] = batch.clean[3] * 100
    assert run(FVU, batch) == run(FVU, make_batch()) and run(Cosine, batch) == run(Cosine, make_batch())


def test_only_counted_positions_enter():
    counted = torch.ones(B, T, dtype=torch.bool)
    counted[:, 0] = False
    counted[1, 3:] = False
    full, part = make_batch(), make_batch(counted=counted)
    z = part.out.latents
    assert run(L0, part)["l0"] == pytest.approx(float((z[counted.reshape(-1)] != 0).sum(-1).float().mean()))
    assert run(L0, part)["l0"] != run(L0, full)["l0"]
    kl = kl_BT(part.logits["clean"], part.logits["spliced"])
    assert run(KLDiv, part)["kldiv"] == pytest.approx(float(kl[counted].mean()), rel=1e-5)


def test_reference_kl_is_summed_over_positions_and_divided_by_sequences():
    batch = make_batch(reference=True)
    kl = kl_BT(batch.logits["clean"], batch.logits["spliced"])
    assert run(KLDiv, batch)["kldiv"] == pytest.approx(float(kl.sum() / B), rel=1e-5)


def test_dead_counts_latents_that_never_fire():
    batch = make_batch()
    batch.out.latents[:, :2] = 0
    batch.out.latents[:, 2:] = 1
    assert run(Dead, batch)["dead_eval"] == pytest.approx(2 / F_)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=40), st.integers(1, 1000))
def test_the_density_histogram_puts_each_latent_in_the_bin_of_its_log_frequency(fired, extra_tokens):
    tokens = max(fired) + extra_tokens
    histogram = density_histogram(torch.tensor(fired), tokens)
    edges, counts = histogram["log10_edges"], histogram["latents"]
    assert edges[0] <= math.log10(1 / tokens) and edges[-1] == 0 and len(counts) == len(edges) - 1
    assert histogram["never_fired"] == fired.count(0) and sum(counts) + fired.count(0) == len(fired)
    for f in {f for f in fired if f}:
        position = bisect.bisect_right(edges, math.log10(f / tokens)) - 1
        assert counts[min(position, len(counts) - 1)] >= fired.count(f)


def test_dead_eval_gives_the_density_histogram_of_the_counted_tokens():
    batch = make_batch()
    batch.out.latents[:, :2] = 0
    batch.out.latents[:, 2:] = 1
    batch.out.latents[:5, 2] = 0  # latent 2 fires on 5 of the 10 tokens
    metric = Dead()
    metric.update(batch)
    density = metric.details()["latent_density"]
    assert density["tokens"] == B * T and density["never_fired"] == 2
    assert density["latents"][-1] == 3 and density["latents"][-2] == 1  # log10(1/2) = -0.3: the bin [-0.5, -0.25)


def test_a_routed_sae_gets_each_blocks_mean_beside_the_whole():
    batch = make_batch()
    x_hat_ND, _ = batch.reconstruction[3]
    to_3 = torch.arange(B * T) % 3 == 0
    batch.reconstruction = {3: (x_hat_ND, to_3), 7: (x_hat_ND, ~to_3)}
    batch.clean = {3: batch.clean[3], 7: batch.clean[3]}
    metric = NormMSE()
    metric.update(batch)
    nmse = ((batch.out.x_hat - batch.out.target) ** 2).sum(-1) / (batch.out.target**2).sum(-1)
    by_block = metric.details()["normmse_by_routed_block"]
    assert by_block["3"] == {"tokens": int(to_3.sum()), "mean": pytest.approx(float(nmse[to_3].mean()))}
    assert by_block["7"] == {"tokens": int((~to_3).sum()), "mean": pytest.approx(float(nmse[~to_3].mean()))}
    assert metric.result()["normmse"] == pytest.approx(float(nmse.mean()))
    batch.reconstruction = {3: (x_hat_ND, to_3), 7: (x_hat_ND, torch.ones_like(to_3))}  # both blocks at some tokens
    overlapping = NormMSE()
    overlapping.update(batch)
    assert overlapping.details() == {}, "a crosscoder's tokens belong to no single block"
    single = NormMSE()
    single.update(make_batch())
    assert single.details() == {}


def test_recovered_and_deltace_from_cross_entropies():
    batch = make_batch()
    ce = {k: float(cross_entropy_BT(v, batch.input_ids_BT)[batch.ce_mask_BT].mean()) for k, v in batch.logits.items()}
    result = run(Recovered, batch)
    assert result["recovered"] == pytest.approx(1 - (ce["spliced"] - ce["clean"]) / (ce["zero"] - ce["clean"] + 1e-8), rel=1e-5)
    assert result["recovered_mean_ablation"] == pytest.approx(1 - (ce["spliced"] - ce["clean"]) / (ce["mean"] - ce["clean"] + 1e-8), rel=1e-5)
    assert run(DeltaCE, batch)["deltace"] == pytest.approx(ce["spliced"] - ce["clean"], rel=1e-5)


@pytest.mark.parametrize("metric_cls", [NormMSE, KLDiv, DeltaCE, Recovered, L0, Dead, FVU, Cosine])
def test_accumulating_two_halves_equals_one_batch(metric_cls):
    whole = run(metric_cls, make_batch())
    halves = run(metric_cls, make_batch(rows=slice(0, 1)), make_batch(rows=slice(1, 2)))
    assert halves == pytest.approx(whole, rel=1e-5)
