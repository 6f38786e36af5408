"""TopK's optional AuxK dead-latent loss (Gao et al. 2024): the loss on the trainer's dead latents, its gradients, the CLI.

Which latents are dead is the trainer's :class:`~routesae.firing.FiringCounter` (tests/test_firing.py);
here a :class:`TrainingState` marks them.
"""

import json

import pytest
import torch
from click.testing import CliRunner
from toy_training import train_steps

from routesae.architectures.base import TrainingState, normalized_mse
from routesae.architectures.topk import TopKConfig, TopKSAE
from routesae.checkpoint import load_sae
from routesae.cli import make_cli
from routesae.errors import ConfigError

D, F, K = 16, 64, 4
DEAD = torch.arange(8)  # latents the tests force dead


def make(auxk=1 / 32, seed=0, **kw):
    torch.manual_seed(seed)
    return TopKSAE(TopKConfig(k=K, latent_size=F, layer=0, auxk=auxk, **kw), D)


def kill(sae, dead=DEAD, bias=-3.0):
    """Make ``dead`` unselectable by TopK; returns the TrainingState that marks them as not having fired for long."""
    with torch.no_grad():
        sae.b_enc[dead] = bias
    return TrainingState(dead_F=torch.zeros(F, dtype=torch.bool).index_fill(0, dead, True))


def test_off_by_default_and_then_exactly_plain_topk():
    cfg = TopKConfig()
    assert cfg.auxk == 0 and cfg.auxk_k is None
    sae = make(auxk=0.0)
    assert set(sae.state_dict()) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    out = sae(torch.randn(10, 1, D))
    assert out.extras == {}
    all_dead = TrainingState(dead_F=torch.ones(F, dtype=torch.bool))
    assert set(sae.loss(out, all_dead)[1]) == {"nmse", "l0"}


def test_auxk_adds_no_state():
    """The dead-latent counter is the trainer's, so an AuxK TopK saves exactly what a plain one does."""
    assert set(make().state_dict()) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    assert make().aux_latents == D // 2 and make(auxk_k=5).aux_latents == 5  # default d_model // 2


def test_auxk_loss_value():
    sae = make(auxk=0.5, auxk_k=3)
    state = kill(sae)
    out = sae(torch.randn(30, 1, D))
    loss, terms = sae.loss(out, state)
    pre = out.pre[:, DEAD]
    values, idx = pre.topk(3, dim=-1)
    e_hat = torch.zeros(30, F).scatter(-1, DEAD[idx], values) @ sae.W_dec  # signed TopK: signed aux values; no b_dec
    expected = normalized_mse(e_hat, out.target - out.x_hat)
    torch.testing.assert_close(terms["auxk"], 0.5 * expected)
    torch.testing.assert_close(loss, terms["nmse"] + terms["auxk"])
    assert terms["dead_window"] == len(DEAD) / F


@pytest.mark.parametrize("auxk", [0.0, 1 / 32])
def test_dead_latents_learn_only_through_the_auxk_loss(auxk):
    sae = make(auxk=auxk)
    state = kill(sae)
    out = sae(torch.randn(32, 1, D))
    assert (out.latents[:, DEAD] == 0).all(), "TopK never selects the dead latents"
    sae.loss(out, state)[0].backward()
    for name in ("W_enc", "W_dec", "b_enc"):
        grad = getattr(sae, name).grad
        assert torch.isfinite(grad).all()
        dead_grad = grad[DEAD].abs().sum()
        assert (dead_grad > 0) if auxk else (dead_grad == 0), name


def test_residual_target_is_detached():
    """The AuxK term must not pull the live latents' reconstruction towards the dead ones' ê."""
    sae = make(auxk=1.0)
    state = kill(sae)
    out = sae(torch.randn(32, 1, D))
    live = out.latents.ne(0).any(0)
    (grad,) = torch.autograd.grad(sae.auxk_loss(out, state.dead_F), [sae.W_enc])
    assert grad[live].abs().sum() == 0 and grad[DEAD].abs().sum() > 0


def test_no_dead_latents_means_no_auxk_term_and_few_dead_ones_are_fine():
    sae = make(auxk=1.0)
    out = sae(torch.randn(16, 1, D))
    for state in (TrainingState(), TrainingState(dead_F=torch.zeros(F, dtype=torch.bool))):  # outside training; none dead
        loss, terms = sae.loss(out, state)
        assert terms["auxk"] == 0 and terms["dead_window"] == 0
    one_dead = make(auxk=1.0, auxk_k=32)
    state = kill(one_dead, dead=torch.tensor([3]))  # fewer dead latents than auxk_k
    loss, terms = one_dead.loss(one_dead(torch.randn(16, 1, D)), state)
    loss.backward()
    assert torch.isfinite(loss) and terms["auxk"] > 0 and terms["dead_window"] == 1 / F
    assert one_dead.W_enc.grad[3].abs().sum() > 0


def test_relu_variant_revives_only_dead_latents_with_positive_preactivations():
    sae = make(relu=True, auxk=1.0)
    state = kill(sae, bias=-100.0)  # dead and far below zero: ReLU blocks their gradient
    sae.loss(sae(torch.randn(16, 1, D)), state)[0].backward()
    assert sae.W_enc.grad[DEAD].abs().sum() == 0


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"auxk": -0.1}, "auxk must be a finite number >= 0"),
        ({"auxk_k": 0}, "auxk_k must satisfy 0 < auxk_k <= latent size"),
        ({"auxk_k": 65, "latent_size": 64}, "auxk_k must satisfy 0 < auxk_k <= latent size"),
    ],
)
def test_bad_settings_are_config_errors(settings_, message):
    with pytest.raises(ConfigError, match=message):
        TopKConfig.from_dict(settings_)


def test_config_round_trips_through_json():
    for cfg in (TopKConfig(auxk=0.03125, auxk_k=16), TopKConfig()):
        assert TopKConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_training_with_auxk_revives_dead_latents():
    """Latents that start dead come back with AuxK and stay dead without it."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(6, D, generator=g)

    def sample():
        return (torch.randn(256, 6, generator=g) @ basis)[:, None]

    dead_after = {}
    for auxk in (0.0, 1.0):
        sae = make(auxk=auxk, seed=0)
        with torch.no_grad():
            sae.b_enc[:32] = -1.5  # half the dictionary starts out of reach of TopK
        fired = torch.zeros(F, dtype=torch.bool)

        def record_firing(step, out, fired=fired):
            if step >= 250:
                fired |= out.latents.ne(0).any(0)

        _, terms = train_steps(sae, sample, on_step=record_firing, dead_after_tokens=512)
        assert torch.isfinite(torch.tensor(terms["nmse"].item())) and terms["nmse"] < 0.3
        dead_after[auxk] = 32 - int(fired[:32].sum())
    assert dead_after[0.0] == 32 and dead_after[1.0] <= 24, dead_after


def test_trains_through_the_cli_and_loads_back(tiny_model_dir, text_corpus_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), "--arch", "topk", "--k", "4",
            "--auxk", "0.03125", "--auxk-k", "8", "--dead-after-tokens", "128", "--latent-size", "64", "--layer", "2",
            "--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "64", "--buffer-tokens", "256",
            "--tokens", "640", "--log-every", "2", "--out", str(out), "--json", "--report", "jsonl"]
    result = CliRunner().invoke(make_cli(), args)
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.stdout)["saes"]
    assert summary["name"] == "topk-L2-k4-F64" and {"nmse", "auxk", "dead_window", "l0"} <= set(summary["final"])
    assert summary["final"]["dead_window"] < 1, "some latents fired within the last 128 tokens"
    sae, _ = load_sae(out / "topk-L2-k4-F64")
    assert sae.cfg.auxk == 0.03125 and sae.cfg.auxk_k == 8
