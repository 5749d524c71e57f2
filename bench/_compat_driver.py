"""Runs many `mergekit-yaml RECIPE OUT` commands in one process (imports paid once).

    python _compat_driver.py {mergekit,evomerge} JOBS.json RESULTS.jsonl

JOBS.json: [{"id": ..., "recipe": path, "out": path, "args": [...]}]. Each job calls the
tool's own command-line entry point (mergekit: the click command of `mergekit-yaml`;
evomerge: merge_engine.cli.main) with [recipe, out, *args]; one JSON line per job with
ok, error (the exception, or the tool's stderr when it exits non-zero), log tail and seconds.
Run by bench/compat_mergekit.py: the mergekit side with the venv's python, the evomerge side
with PYTHONPATH at the repository being checked.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import time
import traceback
from pathlib import Path


def _run_mergekit(argv: list[str]) -> None:
    from mergekit.scripts.run_yaml import main

    main.main(args=argv, standalone_mode=False)


def _run_evomerge(argv: list[str]) -> None:
    from merge_engine.cli import main

    rc = main(argv)
    if rc:
        raise SystemExit(rc)


def main() -> None:
    tool, jobs_path, results_path = sys.argv[1:4]
    import torch

    torch.set_num_threads(1)
    run = _run_mergekit if tool == "mergekit" else _run_evomerge
    jobs = json.loads(Path(jobs_path).read_text())
    with open(results_path, "w") as results:
        for job in jobs:
            buf = io.StringIO()
            handler = logging.StreamHandler(buf)
            handler.setLevel(logging.WARNING)
            logging.getLogger().addHandler(handler)
            start = time.perf_counter()
            error = None
            try:
                with contextlib.redirect_stderr(buf):
                    run([job["recipe"], job["out"], *job["args"]])
            except SystemExit as e:
                error = f"exit {e.code}: " + buf.getvalue().strip()[-2000:]
            except BaseException as e:  # noqa: BLE001 - every failure is a result of the cell
                tb = traceback.extract_tb(e.__traceback__)
                where = f" (at {tb[-1].filename.split('site-packages/')[-1]}:{tb[-1].lineno})" if tb else ""
                error = f"{type(e).__name__}: {e}"[:2000] + where
            finally:
                logging.getLogger().removeHandler(handler)
            results.write(json.dumps({"id": job["id"], "ok": error is None, "error": error,
                                      "log": buf.getvalue()[-1500:], "seconds": time.perf_counter() - start}) + "\n")
            results.flush()


if __name__ == "__main__":
    main()
