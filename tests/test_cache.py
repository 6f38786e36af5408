"""The activation cache on a tiny Llama: exact contents, crash + resume, disk refusal, training from it
(same weights as training live), evaluation of a from-cache checkpoint, and bad input."""

import hashlib
import json
import re
import shutil
from collections import namedtuple

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from routesae import SAESpec, TrainConfig, train
from routesae.activations import training_positions
from routesae.cache import ActivationCache, CacheConfig, cache_activations
from routesae.checkpoint import read_sae_config
from routesae.cli import make_cli
from routesae.data import load_corpus
from routesae.errors import RouteSAEError
from routesae.evaluate import evaluate
from routesae.hookspecs import hookimpl
from routesae.lm import LanguageModel
from routesae.loading import model_for
from routesae.plugins import get_plugin_manager
from routesae.reporters.base import Reporter

CONTEXT, BATCH = 32, 4
SHUFFLE = {"sae_batch_tokens": 64, "buffer_tokens": 256, "log_every": 2}


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return LanguageModel.load(str(tiny_model_dir))


@pytest.fixture
def cache_cfg(tiny_model_dir, text_corpus_dir):
    def make(**changes):
        settings = {"model": str(tiny_model_dir), "dataset": str(text_corpus_dir), "context_length": CONTEXT,
                    "batch_size": BATCH, "tokens": 1000, "shard_mb": 0.2, **changes}
        return CacheConfig(**settings)

    return make


def specs():
    return [SAESpec.build("topk", k=4, latent_size=64, layer=2), SAESpec.build("routesae", k=4, latent_size=64, layers="1:2")]


def shard_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("shard-*.safetensors"))}


def test_cache_holds_exactly_the_training_positions_with_a_complete_manifest(lm, cache_cfg, tmp_path):
    out = cache_activations(tmp_path / "c", cache_cfg(), [3], saes=[specs()[0]], lm=lm, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "routesae-activation-cache" and manifest["format_version"] == 1
    assert manifest["status"] == "complete" and manifest["layers"] == [2, 3] and manifest["dtype"] == "float32"
    assert manifest["model"] == lm.describe()
    corpus = load_corpus(manifest["data"]["source"], lm.tokenizer, context_length=CONTEXT, seed=42)
    assert manifest["data"]["fingerprint"] == corpus.fingerprint and manifest["data"]["keep_bos"] is False
    shards = manifest["shards"]
    assert [s["file"] for s in shards] == [f"shard-{i:05d}.safetensors" for i in range(len(shards))] and len(shards) >= 3
    assert sum(s["tokens"] for s in shards) == manifest["tokens"] >= 1000
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *(s["file"] for s in shards)]
    for s in shards:
        assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        with safe_open(out / s["file"], "pt") as f:
            assert f.get_slice("acts").get_shape() == [s["tokens"], 2, lm.d_model]
            assert f.get_tensor("kept_per_block").sum() == s["tokens"]

    blocks = corpus.split("train")
    n_blocks = shards[-1]["end_block"]
    ids_BT, mask_BT = blocks.input_ids[:n_blocks], blocks.attention_mask[:n_blocks]
    expected = torch.cat([
        lm.capture(ids_BT[i : i + BATCH], mask_BT[i : i + BATCH], [2, 3])[training_positions(mask_BT[i : i + BATCH], False)]
        for i in range(0, n_blocks, BATCH)
    ])
    assert expected.shape[0] == manifest["tokens"]
    cache = ActivationCache(out)
    assert torch.equal(cache.rows(0, cache.tokens), expected), "float32 cache must equal lm.capture bit for bit"
    assert torch.equal(cache.rows(10, 900, [3]), expected[10:900, 1:])
    cache.verify()


def test_bfloat16_cache_stores_the_rounded_activations(lm, cache_cfg, tmp_path):
    full = ActivationCache(cache_activations(tmp_path / "f32", cache_cfg(), [1], lm=lm, progress=False))
    half = ActivationCache(cache_activations(tmp_path / "bf16", cache_cfg(dtype="bfloat16"), [1], lm=lm, progress=False))
    assert half.manifest["dtype"] == "bfloat16" and half.tokens == full.tokens
    assert torch.equal(half.rows(0, half.tokens), full.rows(0, full.tokens).to(torch.bfloat16).float())
    assert half.manifest["bytes"] < 0.6 * full.manifest["bytes"]


def test_a_killed_cache_run_resumes_to_the_same_bytes(lm, cache_cfg, tmp_path):
    cfg = cache_cfg()
    uninterrupted = cache_activations(tmp_path / "a", cfg, [1, 3], lm=lm, progress=False)
    out = tmp_path / "b"
    written = []

    def kill_after_two(record):
        written.append(record["file"])
        if len(written) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_activations(out, cfg, [1, 3], lm=lm, progress=False, on_shard=kill_after_two)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running" and [s["file"] for s in manifest["shards"]] == written
    (out / ".shard-00002.safetensors.x.tmp").write_bytes(b"half a shard")  # what a kill -9 mid-write leaves
    with pytest.raises(RouteSAEError, match="unfinished .*running the same `routesae cache` command again"):
        ActivationCache(out)

    cache_activations(out, cfg, [1, 3], lm=lm, progress=False, resume=True)
    assert shard_bytes(out) == shard_bytes(uninterrupted)
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (uninterrupted, out))
    assert {k: v for k, v in a.items() if k != "harvest_seconds"} == {k: v for k, v in b.items() if k != "harvest_seconds"}
    assert not list(out.glob(".*.tmp"))
    before = shard_bytes(out)
    cache_activations(out, cfg, [1, 3], lm=lm, progress=False)  # complete: nothing to do
    assert shard_bytes(out) == before


def test_refuses_when_the_disk_cannot_hold_the_cache(lm, cache_cfg, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "c"
    needed = 1023 * 2 * lm.d_model * 4  # whole blocks: 1,023 kept tokens hold the first 1,000
    with pytest.raises(RouteSAEError, match=rf"needs {needed:,} bytes \(523.8 kB\) but only 1,000 bytes \(1.0 kB\) are free"):
        cache_activations(out, cache_cfg(), [1, 3], lm=lm, progress=False)
    assert not out.exists()


def test_cache_refuses_bad_targets_and_other_settings(lm, cache_cfg, tmp_path):
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("mine")
    with pytest.raises(RouteSAEError, match="not empty and holds no activation cache"):
        cache_activations(stranger, cache_cfg(), [1], lm=lm, progress=False)
    assert (stranger / "keep.txt").read_text() == "mine"
    with pytest.raises(RouteSAEError, match="nothing to resume"):
        cache_activations(tmp_path / "new", cache_cfg(), [1], lm=lm, progress=False, resume=True)
    with pytest.raises(RouteSAEError, match="no blocks to cache"):
        cache_activations(tmp_path / "new", cache_cfg(), [], lm=lm, progress=False)
    with pytest.raises(RouteSAEError, match="layer 4 is outside the model"):
        cache_activations(tmp_path / "new", cache_cfg(), [4], lm=lm, progress=False)
    with pytest.raises(RouteSAEError, match="asked to cache 1,000,000 tokens but the train split"):
        cache_activations(tmp_path / "new", cache_cfg(tokens=1_000_000), [1], lm=lm, progress=False)
    out = cache_activations(tmp_path / "c", cache_cfg(), [1], lm=lm, progress=False)
    before = shard_bytes(out)
    with pytest.raises(RouteSAEError, match=r"holds a cache of other settings \(.*blocks \[1\].*--overwrite"):
        cache_activations(out, cache_cfg(), [2], lm=lm, progress=False)
    assert shard_bytes(out) == before
    cache_activations(out, cache_cfg(tokens=300), [2], lm=lm, progress=False, overwrite=True)
    assert ActivationCache(out).layers == [2] and len(shard_bytes(out)) == len(ActivationCache(out).shards)


@pytest.fixture
def whole_split_cache(lm, cache_cfg, tmp_path, text_corpus_dir):
    """A cache of every train-split token of blocks 1..3: the live stream's shuffle groups all fit in it."""
    blocks = load_corpus(str(text_corpus_dir), lm.tokenizer, context_length=CONTEXT, seed=42).split("train")
    available = int(training_positions(blocks.attention_mask, keep_bos=False).sum())
    return cache_activations(tmp_path / "cache", cache_cfg(tokens=available), [1, 2, 3], lm=lm, progress=False)


def weights(run, name):
    return load_file(run / name / "weights.safetensors")


def test_training_from_the_cache_gives_the_weights_of_training_live(whole_split_cache, lm, tiny_model_dir, text_corpus_dir, tmp_path):
    live_cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(text_corpus_dir), tokens=1280, batch_size=BATCH,
                           context_length=CONTEXT, device="cpu", **SHUFFLE)
    live = train(specs(), tmp_path / "live", live_cfg, reporters=[], lm=lm)
    cached_cfg = TrainConfig.for_cache(whole_split_cache, tokens=1280, device="cpu", **SHUFFLE)
    assert cached_cfg.model == str(tiny_model_dir) and cached_cfg.batch_size == BATCH
    cached = train(specs(), tmp_path / "cached", cached_cfg, reporters=[])
    assert cached["source"] == "cache" and live["source"] == "live" and cached["steps"] == live["steps"]
    for sae in live["saes"]:
        a, b = weights(tmp_path / "live", sae["name"]), weights(tmp_path / "cached", sae["name"])
        assert all(torch.equal(a[k], b[k]) for k in a), sae["name"]
        live_config, cached_config = read_sae_config(tmp_path / "live" / sae["name"]), read_sae_config(tmp_path / "cached" / sae["name"])
        assert cached_config["model"] == live_config["model"] and cached_config["data"] == live_config["data"]
        assert cached_config["hooks"] == live_config["hooks"]


class InterruptAt(Reporter):
    """A real reporter plugin that stops the run like Ctrl-C would, at step 4."""

    name = "interrupt-cache-test"

    def step(self, report):
        if report.step >= 4:
            raise KeyboardInterrupt


class Interrupter:
    @hookimpl
    def register_reporters(self, register):
        register(InterruptAt)


def test_from_cache_training_needs_no_model_is_deterministic_and_resumes(lm, cache_cfg, tiny_model_dir, tmp_path):
    model_copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_copy)
    cache = cache_activations(tmp_path / "cache", cache_cfg(model=str(model_copy), tokens=1500), [1, 2], progress=False)
    shutil.rmtree(model_copy)  # from here on, nothing can load the language model
    cfg = TrainConfig.for_cache(cache, tokens=1280, checkpoint_every=0, device="cpu", **SHUFFLE)
    first = train(specs(), tmp_path / "a", cfg, reporters=[])
    train(specs(), tmp_path / "b", cfg, reporters=[])
    pm = get_plugin_manager()
    pm.register(Interrupter(), name="interrupter-cache-test")
    try:
        with pytest.raises(RouteSAEError, match="interrupted at step 4"):
            train(specs(), tmp_path / "c", cfg, reporters=["interrupt-cache-test"])
    finally:
        pm.unregister("interrupter-cache-test")
    resumed = train(specs(), tmp_path / "c", cfg, resume=True, reporters=[])
    assert resumed["tokens"] == first["tokens"] == 1280
    for sae in first["saes"]:
        a = weights(tmp_path / "a", sae["name"])
        for other in ("b", "c"):
            b = weights(tmp_path / other, sae["name"])
            assert all(torch.equal(a[k], b[k]) for k in a), (other, sae["name"])


def test_a_from_cache_checkpoint_evaluates_with_timings(whole_split_cache, lm, tmp_path):
    cfg = TrainConfig.for_cache(whole_split_cache, tokens=640, device="cpu", **SHUFFLE)
    summary = train(specs(), tmp_path / "run", cfg, reporters=[])
    directory = tmp_path / "run" / summary["saes"][0]["name"]
    config = read_sae_config(directory)
    reopened = model_for([directory], [config], device="cpu")
    assert reopened.describe() == lm.describe()
    results = evaluate(tmp_path / "run", ["l0", "normmse"], tokens=200, batch_size=BATCH, reporters=[])
    assert len(results) == 2
    for record in results.values():
        assert record["metrics"]["l0"] == pytest.approx(4) and record["tokens"] >= 200
        assert record["seconds"] > 0 and record["tokens_per_s"] == pytest.approx(record["tokens"] / record["seconds"])
        assert 0 < record["sae_seconds"] < record["seconds"]
        timing = record["pass"]
        assert timing["saes"] == 2 and timing["tokens"] == record["tokens"] and timing["seconds"] == record["seconds"]
        assert 0 <= timing["shared_seconds"] < timing["seconds"]


def run_cli(*args):
    return CliRunner().invoke(make_cli(), [str(a) for a in args])


def test_cli_caches_for_architectures_and_trains_from_the_cache(tiny_model_dir, text_corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    common = ["--model", tiny_model_dir, "--dataset", text_corpus_dir, "--context-length", CONTEXT, "--batch-size", BATCH]
    result = run_cli("cache", "--out", cache, *common, "--tokens", 900, "--shard-mb", 0.1, "--json",
                     "--arch", "routesae", "--layers", "0:1", "--arch", "topk", "--layer", 3)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layers"] == [0, 1, 3] and summary["tokens"] >= 900 and summary["shards"] >= 2
    assert summary["bytes"] > summary["tokens"] * 3 * 64 * 4 and summary["tokens_per_s"] > 0
    assert re.search(r"cache: [\d,]+ tokens × 3 blocks × d_model 64 × 4 bytes = ", result.stderr)
    plain = run_cli("cache", "--out", tmp_path / "plain", *common, "--tokens", 300, "--layers", "1:2", "--layer", "0,3", "--json")
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.stdout)["layers"] == [0, 1, 2, 3]

    out = tmp_path / "run"
    trained = run_cli("train", "--from-cache", cache, "--arch", "topk", "--layer", 3, "--k", 4, "--latent-size", 64,
                      "--tokens", 640, "--sae-batch-tokens", 64, "--out", out, "--json", "--report", "jsonl")
    assert trained.exit_code == 0, trained.output
    run = json.loads(trained.stdout)
    assert run["source"] == "cache" and run["tokens"] == 640
    for record in [run, *run["saes"]]:
        assert record["tokens"] == 640 and record["seconds"] > 0
        assert record["tokens_per_s"] == pytest.approx(record["tokens"] / record["seconds"])
    assert 0 < run["harvest_seconds"] < run["seconds"] and 0 < run["sae_step_seconds"] < run["seconds"]
    assert json.loads((out / "run.json").read_text())["request"]["train"]["from_cache"] == str(cache)
    again = run_cli("train", "--from-cache", cache, "--arch", "topk", "--layer", 3, "--k", 4, "--latent-size", 64,
                    "--tokens", 640, "--sae-batch-tokens", 64, "--out", out, "--resume")
    assert again.exit_code == 2 and "finished run" in again.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layer", "0"], r"holds blocks \[1, 2\], but topk-L0-k4-F64 reads \[0\]: cache those blocks too"),
        (["--tokens", "100000"], r"asked for 100,000 training tokens but the activation cache .* holds [\d,]+; lower --tokens"),
        (["--model", "OTHER"], r"was harvested with --model '.*', not '.*'; drop --model"),
        (["--context-length", "64"], r"was harvested with --context-length 32, not 64"),
        (["--keep-bos"], r"was harvested with --keep-bos False, not True"),
    ],
)
def test_bad_from_cache_input_is_a_short_error(lm, cache_cfg, tmp_path, tiny_model_dir_no_bos, extra, message):
    cache = cache_activations(tmp_path / "cache", cache_cfg(tokens=600), [1, 2], lm=lm, progress=False)
    extra = [str(tiny_model_dir_no_bos) if e == "OTHER" else e for e in extra]
    result = run_cli("train", "--from-cache", cache, "--k", 4, "--latent-size", 64, "--layer", 1, *extra, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "run").exists()


def test_a_directory_that_is_not_a_whole_cache_is_refused(lm, cache_cfg, tmp_path):
    result = run_cli("train", "--from-cache", tmp_path, "--out", tmp_path / "run")
    assert result.exit_code == 2 and f"{tmp_path} is not an activation cache (no manifest.json)" in result.stderr

    def kill(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_activations(tmp_path / "half", cache_cfg(), [1], lm=lm, progress=False, on_shard=kill)
    result = run_cli("train", "--from-cache", tmp_path / "half", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "is unfinished" in result.stderr and "same `routesae cache` command" in result.stderr

    whole = cache_activations(tmp_path / "whole", cache_cfg(), [1], lm=lm, progress=False)
    shard = whole / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(RouteSAEError, match="shard-00001.safetensors does not match its checksum"):
        ActivationCache(whole).verify()
    shard.unlink()
    with pytest.raises(RouteSAEError, match="damaged: shard-00001.safetensors is missing"):
        ActivationCache(whole)


def test_cache_cli_errors(tiny_model_dir, text_corpus_dir, tmp_path):
    common = ["--model", tiny_model_dir, "--dataset", text_corpus_dir, "--context-length", CONTEXT, "--out", tmp_path / "c"]
    no_blocks = run_cli("cache", *common)
    assert no_blocks.exit_code == 2 and "no blocks to cache: give --layers A:B" in no_blocks.stderr
    arch_only = run_cli("cache", *common, "--k", 4, "--layer", 1)
    assert arch_only.exit_code == 2 and "--k configure an architecture: add --arch" in arch_only.stderr
    bad_range = run_cli("cache", *common, "--layers", "3:1")
    assert bad_range.exit_code == 2 and "the first block must not come after the last" in bad_range.stderr
