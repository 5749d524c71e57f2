"""The storage path: history.jsonl (one line per scored candidate, appended and fsynced
as soon as that candidate finishes), state.json (written after every generation), the
search definition it was started with, and the exported results. Only this module
writes there.

One search at a time: `open()` takes an exclusive lock (fcntl) on `.evomerge.lock`,
which records the holder (pid, host, start time) for the error the second one gets.
`scratch/` (on-disk candidates) belongs to the lock holder: whatever a killed run left
there is removed by the next one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import yaml
from pydantic import ValidationError

from .config import EvolveConfig
from .record import Candidate, RecordError

log = logging.getLogger(__name__)
LOCK_NAME = ".evomerge.lock"


class StorageLocked(ValueError):
    """Another process holds the storage path."""


class Storage:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.history_file = self.path / "history.jsonl"
        self.state_file = self.path / "state.json"
        self.search_file = self.path / "search.yml"
        self.scratch = self.path / "scratch"
        self._lock: IO[str] | None = None
        self.listeners: list[Callable[[Candidate], None]] = []  # told of each candidate once it is on disk

    def has_run(self) -> bool:
        return self.history_file.exists() or self.state_file.exists()

    @contextmanager
    def open(self, config: EvolveConfig, run_settings: dict[str, Any], resume: bool) -> Iterator[Storage]:
        """Lock the storage path for this process, check it (new search or --resume of the same one), clear
        a killed run's scratch space; unlock on exit."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--storage-path {self.path} is a file; choose a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._acquire()
        try:
            self._start(config, run_settings, resume)
            shutil.rmtree(self.scratch, ignore_errors=True)  # left by a killed run; ours alone under the lock
            yield self
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self._release()

    def _acquire(self) -> None:
        f = open(self.path / LOCK_NAME, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            f.close()
            raise StorageLocked(f"--storage-path {self.path} is in use by another mergekit-evolve ({holder}); "
                                "wait for it to finish, stop it, or choose another --storage-path") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.flush()
        self._lock = f

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.seek(0)
            self._lock.truncate()
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _start(self, config: EvolveConfig, run_settings: dict[str, Any], resume: bool) -> None:
        stored = {"search": config.model_dump(mode="json"), "run": run_settings}
        if self.has_run():
            if not resume:
                raise ValueError(f"{self.path} already holds a search; pass --resume to continue it, or choose "
                                 "another --storage-path")
            previous = yaml.safe_load(self.search_file.read_text()) if self.search_file.exists() else None
            if not same_search(previous, config, run_settings):
                raise ValueError(f"--resume: {self.search_file} differs from this search (definition, seed, "
                                 "popsize or sigma0 changed); resume with the same settings or use a new path")
            return
        self.write_text("search.yml", yaml.safe_dump(stored, sort_keys=False))

    def load_history(self) -> list[Candidate]:
        """Every readable record. A damaged line (bad JSON, `{}`, missing keys) is reported with its line
        number and skipped; the records after it are kept. A last line cut short by a crash is removed
        from the file (its candidate is scored again), so later appends start on a fresh line."""
        if not self.history_file.exists():
            return []
        text = self.history_file.read_text()
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            torn = lines.pop()
            log.warning("warning: %s line %d was cut short (the run was killed while writing it); removed, "
                        "its candidate will be scored again", self.history_file, len(lines) + 1)
            self.write_text(self.history_file.name, text[:len(text) - len(torn)])
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(Candidate.from_json(json.loads(line)))
            except (ValueError, RecordError) as e:  # json.JSONDecodeError is a ValueError
                log.warning("warning: %s line %d skipped: %s", self.history_file, number, str(e).splitlines()[0])
        return records

    def append(self, candidate: Candidate) -> None:
        """One line per candidate, on disk (fsync) before the next candidate is handled."""
        with open(self.history_file, "a") as f:
            f.write(json.dumps(candidate.to_json()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for listener in self.listeners:
            listener(candidate)

    def write_text(self, name: str, text: str) -> Path:
        """Write atomically (temp file, fsync, then rename)."""
        target = self.path / name
        tmp = target.with_name(f".{target.name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(target)
        return target

    def write_state(self, state: dict[str, Any]) -> None:
        self.write_text("state.json", json.dumps(state, indent=2))


def same_search(previous: Any, config: EvolveConfig, run_settings: dict[str, Any]) -> bool:
    """Whether a stored search.yml describes this search. Compared as validated definitions, so a field a
    later version added (with its default) does not block resuming a search an earlier version started."""
    if not isinstance(previous, dict) or previous.get("run") != run_settings:
        return False
    try:
        return EvolveConfig.model_validate(previous.get("search")) == config
    except ValidationError:
        return False
