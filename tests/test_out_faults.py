"""Fault suite for mergekit-yaml's output and inputs (issue 7, merge side).

Every case asserts the message (exit 2, one `mergekit-yaml: error:` line, no traceback) and what is
left on disk: checksums of every file that was there before, and no partial directory or lock left
behind. Signals, locks and crashes use real processes (`python -m merge_engine.cli`); the cases that
only need the CLI's error handling call `main()` in-process to keep the suite fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from factory import make_model
from safetensors.torch import load_file, save_file

from merge_engine import interrupts
from merge_engine.cli import main as cli_main
from merge_engine.io import output

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# --- helpers ---------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root (hidden ones included); links by target."""
    out: dict[str, str] = {}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = ("link:" + os.readlink(p)) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def leftovers(parent: Path) -> list[str]:
    """Partial directories, lock files and staging directories evomerge may have left under parent."""
    found = []
    for p in parent.rglob("*"):
        if ".partial-" in p.name or p.name.endswith(".lock") or p.name.startswith(output.STAGING_PREFIX) \
                or p.name == output.JOURNAL:
            found.append(str(p.relative_to(parent)))
    return found


def write_recipe(path: Path, models: list[Path], **extra) -> Path:
    recipe = {"merge_method": "linear", "models": [{"model": str(m)} for m in models], **extra}
    path.write_text(yaml.safe_dump(recipe))
    return path


def one_error(text: str, *needles: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("mergekit-yaml: error:")]
    assert len(lines) == 1, text
    assert "Traceback" not in text, text
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def cli(capsys, *args: str) -> tuple[int, str]:
    code = cli_main([*map(str, args), "--no-progress"])
    return code, capsys.readouterr().err


def spawn(*args: str, cwd: Path | None = None, umask: int | None = None) -> subprocess.Popen:
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.Popen([sys.executable, "-m", "merge_engine.cli", *map(str, args), "--no-progress"],
                            env=ENV, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=pre)  # noqa: PLW1509 - the test starts no threads


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang: fail with every thread's stack (the CLI registers SIGUSR1)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"mergekit-yaml still running after {timeout} s; its threads:\n{err[-20000:]}")
    return proc.returncode, err


def stop_at(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll until predicate() holds, then SIGSTOP the process there (SIGCONT resumes it); fail if the
    process ends first (the chosen point was missed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            proc.send_signal(signal.SIGSTOP)
            return
        if proc.poll() is not None:
            pytest.fail(f"process ended before the chosen point: {proc.communicate()[1]}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail("timed out waiting for the chosen point")


def partial_with_shard(parent: Path, name: str) -> bool:
    for d in list(parent.glob(f".{name}.partial-*")) + list((parent / name).glob(f"{output.STAGING_PREFIX}*")):
        if any(d.glob("model-*.safetensors")):
            return True
    return False


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny base and fine-tune, and a medium pair (14 MB) whose merge lasts long enough to interrupt."""
    root = tmp_path_factory.mktemp("faultzoo")
    z = {"base": make_model(root / "base", "llama", seed=0, layers=2)}
    z["a"] = make_model(root / "a", base=z["base"], seed=1)
    z["big"] = make_model(root / "big", "llama", seed=2, layers=6, hidden=256)
    z["big_ft"] = make_model(root / "big_ft", base=z["big"], seed=3)
    return z


@pytest.fixture
def recipe(models, tmp_path) -> Path:
    return write_recipe(tmp_path / "recipe.yml", [models["base"], models["a"]])


@pytest.fixture
def big_recipe(models, tmp_path) -> Path:
    return write_recipe(tmp_path / "big.yml", [models["big"], models["big_ft"]])


# --- where the output may go -----------------------------------------------------------------------


def test_foreign_non_empty_dir_is_refused_then_written_into_with_the_flag(capsys, caplog, recipe, models,
                                                                         tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes").write_text("x")
    before = snapshot(out)
    code, err = cli(capsys, recipe, out)
    assert code == 2
    one_error(err, str(out), "is not empty (notes)", output.FLAG)
    assert snapshot(out) == before and leftovers(tmp_path) == []

    (out / "config.json").write_text('{"mine": 1}')

    code = cli_main([str(recipe), str(out), "--no-progress", output.FLAG])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (out / "notes").read_text() == "x"
    assert "config.json" in caplog.text and "evomerge did not write" in caplog.text  # the replaced file is named
    manifest = json.loads((out / output.MANIFEST).read_text())
    assert "notes" not in manifest["files"] and "config.json" in manifest["files"]
    assert torch.equal(weights(out)["lm_head.weight"],
                       (weights(models["base"])["lm_head.weight"] + weights(models["a"])["lm_head.weight"]) / 2)
    assert leftovers(tmp_path) == []


def test_previous_output_is_replaced_user_files_kept_stale_shards_removed(capsys, recipe, models, tmp_path):
    out = tmp_path / "out"
    assert cli(capsys, recipe, out, "--out-shard-size", "20K")[0] == 0
    old_shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(old_shards) > 1
    (out / "my_eval.txt").write_text("results")
    single = write_recipe(tmp_path / "single.yml", [models["a"]])
    code, err = cli(capsys, single, out)
    assert code == 0, err
    assert (out / "my_eval.txt").read_text() == "results"
    assert sorted(p.name for p in out.glob("model*.safetensors*")) == ["model.safetensors"]
    manifest = json.loads((out / output.MANIFEST).read_text())["files"]
    assert set(manifest) == {p.name for p in out.iterdir()} - {"my_eval.txt", output.MANIFEST}
    assert torch.equal(weights(out)["lm_head.weight"], weights(models["a"])["lm_head.weight"])
    assert leftovers(tmp_path) == []


def test_empty_existing_dir_is_written_into(capsys, recipe, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    code, err = cli(capsys, recipe, out)
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and (out / output.MANIFEST).is_file()


def test_dot_cwd_ancestors_and_recipe_dir_are_refused(capsys, recipe, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep").write_text("k")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    for target, needle in [(".", "current directory"), (str(work), "current directory"),
                           (str(tmp_path), "ancestor of the current directory"),
                           (str(recipe.parent), "ancestor of the current directory")]:
        code, err = cli(capsys, recipe, target)
        assert code == 2
        one_error(err, needle)
    monkeypatch.chdir(REPO)
    code, err = cli(capsys, recipe, recipe.parent)
    assert code == 2
    one_error(err, "contains the recipe")
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []
    assert list(tmp_path.parent.glob(f".{tmp_path.name}.*")) == []


def test_file_symlink_parent_file_and_inside_input_are_refused(capsys, recipe, models, tmp_path):
    f = tmp_path / "afile"
    f.write_text("data")
    real = tmp_path / "real"
    real.mkdir()
    (real / "x").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(real)
    before, before_models = snapshot(tmp_path), snapshot(models["a"])
    cases = [(f, "is a file"), (link, "is a symlink"), (f / "sub", "which is a file"),
             (models["a"] / "merged", "overlaps input model"), (models["a"].parent, "overlaps input model")]
    for target, needle in cases:
        code, err = cli(capsys, recipe, target)
        assert code == 2, target
        one_error(err, needle)
    assert snapshot(tmp_path) == before and snapshot(models["a"]) == before_models
    assert leftovers(tmp_path) == [] and leftovers(models["a"].parent) == []


@pytest.mark.slow
def test_output_follows_the_umask(recipe, tmp_path):
    out = tmp_path / "out"
    code, err = finish(spawn(recipe, out, umask=0o027))
    assert code == 0, err
    assert out.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o640}


# --- recipe and input problems ------------------------------------------------------------------------


def test_recipe_that_is_a_directory_or_not_text(capsys, tmp_path):
    code, err = cli(capsys, tmp_path, tmp_path / "out")
    assert code == 2
    one_error(err, str(tmp_path), "is a directory")
    binary = tmp_path / "r.yml"
    binary.write_bytes(b"\xff\xfe\x00merge")
    code, err = cli(capsys, binary, tmp_path / "out")
    assert code == 2
    one_error(err, str(binary), "not UTF-8")
    assert not (tmp_path / "out").exists()


def test_weight_1e_minus_3_is_a_float(capsys, models, tmp_path):
    r = tmp_path / "r.yml"
    r.write_text(f"merge_method: task_arithmetic\nbase_model: {models['base']}\n"
                 f"models:\n  - model: {models['a']}\n    parameters:\n      weight: 1e-3\n")
    code, err = cli(capsys, r, tmp_path / "out")
    assert code == 0, err
    base, a = weights(models["base"])["lm_head.weight"], weights(models["a"])["lm_head.weight"]
    got = weights(tmp_path / "out")["lm_head.weight"]
    assert torch.allclose(got, base + 0.001 * (a - base), atol=1e-7)
    assert not torch.allclose(got, base, atol=1e-6)  # the task vector was really applied


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _sharded(models, tmp_path: Path, name: str) -> Path:
    """A copy of model `a` as a two-file safetensors index."""
    m = _copy(models["a"], tmp_path / name)
    w = weights(m)
    (m / "model.safetensors").unlink()
    names = sorted(w)
    half = len(names) // 2
    save_file({n: w[n] for n in names[:half]}, str(m / "part1.safetensors"), metadata={"format": "pt"})
    save_file({n: w[n] for n in names[half:]}, str(m / "part2.safetensors"), metadata={"format": "pt"})
    index = {"weight_map": {n: ("part1.safetensors" if i < half else "part2.safetensors")
                            for i, n in enumerate(names)}}
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    return m


def _edit_index(m: Path, fn) -> None:
    p = m / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    fn(index)
    p.write_text(json.dumps(index))


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/evomerge-pickle-ran",))


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink_out", "bin_in_safetensors_index",
                                  "config_list", "weight_map_list", "weight_map_ints", "missing_shard"])
def test_bad_model_directories_are_refused(capsys, models, tmp_path, case):
    m = _sharded(models, tmp_path, "m")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(m / "part2.safetensors", outside)
    needle = {"dotdot": "outside the model directory", "absolute": "outside the model directory",
              "symlink_out": "outside the model directory", "bin_in_safetensors_index": "--allow-pickle",
              "config_list": "config.json", "weight_map_list": "weight_map", "weight_map_ints": "weight_map",
              "missing_shard": "part2.safetensors"}[case]
    first = min(json.loads((m / "model.safetensors.index.json").read_text())["weight_map"])
    if case == "dotdot":
        _edit_index(m, lambda ix: ix["weight_map"].update({first: "../outside.safetensors"}))
    elif case == "absolute":
        _edit_index(m, lambda ix: ix["weight_map"].update({first: str(outside)}))
    elif case == "symlink_out":
        (m / "part2.safetensors").unlink()
        (m / "part2.safetensors").symlink_to(outside)
    elif case == "bin_in_safetensors_index":
        torch.save({first: Boom()}, m / "evil.bin")
        _edit_index(m, lambda ix: ix["weight_map"].update({first: "evil.bin"}))
    elif case == "config_list":
        (m / "config.json").write_text("[1, 2]")
    elif case == "weight_map_list":
        _edit_index(m, lambda ix: ix.update({"weight_map": ["part1.safetensors"]}))
    elif case == "weight_map_ints":
        _edit_index(m, lambda ix: ix["weight_map"].update({first: 3}))
    elif case == "missing_shard":
        (m / "part2.safetensors").unlink()
    before = snapshot(tmp_path)
    r = write_recipe(tmp_path / "r.yml", [m, models["a"]])
    Path("/tmp/evomerge-pickle-ran").unlink(missing_ok=True)
    code, err = cli(capsys, r, tmp_path / "out")
    assert code == 2
    line = one_error(err, needle)
    assert "'" + str(m) + "'" in line or str(m) in line  # names the model
    assert not Path("/tmp/evomerge-pickle-ran").exists()
    after = snapshot(tmp_path)
    after.pop("r.yml")
    assert after == before and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_hf_cache_snapshot_links_into_blobs_are_accepted(capsys, models, tmp_path):
    repo = tmp_path / "hub" / "models--x--y"
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in models["a"].iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.name.encode()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    code, err = cli(capsys, write_recipe(tmp_path / "r.yml", [snap]), tmp_path / "out")
    assert code == 0, err
    assert torch.equal(weights(tmp_path / "out")["lm_head.weight"], weights(models["a"])["lm_head.weight"])


@pytest.mark.parametrize("case", ["no_tokenizer", "bad_template", "remote_code", "broken_tokenizer"])
def test_tokenizer_problems_are_found_before_merging(capsys, models, tmp_path, monkeypatch, case):
    m = _copy(models["a"], tmp_path / "m")
    extra: dict = {"tokenizer_source": str(m)}
    if case == "no_tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (m / f).unlink(missing_ok=True)
        needle = "no tokenizer files"
    elif case == "bad_template":
        extra["chat_template"] = "{% for m in messages %}{{ m.content }"
        needle = "chat_template"
    elif case == "remote_code":
        cfg = json.loads((m / "tokenizer_config.json").read_text())
        cfg["auto_map"] = {"AutoTokenizer": ["tok.MyTok", None]}
        (m / "tokenizer_config.json").write_text(json.dumps(cfg))
        needle = "--trust-remote-code"
    else:
        (m / "tokenizer.json").write_text("{not json")
        needle = "does not load"
    r = write_recipe(tmp_path / "r.yml", [models["base"], m], **extra)
    read = []
    monkeypatch.setattr("merge_engine.io.loader.ModelSource.get",
                        lambda self, name: read.append(name))  # would fail the merge if ever reached
    code, err = cli(capsys, r, tmp_path / "out")
    assert code == 2
    one_error(err, needle)
    assert read == [] and not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# --- disk full, read-only --------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs (root only); yields a mount function so that options can vary."""
    mounts: list[Path] = []

    def mount(opts: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        d = tmp_path / f"mnt{len(mounts)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True,
                           check=False)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounts.append(d)
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", str(d)], check=False)


def test_disk_full_is_found_before_writing(capsys, big_recipe, tmpfs):
    disk = tmpfs("size=2m")
    (disk / "mine.txt").write_text("keep me")
    before = snapshot(disk)
    code, err = cli(capsys, big_recipe, disk / "out")
    assert code == 2
    line = one_error(err, "not enough free space", "bytes")
    needed, free = [int(w.strip("(")) for w in line.split() if w.strip("(").isdigit()][:2]
    assert needed > 14_000_000 and free <= 2 * 1024 * 1024
    assert snapshot(disk) == before


def test_disk_full_while_writing_reports_both_numbers_and_cleans_up(capsys, big_recipe, tmpfs, monkeypatch):
    disk = tmpfs("size=2m")
    (disk / "mine.txt").write_text("keep me")
    before = snapshot(disk)
    # as if the disk filled meanwhile
    monkeypatch.setattr("merge_engine.merge.check_space", lambda target, needed: None)
    code, err = cli(capsys, big_recipe, disk / "out")
    assert code == 2
    line = one_error(err, "no space left", "bytes")
    numbers = [int(w.strip("(")) for w in line.split() if w.strip("(").isdigit()]
    assert numbers[0] > 14_000_000 and numbers[1] > 2 * 1024 * 1024 - 100_000  # the partial output was freed
    assert snapshot(disk) == before


def test_read_only_target(capsys, recipe, tmpfs):
    disk = tmpfs("size=1m,ro")
    code, err = cli(capsys, recipe, disk / "out")
    assert code == 2
    one_error(err, "read-only file system", str(disk))
    assert snapshot(disk) == {}


# --- real processes: locks, signals, crashes -------------------------------------------------------------


@pytest.mark.slow
def test_two_merges_into_one_out_dir(big_recipe, tmp_path):
    out = tmp_path / "out"
    first = spawn(big_recipe, out, "--out-shard-size", "200K")
    stop_at(lambda: partial_with_shard(tmp_path, "out"), first)  # holds the lock, paused mid-write
    code2, err2 = finish(spawn(big_recipe, out))
    first.send_signal(signal.SIGCONT)
    code1, err1 = finish(first)
    assert code1 == 0, err1
    assert code2 == 2
    one_error(err2, "being written by another process", f"pid {first.pid}", "merge_engine.cli")
    assert len(list(out.glob("model-*.safetensors"))) > 1 and leftovers(tmp_path) == []


def test_a_signal_inside_a_deferred_region_waits_for_the_chosen_point():
    """The executor's threads must never see an exception raised mid-bookkeeping: inside deferred() a
    signal is recorded and raised at check() (or the region's end); outside, at once."""
    reached = []
    with interrupts.handled():
        with pytest.raises(interrupts.Terminated), interrupts.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler has run by now, and only recorded the signal
            reached.append("after the signal")
            interrupts.check()
            reached.append("after check")
        assert reached == ["after the signal"] and interrupts.received() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt), interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            reached.append("end of region")
        assert reached[-1] == "end of region"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # outside a region the signal interrupts at once
            reached.append("not reached")
    assert reached[-1] == "end of region"
    assert signal.getsignal(signal.SIGTERM) is not interrupts._handler  # restored


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_clean_up_with_one_line(big_recipe, recipe, tmp_path, sig, code):
    out = tmp_path / "out"
    assert cli_main([str(recipe), str(out), "--no-progress"]) == 0  # a previous output, to be kept as it was
    (out / "notes").write_text("mine")
    before = snapshot(out)
    proc = spawn(big_recipe, out, "--out-shard-size", "200K")
    stop_at(lambda: partial_with_shard(tmp_path, "out"), proc)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    rc, err = finish(proc)
    assert rc == code
    one_error(err, "interrupted", "as it was before")
    assert snapshot(out) == before and leftovers(tmp_path) == []


@pytest.mark.slow
def test_sigkill_leaves_a_partial_that_the_next_run_removes(big_recipe, recipe, models, tmp_path):
    out = tmp_path / "out"
    proc = spawn(big_recipe, out, "--out-shard-size", "200K")
    stop_at(lambda: partial_with_shard(tmp_path, "out"), proc)
    proc.kill()
    proc.wait()
    assert not out.exists()
    stale = list(tmp_path.glob(".out.partial-*"))
    assert len(stale) == 1 and json.loads((stale[0] / output.OWNER).read_text())["pid"] == proc.pid
    code, err = finish(spawn(recipe, out))  # the next run, in a new process
    assert code == 0, err
    assert "removing" in err and stale[0].name in err
    assert leftovers(tmp_path) == []
    assert torch.equal(weights(out)["lm_head.weight"],
                       (weights(models["base"])["lm_head.weight"] + weights(models["a"])["lm_head.weight"]) / 2)


def test_partial_of_a_live_process_is_kept(capsys, recipe, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = output._make_partial(tmp_path, ".out.partial-")
        info = json.loads((live / output.OWNER).read_text())
        (live / output.OWNER).write_text(json.dumps({**info, "pid": sleeper.pid,
                                                     "start": output._proc_start(sleeper.pid)}))
        dead = tmp_path / ".out.partial-dead"
        dead.mkdir()
        (dead / output.OWNER).write_text(json.dumps({**info, "pid": 2**22 + 7}))
        code, err = cli(capsys, recipe, tmp_path / "out")
        assert code == 0, err
        assert live.is_dir() and not dead.exists()
    finally:
        sleeper.kill()


KILL_IN_SWITCH = """
import os, signal, sys
from merge_engine.io import output
moves = []
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if output.STAGING_PREFIX in str(src):
        moves.append(dst)
        if len(moves) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
output.os.replace = replace
from merge_engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_in_the_switch_is_finished_by_the_next_run(recipe, models, tmp_path):
    out = tmp_path / "out"
    assert cli_main([str(recipe), str(out), "--out-shard-size", "20K", "--no-progress"]) == 0
    (out / "notes").write_text("mine")
    single = write_recipe(tmp_path / "single.yml", [models["a"]])
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SWITCH, str(single), str(out), "--no-progress"],
                          env=ENV, capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / output.JOURNAL).is_file()  # the switch is recorded as begun
    again = write_recipe(tmp_path / "again.yml", [models["base"]])
    code, err = finish(spawn(again, out))
    assert code == 0, err
    assert "finishing the switch" in err
    assert (out / "notes").read_text() == "mine"
    assert sorted(p.name for p in out.glob("model*.safetensors*")) == ["model.safetensors"]
    assert torch.equal(weights(out)["lm_head.weight"], weights(models["base"])["lm_head.weight"])
    assert leftovers(tmp_path) == []
