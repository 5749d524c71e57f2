"""mergekit-pytorch (merge_engine/raw.py): flat state-dict files merged tensor by tensor, on real files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from factory import MERGEKIT_VENV
from safetensors.torch import load_file, save_file

from merge_engine.cli import pytorch_main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    base = {"encoder.w": torch.randn(6, 4, generator=g), "head.w": torch.randn(3, 4, generator=g),
            "head.b": torch.randn(3, generator=g)}
    out = {}
    for name, seed in (("base", None), ("a", 1), ("b", 2)):
        state = base if seed is None else {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        out[name] = tmp_path / f"{name}.safetensors"
        save_file(state, str(out[name]))
    extra = load_file(str(out["a"])) | {"a_only.w": torch.ones(2)}
    out["a_extra"] = tmp_path / "a_extra.safetensors"
    save_file(extra, str(out["a_extra"]))
    return out


def recipe(tmp_path: Path, files, a="a", **extra) -> Path:
    r = {"merge_method": "task_arithmetic", "base_model": str(files["base"]),
         "models": [{"model": str(files[a]), "parameters": {"weight": [{"filter": "head", "value": 0.5},
                                                                       {"value": 1.0}]}},
                    {"model": str(files["b"]), "parameters": {"weight": 0.25}}], **extra}
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(r))
    return path


def merged(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def one_error(err: str, needle: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("mergekit-pytorch: error:")]
    assert len(lines) == 1 and needle in err and "Traceback" not in err, err


def test_task_arithmetic_per_tensor_with_filters(files, tmp_path, capsys):
    assert pytorch_main([str(recipe(tmp_path, files)), str(tmp_path / "out"), "--no-progress"]) == 0
    out = merged(tmp_path / "out")
    st = {k: load_file(str(files[k])) for k in ("base", "a", "b")}
    for name, wa in (("encoder.w", 1.0), ("head.w", 0.5), ("head.b", 0.5)):  # the filter hits head.*
        want = st["base"][name] + wa * (st["a"][name] - st["base"][name]) + 0.25 * (st["b"][name] - st["base"][name])
        torch.testing.assert_close(out[name], want, rtol=0, atol=1e-6)
    assert set(out) == {"encoder.w", "head.w", "head.b"}


def test_missing_tensors_error_intersection_union(files, tmp_path, capsys):
    r = recipe(tmp_path, files, a="a_extra")
    assert pytorch_main([str(r), str(tmp_path / "out"), "--no-progress"]) == 2
    one_error(capsys.readouterr().err, "tensor 'a_only.w' is missing from")
    assert not (tmp_path / "out").exists()
    assert pytorch_main([str(r), str(tmp_path / "inter"), "-i", "--no-progress"]) == 0
    assert "a_only.w" not in merged(tmp_path / "inter")
    # union: a_only.w is not in the base, which task_arithmetic needs
    assert pytorch_main([str(r), str(tmp_path / "union"), "-u", "--no-progress"]) == 2
    one_error(capsys.readouterr().err, "missing from the base model")
    lin = tmp_path / "lin.yml"
    lin.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(files["a_extra"])},
                                                                        {"model": str(files["b"])}]}))
    assert pytorch_main([str(lin), str(tmp_path / "lin"), "-u", "--no-progress"]) == 0
    out = merged(tmp_path / "lin")
    torch.testing.assert_close(out["a_only.w"], torch.ones(2))  # from the one file that has it
    torch.testing.assert_close(out["head.b"], (load_file(str(files["a"]))["head.b"] +
                                               load_file(str(files["b"]))["head.b"]) / 2)


def test_pickles_only_when_asked(files, tmp_path, capsys):
    pt = tmp_path / "a.pt"
    torch.save(load_file(str(files["a"])), pt)
    r = recipe(tmp_path, {**files, "a": pt})
    assert pytorch_main([str(r), str(tmp_path / "out"), "--no-progress"]) == 2
    one_error(capsys.readouterr().err, "pass --allow-pickle")
    assert pytorch_main([str(r), str(tmp_path / "out"), "--allow-pickle", "--no-progress"]) == 0
    assert pytorch_main([str(recipe(tmp_path, files)), str(tmp_path / "st"), "--no-progress"]) == 0
    a, b = merged(tmp_path / "out"), merged(tmp_path / "st")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_recipe_is_one_line(files, tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"merge_method": "tiez", "models": [{"model": str(files["a"])}]}))
    assert pytorch_main([str(bad), str(tmp_path / "out")]) == 2
    one_error(capsys.readouterr().err, "did you mean 'ties'")
    nofile = tmp_path / "nofile.yml"
    nofile.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(tmp_path / "nope.pt")}]}))
    assert pytorch_main([str(nofile), str(tmp_path / "out")]) == 2
    one_error(capsys.readouterr().err, "no such file")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (MERGEKIT_VENV / "bin" / "mergekit-pytorch").exists(),
                    reason="mergekit 0.1.5 venv not available (EVOMERGE_MERGEKIT_VENV)")
def test_same_tensors_as_mergekit(files, tmp_path):
    r = recipe(tmp_path, files)
    assert pytorch_main([str(r), str(tmp_path / "ours"), "--no-progress"]) == 0
    subprocess.run([str(MERGEKIT_VENV / "bin" / "mergekit-pytorch"), str(r), str(tmp_path / "theirs")], check=True,
                   capture_output=True)
    ours, theirs = merged(tmp_path / "ours"), merged(tmp_path / "theirs")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
