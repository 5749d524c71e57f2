"""What a search leaves for a person: pictures, report.md, report.html, evolve.log, the evolved
model's card, and --json, on a real (small, in-process) search."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image

from evolve import pictures
from evolve.cli import main as evolve_main
from evolve.config import GenomeDefinition
from evolve.genome import Genome
from evolve.pictures import genome_table, plot_gene_spread
from evolve.run import RunOptions, evolve
from evolve.search import SearchSettings
from tests.test_evolve import ROOT, TASKS, in_process, search_config, settings, trained  # noqa: F401 (fixtures)


def _search(models, in_process, path: Path, export: bool):  # noqa: F811
    options = RunOptions(storage_path=str(path), search=SearchSettings(max_fevals=20, sigma0=0.3, random_seed=1,
                                                                       progress=False),
                         task_search_path=[str(ROOT / "tasks")], export_model=export)
    return evolve(search_config(models, layer_granularity=2, filters=["mlp"]), options, evaluator=in_process)


@pytest.fixture(scope="module")
def searched(trained, in_process, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("report") / "s"
    return path, _search(trained, in_process, path, export=True)


@pytest.mark.slow
def test_pictures_exist_and_are_real_images(searched):
    path, _ = searched
    for name in ("fitness.png", "genome_heatmap.png", "gene_spread.png"):
        with Image.open(path / name) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 250
            colours = len(set(im.convert("RGB").getdata()))
            assert colours > 50, f"{name} looks blank ({colours} colours)"


@pytest.mark.slow
def test_report_md_has_no_none_and_names_only_written_files(searched, trained, in_process, tmp_path):  # noqa: F811
    path, out = searched
    text = (path / "report.md").read_text()
    assert "None" not in text
    popsize = re.search(r"popsize (\d+)", text)
    gen0 = sum(1 for c in out.search.candidates if c.generation == 0)
    assert popsize and int(popsize[1]) == gen0  # cma's default for this many genes, as the search used it
    assert "`best_model/`" in text
    quiet = _search(trained, in_process, tmp_path / "noexport", export=False)
    assert "best_model" not in quiet.report and not (tmp_path / "noexport" / "best_model").exists()


@pytest.mark.slow
def test_report_lists_the_pareto_front_of_the_tasks(searched):
    path, out = searched
    text = (path / "report.md").read_text()
    section = text.split("## Trade-offs between the tasks (Pareto front)")[1].split("\n## ")[0]
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", section, re.M)
    listed = {int(r[0]) for r in rows}
    scored = {c.index: c.score.per_task for c in out.search.candidates if c.score.ok}
    tasks = list(next(iter(scored.values())))
    assert len(set(map(tuple, (s.values() for s in scored.values())))) > 2  # the candidates differ
    for i, s in scored.items():  # listed exactly when no other candidate is at least as good on both and better on one
        beaten = any(all(o[t] >= s[t] for t in tasks) and o != s for o in scored.values())
        first_of_equals = all(o != s for j, o in scored.items() if j < i)
        assert (i in listed) == (not beaten and first_of_equals), (i, s)
    assert out.best.index in listed


@pytest.mark.slow
def test_report_html_is_self_contained_and_sortable(searched):
    path, out = searched
    page = (path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r"""(src|href)=["'](https?:|//)""", page)  # nothing fetched from elsewhere
    assert "<script>" in page and "sortable" in page
    rows = re.findall(r"<tr class=\"[^\"]*\"><td>(\d+)</td>", page.split('id="history"')[1])
    assert sorted(map(int, rows)) == [c.index for c in out.search.candidates]


@pytest.mark.slow
def test_log_file_in_storage_path(searched):
    path, _ = searched
    log = (path / "evolve.log").read_text()
    assert "genome:" in log and "exporting best_model/" in log


@pytest.mark.slow
def test_evolved_model_card_describes_the_search(searched):
    path, out = searched
    card = ModelCard.load(path / "best_model" / "README.md")
    assert card.data.to_dict()["library_name"] == "transformers"
    text = card.text
    best = out.best
    assert "## How this recipe was found" in text
    assert f"{best.score.fitness:.4f}" in text and "`evo_reversal` (acc, 2)" in text
    assert "held-out score" in text and "budget | 20 evaluations" in text
    assert "![fitness over the search](fitness.png)" in text and (path / "best_model" / "fitness.png").exists()


def test_genome_heatmap_table_places_each_gene(zoo):
    genome = Genome.for_models(search_config(zoo, layer_granularity=1, filters=["mlp"]).genome)
    values = [round(0.01 * i, 2) for i in range(genome.dimension)]
    tables = genome_table(genome.genes, values)
    assert set(tables) == {"weight"}
    rows, cols, grid = tables["weight"]
    assert cols == ["a", "b"] and rows[:2] == ["group 0 / mlp", "group 0 / other"]
    for gene, v in zip(genome.genes, values, strict=True):
        label = f"group {gene.group} / {gene.filter or 'other'}"
        assert grid[rows.index(label), cols.index(Path(gene.model).name)] == v


def test_gene_spread_names_every_gene_like_the_heatmap_and_clips_nothing(tmp_path, monkeypatch):
    definition = GenomeDefinition(models=["models/a", "models/b"], base_model="models/base",
                                  merge_method="task_arithmetic", layer_granularity=2, filters=["mlp"])
    genome = Genome(definition, num_layers=4)  # 8 genes: a narrow picture under a long title
    rng = np.random.default_rng(0)
    records = [{"index": i, "generation": i // 4, "ok": True, "fitness": float(rng.random()),
                "genome": genome.values(rng.random(genome.dimension))} for i in range(12)]
    figures: list = []
    plt = pictures._pyplot()
    close = plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its labels
    out = plot_gene_spread(genome.genes, records, tmp_path / "gene_spread.png")
    ticks = [t.get_text() for t in figures[0].axes[0].get_xticklabels()]
    close(figures[0])
    assert ticks == [f"weight {Path(g.model or '').name} group {g.group} / {g.filter or 'other'}"
                     for g in genome.genes]  # the catch-all genes too: "weight a group 0 / other"
    rows = genome_table(genome.genes, [0.5] * genome.dimension)["weight"][0]
    assert {t.split(" ", 2)[2] for t in ticks} == set(rows)  # named as the heatmap's rows
    with Image.open(out) as im:
        pixels = np.asarray(im.convert("RGB"))
    border = np.concatenate([pixels[:3], pixels[-3:], pixels[:, :3].transpose(1, 0, 2),
                             pixels[:, -3:].transpose(1, 0, 2)], axis=1)
    assert (border >= 250).all(), "something (the title?) runs off the edge of gene_spread.png"


@pytest.mark.slow
def test_evolve_json_summary(zoo, tmp_path):
    search = tmp_path / "search.yml"
    search.write_text(json.dumps(search_config(zoo).model_dump(mode="json")))
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = evolve_main([str(search), "--storage-path", str(tmp_path / "s"), "--num-workers", "0",
                          "--max-fevals", "4", "--popsize", "4", "--task-search-path", str(ROOT / "tasks"),
                          "--no-export", "--no-progress", "--json"])
    assert rc == 0
    summary = json.loads(buf.getvalue())
    assert summary["evaluations"] == 4 and summary["best_model"] is None
    assert Path(summary["report_html"]).exists() and Path(summary["log"]).exists()
    assert isinstance(summary["best_fitness"], float) and summary["peak_rss_mib"] > 50
