"""Tiny, randomly initialised Llama-style models with a real (small, byte-level BPE) tokenizer.

They load in well under a second, so unit tests exercise the real TransformerLens bridge and
Hugging Face code paths instead of mocks. The tokenizer mimics SmolLM2's awkward choices:
pad and EOS share an id, so any code that builds masks from token ids gets caught.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS = "<|bos|>", "<|eos|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Sparse autoencoders find features in language models.",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy.",
    "In 1905 Albert Einstein published four papers. Music, art and science changed in the 20th century.",
    "def train(model, data):\n    return model.fit(data)  # code has its own tokens\n",
    "Rivers flow to the sea; mountains rise above the clouds, and cities grow along the coasts.",
]


def make_tokenizer(prepend_bos: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    if prepend_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    fast.padding_side = "right"
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model_dir(
    path: Path, n_layers: int = 4, d_model: int = 64, seed: int = 0, prepend_bos: bool = True
) -> Path:
    """Write a Hugging Face model directory (config, safetensors weights, tokenizer) to ``path``."""
    tok = make_tokenizer(prepend_bos)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
