"""Atomic output directories: build in a sibling temp dir, rename into place."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def check_not_an_input(out_path: Path, inputs: list[Path]) -> None:
    out = out_path.resolve()
    for p in inputs:
        p = p.resolve()
        if out == p or p in out.parents or out in p.parents:
            raise ValueError(f"output directory {out_path} overlaps input model {p}; "
                             "choose an output path outside every input model")


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temp dir next to `final`; on success it replaces `final`
    (an existing `final` is moved aside first and removed after); on any error the
    temp dir is deleted and `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
