"""Router (gate) weights of the output MoE: one [num_gates, hidden] matrix per layer, as mergekit 0.1.5's
moe/router.py computes them. Row g of layer l is the vector the router compares each token's hidden state
with (router logit = hidden @ row); a row per routed expert, then one per shared expert.

Prompt modes (per expert, from its positive prompts P and negative prompts N; mergekit's arithmetic):

    prompt text     = tokenizer.bos_token + prompt, tokenized without special tokens
    cheap_embed     e(S) = sum over the prompts of S, over their tokens, of embed[token]        (hidden,)
                    v = e(P) / |e(P)| - e(N) / |e(N)|;  row = v / |v|, the same for every layer
    hidden(_last)   h_l(p) = hidden state entering layer l (transformers' hidden_states[l]: l = 0 is the
                    embedding output) at the last token of prompt p, from one forward pass of the base
                    h_l(S) = mean over the prompts p of S of h_l(p)
                    v_l = h_l(P) - h_l(N);  row_l = v_l / |v_l|                                  (layers, hidden)
    hidden_avg      as hidden, with h_l(p) the mean over the prompt's tokens

Norms are clamped at 1e-8 as in mergekit. Random modes draw [layers, gates, hidden] from the run's generator
(torch.randn / torch.rand on CPU: with the same seed, mergekit's `--random-seed` draws the same numbers).
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import PlanError
from .config import Expert

log = logging.getLogger(__name__)
EPS = 1e-8


def normalize(v: torch.Tensor) -> torch.Tensor:
    """v / |v| along the last dimension (clamped at 1e-8)."""
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=EPS)


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's token ids as mergekit feeds them: the BOS token's text prepended, no special tokens."""
    bos = tokenizer.bos_token or ""
    return [list(tokenizer(bos + p, add_special_tokens=False)["input_ids"]) for p in prompts]


def checked_ids(tokenizer: Any, prompts: Sequence[str], vocab: int) -> list[list[int]]:
    """prompt_ids, each prompt at least one token and every id a row of the base's embedding."""
    ids = prompt_ids(tokenizer, prompts)
    bad = sorted({t for p in ids for t in p if t >= vocab})
    if bad:
        raise PlanError(f"the base model's tokenizer gives token ids {bad[:5]} for the prompts, beyond its "
                        f"embedding's {vocab} rows; use a base whose tokenizer fits its embedding")
    if any(not p for p in ids):
        raise PlanError("a prompt tokenizes to no tokens (and the tokenizer has no BOS token); give non-empty prompts")
    return ids


# --- one expert's gate vector, from a per-prompt-set function ---------------------------------------------


def expert_gate(expert: Expert, encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
    """normalize(encode(positive) - encode(negative)); encode maps prompts to a (layers, hidden) tensor."""
    v = encode(list(expert.positive_prompts or []))
    if expert.negative_prompts:
        v = v - encode(list(expert.negative_prompts))
    return normalize(v)


def cheap_embed_vector(embed: torch.Tensor, ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Sum of the embedding rows of every token of every prompt, normalised: (hidden,) float32."""
    flat = torch.tensor([t for p in ids for t in p], dtype=torch.long)
    return normalize(embed.float().index_select(0, flat).sum(dim=0))


@torch.no_grad()
def hidden_vectors(model: Any, ids: Sequence[Sequence[int]], average_tokens: bool) -> torch.Tensor:
    """Mean over the prompts of the hidden state entering each decoder layer (the last token's, or the mean
    over the prompt's tokens): (layers, hidden) float32. One prompt per forward pass: no padding."""
    total = None
    device = next(model.parameters()).device
    for p in ids:
        out = model(input_ids=torch.tensor([list(p)], device=device), output_hidden_states=True, return_dict=True)
        states = torch.stack(out.hidden_states[:-1]).float()  # (layers, 1, tokens, hidden): inputs of each layer
        h = states[:, 0].mean(dim=1) if average_tokens else states[:, 0, -1]  # (layers, hidden)
        total = h if total is None else total + h
    assert total is not None  # ids is never empty (positive_prompts are required by the config)
    return (total / len(ids)).cpu()


# --- all gates ----------------------------------------------------------------------------------------------


def random_gates(mode: str, layers: int, gates: int, hidden: int, generator: torch.Generator) -> torch.Tensor:
    """(layers, gates, hidden): standard normal (random), or U(-1/sqrt(hidden), 1/sqrt(hidden)) (uniform_random)."""
    if mode == "random":
        return torch.randn((layers, gates, hidden), generator=generator)
    scale = math.sqrt(1.0 / hidden)
    return torch.rand((layers, gates, hidden), generator=generator) * 2 * scale - scale


def cheap_embed_gates(experts: Sequence[Expert], tokenizer: Any, embed: torch.Tensor, layers: int) -> torch.Tensor:
    """(layers, gates, hidden) from the base's input embedding (vocabulary, hidden)."""

    def encode(prompts: list[str]) -> torch.Tensor:
        return cheap_embed_vector(embed, checked_ids(tokenizer, prompts, embed.shape[0]))

    rows = torch.stack([expert_gate(e, encode) for e in experts])  # (gates, hidden)
    return rows.unsqueeze(0).expand(layers, -1, -1).contiguous()


def hidden_gates(experts: Sequence[Expert], tokenizer: Any, model: Any, mode: str) -> torch.Tensor:
    """(layers, gates, hidden) from the base model's forward passes on the prompts."""

    vocab = model.get_input_embeddings().weight.shape[0]

    def encode(prompts: list[str]) -> torch.Tensor:
        return hidden_vectors(model, checked_ids(tokenizer, prompts, vocab), average_tokens=mode == "hidden_avg")

    return torch.stack([expert_gate(e, encode) for e in experts], dim=1)  # (layers, gates, hidden)


def load_base_model(path: Path, device: str, trust_remote_code: bool, progress: bool = True) -> Any:
    """The base model in transformers, in its stored dtype, for the hidden-state passes (the one whole model
    this command holds in memory)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto", trust_remote_code=trust_remote_code,
                                                          low_cpu_mem_usage=True)
    except Exception as e:  # noqa: BLE001 - any load failure, reported with the model named
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"base_model {path}: transformers cannot load it for the hidden-state gates: {first}; "
                        "fix the model or use gate_mode: cheap_embed or random") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def compute_gates(mode: str, experts: Sequence[Expert], *, layers: int, hidden: int, generator: torch.Generator,
                  tokenizer: Any = None, embed: Callable[[], torch.Tensor] | None = None,
                  base_path: Path | None = None, device: str = "cpu", trust_remote_code: bool = False,
                  progress: bool = True) -> torch.Tensor:
    """(layers, gates, hidden) float32 router rows for `experts` (routed, then shared) under gate_mode `mode`."""
    if mode in ("random", "uniform_random"):
        return random_gates(mode, layers, len(experts), hidden, generator)
    if mode == "cheap_embed":
        assert embed is not None and tokenizer is not None
        return cheap_embed_gates(experts, tokenizer, embed(), layers)
    assert base_path is not None and tokenizer is not None
    model = load_base_model(base_path, device, trust_remote_code, progress)
    try:
        gates = hidden_gates(experts, tokenizer, model, mode)
    finally:
        del model
        gc.collect()
    if gates.shape[0] != layers:
        raise PlanError(f"base_model: the forward pass gave {gates.shape[0]} layers of hidden states, the config "
                        f"says {layers}")
    return gates


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly linearly dependent (condition number above `threshold`, mergekit's
    warning): some experts will be chosen rarely."""
    out = []
    for layer in range(gates.shape[0]):
        rows = gates[layer].double()
        if rows.shape[0] > 1 and torch.linalg.cond(rows).item() > threshold:
            out.append(layer)
    return out
