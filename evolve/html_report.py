"""report.html: one self-contained page to look at a search without tools: the report's summary,
every picture inline (base64 PNG), the held-out table, and the whole history as a table that sorts
by any column on a click. No external asset: no script, style sheet or font is fetched."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .pictures import HeldOut, as_record

_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach((th, col) => th.addEventListener('click', () => {
  const table = th.closest('table'), body = table.tBodies[0];
  const asc = th.dataset.dir !== 'asc';
  table.querySelectorAll('th').forEach(h => delete h.dataset.dir);
  th.dataset.dir = asc ? 'asc' : 'desc';
  const key = td => { const t = td.textContent.trim(), n = parseFloat(t); return isNaN(n) ? t : n; };
  [...body.rows].sort((a, b) => {
    const x = key(a.cells[col]), y = key(b.cells[col]);
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
  }).forEach(r => body.appendChild(r));
}));
"""

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
th[data-dir=asc]::after { content: ' \\25B2'; } th[data-dir=desc]::after { content: ' \\25BC'; }
td.left, th.left { text-align: left; }
tr.best { background: #fff3c4; } tr.failed { color: #a00; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>' \
           f'{html.escape(alt)}</figcaption></figure>'


def render_html(report_md: str, records: Sequence[Any], held_out: Sequence[HeldOut],
                pictures: Sequence[tuple[Path, str]], title: str = "Merge search report") -> str:
    recs = sorted((as_record(r) for r in records), key=lambda r: r["index"])
    ok = [r for r in recs if r["ok"]]
    best_index = max(ok, key=lambda r: r["fitness"])["index"] if ok else None
    tasks = list(dict.fromkeys(t for r in recs for t in r.get("scores", {})))
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", "<h2>Summary</h2>", f"<pre>{html.escape(report_md)}</pre>"]
    if pictures:
        parts.append("<h2>Pictures</h2>")
        parts += [_img(p, alt) for p, alt in pictures if p.exists()]
    if held_out:
        parts += ["<h2>Held-out validation of the top candidates</h2>",
                  ('<table class="sortable"><thead><tr><th>evaluation</th><th>fitness</th><th>held-out</th>'
                   "<th>gap</th></tr></thead><tbody>")]
        for h in held_out:
            val = "failed" if h.validation is None else f"{h.validation:.4f}"
            gap = "" if h.validation is None else f"{h.fitness - h.validation:+.4f}"
            parts.append(f"<tr><td>{h.index}</td><td>{h.fitness:.4f}</td><td>{val}</td><td>{gap}</td></tr>")
        parts.append("</tbody></table>")
    header = ["evaluation", "generation", "fitness", *tasks, "merge s", "score s", "recipe hash", "error"]
    parts += [f"<h2>History ({len(recs)} evaluations; click a column to sort)</h2>",
              '<table class="sortable" id="history"><thead><tr>'
              + "".join(f'<th{" class=left" if h in ("recipe hash", "error") else ""}>{html.escape(h)}</th>'
                        for h in header) + "</tr></thead><tbody>"]
    for r in recs:
        cls = "best" if r["index"] == best_index else ("failed" if not r["ok"] else "")
        cells = [str(r["index"]), str(r["generation"]), f"{r['fitness']:.4f}",
                 *(f"{r['scores'][t]:.4f}" if t in r.get("scores", {}) else "" for t in tasks),
                 f"{r.get('merge_seconds', 0):.3f}", f"{r.get('score_seconds', 0):.3f}"]
        row = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
        row += f'<td class="left">{html.escape(str(r.get("recipe_hash", "")))}</td>'
        row += f'<td class="left">{html.escape(str(r.get("error") or ""))}</td>'
        parts.append(f'<tr class="{cls}">{row}</tr>')
    parts += ["</tbody></table>", f"<script>{_SORT_JS}</script>", "</body></html>"]
    return "\n".join(parts)
