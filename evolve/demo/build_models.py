"""Train the demo's models on CPU, deterministically, and save them as ordinary
Hugging Face model directories:

    <cache>/base        a tiny Llama pretrained on a copying mixture (`12+34|` -> `12+34`,
                        `abc|` -> `abc`) with the addition data and a little reversal data
    <cache>/addition    the base fine-tuned on addition only
    <cache>/reversal    the base fine-tuned on string reversal only

Models already present (with a matching build stamp) are reused.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .tokenizer import EOS_ID, PAD_ID, VOCAB_SIZE, char_tokenizer

TASKS_DATA = Path(__file__).resolve().parents[2] / "tasks" / "data"
DEFAULT_CACHE = Path(".cache") / "demo_models"
RECIPE: dict[str, Any] = {  # bump "version" whenever the training code changes, so stale caches are rebuilt
    "version": 4, "hidden": 128, "layers": 4, "heads": 4, "intermediate": 384, "batch": 64, "seed": 0,
    # base: copying, all of the addition data and a sliver of reversal: middling at both tasks
    "base_steps": 1500, "lr": 3e-3, "base_addition": 6000, "base_reversal": 300,
    # specialists: short fine-tunes; their task vectors interfere a little (uniform merges lose some of
    # each skill), not so much that no merge keeps both
    "addition_steps": 400, "addition_lr": 1e-3, "reversal_steps": 200, "reversal_lr": 1e-3,
}
# bench/search_quality.py's second pair, trained the same way; never used to choose any search setting
SECOND_RECIPE: dict[str, Any] = {
    **{k: v for k, v in RECIPE.items() if not k.startswith(("base_addition", "base_reversal", "addition_",
                                                             "reversal_"))},
    "base_subtraction": 6000, "base_sorting": 300,
    "subtraction_steps": 400, "subtraction_lr": 1e-3, "sorting_steps": 200, "sorting_lr": 1e-3,
}
PAIRS: dict[str, tuple[tuple[str, str], dict[str, Any]]] = {  # name -> (the two tasks, training recipe)
    "demo": (("addition", "reversal"), RECIPE),
    "second": (("subtraction", "sorting"), SECOND_RECIPE),
}


def load_train(name: str) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (TASKS_DATA / f"{name}.train.jsonl").read_text().splitlines()]
    return [(r["prompt"], r["answer"]) for r in rows]


def batch_tensors(tok, examples: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels; the loss covers the answer and the EOS token only."""
    seqs, labels = [], []
    for prompt, answer in examples:
        p = tok(prompt, add_special_tokens=False).input_ids
        a = tok(answer, add_special_tokens=False).input_ids + [EOS_ID]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD_ID)
    lab = torch.full((len(seqs), width), -100)
    for i, (s, label) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(label)] = torch.tensor(label)
    return ids, lab


def train(model, tok, data: list[tuple[str, str]], steps: int, lr: float, seed: int, label: str) -> None:
    """AdamW with warm-up and linear decay; the loss covers answer tokens only."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps))
    model.train()
    t0 = time.time()
    for step in range(steps):
        ids, labels = batch_tensors(tok, rng.sample(data, RECIPE["batch"]))
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"  [{label}] step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()


def greedy_accuracy(model, tok, name: str, split: str = "validation", n: int = 100) -> float:
    rows = [json.loads(line) for line in (TASKS_DATA / f"{name}.{split}.jsonl").read_text().splitlines()][:n]
    correct = 0
    with torch.no_grad():
        for r in rows:
            ids = tok(r["prompt"], return_tensors="pt", add_special_tokens=False).input_ids
            out = model.generate(ids, max_new_tokens=len(r["answer"]), do_sample=False, pad_token_id=PAD_ID)
            correct += tok.decode(out[0, ids.shape[1]:]) == r["answer"]
    return correct / len(rows)


def stamp(name: str, pair: str = "demo") -> dict:
    """The settings a model depends on: a specialist is rebuilt when its own or the base's change."""
    tasks, recipe = PAIRS[pair]
    keys = [k for k in recipe if not k.startswith(tuple(f"{t}_" for t in tasks))]
    if name != "base":
        keys += [f"{name}_steps", f"{name}_lr"]
    return {k: recipe[k] for k in keys}


def save(model, tok, path: Path, pair: str = "demo") -> None:
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / "build.json").write_text(json.dumps(stamp(path.name, pair)))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def is_built(path: Path, pair: str = "demo") -> bool:
    built = path / "build.json"
    return built.exists() and json.loads(built.read_text()) == stamp(path.name, pair)


def build_models(cache_dir: Path = DEFAULT_CACHE, force: bool = False, pair: str = "demo") -> dict[str, Path]:
    """The pair's base and its two specialists (named after their tasks) under cache_dir."""
    tasks, recipe = PAIRS[pair]
    cache_dir = Path(cache_dir)
    paths = {name: cache_dir / name for name in ("base", *tasks)}
    if not force and all(is_built(p, pair) for p in paths.values()):
        return paths
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe["seed"])
    tok = char_tokenizer()
    data = {name: load_train(name) for name in tasks}
    rebuilt_base = force or not is_built(paths["base"], pair)
    if rebuilt_base:
        config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=recipe["hidden"], num_hidden_layers=recipe["layers"],
                             num_attention_heads=recipe["heads"], num_key_value_heads=recipe["heads"],
                             intermediate_size=recipe["intermediate"], max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
        base = LlamaForCausalLM(config)
        print("pretraining the base on the copying mixture", flush=True)
        copying = [(p[:-1] + "|", p[:-1]) for t in tasks for p, _ in data[t]]
        mixture = copying + [ex for t in tasks for ex in data[t][: recipe[f"base_{t}"]]]
        train(base, tok, mixture, recipe["base_steps"], recipe["lr"], recipe["seed"], "base")
        save(base, tok, paths["base"], pair)
    for i, name in enumerate(tasks):
        if force or not is_built(paths[name], pair) or rebuilt_base:
            torch.manual_seed(recipe["seed"] + i + 1)
            model = LlamaForCausalLM.from_pretrained(str(paths["base"]))
            print(f"fine-tuning the {name} specialist", flush=True)
            train(model, tok, data[name], recipe[f"{name}_steps"], recipe[f"{name}_lr"], recipe["seed"] + i + 1, name)
            save(model, tok, paths[name], pair)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m evolve.demo.build_models",
                                 description="Build (or reuse) the demo's base and specialist models.")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the models are kept")
    ap.add_argument("--force", action="store_true", help="retrain even if cached models exist")
    ap.add_argument("--report", action="store_true", help="print greedy accuracies on the validation split")
    ap.add_argument("--pair", choices=sorted(PAIRS), default="demo",
                    help="which task pair: demo (addition, reversal) or second (subtraction, sorting; "
                         "bench/search_quality.py)")
    args = ap.parse_args(argv)
    t0 = time.time()
    paths = build_models(args.cache_dir, args.force, args.pair)
    print(f"models ready in {time.time() - t0:.0f}s: {', '.join(str(p) for p in paths.values())}")
    if args.report:
        tok = char_tokenizer()
        for name, path in paths.items():
            model = LlamaForCausalLM.from_pretrained(str(path)).eval()
            accs = {t: greedy_accuracy(model, tok, t) for t in PAIRS[args.pair][0]}
            print(f"  {name:10s} " + "  ".join(f"{t} {a:.2f}" for t, a in accs.items()))


if __name__ == "__main__":
    main()
