"""The pictures of a finished search: fitness over the evaluations (generations marked, held-out
scores of the top candidates), the best genome as a heatmap (layer group x model, one panel per
parameter), and the spread of every gene over the last generations.

They read history records as plain dicts (the keys of a history.jsonl line) through `as_record`,
so typed record objects with a `to_json()` work as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .genome import Gene


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, imported when the first picture is drawn (not when
    the search's modules load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def as_record(item: Any) -> dict[str, Any]:
    """One history record as the dict of its history.jsonl line (a typed record's `to_json()`)."""
    return item.to_json() if hasattr(item, "to_json") else dict(item)


@dataclass(frozen=True)
class HeldOut:
    """A top candidate's fitness and its score on the held-out validation split (None: failed)."""

    index: int
    fitness: float
    validation: float | None


def held_out_points(validation: Iterable[Any]) -> list[HeldOut]:
    """From run.py's validation entries: dicts {index, fitness, validation} or objects with
    `.candidate` and `.score` (ok, fitness)."""
    out = []
    for v in validation:
        if isinstance(v, dict):
            out.append(HeldOut(int(v["index"]), float(v["fitness"]), v["validation"]))
        else:
            out.append(HeldOut(v.candidate.index, v.candidate.score.fitness,
                               v.score.fitness if v.score.ok else None))
    return out


def short_name(model: str | None) -> str:
    return "global" if model is None else Path(model.rstrip("/")).name or model


def plot_fitness(records: Sequence[Any], out: Path, held_out: Sequence[HeldOut] = ()) -> Path:
    recs = sorted((as_record(r) for r in records), key=lambda r: r["index"])
    ok = [(r["index"], r["fitness"]) for r in recs if r["ok"]]
    best, running = float("-inf"), []
    for i, f in ok:
        best = max(best, f)
        running.append((i, best))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    starts: dict[int, int] = {}
    for r in recs:
        starts.setdefault(r["generation"], r["index"])
    for _, i in sorted(starts.items())[1:]:
        ax.axvline(i - 0.5, color="0.8", lw=0.8, ls=":", zorder=0)
    for g, i in sorted(starts.items()):
        label = ax.annotate(f"g{g}", (i - 0.5, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                            color="0.45", xytext=(2, -10), textcoords="offset points", annotation_clip=True)
        label.set_in_layout(False)  # labels never push the axes around
    if ok:
        ax.scatter([i for i, _ in ok], [f for _, f in ok], s=12, alpha=0.6, label="candidate (search fitness)")
        ax.step([i for i, _ in running], [f for _, f in running], where="post", color="C3", label="best so far")
    failed = [r["index"] for r in recs if not r["ok"]]
    if failed:
        ax.scatter(failed, [min((f for _, f in ok), default=0.0)] * len(failed), marker="x", color="k",
                   label="failed")
    scored = [(h.index, h.fitness, h.validation) for h in held_out if h.validation is not None]
    if scored:
        for index, fitness, validation in scored:
            ax.plot([index, index], [fitness, validation], color="C2", lw=0.8, alpha=0.7)
        ax.scatter([i for i, _, _ in scored], [v for _, _, v in scored], marker="D", s=36, color="C2",
                   edgecolor="k", zorder=3, label="held-out score (top candidates)")
    ax.set_xlabel("evaluation (dotted lines: generations)")
    ax.set_ylabel("fitness")
    ax.set_title("CMA-ES merge search")
    ax.grid(alpha=0.3)
    if ok or failed:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def place_label(gene: Gene, has_filters: bool) -> str:
    """Where a gene acts: its layer group, and its filter when the genome has filters (`other`: the
    catch-all genes for every tensor no filter names). The heatmap's rows and the spread's ticks."""
    return f"group {gene.group}" + (f" / {gene.filter or 'other'}" if has_filters else "")


def genome_table(genes: Sequence[Gene], values: Sequence[float]) -> dict[str, tuple[list[str], list[str],
                                                                                      np.ndarray]]:
    """param -> (row labels: layer group / filter, column labels: model, values); NaN where no gene."""
    has_filters = any(g.filter for g in genes)
    tables: dict[str, tuple[list[str], list[str], np.ndarray]] = {}
    for param in dict.fromkeys(g.param for g in genes):
        sel = [(g, v) for g, v in zip(genes, values, strict=True) if g.param == param]
        rows = list(dict.fromkeys(place_label(g, has_filters) for g, _ in sel))
        cols = list(dict.fromkeys(short_name(g.model) for g, _ in sel))
        grid = np.full((len(rows), len(cols)), np.nan)
        for g, v in sel:
            grid[rows.index(place_label(g, has_filters)), cols.index(short_name(g.model))] = v
        tables[param] = (rows, cols, grid)
    return tables


def plot_genome_heatmap(genes: Sequence[Gene], values: Sequence[float], out: Path, title: str = "") -> Path:
    """One panel per parameter (weight, density, ...): which model contributes how much in which layer group."""
    tables = genome_table(genes, values)
    n = len(tables)
    height = max(2.5, 0.45 * max(len(r) for r, _, _ in tables.values()) + 1.5)
    plt = _pyplot()
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1.5, height), dpi=100, squeeze=False)
    for ax, (param, (rows, cols, grid)) in zip(axes[0], tables.items(), strict=True):
        lows = [g.low for g in genes if g.param == param]
        highs = [g.high for g in genes if g.param == param]
        im = ax.imshow(grid, cmap="viridis", vmin=min(lows), vmax=max(highs), aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=20, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if v < (min(lows) + max(highs)) / 2 else "black")
        ax.set_title(param)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title or "best genome: parameter per layer group and model")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_layer_path(path: Sequence[tuple[str, int]], models: Sequence[str], out: Path, title: str = "") -> Path:
    """The best layer path: one row per source model, one column per depth; a filled cell is that model's
    layer (its number written in it) at that depth."""
    rows = list(dict.fromkeys([*models, *(m for m, _ in path)]))
    grid = np.full((len(rows), len(path)), np.nan)
    for depth, (model, _) in enumerate(path):
        grid[rows.index(model), depth] = rows.index(model)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(path) + 2.5), 0.6 * len(rows) + 1.6), dpi=100)
    ax.imshow(grid, cmap="tab10", vmin=0, vmax=9, aspect="auto")
    for depth, (model, layer) in enumerate(path):
        ax.text(depth, rows.index(model), str(layer), ha="center", va="center", fontsize=8, color="white")
    ax.set_yticks(range(len(rows)), [short_name(m) for m in rows], fontsize=8)
    ax.set_xticks(range(len(path)), [str(d) for d in range(len(path))], fontsize=7)
    ax.set_xlabel("depth in the merged model (the number in a cell: the source model's layer)")
    ax.set_title(title or f"best layer path ({len(path)} layers)", fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_gene_spread(genes: Sequence[Gene], records: Sequence[Any], out: Path, last: int = 3,
                     labels: Sequence[str] | None = None) -> Path:
    """Box plot of every gene over the candidates of the last `last` generations, in [0, 1] of its range:
    a narrow box is a gene the search has settled, a wide one a gene it is still exploring (or that does
    not matter). The best candidate's value is marked."""
    recs = [as_record(r) for r in records]
    ok = [r for r in recs if r["ok"] and len(r["genome"]) == len(genes)]
    gens = sorted({r["generation"] for r in ok})[-last:]
    window = [r for r in ok if r["generation"] in gens]
    span = np.array([(g.high - g.low) or 1.0 for g in genes])
    low = np.array([g.low for g in genes])
    data = (np.array([r["genome"] for r in window]) - low) / span if window else np.zeros((0, len(genes)))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(genes) + 2), 4.5), dpi=100)
    if len(window):
        ax.boxplot([data[:, k] for k in range(len(genes))], widths=0.6, showfliers=True)
        best = max(ok, key=lambda r: r["fitness"])
        ax.scatter(range(1, len(genes) + 1), (np.array(best["genome"]) - low) / span, marker="*", s=60,
                   color="C3", zorder=3, label=f"best (evaluation {best['index']})")
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)  # above the boxes
    if labels is None:
        has_filters = any(g.filter for g in genes)
        labels = [f"{g.param} {short_name(g.model)} {place_label(g, has_filters)}" for g in genes]
    ax.set_xticks(range(1, len(genes) + 1), labels, rotation=90, fontsize=7)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("gene value, 0-1 of its range")
    gen_text = (f"generation {gens[0]}" if len(gens) == 1 else f"generations {gens[0]}-{gens[-1]}") if gens \
        else "no successful candidate"
    ax.set_title(f"gene spread, {gen_text} ({len(window)} candidates)", fontsize=10, loc="left")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, bbox_inches="tight")  # nothing clipped, whatever the labels' length
    plt.close(fig)
    return out
