"""The control routers route as they claim, and a RouteSAE with each trains, evaluates, extracts contexts and steers
at the block it routed to (issue 14: the routing claim under controls)."""

import json

import pytest
import torch
from click.testing import CliRunner

from routesae import StandardizedLayers, load
from routesae.architectures.routesae import RouteSAE
from routesae.cli import make_cli
from routesae.errors import RouteSAEError
from routesae.routers.controls import token_keys

D, LATENTS = 16, 64


def build(router, n_layers=4, first=2, **settings):
    cfg = RouteSAE.build_config({"layers": f"{first}:{first + n_layers - 1}", "latent_size": LATENTS, "k": 4,
                                 "router": router, **settings})
    torch.manual_seed(0)
    return RouteSAE(cfg.resolve(first + n_layers + 2), D).eval()


def acts(n, n_layers, seed=0):
    return torch.randn(n, n_layers, D, generator=torch.Generator().manual_seed(seed)) * torch.linspace(1, 4, n_layers)[:, None]


def test_fixed_sends_every_token_to_its_block_and_splices_there():
    sae = build("fixed", route_block=3)  # blocks 2..5: index 1
    raw = acts(50, 4)
    with torch.no_grad():
        out = sae(raw)
    assert (out.extras["chosen"] == 1).all() and (sae.routed_blocks(out) == 3).all()
    x = StandardizedLayers(raw, "token").materialize()
    torch.testing.assert_close(out.target, x[:, 1], msg="unscaled: no router probability to scale by")
    reconstruction = sae.reconstruction(out)
    assert reconstruction[3][1].all() and not any(mask.any() for block, (_, mask) in reconstruction.items() if block != 3)
    assert (build("fixed").route(raw)[2].chosen_N == 3).all(), "default: the top of the range"
    with pytest.raises(RouteSAEError, match="--route-block 9 is outside the routed range 2..5"):
        build("fixed", route_block=9)(raw)


def test_random_is_uniform_deterministic_per_token_and_seeded():
    n_layers, n = 16, 32_000
    sae = build("random", n_layers=n_layers)
    raw = acts(n, n_layers, seed=1)
    chosen = sae.route(raw)[2].chosen_N
    counts = torch.bincount(chosen, minlength=n_layers).double()
    expected = n / n_layers
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.7, (chi2, counts)  # the 0.999 quantile of chi-square with 15 degrees of freedom
    permutation = torch.randperm(n)
    assert torch.equal(sae.route(raw[permutation])[2].chosen_N, chosen[permutation]), "a token's block, in any batch"
    assert torch.equal(sae.route(raw[:100])[2].chosen_N, chosen[:100])
    reseeded = build("random", n_layers=n_layers, route_seed=1).route(raw)[2].chosen_N
    assert (reseeded != chosen).float().mean() > 0.8
    per_batch = build("random", n_layers=n_layers, route_per="batch")
    assert per_batch.route(raw[:64])[2].chosen_N.unique().numel() == 1
    batches = torch.stack([per_batch.route(raw[i : i + 8])[2].chosen_N[0] for i in range(0, 8 * 200, 8)])
    assert batches.unique().numel() > 10, "different batches draw different blocks"
    keys = token_keys(raw[:5], 0)
    assert keys.dtype == torch.long and (keys >= 0).all()


def test_uniform_routes_the_mean_of_the_layers_and_splices_at_the_top():
    sae = build("uniform")
    raw = acts(40, 4)
    with torch.no_grad():
        out = sae(raw)
    x = StandardizedLayers(raw, "token").materialize()
    torch.testing.assert_close(out.target, x.mean(1))
    torch.testing.assert_close(out.extras["layer_weights"], torch.full((40, 4), 0.25))
    assert (sae.routed_blocks(out) == 5).all() and sae.steering_caveat() is not None


@pytest.mark.parametrize(
    ("router", "extra", "weighted", "blocks"),
    [("fixed", ["--route-block", "1"], {1}, {1}), ("random", [], {0, 1, 2}, {0, 1, 2}), ("uniform", [], {0, 1, 2}, {2})],
)
def test_each_control_trains_evaluates_extracts_contexts_and_steers(router, extra, weighted, blocks, tiny_model_dir,
                                                                     text_corpus_dir, tmp_path):
    """``weighted``: the blocks the routing counts give weight to; ``blocks``: where tokens are spliced and attributed."""
    out = tmp_path / "run"
    cli = make_cli()
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), "--k", "4", "--latent-size", "64",
            "--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "64", "--buffer-tokens", "256",
            "--tokens", "640", "--arch", "routesae", "--layers", "0:2", "--router", router, *extra, "--report", "jsonl",
            "--out", str(out)]
    trained = CliRunner().invoke(cli, args)
    assert trained.exit_code == 0, trained.output
    (sae_dir,) = [p for p in out.iterdir() if p.name.startswith("routesae-")]
    assert router in sae_dir.name
    counts = json.loads((sae_dir / "config.json").read_text())["training"]["statistics"]["routing_counts"]
    assert {int(block) for block, count in counts.items() if count} == weighted
    evaluated = CliRunner().invoke(cli, ["evaluate", str(sae_dir), "--tokens", "128", "--metric", "kldiv"])
    assert evaluated.exit_code == 0, evaluated.output
    contexts = CliRunner().invoke(cli, ["contexts", str(sae_dir), "--threshold", "0.5", "--min-contexts", "1"])
    assert contexts.exit_code == 0, contexts.output
    record = json.loads((sae_dir / "contexts.json").read_text())
    shown = {c["layer"] for latent in record["latents"].values() for cs in latent["classes"].values() for c in cs}
    assert shown and shown <= blocks, "each context is attributed to the block its token was routed to"
    steer = ["steer", str(sae_dir), "--clamp", "3=+5", "--prompt", "The fox", "--max-new-tokens", "2", "--no-chat",
             "--scale-tokens", "0"]
    steered = CliRunner().invoke(cli, steer + (["--soft-at-argmax"] if router == "uniform" else []))
    assert steered.exit_code == 0, steered.output
    if router == "uniform":
        refused = CliRunner().invoke(cli, steer)
        assert refused.exit_code == 2 and "uniform" in refused.output
    assert load(sae_dir).routing_rule.name == router
