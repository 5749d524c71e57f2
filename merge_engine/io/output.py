"""Where a merged model goes: checks before merging, a lock, and an atomic switch.

The rules (README, "mergekit-yaml output"):

- OUT_DIR absent: the model is built in a sibling ``.NAME.partial-XXXX`` directory and renamed into
  place when complete (one rename: OUT_DIR is either absent or complete).
- OUT_DIR a previous evomerge output (it holds ``.evomerge-manifest.json``, the list of files evomerge
  wrote there), or an empty directory: the new files are built in ``OUT_DIR/.evomerge-partial-XXXX`` and
  moved over the old ones; files of the old manifest that the new model does not have (an old shard
  count) are removed; anything else in OUT_DIR is kept. A journal written before the first move lets the
  next run finish an interrupted switch.
- OUT_DIR a non-empty directory that evomerge did not write: refused, unless ``write_into_existing``
  (``--write-into-existing``), which writes into it as mergekit does: files of the same name are
  replaced (each one named in a warning), others are kept.
- Refused: ``.``, the current directory or any of its ancestors, an ancestor of the recipe, a file, a
  symlink, a path inside an input model or containing one.

A lock file ``.NAME.lock`` next to OUT_DIR (``fcntl.flock``, released by the kernel if the holder
dies) keeps two processes from writing one OUT_DIR. Every directory and file is created with the
process's umask. A partial directory records its owner (pid, host); the next run into the same OUT_DIR
removes those whose owner is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import interrupts

log = logging.getLogger(__name__)

MANIFEST = ".evomerge-manifest.json"
JOURNAL = ".evomerge-switch.json"
OWNER = ".evomerge-owner.json"
STAGING_PREFIX = ".evomerge-partial-"
FLAG = "--write-into-existing"


class OutputError(ValueError):
    """OUT_DIR cannot be written as asked; the message says why and what to do."""


@dataclass(frozen=True)
class OutputTarget:
    """What check_output decided about OUT_DIR, before any tensor is read."""

    path: Path                       # absolute, parents resolved (OUT_DIR itself is no symlink)
    exists: bool                     # an existing directory (empty, evomerge output, or foreign with the flag)
    previous: dict[str, int]         # the old manifest: file name -> size when written
    foreign: frozenset[str]          # names in OUT_DIR that evomerge did not write
    write_into_existing: bool

    @property
    def lock_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.lock"


# --- checks before merging -------------------------------------------------------------------------


def check_output(out_path: str | Path, *, inputs: Sequence[Path] = (), protected: Sequence[Path] = (),
                 write_into_existing: bool = False) -> OutputTarget:
    """Every rule about OUT_DIR that can be checked without merging; raises OutputError."""
    raw = str(out_path)
    path = Path(os.path.abspath(os.path.expanduser(raw)))
    cwd = Path.cwd().resolve()
    if os.path.islink(path):
        raise OutputError(f"OUT_DIR {raw} is a symlink to {os.readlink(path)}: replacing the link and writing "
                          "through it would both surprise someone; give the real directory instead")
    real = path.parent.resolve() / path.name
    if real == cwd or real in cwd.parents:
        what = "the current directory" if real == cwd else f"an ancestor of the current directory {cwd}"
        raise OutputError(f"OUT_DIR {raw} is {what}; give a new directory for the merged model, e.g. {raw}/merged")
    for p in protected:
        p = Path(p).resolve()
        if real in p.parents:
            raise OutputError(f"OUT_DIR {raw} contains the recipe {p}; write the model to another directory")
    for p in inputs:
        p = Path(p).resolve()
        if real == p or p in real.parents or real in p.parents:
            raise OutputError(f"OUT_DIR {raw} overlaps input model {p}; choose an output path outside every "
                              "input model")
    for parent in [real, *real.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == real else f"is inside {parent}, which is a file"
            raise OutputError(f"OUT_DIR {raw} {what}; give a directory path")
        if parent.exists():
            break
    nearest = next(p for p in real.parents if p.exists())  # will hold the lock, and the partial dir of a new OUT_DIR
    for anchor in [nearest, real] if real.exists() else [nearest]:
        if os.statvfs(anchor).f_flag & os.ST_RDONLY:
            raise OutputError(f"cannot write OUT_DIR {raw}: {anchor} is on a read-only file system; choose "
                              "OUT_DIR on a writable disk")
        if not os.access(anchor, os.W_OK):
            raise OutputError(f"cannot write OUT_DIR {raw}: no write permission on {anchor}; choose another "
                              "OUT_DIR or fix the permissions")
    if not real.exists():
        return OutputTarget(real, False, {}, frozenset(), write_into_existing)
    names = {n for n in os.listdir(real) if n == MANIFEST or not n.startswith(".evomerge-")}
    previous = _read_manifest(real) if MANIFEST in names else None
    if previous is None and MANIFEST in names:
        raise OutputError(f"{real / MANIFEST} is unreadable or not an evomerge manifest; remove it if the "
                          f"directory is yours, or choose another OUT_DIR")
    foreign = frozenset(names - set(previous or {}) - {MANIFEST})
    if foreign and previous is None and not write_into_existing:
        shown = ", ".join(sorted(foreign)[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputError(f"OUT_DIR {raw} is not empty ({shown}) and was not written by evomerge (no {MANIFEST}); "
                          f"choose another OUT_DIR, or pass {FLAG} to write into it as mergekit does "
                          "(files of the same name are replaced, the others kept)")
    return OutputTarget(real, True, previous or {}, foreign, write_into_existing)


def check_collisions(target: OutputTarget, names: Sequence[str]) -> None:
    """Refuse to replace a file evomerge did not write, unless the user passed the flag."""
    hit = sorted(set(names) & target.foreign)
    if hit and not target.write_into_existing:
        raise OutputError(f"OUT_DIR {target.path} already has {', '.join(hit)}, not written by evomerge; move "
                          f"them away, choose another OUT_DIR, or pass {FLAG} to replace them")


def free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_space(target: OutputTarget, needed: int) -> None:
    free = free_bytes(target.path)
    if needed > free:
        raise OutputError(f"not enough free space for OUT_DIR {target.path}: the model needs {_size(needed)} "
                          f"({needed} bytes), {_size(free)} ({free} bytes) are free there; free some space or "
                          "choose OUT_DIR on another disk")


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _read_manifest(out: Path) -> dict[str, int] | None:
    try:
        data = json.loads((out / MANIFEST).read_text())
        files = data["files"]
        if data.get("tool") != "evomerge" or not isinstance(files, dict):
            return None
        if not all(isinstance(k, str) and "/" not in k and isinstance(v, int) for k, v in files.items()):
            return None
        return files
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- the lock --------------------------------------------------------------------------------------


def _holder() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": _command_line()}


def _command_line() -> str:
    try:  # as typed (`python -m merge_engine.cli ...`), which sys.argv does not keep
        args = Path("/proc/self/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        return shlex.join(a.decode(errors="replace") for a in args)
    except OSError:
        return shlex.join(sys.argv)


@contextlib.contextmanager
def output_lock(target: OutputTarget) -> Iterator[None]:
    """Exclusive fcntl lock on OUT_DIR's lock file; the second writer gets an OutputError naming the first."""
    path = target.lock_path
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            raise OutputError(f"OUT_DIR {target.path} is being written by another process "
                              f"({_describe_holder(info)}); wait for it to finish or choose another OUT_DIR") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino  # not unlinked by a holder that just released it
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _describe_holder(info: str) -> str:
    try:
        h = json.loads(info)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has just started"


# --- owners of partial directories ------------------------------------------------------------------


def _proc_start(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _owner_alive(partial: Path) -> bool:
    try:
        owner = json.loads((partial / OWNER).read_text())
        pid, host, start = int(owner["pid"]), owner["host"], owner.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no owner record: left by a killed run (we hold OUT_DIR's lock)
    if host != socket.gethostname():
        return True  # cannot tell; keep it
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start is None or _proc_start(pid) == start


def _remove_stale_partials(target: OutputTarget) -> None:
    parent, name = target.path.parent, target.path.name
    candidates = list(parent.glob(f".{name}.partial-*"))
    if target.path.is_dir():
        candidates += list(target.path.glob(f"{STAGING_PREFIX}*"))
        for tmp in target.path.glob(".evomerge-*.tmp"):  # a manifest or journal half-written by a killed run
            tmp.unlink()
    for p in candidates:
        if not p.is_dir() or p.is_symlink():
            continue
        if _owner_alive(p):
            log.warning("leaving %s: its owner (see %s) is still running or on another host", p, p / OWNER)
            continue
        log.warning("removing %s, left by a run that was killed", p)
        shutil.rmtree(p, ignore_errors=True)


def _make_partial(where: Path, prefix: str) -> Path:
    """mkdir with the umask's permissions (tempfile.mkdtemp would make it 0700)."""
    while True:
        p = where / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(p, 0o777)
        except FileExistsError:
            continue
        (p / OWNER).write_text(json.dumps(_holder()))
        return p


# --- the switch ------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _written_files(staging: Path) -> dict[str, int]:
    files: dict[str, int] = {}
    for p in sorted(staging.iterdir()):
        if p.name == OWNER:
            continue
        if not p.is_file() or p.is_symlink():
            raise RuntimeError(f"unexpected non-file {p} in the staging directory")
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        files[p.name] = p.stat().st_size
    return files


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _manifest(files: dict[str, int]) -> dict:
    return {"tool": "evomerge", "files": files, "written": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _switch_new(staging: Path, final: Path) -> None:
    files = _written_files(staging)
    (staging / OWNER).unlink()
    _write_json_atomic(staging / MANIFEST, _manifest(files))
    _fsync_dir(staging)
    try:
        os.rename(staging, final)  # replaces an empty directory made meanwhile; never a non-empty one
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise OutputError(f"OUT_DIR {final} was created by someone else while merging; nothing was "
                              "written to it. Run again") from None
        raise
    _fsync_dir(final.parent)


def _switch_in_place(staging: Path, target: OutputTarget) -> None:
    files = _written_files(staging)
    replaced = sorted(set(files) & target.foreign)
    if replaced:
        check_collisions(target, replaced)
        log.warning("replacing %d file(s) in %s that evomerge did not write (%s): %s", len(replaced),
                    target.path, FLAG, ", ".join(replaced))
    stale = {n: s for n, s in target.previous.items() if n not in files}
    _write_json_atomic(target.path / JOURNAL, {"staging": staging.name, "files": files, "stale": stale})
    _fsync_dir(target.path)
    _finish_switch(target.path, staging, files, stale)


def _finish_switch(out: Path, staging: Path, files: dict[str, int], stale: dict[str, int]) -> None:
    """Move the staged files over the old ones, write the manifest, drop stale files and the journal.
    Idempotent: the next run calls it again when a journal is left behind."""
    for name in files:
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    _write_json_atomic(out / MANIFEST, _manifest(files))
    for name, size in stale.items():
        p = out / name
        if p.is_file() and not p.is_symlink() and p.stat().st_size == size:
            p.unlink()
        elif p.exists():
            log.warning("keeping %s: it was changed since evomerge wrote it", p)
    _fsync_dir(out)
    (out / JOURNAL).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def _recover_switch(out: Path) -> None:
    """Finish a switch that a killed run began (its staged files were complete)."""
    try:
        journal = json.loads((out / JOURNAL).read_text())
        staging = out / journal["staging"]
        files, stale = dict(journal["files"]), dict(journal["stale"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputError(f"{out / JOURNAL} (left by an interrupted run) is unreadable: {e}; remove it and "
                          "check OUT_DIR by hand") from None
    if not staging.name.startswith(STAGING_PREFIX) or staging.parent != out:
        raise OutputError(f"{out / JOURNAL} names an unexpected directory {staging}; remove it")
    log.warning("finishing the switch of %s that an interrupted run began", out)
    _finish_switch(out, staging, files, stale)


# --- putting it together ---------------------------------------------------------------------------


@contextlib.contextmanager
def output_directory(target: OutputTarget, needed_bytes: int = 0) -> Iterator[Path]:
    """Lock OUT_DIR, tidy what killed runs left, yield an empty staging directory to write the model
    into; on success switch it into place, on any error or interrupt remove it and leave OUT_DIR as it
    was. Disk full, read-only and permission errors become OutputErrors with the numbers."""
    committed = False
    try:
        _mkdirs(target.path.parent)
        with output_lock(target):
            if (target.path / JOURNAL).exists():
                _recover_switch(target.path)
            _remove_stale_partials(target)
            staging = (_make_partial(target.path, STAGING_PREFIX) if target.exists else
                       _make_partial(target.path.parent, f".{target.path.name}.partial-"))
            try:
                yield staging
                with interrupts.deferred():  # the switch is never cut short by a signal
                    if target.exists:
                        _switch_in_place(staging, target)
                    else:
                        _switch_new(staging, target.path)
                    committed = True
            except BaseException:
                if not committed:
                    shutil.rmtree(staging, ignore_errors=True)
                raise
    except KeyboardInterrupt as e:
        e.committed = committed  # type: ignore[attr-defined]
        raise
    except OSError as e:
        raise _explain(e, target, needed_bytes) from None


def _mkdirs(path: Path) -> None:
    """Create OUT_DIR's missing parents (with the umask's permissions)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot create {path}: a file is in the way") from None


def _is_output_path(p: Path, out: Path) -> bool:
    """OUT_DIR, a file in it, one of its parents, or its lock or partial directory."""
    if p == out or p in out.parents or p.is_relative_to(out):
        return True
    if not p.is_relative_to(out.parent):
        return False
    return p.relative_to(out.parent).parts[0].startswith(f".{out.name}.")


def _explain(e: OSError, target: OutputTarget, needed: int) -> OutputError | OSError:
    where = e.filename or target.path
    if e.filename is not None and not _is_output_path(Path(os.path.abspath(e.filename)), target.path):
        return e  # about an input file: not ours to explain
    if e.errno == errno.ENOSPC:
        free = free_bytes(target.path)
        return OutputError(f"no space left on the device while writing {where}: the model needs {_size(needed)} "
                           f"({needed} bytes), {_size(free)} ({free} bytes) are free now that the partial output "
                           "is removed; free some space or choose OUT_DIR on another disk")
    if e.errno == errno.EROFS:
        return OutputError(f"cannot write {where}: read-only file system; choose OUT_DIR on a writable disk")
    if e.errno in (errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write {where}: permission denied; choose OUT_DIR in a directory you can "
                           "write, or fix its permissions")
    if e.errno == errno.ENOTDIR:
        return OutputError(f"cannot create {where}: a part of the path is a file, not a directory")
    if e.errno == errno.EDQUOT:
        return OutputError(f"cannot write {where}: disk quota exceeded (the model needs {needed} bytes)")
    return e
