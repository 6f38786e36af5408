"""The routing-controls grid (``routesae compare``) on the embedded model: one harvest for the whole grid, and its time.

The language model's forwards are counted by who asked for them (the caller's module): the cache
harvests each batch once, training reads the cache and never calls the model, and evaluation and
contexts run their own passes over their own splits, shared by every SAE of the grid.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter

from test_throughput import once, record

from routesae.compare import CACHE_DIR, CompareConfig, compare
from routesae.files import read_json

# A short run's hard router spreads its tokens over many blocks (after 9 steps on 18k tokens, six blocks of 6..20 got
# 5% or more), each of which adds a TopK and a fixed-router RouteSAE per k and seed: the benchmark keeps the blocks
# that get a fifth, and reads 2,048 tokens in evaluation (the MLSAE alone splices 16 blocks one at a time).
GRID = CompareConfig(k=(16, 32, 64), seeds=(0,), latent_size=4096, min_share=0.2,
                     evaluate={"tokens": 2048}, contexts={"tokens": 2048})


STAGES = {"routesae.cache": "cache", "routesae.trainer": "training", "routesae.train": "training",
          "routesae.evaluate": "evaluate", "routesae.contexts.extract": "contexts"}


def stage_of(frame) -> str:
    """The stage a call came from: the first of ``STAGES``' modules on its stack."""
    while frame is not None:
        stage = STAGES.get(frame.f_globals.get("__name__"))
        if stage:
            return stage
        frame = frame.f_back
    return "other"


def test_the_grid_harvests_each_batch_once(benchmark, lm, workload, tmp_path, monkeypatch):
    """(k) The whole grid from one harvest: one language-model forward per cached batch, none in training."""
    callers: Counter[str] = Counter()
    capture = lm.capture

    def counted(*args, **kwargs):
        callers[stage_of(sys._getframe(1))] += 1
        return capture(*args, **kwargs)

    monkeypatch.setattr(lm, "capture", counted)
    started = time.perf_counter()
    comparison = once(benchmark, lambda: compare(tmp_path / "grid", GRID, workload.cfg, reporters=(), lm=lm))
    seconds = time.perf_counter() - started
    lm_batches = math.ceil(read_json(tmp_path / "grid" / CACHE_DIR / "manifest.json")["blocks"] / workload.cfg.batch_size)
    ratio = callers["cache"] / lm_batches
    record(benchmark, "compare grid: LM forwards while harvesting / LM batches cached (training: none)", ratio, "= 1.0",
           ratio == 1.0 and callers["training"] == 0, saes=len(comparison["saes"]), grid_seconds=seconds,
           tokens=workload.tokens, **{f"{stage}_forwards": callers[stage] for stage in ("cache", "training", "evaluate",
                                                                                      "contexts", "other")})
