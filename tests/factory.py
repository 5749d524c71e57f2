"""Tiny random Hugging Face models for tests: real configs, real save_pretrained,
real safetensors, and an offline-built character tokenizer."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

from evolve.demo.tokenizer import VOCAB_SIZE, char_tokenizer

# mergekit 0.1.5 from PyPI in its own venv, for the comparison tests (skipped where it is absent): the bench
# scripts create it under the checkout's .cache/
MERGEKIT_VENV = Path(os.environ.get("EVOMERGE_MERGEKIT_VENV")
                     or Path(__file__).resolve().parent.parent / ".cache" / "mergekit-0.1.5")


def run_mergekit_yaml(recipe: Path, out: Path, *flags: str) -> Path:
    """mergekit 0.1.5's `mergekit-yaml RECIPE OUT [flags]`, offline; asserts it succeeded and returns OUT."""
    proc = subprocess.run([str(MERGEKIT_VENV / "bin" / "mergekit-yaml"), str(recipe), str(out), *flags],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


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
    if arch == "qwen3":  # head_dim is its own setting (default 128), q_norm / k_norm per layer
        from transformers import Qwen3Config

        return Qwen3Config(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                           max_position_embeddings=64, tie_word_embeddings=tie, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                             num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=tie, **common)
    raise ValueError(arch)


def make_model(path: Path, arch: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 32,
               tie: bool = False, base: Path | None = None, noise: float = 0.02) -> Path:
    """Save a tiny random model at `path`; with `base`, a fine-tune-like perturbation of it."""
    return _save_tiny(AutoModelForCausalLM, path, lambda: tiny_config(arch, layers, hidden, tie), seed, base, noise)


def _save_tiny(auto_class, path: Path, config, seed: int, base: Path | None, noise: float) -> Path:
    """`auto_class` built from `config()` (or loaded from `base` plus Gaussian noise of std `noise` on every
    parameter), saved at `path` with the char tokenizer."""
    torch.manual_seed(seed)
    if base is not None:
        model = auto_class.from_pretrained(str(base))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    else:
        model = auto_class.from_config(config())
    model.save_pretrained(str(path), safe_serialization=True)
    char_tokenizer().save_pretrained(str(path))
    return path


# ---- one tiny model per family of merge_engine/architecture.py's KNOWN table ------------------------------

_STD = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)
_GPT = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)
_EXPERTS = dict(num_local_experts=2, num_experts_per_tok=1)
_QWEN_MOE = dict(moe_intermediate_size=32, num_experts=2, num_experts_per_tok=1)
# model_type -> config keywords (beside the char tokenizer's vocabulary and special ids): 2 layers, hidden size 32
FAMILY_CONFIGS: dict[str, dict] = {
    **{mt: _STD for mt in ("llama", "mistral", "qwen2", "phi3", "olmo", "olmo2", "olmo3", "stablelm", "starcoder2",
                           "cohere", "cohere2", "granite", "smollm3", "phi")},
    **{mt: {**_STD, "head_dim": 8} for mt in ("qwen3", "gemma", "gemma2")},
    "gemma3_text": {**_STD, "head_dim": 8, "sliding_window": 16},
    "mixtral": {**_STD, **_EXPERTS},
    "qwen2_moe": {**_STD, **_QWEN_MOE, "shared_expert_intermediate_size": 32},
    "qwen3_moe": {**_STD, **_QWEN_MOE, "head_dim": 8},
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "gpt2": _GPT, "gpt_bigcode": _GPT, "gptj": {**_GPT, "rotary_dim": 4},
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64),
}


def family_config(model_type: str, **overrides):
    from transformers import AutoConfig

    tokens = dict(vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoConfig.for_model(model_type, **{**tokens, **FAMILY_CONFIGS[model_type], **overrides})


def make_family(path: Path, model_type: str, seed: int = 0, base: Path | None = None, noise: float = 0.02) -> Path:
    """A tiny random causal LM of `model_type` (FAMILY_CONFIGS) at `path`; with `base`, a perturbation of it."""
    return _save_tiny(AutoModelForCausalLM, path, lambda: family_config(model_type), seed, base, noise)


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def fuse_experts(path: Path) -> Path:
    """Rewrite the MoE checkpoint at `path` under transformers 5's in-memory names, every layer's experts fused into
    `mlp.experts.gate_up_proj` [experts, 2 x intermediate, hidden] and `mlp.experts.down_proj` [experts, hidden,
    intermediate] (transformers saves per-expert names, `experts.N.w2` / `experts.N.down_proj`; it loads both)."""
    from safetensors.torch import save_file

    model = AutoModelForCausalLM.from_pretrained(str(path))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


# ---- tiny trained models whose task scores differ --------------------------------------------------------

TASK_DATA = Path(__file__).resolve().parent.parent / "tasks" / "data"
SPECIALIST_TASKS = {"addition": "evo_addition", "reversal": "evo_reversal"}


def memorised_docs(task: str, n: int = 8) -> list[tuple[str, str]]:
    """The first n documents of a bundled task's fitness (validation) split: `limit=n` scores exactly these."""
    import json

    lines = (TASK_DATA / f"{task}.validation.jsonl").read_text().splitlines()[:n]
    return [(r["prompt"], r["answer"]) for r in map(json.loads, lines)]


def teach(path: Path, base: Path, docs: list[tuple[str, str]], seed: int, max_steps: int = 400) -> Path:
    """Fine-tune `base` until every answer token of `docs` is the greedy next token (lm-eval's `acc` for the
    bundled loglikelihood tasks), then save it at `path`. Seconds on one CPU core."""
    from evolve.demo.build_models import batch_tensors

    torch.manual_seed(seed)
    tok = char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(base))
    ids, labels = batch_tensors(tok, docs)
    answer = labels[:, 1:] != -100
    answer &= labels[:, 1:] != tok.eos_token_id  # lm-eval scores the answer, not the EOS after it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a batch of 8 short sequences: more threads only add contention
    try:
        for _ in range(max_steps):
            out = model(input_ids=ids, labels=labels)
            if (out.logits[:, :-1].argmax(-1) == labels[:, 1:])[answer].all():
                break
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        else:
            raise RuntimeError(f"teach: {path.name} did not learn its {len(docs)} documents in {max_steps} steps")
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


def make_specialists(root: Path, n_docs: int = 8) -> dict[str, Path]:
    """A random 4-layer Llama base and two fine-tunes of it: `addition` knows the first n_docs documents of
    evo_addition's fitness split, `reversal` those of evo_reversal. Candidates mixing them score differently
    (the base scores 0 on both, each specialist 1 on its own task), unlike the untrained zoo, which scores 0."""
    base = make_model(root / "base", "llama", seed=10, layers=4)
    out = {"base": base}
    for i, task in enumerate(SPECIALIST_TASKS):
        out[task] = teach(root / task, base, memorised_docs(task, n_docs), seed=11 + i)
    return out


# ---- tiny vision-language models (config.json nests text_config / vision_config) --------------------------

VLM_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "gemma3", "mistral3")
VLM_TEXT_LAYERS, VLM_VISION_LAYERS = 2, 3  # different depths: a gradient must run over each tower's own layers


def tiny_vlm_config(family: str, hidden: int = 32):
    """Text decoder of VLM_TEXT_LAYERS layers, vision encoder of VLM_VISION_LAYERS, the char tokenizer's vocabulary
    (its last ids stand in for the image / vision marker tokens)."""
    from transformers import Gemma3Config, LlavaConfig, Mistral3Config, Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=VLM_TEXT_LAYERS,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    last = VOCAB_SIZE - 1
    if family == "llava":
        return LlavaConfig(text_config=dict(model_type="llama", **text), image_token_index=last,
                           vision_config=dict(model_type="clip_vision_model", hidden_size=hidden,
                                              intermediate_size=hidden * 2, num_hidden_layers=VLM_VISION_LAYERS,
                                              num_attention_heads=4, image_size=32, patch_size=8,
                                              projection_dim=hidden))
    if family == "qwen2_vl":
        return Qwen2VLConfig(text_config=dict(rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, **text),
                             vision_config=dict(depth=VLM_VISION_LAYERS, embed_dim=hidden, hidden_size=hidden,
                                                num_heads=4, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
                                                temporal_patch_size=2),
                             image_token_id=last, video_token_id=last - 1, vision_start_token_id=last - 2,
                             vision_end_token_id=last - 3, bos_token_id=1, eos_token_id=2)
    if family == "qwen2_5_vl":  # windowed attention in vision blocks 0-1, full attention in block 2
        return Qwen2_5_VLConfig(text_config=dict(rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, **text),
                                vision_config=dict(depth=VLM_VISION_LAYERS, hidden_size=hidden,
                                                   intermediate_size=hidden * 2, out_hidden_size=hidden, num_heads=4,
                                                   patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                                                   window_size=8, fullatt_block_indexes=[VLM_VISION_LAYERS - 1]),
                                image_token_id=last, video_token_id=last - 1, vision_start_token_id=last - 2,
                                vision_end_token_id=last - 3, bos_token_id=1, eos_token_id=2)
    if family == "mistral3":  # a Mistral decoder, a Pixtral encoder; untied head, as Mistral Small 3.1
        return Mistral3Config(text_config=dict(model_type="mistral", head_dim=8, **text),
                              vision_config=dict(model_type="pixtral", hidden_size=hidden, intermediate_size=hidden * 2,
                                                 num_hidden_layers=VLM_VISION_LAYERS, num_attention_heads=4, head_dim=8,
                                                 image_size=32, patch_size=8),
                              image_token_index=last, spatial_merge_size=2, tie_word_embeddings=False)
    if family == "gemma3":
        return Gemma3Config(text_config=dict(head_dim=8, sliding_window=16, **text),
                            vision_config=dict(hidden_size=hidden, intermediate_size=hidden * 2,
                                               num_hidden_layers=VLM_VISION_LAYERS, num_attention_heads=4,
                                               image_size=32, patch_size=8, vision_use_head=False),
                            mm_tokens_per_image=4, image_token_index=last, boi_token_index=last - 1,
                            eoi_token_index=last - 2)
    raise ValueError(family)


def make_vlm(path: Path, family: str, seed: int = 0, base: Path | None = None, noise: float = 0.02) -> Path:
    """Save a tiny random vision-language model at `path` with the char tokenizer; with `base`, a fine-tune-like
    perturbation of it. A LLaVA base also gets its processor files (preprocessor_config.json from a CLIP image
    processor, processor_config.json, chat_template.json), as hub LLaVA checkpoints have."""
    from transformers import AutoModelForImageTextToText

    _save_tiny(AutoModelForImageTextToText, path, lambda: tiny_vlm_config(family), seed, base, noise)
    if family == "llava" and base is None:
        import json

        from transformers import CLIPImageProcessorPil, LlavaProcessor

        images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        images.save_pretrained(str(path))
        LlavaProcessor(image_processor=images, tokenizer=char_tokenizer(), patch_size=8).save_pretrained(str(path))
        (path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    return path


def vlm_prompt(family: str, config, seed: int = 0) -> dict:
    """A model's inputs for a 5-token prompt with one random image after its second token, as each family's
    processor gives them: LLaVA a 32x32 image of 16 patches (16 image tokens); Qwen2-VL / 2.5-VL 4x4 patches of
    4 pixels (flattened, with their grid and M-RoPE's token types), merged 2x2 into 4 tokens; Mistral3 a 32x32
    image of 4x4 patches of 8 pixels, merged 2x2 into 4 tokens. Gemma3: the text alone."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    if family == "llava":
        n, image = 16, {"pixel_values": torch.randn(1, 3, 32, 32, generator=g)}
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        n, image = 4, {"pixel_values": torch.randn(16, 3 * 2 * 4 * 4, generator=g),
                       "image_grid_thw": torch.tensor([[1, 4, 4]]),
                       "mm_token_type_ids": torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0]])}
    elif family == "mistral3":
        n, image = 4, {"pixel_values": torch.randn(1, 3, 32, 32, generator=g), "image_sizes": torch.tensor([[32, 32]])}
    else:
        return {"input_ids": ids}
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    return {"input_ids": torch.cat([ids[:, :2], torch.full((1, n), image_id), ids[:, 2:]], dim=1), **image}
