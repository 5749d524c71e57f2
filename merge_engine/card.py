"""The model card (README.md) of a merged model, derived from the recipe and method spec."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import MergeConfig


def render_model_card(config: MergeConfig) -> str:
    spec = config.method
    models = [m for m in config.referenced_models() if m != config.base_model]
    lines = [
        "---",
        "tags:",
        "- merge",
        "- evomerge",
        "---",
        f"# {config.name or 'Merged model'}",
        "",
        f"This model was merged with evomerge using **{spec.name}**: {spec.description}.",
        f"Method reference: {spec.paper}.",
        "",
    ]
    if config.base_model:
        lines += [f"Base model: `{config.base_model}`", ""]
    lines += ["Models merged:", ""] + [f"- `{m}`" for m in models] + [""]
    lines += ["Parameters of this method:", ""]
    for p in spec.params:
        default = "required" if p.required else f"default {p.default!r}"
        lines.append(f"- `{p.name}` ({p.scope.replace('_', '-')}, {default}): {p.help}")
    lines += ["", "## Recipe", "", "```yaml", config.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)
