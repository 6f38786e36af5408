"""The 1B readiness check runs end to end, in its CPU smoke mode, before a GPU session spends its minutes on it."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_and_reports_every_figure(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "device-out")}
    (tmp_path / "device-out").mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path / "check")],
        capture_output=True, text=True, env=env, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "device-out" / "gpu-check.json").read_text())
    assert report == json.loads((tmp_path / "check" / "gpu-check.json").read_text())
    assert report["model"].endswith("4 blocks, d_model 64") and report["routed_blocks"] == "0..2"
    assert report["saes"] == ["routesae-L0-2-hard-sum-k8-F256", "topk-L2-k8-F256"]
    for rate in ("train_tokens_per_s", "capture_tokens_per_s", "plain_forward_tokens_per_s"):
        assert report[rate] > 0
    assert report["train_vs_capture"] == report["train_tokens_per_s"] / report["capture_tokens_per_s"]
    assert report["steps"] == 4 and report["peak_gpu_memory_gib"] is None


def test_the_config_has_llama_3_2_1b_shape():
    shape = json.loads((ROOT / "benchmarks" / "llama-3.2-1b.json").read_text())
    assert (shape["num_hidden_layers"], shape["hidden_size"], shape["intermediate_size"]) == (16, 2048, 8192)
    assert (shape["num_attention_heads"], shape["num_key_value_heads"]) == (32, 8)
