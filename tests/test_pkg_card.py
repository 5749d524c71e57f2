"""The merged model's card and recipe files: Hub front matter (checked with huggingface_hub's own
ModelCard parser), the recipe as the user wrote it, method text."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData

from merge_engine.card import hub_ids, render_model_card
from merge_engine.cli import main
from merge_engine.config import parse_recipe
from tests.factory import make_model

RECIPE = """\
# my ties recipe: {note}
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}   # keep half
  - model: {b}
    parameters: {{weight: 0.4, density: 0.5}}
dtype: bf16          # an alias: resolved to bfloat16
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("card_models")
    base = make_model(root / "base", seed=0)
    return {"base": base, "a": make_model(root / "a", seed=1, base=base),
            "b": make_model(root / "b", seed=2, base=base)}


def test_hub_front_matter_and_recipe_as_written(models, tmp_path, monkeypatch):
    monkeypatch.chdir(models["base"].parent)  # the recipe names the models as Hub-style `owner/name` ids
    (models["base"].parent / "org").mkdir(exist_ok=True)
    for name in ("base", "a", "b"):
        link = models["base"].parent / "org" / name
        if not link.exists():
            link.symlink_to(models[name])
    text = RECIPE.format(note="comments survive", base="org/base", a="org/a", b="org/b")
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text)
    out = tmp_path / "out"
    assert main([str(recipe), str(out), "--no-progress"]) == 0

    card = ModelCard.load(out / "README.md")  # huggingface_hub's parser: raises on malformed front matter
    assert isinstance(card.data, ModelCardData)
    meta = card.data.to_dict()
    assert meta["base_model"] == ["org/base", "org/a", "org/b"]
    assert meta["library_name"] == "transformers"
    assert {"merge", "mergekit", "evomerge"} <= set(meta["tags"])
    assert "```yaml\n" + text.rstrip() + "\n```" in card.text  # the recipe as written, comments included
    assert "Method reference: Yadav et al. 2023" in card.text
    # mergekit_config.yml is the user's text byte for byte; the resolved form (alias spelled out) beside it
    assert (out / "mergekit_config.yml").read_text() == text
    resolved = yaml.safe_load((out / "mergekit_config.resolved.yml").read_text())
    assert resolved["dtype"] == "bfloat16"
    assert parse_recipe(resolved) == parse_recipe(yaml.safe_load(text))


def test_card_without_alias_has_no_resolved_file(models, tmp_path):
    text = (f"merge_method: linear  # plain\nmodels:\n  - model: {models['a']}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {models['b']}\n    parameters: {{weight: 1.0}}\nparameters: {{normalize: true}}\n")
    recipe = tmp_path / "r.yml"
    recipe.write_text(text)
    assert main([str(recipe), str(tmp_path / "out"), "--no-progress"]) == 0
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == text
    assert not (tmp_path / "out" / "mergekit_config.resolved.yml").exists()
    meta = ModelCard.load(tmp_path / "out" / "README.md").data.to_dict()
    assert "base_model" not in meta  # absolute local paths are not Hub ids: the Hub would reject them
    assert meta["library_name"] == "transformers"


def test_passthrough_card_has_no_placeholder_reference():
    config = parse_recipe({"merge_method": "passthrough",
                           "slices": [{"sources": [{"model": "org/a", "layer_range": [0, 2]}]},
                                      {"sources": [{"model": "org/b", "layer_range": [0, 2]}]}]})
    text = render_model_card(config)
    assert "Method reference: -" not in text
    assert "passthrough" in text
    assert ModelCard(text).data.to_dict()["base_model"] == ["org/a", "org/b"]


def test_hub_ids_keep_only_owner_name_ids():
    assert hub_ids(["meta-llama/Llama-3.1-8B", "/abs/path", "./rel/x", "a/b/c", "plain", "org/m.v2"]) == [
        "meta-llama/Llama-3.1-8B", "org/m.v2"]


def test_card_extra_section_is_appended():
    config = parse_recipe({"merge_method": "linear", "models": [{"model": "org/a"}, {"model": "org/b"}]})
    text = render_model_card(config, extra="## How this recipe was found\n\nby search")
    assert text.rstrip().endswith("by search")
    assert ModelCard(text).data.to_dict()["tags"] == ["merge", "mergekit", "evomerge"]


def test_card_passes_modelcard_validate_against_the_hub_rules(monkeypatch):
    """huggingface_hub's ModelCard.validate posts the card to the Hub's /api/validate-yaml: here a stand-in
    on 127.0.0.1 that applies the Hub's rules for the fields evomerge writes."""
    from huggingface_hub import constants

    from tests.hub_standin import HubStandIn

    config = parse_recipe({"merge_method": "ties", "base_model": "org/base",
                           "models": [{"model": "org/a", "parameters": {"weight": 1.0}},
                                      {"model": "/local/b", "parameters": {"weight": 1.0}}]})
    with HubStandIn() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        ModelCard(render_model_card(config)).validate()  # raises ValueError on a 400
        assert len(hub.validated) == 1
        bad = render_model_card(config).replace("- org/a", "- /local/b")  # what listing a local path would do
        with pytest.raises(ValueError, match="base_model"):
            ModelCard(bad).validate()
