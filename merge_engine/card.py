"""The model card (README.md) of a merged model, derived from the recipe and method spec.

The front matter is what the Hugging Face Hub reads: `base_model` (the inputs that are Hub
ids), `library_name: transformers`, and the tags mergekit users search by (`merge`,
`mergekit`). The recipe appears in a yaml block as the user wrote it (comments included)
when it came from a file. `extra` is markdown appended by the caller (mergekit-evolve
describes the search that found the recipe there).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from .config import MergeConfig

TAGS = ("merge", "mergekit", "evomerge")
# owner/name as the Hub spells a model id; local paths (absolute, ./x, deeper trees) are not ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def hub_ids(models: list[str]) -> list[str]:
    """The models the Hub can link to: `owner/name` ids. Local paths stay in the card's text only."""
    return [m for m in models if _HUB_ID.match(m) and ".." not in m and not m.endswith((".", "-"))]


def front_matter(config: MergeConfig) -> dict:
    data: dict = {}
    bases = hub_ids(config.referenced_models())
    if bases:
        data["base_model"] = bases
    data["library_name"] = "transformers"
    data["tags"] = list(TAGS)
    return data


def render_model_card(config: MergeConfig, recipe_text: str | None = None, extra: str | None = None) -> str:
    spec = config.method
    models = [m for m in config.referenced_models() if m != config.base_model]
    lines = ["---", yaml.safe_dump(front_matter(config), sort_keys=False).rstrip(), "---",
             f"# {config.name or 'Merged model'}", "",
             (f"This model was merged with evomerge (mergekit-compatible recipes) "
              f"using **{spec.name}**: {spec.description}.")]
    if spec.paper and spec.paper.strip() != "-":
        lines.append(f"Method reference: {spec.paper}.")
    lines.append("")
    if config.base_model:
        lines += [f"Base model: `{config.base_model}`", ""]
    lines += ["Models merged:", ""] + [f"- `{m}`" for m in models] + [""]
    if spec.params:
        lines += ["Parameters of this method:", ""]
        for p in spec.params:
            default = "required" if p.required else f"default {p.default!r}"
            lines.append(f"- `{p.name}` ({p.scope.replace('_', '-')}, {default}): {p.help}")
        lines.append("")
    recipe = recipe_text if recipe_text is not None else config.to_yaml()
    lines += ["## Recipe", "", "Reproduce with `mergekit-yaml mergekit_config.yml OUT_DIR`:", "", "```yaml",
              recipe.rstrip(), "```", ""]
    if extra:
        lines += [extra.rstrip(), ""]
    return "\n".join(lines)
