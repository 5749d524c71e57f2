"""Tiny random Hugging Face models for tests: real configs, real save_pretrained,
real safetensors, and an offline-built character tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          Qwen2Config)

from evolve.demo.tokenizer import VOCAB_SIZE, char_tokenizer


def tiny_config(arch: str = "llama", layers: int = 2, hidden: int = 32, tie: bool = False):
    common = dict(vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=tie, **common)
    if arch == "mistral":
        return MistralConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=tie, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=tie, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                             num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=tie, **common)
    raise ValueError(arch)


def make_model(path: Path, arch: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 32,
               tie: bool = False, base: Path | None = None, noise: float = 0.02) -> Path:
    """Save a tiny random model at `path`; with `base`, a fine-tune-like perturbation of it."""
    torch.manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(str(base))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(arch, layers, hidden, tie))
    model.save_pretrained(str(path), safe_serialization=True)
    char_tokenizer().save_pretrained(str(path))
    return path
