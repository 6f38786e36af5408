"""``--epochs``: several passes over the train split, each in a new seeded order, resumable bit for bit.

The stream tests run the real tiny Llama through :class:`ActivationStream`; the training tests drive
``routesae train`` (CLI or ``train()``) on a one-file dataset, interrupt it in its second epoch with a
real reporter plugin, resume, and compare the weights with an uninterrupted run; the cache serves the
same epochs without the model.
"""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_train import InterruptAt, Interrupter

from routesae import SAESpec, TrainConfig, train
from routesae.activations import ActivationStream, Shard, training_positions
from routesae.cache import ActivationCache, CacheConfig, CachedStream, cache_activations
from routesae.cli import make_cli
from routesae.data import load_corpus
from routesae.errors import ConfigError, RouteSAEError
from routesae.lm import LanguageModel
from routesae.plugins import get_plugin_manager
from routesae.train_config import DEFAULT_TOKENS, run_request

SHUFFLE = {"batch_size": 4, "context_length": 32, "sae_batch_tokens": 128, "buffer_tokens": 512, "log_every": 1}
SMALL = ["--k", "4", "--latent-size", "64", "--batch-size", "4", "--context-length", "32", "--sae-batch-tokens", "128",
         "--buffer-tokens", "512", "--log-every", "1", "--report", "jsonl"]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return LanguageModel.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def small_txt(text_corpus_dir, tmp_path_factory):
    """One plain-text file: the corpus folder's .txt, whose train split is a few thousand tokens."""
    path = tmp_path_factory.mktemp("small") / "small.txt"
    path.write_text((text_corpus_dir / "a.txt").read_text())
    return path


@pytest.fixture(scope="module")
def blocks(lm, small_txt):
    return load_corpus(str(small_txt), lm.tokenizer, context_length=32, seed=42).split("train")


def stream(lm, blocks, **settings):
    shuffle = {"lm_batch_size": 4, "sae_batch_tokens": 32, "buffer_tokens": 128, "seed": 5, **settings}
    return ActivationStream(lm, blocks, [1, 3], **shuffle)


def served(s):
    """Every batch ``s`` serves, with the (epoch, position) after it."""
    batches = []
    for batch in s:
        batches.append((batch, s.epoch, s.position))
    return batches


def epoch_of(epoch, position):
    """The epoch of the batch after which the stream stood at (``epoch``, ``position``): a finished epoch has
    moved on to the next one's start."""
    return epoch - 1 if epoch > 0 and position == (0, 0) else epoch


def rows(batches):
    """The batches' rows in a canonical order, to compare what was served regardless of order."""
    x = torch.cat(batches)
    return x[torch.argsort(x[:, 0, 0] * 1e3 + x[:, 1, 1])]


# -- the stream --------------------------------------------------------------------------------------------


def test_each_epoch_serves_every_token_once_the_first_as_a_single_pass_later_ones_reshuffled(lm, blocks):
    one = [b for b, _, _ in served(stream(lm, blocks))]
    three = stream(lm, blocks, epochs=3)
    batches = served(three)
    assert [b.shape[0] for b, _, _ in batches] == list(three.batch_sizes())
    per_epoch = [[b for b, e, p in batches if epoch_of(e, p) == epoch] for epoch in range(3)]
    assert len(per_epoch[0]) == len(one) and all(torch.equal(a, b) for a, b in zip(per_epoch[0], one)), \
        "the first epoch is the single-pass stream, bit for bit"
    kept = int(training_positions(blocks.attention_mask, False).sum())
    assert three.pass_tokens == kept
    for epoch in per_epoch:
        assert sum(b.shape[0] for b in epoch) == kept
        torch.testing.assert_close(rows(epoch), rows(per_epoch[0]), rtol=0, atol=0)
    firsts = [epoch[0] for epoch in per_epoch]
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2]), "each epoch reshuffles"
    assert three.group_order(0) == list(range(len(three.groups)))
    assert sorted(three.group_order(1)) == sorted(three.group_order(2)) == three.group_order(0)
    assert three.group_order(1) != three.group_order(2), "the groups' order is drawn anew each epoch"
    assert (three.epoch, three.position) == (2, (len(three.groups), 0))
    again = [b for b, _, _ in served(stream(lm, blocks, epochs=3))]
    assert all(torch.equal(a, b) for (a, _, _), b in zip(batches, again)), "deterministic"
    assert stream(lm, blocks, epochs=3, seed=6).group_order(1) != three.group_order(1), "the seed decides"


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_stream_resumed_anywhere_in_a_later_epoch_serves_the_rest_bit_for_bit(lm, blocks, prefetch):
    full = served(stream(lm, blocks, epochs=3))
    starts = [i for i, (_, e, p) in enumerate(full) if e == 1 and p[1] > 0][:2] + [i for i, (_, e, p) in enumerate(full) if e == 2][:1]
    for k in starts:
        _, epoch, position = full[k]
        rest = served(stream(lm, blocks, epochs=3, epoch=epoch, position=position, prefetch=prefetch))
        assert len(rest) == len(full) - (k + 1)
        assert all(torch.equal(a, b) and (ea, pa) == (eb, pb) for (a, ea, pa), (b, eb, pb) in zip(rest, full[k + 1:]))


def test_a_token_limit_ends_the_stream_inside_a_later_epoch(lm, blocks):
    whole = stream(lm, blocks, epochs=2)
    limit = whole.pass_tokens + 100
    batches = served(stream(lm, blocks, epochs=2, tokens=limit))
    assert sum(b.shape[0] for b, _, _ in batches) == limit
    assert batches[-1][1] == 1, "it stopped in the second epoch"


def test_ranks_shares_add_up_to_each_batch_in_every_epoch(lm, blocks):
    """Under torchrun each rank harvests every other LM batch; in a reshuffled epoch the shares still make the batch."""
    whole = served(stream(lm, blocks, epochs=2))
    shares = [served(stream(lm, blocks, epochs=2, shard=Shard(rank, 2))) for rank in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(whole)
    for (batch, epoch, position), (a, ea, pa), (b, eb, pb) in zip(whole, *shares):
        assert (epoch, position) == (ea, pa) == (eb, pb)
        assert a.shape[0] + b.shape[0] == batch.shape[0]  # a group of one LM batch leaves rank 1 an empty share
        torch.testing.assert_close(rows([a, b]), rows([batch]), rtol=0, atol=0)
    split = [min(a.shape[0], b.shape[0]) > 0 for (_, e, p), (a, _, _), (b, _, _) in zip(whole, *shares) if epoch_of(e, p)]
    assert sum(split) > len(split) / 2, "in the second epoch too, most batches are split between the ranks"


# -- settings ------------------------------------------------------------------------------------------------


def test_epochs_and_tokens_settings():
    assert TrainConfig().tokens == DEFAULT_TOKENS and TrainConfig().epochs is None
    assert TrainConfig(epochs=2).tokens is None, "--epochs alone: whole passes, counted when the data is known"
    assert TrainConfig(epochs=2, tokens=5000).tokens == 5000
    assert TrainConfig.from_dict(TrainConfig(epochs=3).to_dict()) == TrainConfig(epochs=3)
    with pytest.raises(ConfigError, match="epochs must be at least 1, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="tokens must be positive"):
        TrainConfig(tokens=0, epochs=2)
    spec = [SAESpec.build("topk", k=4, latent_size=64)]
    assert "epochs" not in run_request(spec, TrainConfig())["train"], "runs from before --epochs still resume"
    assert run_request(spec, TrainConfig(epochs=2))["train"]["epochs"] == 2


# -- training ------------------------------------------------------------------------------------------------


def weights(run, name):
    return load_file(run / name / "weights.safetensors")


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_trains_two_epochs_of_one_file_and_records_them(tiny_model_dir, small_txt, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--dataset", str(small_txt), *SMALL, "--out", str(out)]
    result = CliRunner().invoke(make_cli(), [*args, "--epochs", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    manifest = json.loads((out / "run.json").read_text())
    config = json.loads((out / "topk-L2-k4-F64" / "config.json").read_text())["training"]
    one_pass = config["epoch_tokens"]
    assert summary["tokens"] == manifest["progress"]["tokens"] == config["tokens_done"] == 2 * one_pass > 0
    assert (manifest["train"]["epochs"], manifest["train"]["tokens"]) == (2, 2 * one_pass)
    assert (manifest["request"]["train"]["epochs"], manifest["request"]["train"]["tokens"]) == (2, None)
    assert manifest["progress"]["epoch"] == 1 and (config["epochs"], config["epochs_done"]) == (2, 2.0)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(s["event"] == "step" for s in steps) == summary["steps"]

    too_many = CliRunner().invoke(make_cli(), [*args[:-1], str(tmp_path / "other"), "--tokens", str(3 * one_pass)])
    assert too_many.exit_code == 2 and "Traceback" not in too_many.output
    assert f"holds {one_pass:,} usable tokens" in too_many.stderr and "pass --epochs 3" in too_many.stderr
    short = CliRunner().invoke(make_cli(), [*args[:-1], str(tmp_path / "other"), "--tokens", str(3 * one_pass),
                                            "--epochs", "2"])
    assert short.exit_code == 2 and f"{2 * one_pass:,} in 2 passes" in short.stderr
    assert "raise --epochs to 3" in short.stderr
    assert not (tmp_path / "other").exists()


def interrupted(specs, out, cfg, at_step):
    """Train until test_train's interrupting reporter stops the run like Ctrl-C at ``at_step``; the saved progress."""
    pm = get_plugin_manager()
    pm.register(Interrupter(), name="interrupter-epochs")
    usual, InterruptAt.at_step = InterruptAt.at_step, at_step
    try:
        with pytest.raises(RouteSAEError, match=f"interrupted at step {at_step}"):
            train(specs, out, cfg, reporters=[InterruptAt.name])
    finally:
        InterruptAt.at_step = usual
        pm.unregister("interrupter-epochs")
    return json.loads((out / "run.json").read_text())["progress"]


def steps_in_first_epoch(lm, cfg):
    blocks = load_corpus(cfg.dataset, lm.tokenizer, context_length=cfg.context_length, seed=cfg.seed).split("train")
    return len(list(ActivationStream(lm, blocks, [0], lm_batch_size=cfg.batch_size, sae_batch_tokens=cfg.sae_batch_tokens,
                                     buffer_tokens=cfg.buffer_tokens).batch_sizes()))


def test_a_run_interrupted_in_its_second_epoch_resumes_to_the_same_weights(lm, tiny_model_dir, small_txt, tmp_path):
    cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(small_txt), epochs=2, checkpoint_every=0, **SHUFFLE)
    specs = [SAESpec.build("topk", k=4, latent_size=64, layer=1), SAESpec.build("routesae", k=4, latent_size=64, layers="1:2")]
    whole = train(specs, tmp_path / "a", cfg, reporters=[], lm=lm)
    at = steps_in_first_epoch(lm, cfg) + 3
    progress = interrupted(specs, tmp_path / "b", cfg, at)
    assert progress["step"] == at and progress["epoch"] == 1 and progress["batch"] > 0, "mid-group of epoch 2"
    resumed = train(specs, tmp_path / "b", cfg, resume=True, reporters=[], lm=lm)
    assert resumed["steps"] == whole["steps"] and resumed["tokens"] == whole["tokens"]
    assert 0 < resumed["session_tokens"] < whole["tokens"] / 2
    for sae in whole["saes"]:
        assert same_weights(weights(tmp_path / "a", sae["name"]), weights(tmp_path / "b", sae["name"])), sae["name"]


def test_a_run_from_before_epochs_resumes_without_an_epoch_in_its_progress(lm, tiny_model_dir, small_txt, tmp_path):
    cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(small_txt), tokens=1200, checkpoint_every=0, **SHUFFLE)
    specs = [SAESpec.build("topk", k=4, latent_size=64, layer=2)]
    train(specs, tmp_path / "a", cfg, reporters=[], lm=lm)
    interrupted(specs, tmp_path / "b", cfg, 4)
    manifest_path = tmp_path / "b" / "run.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["progress"]["epoch"]  # as an earlier routesae wrote it
    manifest_path.write_text(json.dumps(manifest))
    train(specs, tmp_path / "b", cfg, resume=True, reporters=[], lm=lm)
    name = "topk-L2-k4-F64"
    assert same_weights(weights(tmp_path / "a", name), weights(tmp_path / "b", name))


def test_the_cache_serves_the_epochs_of_the_live_run_and_resumes_them(lm, tiny_model_dir, small_txt, tmp_path):
    """A cache of the whole train split trains the weights of live epochs; interrupted in epoch 2, it resumes them."""
    blocks = load_corpus(str(small_txt), lm.tokenizer, context_length=32, seed=42).split("train")
    available = int(training_positions(blocks.attention_mask, keep_bos=False).sum())
    cache_cfg = {"model": str(tiny_model_dir), "dataset": str(small_txt), "context_length": 32, "batch_size": 4}
    cache = cache_activations(tmp_path / "cache", CacheConfig(tokens=available, **cache_cfg), [1, 2], lm=lm, progress=False)
    specs = [SAESpec.build("topk", k=4, latent_size=64, layer=2)]
    shuffle = {k: v for k, v in SHUFFLE.items() if k not in ("batch_size", "context_length")}
    live_cfg = TrainConfig(model=str(tiny_model_dir), dataset=str(small_txt), epochs=2, checkpoint_every=0, **SHUFFLE)
    live = train(specs, tmp_path / "live", live_cfg, reporters=[], lm=lm)
    cached_cfg = TrainConfig.for_cache(cache, epochs=2, checkpoint_every=0, device="cpu", **shuffle)
    assert cached_cfg.tokens is None, "--epochs alone: two passes over the cache"
    cached = train(specs, tmp_path / "cached", cached_cfg, reporters=[])
    assert cached["source"] == "cache" and (cached["tokens"], cached["steps"]) == (live["tokens"], live["steps"])
    name = "topk-L2-k4-F64"
    assert same_weights(weights(tmp_path / "live", name), weights(tmp_path / "cached", name))
    progress = interrupted(specs, tmp_path / "resumed", cached_cfg, steps_in_first_epoch(lm, live_cfg) + 2)
    assert progress["epoch"] == 1
    train(specs, tmp_path / "resumed", cached_cfg, resume=True, reporters=[])
    assert same_weights(weights(tmp_path / "live", name), weights(tmp_path / "resumed", name))
    shuffle = {"lm_batch_size": 4, "sae_batch_tokens": 64, "buffer_tokens": 64, "epochs": 2}  # a group per LM batch
    opened = ActivationCache(cache)
    whole = [b for b, _, _ in served(CachedStream(opened, [2], **shuffle))]
    shares = [[b for b, _, _ in served(CachedStream(opened, [2], shard=Shard(rank, 2), **shuffle))] for rank in range(2)]
    assert sum(len(b) == 0 for b in shares[1]) >= len(whole) / 3, "rank 1 holds no LM batch of every other group"
    for batch, a, b in zip(whole, *shares, strict=True):
        assert torch.equal(torch.sort(torch.cat([a, b]).flatten()).values, torch.sort(batch.flatten()).values)
    with pytest.raises(RouteSAEError, match=r"cache .* holds [\d,]+; lower --tokens, cache more .*, or pass --epochs 3"):
        TrainConfig.for_cache(cache, tokens=2 * available + 1)
    assert TrainConfig.for_cache(cache, tokens=2 * available + 1, epochs=3).tokens == 2 * available + 1
