"""Training end to end on a tiny Llama through the real CLI: checkpoints, resume, determinism, errors."""

import json
from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from routesae import SAESpec, TrainConfig, train
from routesae.architectures.topk import TopKConfig, TopKSAE
from routesae.checkpoint import load_sae
from routesae.cli import make_cli
from routesae.config import setting
from routesae.errors import RouteSAEError
from routesae.hookspecs import hookimpl
from routesae.plugins import get_plugin_manager
from routesae.reporters.base import Reporter
from routesae.train_config import lr_factor

SMALL = ["--k", "4", "--latent-size", "64", "--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "64",
         "--buffer-tokens", "256", "--log-every", "2"]


def run_cli(*args):
    result = CliRunner().invoke(make_cli(), list(args))
    return result


@pytest.fixture
def base_args(tiny_model_dir, text_corpus_dir):
    return ["train", "--model", str(tiny_model_dir), "--dataset", str(text_corpus_dir), *SMALL]


def test_train_writes_a_loadable_checkpoint_and_a_json_summary(base_args, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = run_cli(*base_args, "--layer", "2", "--tokens", "1500", "--out", str(out), "--json", "--report", "jsonl")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tokens"] == 1500 and summary["source"] == "live"
    (sae_summary,) = summary["saes"]
    for timed in (summary, sae_summary):  # what the benchmarks read: the training loop's tokens per second
        assert timed["tokens"] == 1500 and timed["seconds"] > 0
        assert timed["tokens_per_s"] == pytest.approx(timed["tokens"] / timed["seconds"])
    assert 0 < summary["harvest_seconds"] < summary["seconds"]
    assert 0 < sae_summary["sae_step_seconds"] == summary["sae_step_seconds"] < summary["seconds"]
    assert sae_summary["name"] == "topk-L2-k4-F64" and sae_summary["layers"] == [2]
    sae, config = load_sae(out / "topk-L2-k4-F64")
    assert isinstance(sae.cfg.k, int) and sae.cfg.k == 4 and not sae.training
    assert config["hooks"] == ["blocks.2.hook_resid_post"] and config["hf_hidden_states_index"] == [3]
    assert config["model"]["n_layers"] == 4 and config["data"]["fingerprint"]
    assert config["training"]["finished"] and config["routesae_version"]
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [s["saes"]["topk-L2-k4-F64"]["loss"] for s in steps if s["event"] == "step"]
    assert losses[-1] < losses[0]
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_same_command_twice_gives_bit_identical_weights(base_args, tmp_path):
    for name in ("a", "b"):
        result = run_cli(*base_args, "--tokens", "640", "--out", str(tmp_path / name), "--report", "jsonl")
        assert result.exit_code == 0, result.output
    a = load_file(tmp_path / "a" / "topk-L2-k4-F64" / "weights.safetensors")
    b = load_file(tmp_path / "b" / "topk-L2-k4-F64" / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


class InterruptAt(Reporter):
    """A real reporter plugin that stops the run like Ctrl-C would, at a given step."""

    name = "interrupt"
    at_step = 4

    def step(self, report):
        if report.step >= self.at_step:
            raise KeyboardInterrupt


class Interrupter:
    @hookimpl
    def register_reporters(self, register):
        register(InterruptAt)


def test_interrupted_run_resumes_to_the_same_weights_as_an_uninterrupted_run(tiny_model_dir, text_corpus_dir, tmp_path):
    cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(text_corpus_dir), tokens=1280, batch_size=4, context_length=32,
                      sae_batch_tokens=64, buffer_tokens=256, log_every=2, checkpoint_every=0)
    specs = [SAESpec.build("topk", k=4, latent_size=64, layer=1), SAESpec.build("batchtopk", k=4, latent_size=64, layer=2)]
    uninterrupted = train(specs, tmp_path / "a", cfg, reporters=[])

    pm = get_plugin_manager()
    pm.register(Interrupter(), name="interrupter")
    out = tmp_path / "b"
    try:
        with pytest.raises(RouteSAEError, match="interrupted at step 4; checkpoint saved.*--resume"):
            train(specs, out, cfg, reporters=["interrupt"])
    finally:
        pm.unregister("interrupter")
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "running" and manifest["progress"]["step"] == 4
    assert manifest["progress"]["batch"] > 0, "the interruption should fall inside a shuffle group"
    with pytest.raises(RouteSAEError, match="unfinished run.*--resume"):
        train(specs, out, cfg, reporters=[])
    resumed = train(specs, out, cfg, resume=True, reporters=[])
    assert resumed["tokens"] == uninterrupted["tokens"] == 1280 and resumed["steps"] == uninterrupted["steps"]
    assert 0 < resumed["session_tokens"] < 1280 and uninterrupted["session_tokens"] == 1280
    assert resumed["tokens_per_s"] == pytest.approx(resumed["session_tokens"] / resumed["seconds"])
    for name in ("topk-L1-k4-F64", "batchtopk-L2-k4-F64"):
        a = load_file(tmp_path / "a" / name / "weights.safetensors")
        b = load_file(out / name / "weights.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    logged_steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert logged_steps == list(range(2, resumed["steps"] + 1, 2))


def test_one_harvest_trains_several_architectures(base_args, tmp_path):
    result = run_cli(*base_args, "--arch", "topk", "--arch", "batchtopk", "--tokens", "640", "--out", str(tmp_path / "r"),
                     "--json", "--report", "jsonl")
    assert result.exit_code == 0, result.output
    names = [s["name"] for s in json.loads(result.stdout)["saes"]]
    assert names == ["topk-L2-k4-F64", "batchtopk-L2-k4-F64"]
    for name in names:
        assert load_sae(tmp_path / "r" / name)[0].name == name.split("-")[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--arch", "nope"], "unknown architecture 'nope'; installed: .*topk"),
        (["--layer", "4"], "layer 4 is outside the model: it has 4 blocks"),
        (["--k", "64"], "0 < k < latent size"),
        (["--k", "0"], "0 < k < latent size"),
        (["--tokens", "10000000"], "asked for 10,000,000 training tokens but the train split"),
        (["--text-field", "body", "--dataset", "JSONL"], "body"),
        (["--dataset", "/no/such/corpus"], "/no/such/corpus"),
        (["--model", "/no/such/model"], "/no/such/model"),
        (["--lr", "-1"], "lr must be positive"),
        (["--dead-after-tokens", "0"], "dead-after-tokens must be positive"),
    ],
)
def test_bad_input_is_a_short_error_with_exit_code_2(base_args, tmp_path, text_corpus_dir, extra, message):
    extra = [str(text_corpus_dir / "b.jsonl") if e == "JSONL" else e for e in extra]
    result = run_cli(*base_args, *extra, "--out", str(tmp_path / "run"), "--report", "jsonl")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) <= 2
    import re

    assert re.search(message, result.stderr), result.stderr


def test_a_different_run_in_out_is_refused_and_left_untouched(base_args, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*base_args, "--tokens", "640", "--out", str(out), "--report", "jsonl").exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = run_cli(*base_args, "--tokens", "640", "--out", str(out), "--report", "jsonl")
    assert again.exit_code == 2 and "already holds this finished run" in again.stderr
    other = run_cli(*base_args, "--tokens", "640", "--lr", "0.001", "--out", str(out), "--report", "jsonl")
    assert other.exit_code == 2 and "already holds a different run" in other.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert run_cli(*base_args, "--tokens", "640", "--resume", "--out", str(tmp_path / "empty")).exit_code == 2
    replaced = run_cli(*base_args, "--tokens", "640", "--lr", "0.001", "--out", str(out), "--overwrite", "--report", "jsonl")
    assert replaced.exit_code == 0, replaced.output


@dataclass
class TemperatureConfig(TopKConfig):
    temperature: float = setting(1.0, "A setting only this architecture has.")


class TemperatureSAE(TopKSAE):
    name = "temperature"
    Config = TemperatureConfig


class TemperaturePlugin:
    @hookimpl
    def register_architectures(self, register):
        register(TemperatureSAE)


def test_architecture_settings_become_options_and_apply_only_where_they_exist(base_args, tmp_path):
    pm = get_plugin_manager()
    pm.register(TemperaturePlugin(), name="temperature")
    try:
        assert "--temperature" in run_cli("train", "--help").output
        refused = run_cli(*base_args, "--temperature", "2", "--arch", "topk", "--out", str(tmp_path / "r"))
        assert refused.exit_code == 2
        assert "--temperature is not a setting of --arch topk; their settings: " in refused.stderr
        assert "--k, --latent-size, --layer" in refused.stderr
        both = run_cli(*base_args, "--temperature", "2", "--arch", "topk", "--arch", "temperature", "--tokens", "128",
                       "--out", str(tmp_path / "r"), "--report", "jsonl")
        assert both.exit_code == 0, both.output
        assert load_sae(tmp_path / "r" / "temperature-L2-k4-F64")[0].cfg.temperature == 2.0
    finally:
        pm.unregister("temperature")


def test_reference_2025_schedule_reproduces_the_reference_codes_jump():
    # The worked example of the method notes: N = 4270 steps, 1.0 at step 3415, 0.2001 at 3416.
    factor = [lr_factor(s, 4270, 0.05, 0.2, "reference-2025") for s in range(4270)]
    assert factor[0] == 0.0 and factor[3415] == 1.0 and factor[3416] == pytest.approx(0.2001, abs=1e-4)
    assert all(f == 0.0 for f in factor[4270 - 213 :])


def test_lr_schedule_warms_up_holds_and_decays():
    factors = [lr_factor(s, 100, 0.05, 0.2) for s in range(100)]
    assert factors[0] == 0.2 and factors[4] == 1.0
    assert all(f == 1.0 for f in factors[5:80])
    assert all(a > b for a, b in zip(factors[80:], factors[81:])) and factors[-1] == pytest.approx(0.05)
    assert all(0 < f <= 1 for f in factors)


def test_a_comma_list_sweeps_a_setting_from_one_harvest(base_args, tmp_path):
    result = run_cli(*base_args, "--k", "2,4,8", "--arch", "topk", "--tokens", "256", "--out", str(tmp_path / "r"), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [s["name"] for s in summary["saes"]] == ["topk-L2-k2-F64", "topk-L2-k4-F64", "topk-L2-k8-F64"]
    assert [load_sae(tmp_path / "r" / s["name"])[0].cfg.k for s in summary["saes"]] == [2, 4, 8]


def test_a_toml_run_file_names_each_sae(tiny_model_dir, text_corpus_dir, tmp_path):
    run_file = tmp_path / "run.toml"
    run_file.write_text(
        f"""
[train]
model = "{tiny_model_dir}"
dataset = "{text_corpus_dir}"
context-length = 32
batch_size = 4
sae_batch_tokens = 64
tokens = 256
out = "{tmp_path / 'from-file'}"

[sae.small]
arch = "topk"
k = 2
latent-size = 64

[sae.wide]
arch = "batchtopk"
k = 4
latent_size = 128
layer = 1
"""
    )
    result = run_cli("train", "--config", str(run_file), "--json")
    assert result.exit_code == 0, result.output
    assert [s["name"] for s in json.loads(result.stdout)["saes"]] == ["small", "wide"]
    wide, _ = load_sae(tmp_path / "from-file" / "wide")
    assert (wide.name, wide.cfg.latent_size, wide.layers) == ("batchtopk", 128, (1,))
    mixed = run_cli("train", "--config", str(run_file), "--arch", "topk")
    assert mixed.exit_code == 2 and "either in --config or with --arch" in mixed.stderr
    run_file.write_text("[sae.x]\nk = 3\n")
    assert "needs an arch" in run_cli("train", "--config", str(run_file), "--out", str(tmp_path / "x")).stderr


class DivergingSAE(TopKSAE):
    """A real architecture plugin whose loss turns NaN from its fourth step on."""

    name = "diverging"

    def __init__(self, cfg, d_model):
        super().__init__(cfg, d_model)
        self.steps_done = 0

    def loss(self, out, state):
        loss, terms = super().loss(out, state)
        return (loss * float("nan") if self.steps_done >= 3 else loss), terms

    def after_step(self, step):
        self.steps_done += 1


class DivergingPlugin:
    @hookimpl
    def register_architectures(self, register):
        register(DivergingSAE)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model_dir, text_corpus_dir, tmp_path):
    pm = get_plugin_manager()
    pm.register(DivergingPlugin(), name="diverging")
    cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(text_corpus_dir), tokens=1280, batch_size=4, context_length=32,
                      sae_batch_tokens=64, buffer_tokens=256, checkpoint_every=2)
    try:
        with pytest.raises(RouteSAEError, match=r"diverged: SAE diverging-L1-k4-F64 loss is nan at step 3; the last checkpoint"):
            train([SAESpec.build("diverging", k=4, latent_size=64, layer=1)], tmp_path / "run", cfg, reporters=[])
        manifest = json.loads((tmp_path / "run" / "run.json").read_text())
        assert manifest["status"] == "running" and manifest["progress"]["step"] == 2
        sae, config = load_sae(tmp_path / "run" / "diverging-L1-k4-F64")
        assert config["training"]["steps_done"] == 2
        assert all(torch.isfinite(p).all() for p in sae.parameters())
    finally:
        pm.unregister("diverging")


def test_train_help_starts_with_an_example_and_groups_its_options_into_panels():
    help_text = run_cli("train", "--help").output
    lines = [line.strip() for line in help_text.splitlines() if line.strip()]
    assert lines[0].startswith("Usage: ") and lines[0].endswith(" train [OPTIONS]")
    example = lines.index("Example:")
    assert example < 6 and lines[example + 1].startswith("routesae train --arch routesae --arch topk")
    panels = [line.split("─")[1].strip() for line in lines if line.startswith("╭─")]
    assert panels[:3] == ["What to train", "SAE settings (several architectures)", "crosscoder settings"]
    for title in ("routesae settings", "Data", "Optimisation", "Run directory", "Speed"):
        assert title in panels, title
    assert panels.index("Data") < panels.index("Optimisation") < panels.index("Run directory") < panels.index("Speed")
    panel_of = {}
    for line in help_text.splitlines():
        if line.startswith("╭─"):
            current = line.split("─")[1].strip()
        elif line.startswith("│ --"):
            panel_of[line[2:].split()[0].split("/")[0]] = current
    assert panel_of["--lr"] == "Optimisation" and panel_of["--model"] == "Data" and panel_of["--out"] == "Run directory"
    assert panel_of["--router"] == "routesae settings" and panel_of["--k"].startswith("SAE settings")
