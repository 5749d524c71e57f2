"""Loader for the bundled tasks' local JSONL data (used via `custom_dataset`)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

DATA = Path(__file__).parent / "data"


def load_local(name: str, **_: object) -> datasets.DatasetDict:
    return load_splits(name, ("train", "validation", "test"), generator="generate_data.py")


def load_addition(**kwargs: object) -> datasets.DatasetDict:
    return load_local("addition")


def load_reversal(**kwargs: object) -> datasets.DatasetDict:
    return load_local("reversal")


def load_subtraction(**kwargs: object) -> datasets.DatasetDict:
    return load_local("subtraction")


def load_sorting(**kwargs: object) -> datasets.DatasetDict:
    return load_local("sorting")


def load_splits(name: str, splits: tuple[str, ...], generator: str | None = None) -> datasets.DatasetDict:
    """The given splits of a task's JSONL data (the worked example has no train split); a missing file
    names the script that makes it (default: make_<name>.py)."""
    out = {}
    for split in splits:
        path = DATA / f"{name}.{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"task data {path} is missing; run `python tasks/{generator or f'make_{name}.py'}`")
        out[split] = datasets.Dataset.from_list([json.loads(line) for line in path.read_text().splitlines()])
    return datasets.DatasetDict(out)


def load_subtraction_choice(**kwargs: object) -> datasets.DatasetDict:
    return load_splits("subtraction_choice", ("validation", "test"))
