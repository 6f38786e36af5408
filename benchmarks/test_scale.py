"""Throughput of whole ``routesae train`` processes: a short run started cold, and two CPU ranks under ``torchrun``.

Both start real processes, as a user would, and read the run's own ``--json`` summary (its
``tokens_per_s`` is the training loop's; model loading and tokenisation are excluded there).

* Cold start: a fresh process trains one TopK on block 15 for 30k tokens; its tokens/s is set
  against the plain Hugging Face forward through block 15 (``conftest.PlainForward``, measured
  here), beside the same training warm (a second run in this process).
* Two ranks: RouteSAE + TopK on SmolLM2 under ``torchrun --nproc-per-node 2`` with one thread per
  rank, against one process with one thread: the language model's work splits two ways.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from test_throughput import DEEPEST_SINGLE, LATENTS, once, record

from routesae import SAESpec, train

COLD_TOKENS = 30_000


def routesae_train(out: Path, *args: str, ranks: int = 1, threads: int | None = None) -> dict[str, Any]:
    """``routesae train ... --json`` in fresh processes (``ranks`` of them under torchrun); returns the summary."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "routesae"]
    command = launcher if ranks > 1 else [sys.executable, "-m", "routesae"]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    result = subprocess.run([*command, "train", *args, "--out", str(out), "--json", "--report", "jsonl"],
                            capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_cold_start_vs_plain_forward(benchmark, lm, plain_forward, workload, tmp_path):
    """(i) A short TopK run in a fresh process: ≥ 0.85 x the plain forward's tokens/s (the warm ratio beside it)."""
    plain_rate = workload.tokens / plain_forward.seconds(workload, DEEPEST_SINGLE)
    settings = ["--arch", "topk", "--layer", str(DEEPEST_SINGLE), "--k", "32", "--latent-size", str(LATENTS),
                "--tokens", str(COLD_TOKENS), "--checkpoint-every", "0"]
    cold = once(benchmark, lambda: routesae_train(tmp_path / "cold", *settings))
    spec = [SAESpec.build("topk", k=32, layer=DEEPEST_SINGLE, latent_size=LATENTS)]
    cfg = workload.cfg.replace(tokens=COLD_TOKENS)
    train(spec, tmp_path / "warm-up", cfg, reporters=[], lm=lm)
    warm = train(spec, tmp_path / "warm", cfg, reporters=[], lm=lm)
    ratio = cold["tokens_per_s"] / plain_rate
    record(benchmark, "train TopK @15, 30k tokens, fresh process / plain HF forward to 15 (tokens/s)", ratio,
           "≥ 0.85", ratio >= 0.85, tokens=COLD_TOKENS, cold_tokens_per_s=cold["tokens_per_s"],
           warm_ratio=warm["tokens_per_s"] / plain_rate, plain_tokens_per_s=plain_rate)


def test_two_cpu_ranks_vs_one(benchmark, workload, tmp_path):
    """(j) RouteSAE + TopK under torchrun, 2 ranks x 1 thread: ≥ 1.6 x the tokens/s of 1 process x 1 thread."""
    settings = ["--arch", "routesae", "--arch", "topk", "--k", "32", "--latent-size", str(LATENTS),
                "--tokens", str(workload.tokens), "--checkpoint-every", "0", "--device", "cpu"]
    one = routesae_train(tmp_path / "one", *settings, threads=1)
    two = once(benchmark, lambda: routesae_train(tmp_path / "two", *settings, ranks=2, threads=1))
    ratio = two["tokens_per_s"] / one["tokens_per_s"]
    record(benchmark, "train RouteSAE+TopK, 2 CPU ranks x 1 thread / 1 process x 1 thread (tokens/s)", ratio,
           "≥ 1.6", ratio >= 1.6, tokens=workload.tokens, one_tokens_per_s=one["tokens_per_s"],
           two_tokens_per_s=two["tokens_per_s"])
