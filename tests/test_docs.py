"""The README documents every method and every command-line option."""

from __future__ import annotations

from pathlib import Path

from evolve.cli import build_parser as evolve_parser
from merge_engine.cli import build_multi_parser as multi_parser
from merge_engine.cli import build_parser as merge_parser
from merge_engine.cli import build_pytorch_parser as pytorch_parser
from merge_engine.cli import build_surgeon_parser as surgeon_parser
from merge_engine.methods import REGISTRY

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def options(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def test_every_method_and_parameter_is_documented():
    for name, spec in REGISTRY.items():
        assert f"`{name}`" in README, name
        for p in spec.params:
            assert f"`{p.name}`" in README, (name, p.name)


def test_every_cli_option_is_documented():
    parsers = (merge_parser(), evolve_parser(), multi_parser(), surgeon_parser(), pytorch_parser())
    for opt in set().union(*(options(p) for p in parsers)):
        assert opt in README, opt


def test_every_extract_lora_option_is_documented():
    from merge_engine.extract_lora import build_parser as extract_parser

    section = README.split("## mergekit-extract-lora", 1)[1].split("\n## ", 1)[0]
    for opt in options(extract_parser()):
        assert f"`{opt}" in section, opt
