"""The storage path: history.jsonl (one line per scored candidate, appended and flushed
as it is scored), state.json (written after every generation), the search definition
it was started with, and the exported results. Only this module writes there."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from .config import EvolveConfig


class Storage:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.history_file = self.path / "history.jsonl"
        self.state_file = self.path / "state.json"
        self.search_file = self.path / "search.yml"

    def has_run(self) -> bool:
        return self.history_file.exists() or self.state_file.exists()

    def start(self, config: EvolveConfig, run_settings: dict[str, Any], resume: bool) -> None:
        """Create the storage dir; on resume, check the search is the one stored there."""
        stored = {"search": config.model_dump(mode="json"), "run": run_settings}
        if self.has_run():
            if not resume:
                raise ValueError(f"{self.path} already holds a search; pass --resume to continue it, or choose "
                                 "another --storage-path")
            previous = yaml.safe_load(self.search_file.read_text()) if self.search_file.exists() else None
            if previous != stored:
                raise ValueError(f"--resume: {self.search_file} differs from this search (definition, seed, "
                                 "popsize or sigma0 changed); resume with the same settings or use a new path")
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_text("search.yml", yaml.safe_dump(stored, sort_keys=False))

    def load_history(self) -> list[dict[str, Any]]:
        """Every complete record. A last line cut short by a crash is dropped from the file (its candidate
        is scored again), so later appends start on a fresh line."""
        if not self.history_file.exists():
            return []
        text = self.history_file.read_text()
        records, kept = [], 0
        for line in text.splitlines(keepends=True):
            try:
                if not line.endswith("\n"):
                    raise ValueError("incomplete line")
                records.append(json.loads(line))
            except ValueError:
                break
            kept += len(line)
        if kept < len(text):
            self.write_text(self.history_file.name, text[:kept])
        return records

    def append(self, record: dict[str, Any]) -> None:
        with open(self.history_file, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_text(self, name: str, text: str) -> Path:
        """Write atomically (temp file, then rename)."""
        target = self.path / name
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        tmp.replace(target)
        return target

    def write_state(self, state: dict[str, Any]) -> None:
        self.write_text("state.json", json.dumps(state, indent=2))
