"""A SAELens SAE in routesae's stages: evaluated beside a routesae SAE of the same model in one pass, in one
report, and through contexts, steering and interpretation, on the tiny Llama. The SAELens SAE is a golden
directory written by real sae-lens whose metadata names the test's model and corpus, as the directory of
an SAE trained on them would."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from openai_server import FakeOpenAI
from saelens_formulas import saelens_encode_decode

from routesae import (
    LanguageModel,
    SAESpec,
    TrainConfig,
    export_sae,
    extract_contexts,
    interpret,
    load_sae,
    steer,
    train,
)
from routesae.cli import make_cli
from routesae.data import load_corpus

GOLDEN = Path(__file__).parent / "data" / "saelens" / "topk"


@pytest.fixture(scope="module")
def routesae_sae(tmp_path_factory, tiny_model_dir, text_corpus_dir):
    out = tmp_path_factory.mktemp("saelens-stages") / "run"
    cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(text_corpus_dir), tokens=640, batch_size=4,
                      context_length=32, sae_batch_tokens=64, buffer_tokens=256, log_every=2, device="cpu")
    specs = [SAESpec.build("topk", k=4, latent_size=64, layer=2, relu=True, normalize="none"),
             SAESpec.build("vanilla", latent_size=64, layer=1, normalize="layer_norm")]
    train(specs, out, cfg, reporters=[])
    return out / "topk-L2-k4-F64"


def test_a_trained_sae_exported_computes_in_saelens_what_it_computes_on_the_model(
    routesae_sae, tiny_model_dir, text_corpus_dir, tmp_path
):
    """routesae train --normalize layer_norm, then export: SAELens's formulas on real residual activations."""
    trained = routesae_sae.parent / "vanilla-L1-F64"
    result = cli("export", trained, "--format", "saelens", "--out", tmp_path / "saelens")
    assert result.exit_code == 0, result.output
    lm = LanguageModel.load(str(tiny_model_dir))
    ids, mask = next(load_corpus(str(text_corpus_dir), lm.tokenizer, context_length=32, seed=42).split("eval").batches(4))
    acts = lm.capture(ids, mask, [1])[mask.bool()][:, 0]
    sae, config = load_sae(trained)
    with torch.no_grad():
        out = sae(acts[:, None])
        ours = sae.reconstruction(out)[1][0]
    z, theirs = saelens_encode_decode(tmp_path / "saelens", acts)
    excess = (ours - theirs).abs() - 1e-5 * acts.norm(dim=-1, keepdim=True)
    assert (excess <= 0).all() and torch.allclose(out.latents, z, atol=1e-5)
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert (cfg["normalize_activations"], cfg["metadata"]["hook_name"]) == ("layer_norm", "blocks.1.hook_resid_post")
    assert cfg["metadata"]["routesae"]["training"] == config["training"]
    export_sae(trained, tmp_path / "again")
    assert (tmp_path / "again" / "sae_weights.safetensors").read_bytes() == (
        tmp_path / "saelens" / "sae_weights.safetensors").read_bytes(), "the command and the function write the same"


def saelens_sae(tmp_path, model, dataset, name="saelens-topk"):
    """The golden topk directory, its metadata naming ``model`` and ``dataset`` (None: no dataset)."""
    directory = tmp_path / name
    shutil.copytree(GOLDEN, directory)
    cfg = json.loads((directory / "cfg.json").read_text())
    cfg["metadata"]["model_name"] = str(model)
    if dataset is None:
        del cfg["metadata"]["dataset_path"]
    else:
        cfg["metadata"]["dataset_path"] = str(dataset)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


def cli(*args):
    return CliRunner().invoke(make_cli(), [str(a) for a in args])


def test_a_routesae_and_a_saelens_sae_are_evaluated_in_one_pass_and_reported_together(
    routesae_sae, tiny_model_dir, tmp_path
):
    theirs = saelens_sae(tmp_path, tiny_model_dir, None)  # no dataset of its own: the routesae SAE's eval split
    result = cli("evaluate", routesae_sae, theirs, "--tokens", "256", "--json", "--report", "jsonl")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    ours, imported = records[str(routesae_sae)], records[str(theirs)]
    assert ours["pass"] == imported["pass"] and imported["pass"]["saes"] == 2, "one pass over the data for both"
    assert imported["sae"] == "saelens-topk" and imported["architecture"] == "topk" and imported["tokens"] == ours["tokens"]
    assert 0 < imported["metrics"]["l0"] <= 8, "SAELens's topk keeps at most k=8 (ReLU'd) latents"
    assert imported["settings"]["data"] == ours["settings"]["data"]
    assert json.loads((theirs / "eval.json").read_text())["metrics"] == imported["metrics"]

    result = cli("report", routesae_sae, theirs, "--out", tmp_path / "both.html")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "both.html").read_text()
    assert 'data-sae="topk-L2-k4-F64"' in page and 'data-sae="saelens-topk"' in page
    assert "read from saelens (topk, sae-lens 6.54.12)" in page and "and 1 more" in page
    assert page.count('<tr data-sae="') == 2, "both in the one metric table"
    assert '<polyline data-sae="topk-L2-k4-F64"' in page, "the routesae SAE's training curves"
    assert '<polyline data-sae="vanilla-L1-F64"' not in page, "not those of the other SAE of its run"


def test_a_saelens_sae_of_another_model_or_without_data_is_refused_by_name(routesae_sae, tiny_model_dir, tmp_path):
    other = saelens_sae(tmp_path, "tiny-llama", "corpus", name="other-model")
    result = cli("evaluate", routesae_sae, other, "--tokens", "256")
    assert result.exit_code == 2 and "'tiny-llama'" in result.stderr and "Traceback" not in result.output
    alone = saelens_sae(tmp_path, tiny_model_dir, None, name="no-data")
    result = cli("evaluate", alone, "--tokens", "256")
    assert result.exit_code == 2 and "records no training data" in result.stderr, result.output


def test_contexts_interpretation_steering_and_the_report_work_on_a_saelens_sae(
    tiny_model_dir, text_corpus_dir, tmp_path, monkeypatch
):
    theirs = saelens_sae(tmp_path, tiny_model_dir, text_corpus_dir)
    record = extract_contexts([theirs], threshold=0.05, min_contexts=1, max_classes=0)[str(theirs)]
    assert record["interpretable_latents"] > 0 and (theirs / "contexts.json").is_file()
    contexts = json.loads((theirs / "contexts.json").read_text())
    assert {c["layer"] for r in contexts["latents"].values() for cs in r["classes"].values() for c in cs} == {2}

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with FakeOpenAI() as server:
        doc = interpret(theirs, "openai", base_url=server.base_url, sample=2, detection=False, concurrency=1,
                        backoff=0.01, progress=False)
    assert doc["summary"]["features_scored"] == 2 and (theirs / "interpretations.json").is_file()

    latent = int(next(iter(contexts["latents"])))
    result = steer(theirs, "The city of", [f"{latent}=+50"], max_new_tokens=4)
    assert result.settings["clamps"] == [f"{latent}=+50"] and result.original

    report = cli("report", theirs)
    assert report.exit_code == 0, report.output
    page = (theirs / "report.html").read_text()
    assert page.count('class="card"') >= 2 and "the feature fires on one word." in page
