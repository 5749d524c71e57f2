"""--upload / --private / --json / --version of mergekit-yaml, end to end through the console script,
against a stand-in Hub on 127.0.0.1 (tests/hub_standin.py): never the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factory import make_model
from tests.hub_standin import HubStandIn

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merge_engine.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("publish")
    base = make_model(root / "base", seed=0)
    a = make_model(root / "a", seed=1, base=base)
    path = root / "recipe.yml"
    path.write_text(f"# uploaded\nmerge_method: task_arithmetic\nbase_model: {base}\n"
                    f"models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n")
    return path


@pytest.mark.slow
def test_upload_pushes_every_file_to_a_private_repo(recipe, tmp_path):
    out = tmp_path / "merged"
    with HubStandIn() as hub:
        proc = _run([str(recipe), str(out), "--no-progress", "--upload", "me/tiny-merge", "--private", "--json"],
                    _env(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_TOKEN="hf_standin_token"))
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        repo = hub.repos["me/tiny-merge"]
        assert repo["private"] is True
        local = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert repo["files"] == local  # every file, byte for byte, in one commit
        assert len(repo["commits"]) == 1
        assert any({k.lower(): v for k, v in h.items()}.get("authorization") == "Bearer hf_standin_token"
                   for h in hub.headers_seen)
    assert {"model.safetensors", "config.json", "README.md", "mergekit_config.yml"} <= set(local)
    assert summary["output_path"] == str(out.resolve())
    assert summary["uploaded"].startswith("http://127.0.0.1/me/tiny-merge/commit/")
    assert summary["tensors"] > 10 and summary["bytes"] == (out / "model.safetensors").stat().st_size
    assert summary["seconds"] > 0 and summary["peak_rss_mib"] > 50


@pytest.mark.slow
def test_upload_refused_before_merging_when_offline_or_malformed(recipe, tmp_path):
    out = tmp_path / "merged"
    proc = _run([str(recipe), str(out), "--upload", "me/x"], _env(HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2 and "HF_HUB_OFFLINE" in proc.stderr
    proc = _run([str(recipe), str(out), "--upload", "no-owner"], _env(HF_HUB_OFFLINE="0"))
    assert proc.returncode == 2 and "owner/name" in proc.stderr
    assert not out.exists()  # nothing merged, nothing written


@pytest.mark.slow
def test_upload_failure_keeps_the_model_and_says_how_to_retry(recipe, tmp_path):
    out = tmp_path / "merged"
    with HubStandIn() as hub:
        hub.server.RequestHandlerClass.do_POST = lambda self: self._reply(403, {"error": "Forbidden: bad token"})
        proc = _run([str(recipe), str(out), "--no-progress", "--upload", "me/m"],
                    _env(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_TOKEN="hf_bad"))
    assert proc.returncode == 1
    assert "hf upload me/m" in proc.stderr and (out / "model.safetensors").exists()


def test_version_of_both_commands(capsys):
    from importlib.metadata import version

    from evolve.cli import main as evolve_main
    from merge_engine.cli import main as yaml_main

    for main, prog in ((yaml_main, "mergekit-yaml"), (evolve_main, "mergekit-evolve")):
        with pytest.raises(SystemExit) as e:
            main(["--version"])
        assert e.value.code == 0
        assert capsys.readouterr().out.strip() == f"{prog} {version('evomerge')}"


def test_evolve_without_its_extra_says_what_to_install(monkeypatch, tmp_path, capsys):
    from evolve import extra
    from evolve.cli import main as evolve_main

    real = extra.installed
    monkeypatch.setattr(extra, "installed", lambda dist: dist not in ("cma", "ray") and real(dist))
    assert evolve_main(["search.yml", "--storage-path", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "cma, ray" in err and "pip install 'evomerge[evolve]'" in err
    assert not (tmp_path / "s").exists()
