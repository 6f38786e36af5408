"""A 1B readiness check for one GPU: RouteSAE + TopK on a Llama-3.2-1B-shaped model, the way users train.

``make gpu-check`` runs it (on a GPU machine without network access, the wheels ``make gpu-wheels``
downloaded are installed first). The model has Llama-3.2-1B's shape (``llama-3.2-1b.json``: 16
blocks, d_model 2048) with random weights, and a byte-level BPE tokenizer trained here on the
embedded wiki corpus, so nothing comes from a hub; the random weights change the values, not the
cost. It trains RouteSAE over the default routed range and TopK on the top of it (k 64, 16,384
latents, context 512) with ``--compile --autocast --overlap-harvest`` for a few hundred steps, after
a short run that pays for compilation, and prints:

* training tokens/s, and its ratio to the truncated forward through the deepest routed block,
  measured in the same process over the same blocks: ``LanguageModel.capture`` and a plain Hugging
  Face forward of a fresh copy of the model;
* peak GPU memory of the measured run.

The language model runs in float32 with TF32 matrix products (``torch.set_float32_matmul_precision
("high")``), as GPU training usually does. ``--smoke`` runs the same code on a tiny model on the CPU
(the test suite does, so the script works before a GPU session spends its minutes on it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from routesae import SAESpec, TrainConfig, train
from routesae.architectures.base import default_layer_range
from routesae.data import load_corpus, read_documents
from routesae.lm import LanguageModel

CONFIG = Path(__file__).with_name("llama-3.2-1b.json")
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16}
EOS = "<|eos|>"


def make_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``documents`` (EOS doubles as padding, as in SmolLM2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.padding_side = "right"
    return fast


def make_model(directory: Path, smoke: bool, device: torch.device) -> Path:
    """Write the random Llama-3.2-1B-shaped model and its tokenizer to ``directory``."""
    documents = read_documents("wiki")
    tokenizer = make_tokenizer(documents[:300] if smoke else documents, 512 if smoke else 8192)
    shape = {k: v for k, v in json.loads(CONFIG.read_text()).items() if not k.startswith("_")}
    config = LlamaConfig(**{**shape, **(SMOKE_SHAPE if smoke else {})}, vocab_size=len(tokenizer),
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_rate(forward: Any, lm: LanguageModel, cfg: TrainConfig, deepest: int, batches: int) -> float:
    """Tokens/s of ``forward(ids, mask, deepest)`` over the first ``batches`` LM batches of the train split."""
    blocks = load_corpus(cfg.dataset, lm.tokenizer, context_length=cfg.context_length, seed=cfg.seed).split("train")
    ids, mask = blocks.input_ids.to(lm.device), blocks.attention_mask.to(lm.device)
    size = cfg.batch_size
    forward(ids[:size], mask[:size], deepest)  # warm-up
    synchronize(lm.device)
    started = time.perf_counter()
    for b in range(batches):
        forward(ids[b * size : (b + 1) * size], mask[b * size : (b + 1) * size], deepest)
    synchronize(lm.device)
    return int(mask[: batches * size, 1:].sum()) / (time.perf_counter() - started)  # the tokens training counts


def plain_forward(model_dir: Path, device: torch.device) -> Any:
    """A fresh Hugging Face copy of the model (default attention, no hooks), truncated per call like the capture."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).to(device).eval()

    def forward(ids: torch.Tensor, mask: torch.Tensor, deepest: int) -> None:
        body, layers = hf.model, hf.model.layers
        body.layers = layers[: deepest + 1]
        try:
            with torch.no_grad():
                body(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            body.layers = layers

    return forward


def check(out: Path, steps: int, smoke: bool) -> dict[str, Any]:
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it on a GPU machine, or pass --smoke for the CPU")
    torch.set_float32_matmul_precision("high")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir = make_model(out / "model", smoke, device)
    lm = LanguageModel.load(str(model_dir), device=device)
    first, deepest = default_layer_range(lm.n_layers)
    latents, k = (256, 8) if smoke else (16_384, 64)
    specs = [SAESpec.build("routesae", k=k, latent_size=latents), SAESpec.build("topk", k=k, latent_size=latents)]
    batch_tokens = 64 if smoke else 2048
    cfg = TrainConfig(model=str(model_dir), dataset="wiki", context_length=64 if smoke else 512, batch_size=16,
                      sae_batch_tokens=batch_tokens, buffer_tokens=1024 if smoke else 16_384, tokens=steps * batch_tokens,
                      compile=not smoke, autocast=not smoke, overlap_harvest=True, device=str(device), checkpoint_every=0,
                      log_every=max(1, steps // 6))
    prepared = time.perf_counter() - started
    warm_up = train(specs, out / "warm-up", cfg.replace(tokens=(2 if smoke else 20) * batch_tokens), reporters=[], lm=lm)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    summary = train(specs, out / "run", cfg, reporters=["console"], lm=lm)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    lm_batches = max(2, min(64, steps * batch_tokens // (cfg.batch_size * cfg.context_length)))
    capture_rate = forward_rate(lambda i, m, d: lm.capture(i, m, [d]), lm, cfg, deepest, lm_batches)
    plain_rate = forward_rate(plain_forward(model_dir, device), lm, cfg, deepest, lm_batches)
    rate = summary["tokens_per_s"]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": f"Llama-3.2-1B shape, random weights: {lm.n_layers} blocks, d_model {lm.d_model}",
        "saes": [s["name"] for s in summary["saes"]],
        "routed_blocks": f"{first}..{deepest}",
        "context": cfg.context_length,
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "train_tokens_per_s": rate,
        "capture_tokens_per_s": capture_rate,
        "plain_forward_tokens_per_s": plain_rate,
        "train_vs_capture": rate / capture_rate,
        "train_vs_plain_forward": rate / plain_rate,
        "capture_vs_plain_forward": capture_rate / plain_rate,
        "harvest_share": summary["harvest_seconds"] / summary["seconds"],
        "peak_gpu_memory_gib": None if peak is None else peak / 2**30,
        "train_seconds": summary["seconds"],
        "warm_up_seconds": warm_up["seconds"],
        "prepare_seconds": prepared,
        "total_seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"),
                        help="Where the model, the runs and gpu-check.json go (also copied to $OUT when it is set).")
    parser.add_argument("--steps", type=int, default=300, help="Steps of the measured run. [default: 300]")
    parser.add_argument("--smoke", action="store_true", help="A tiny model on the CPU: check that the script runs.")
    args = parser.parse_args()
    result = check(args.out, 4 if args.smoke else args.steps, args.smoke)
    text = json.dumps(result, indent=2) + "\n"
    for folder in [args.out, *([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])]:
        (folder / "gpu-check.json").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
