"""``leaderboard.html``: one self-contained page (no network): a sortable table and an inline SVG
plot of accuracy against FLOPs with the reference frontier and the budget (tooling)."""
from __future__ import annotations

import html
import math

from .challenge import REFERENCE_MODEL
from .leaderboard import COLUMNS, Board, row_values

HEADERS = {"rank": "rank", "team": "team", "submission": "submission", "kind": "kind",
           "submitted_at": "submitted at", "final": "final", "status": "status",
           "public_accuracy": "public score", "private_accuracy": "private score", "flops": "FLOPs / example",
           "relative_flops": "FLOPs (x ref)", "latency_ms": "latency (ms, 16k rows)", "relative_latency": "latency (x ref)",
           "reason": "reason", "note": "note"}
NUMERIC = {"rank", "public_accuracy", "private_accuracy", "flops", "relative_flops", "latency_ms", "relative_latency"}

# clicking a header sorts by that column (numbers as numbers, empty cells last); again reverses
SORT_JS = """
document.querySelectorAll('#board th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = document.querySelector('#board tbody');
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    document.querySelectorAll('#board th').forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var numeric = th.dataset.type === 'number';
    var key = function (tr) { return tr.children[col].dataset.value; };
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === '' || y === '') { return (x === '') - (y === ''); }
      var d = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
      return asc ? d : -d;
    });
    rows.forEach(function (tr) { body.appendChild(tr); });
  });
});
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; }
th { background: #eee; cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.disqualified td, tr.invalid td, tr.not-counted td { color: #888; }
tr.ranked td { font-weight: 600; }
svg text { font-size: 11px; }
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _table(board: Board) -> str:
    columns = [c for c in COLUMNS if c != "private_accuracy" or board.reveal_private]
    head = "".join(f'<th data-column="{c}" data-type="{"number" if c in NUMERIC else "text"}">{_esc(HEADERS[c])}</th>'
                   for c in columns)
    rows = []
    for e in board.entries:
        values = row_values(e, board.reveal_private)
        status = e.status.replace(" ", "-")
        cls = f"{status}{' ranked' if e.rank is not None else ''}"
        cells = "".join(f'<td data-value="{_esc(values[c])}"{" class=number" if c in NUMERIC else ""}>'
                        f"{_esc(values[c])}</td>" for c in columns)
        rows.append(f'<tr class="{cls}" data-team="{_esc(e.team)}" data-submission="{_esc(e.submission)}">{cells}</tr>')
    return f'<table id="board"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (lower) and accuracy (higher), by cost."""
    frontier = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not frontier or y > frontier[-1][1]:
            frontier.append((x, y))
    return frontier


def _plot(board: Board, width: int = 680, height: int = 400) -> str:
    metric = "private" if board.reveal_private else "public"
    scored = [e for e in board.entries if e.scored and e.relative_flops]
    refs = [(p["relative_flops"], p[metric], p.get("name", "")) for p in board.frontier
            if p.get(metric) is not None and p.get("relative_flops")]
    xs = [e.relative_flops for e in scored] + [r[0] for r in refs] + [board.budget, 1.0]
    ys = [getattr(e, metric) for e in scored] + [r[1] for r in refs]
    left, right, top, bottom = 56, 16, 16, 44
    lo_x, hi_x = math.log2(min(xs) / 1.3), math.log2(max(xs) * 1.3)
    lo_y = max(0.0, (min(ys) if ys else 0.5) - 0.03)
    hi_y = min(1.0, (max(ys) if ys else 1.0) + 0.03)
    if hi_y - lo_y < 0.05:  # all scores alike: keep a readable range around them
        lo_y = max(0.0, (lo_y + hi_y) / 2 - 0.025)
        hi_y = lo_y + 0.05

    def px(x):
        return left + (math.log2(x) - lo_x) / (hi_x - lo_x) * (width - left - right)

    def py(y):
        return top + (hi_y - y) / (hi_y - lo_y) * (height - top - bottom)

    parts = [f'<svg id="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{metric} accuracy against FLOPs">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#999"/>']
    tick = 2.0 ** math.floor(lo_x)
    while tick <= 2.0 ** hi_x:
        if tick >= 2.0 ** lo_x:
            parts.append(f'<line x1="{px(tick):.1f}" x2="{px(tick):.1f}" y1="{height - bottom}" '
                         f'y2="{height - bottom + 4}" stroke="#999"/><text x="{px(tick):.1f}" '
                         f'y="{height - bottom + 16}" text-anchor="middle">{tick:g}x</text>')
        tick *= 2
    for i in range(6):
        y = lo_y + i * (hi_y - lo_y) / 5
        parts.append(f'<line x1="{left - 4}" x2="{left}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#999"/>'
                     f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3f}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle">FLOPs per example, '
                 f'relative to {_esc(REFERENCE_MODEL)} (log scale)</text>'
                 f'<text transform="translate(14 {(top + height - bottom) / 2}) rotate(-90)" text-anchor="middle">'
                 f'{metric} accuracy</text>')
    bx = px(board.budget)
    parts.append(f'<line class="budget" x1="{bx:.1f}" x2="{bx:.1f}" y1="{top}" y2="{height - bottom}" '
                 f'stroke="#c33" stroke-dasharray="5 4"/><text x="{bx + 4:.1f}" y="{top + 12}" fill="#c33">'
                 f'budget {board.budget:g}x</text>')
    frontier = pareto_frontier([(x, y) for x, y, _ in refs])
    if frontier:
        # a staircase: what the best reference reaches at each cost, up to the right edge
        steps = [frontier[0]]
        for x, y in frontier[1:]:
            steps += [(x, steps[-1][1]), (x, y)]
        steps.append((2.0 ** hi_x, steps[-1][1]))
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in steps)
        parts.append(f'<polyline class="frontier" points="{line}" fill="none" stroke="#2a2" stroke-width="2"/>')
    for x, y, name in refs:
        parts.append(f'<rect class="ref" x="{px(x) - 4:.1f}" y="{py(y) - 4:.1f}" width="8" height="8" fill="#2a2">'
                     f'<title>reference: {_esc(name)}: {y:.4f} at {x:.2f}x</title></rect>')
    colors = {"ok": "#1f5fbf", "disqualified": "#c33"}
    for e in scored:
        y = getattr(e, metric)
        parts.append(f'<circle class="point {e.status.replace(" ", "-")}" cx="{px(e.relative_flops):.1f}" '
                     f'cy="{py(y):.1f}" r="5" fill="{colors.get(e.status, "#888")}" fill-opacity="0.75" '
                     f'data-team="{_esc(e.team)}" data-submission="{_esc(e.submission)}"><title>{_esc(e.team)}/'
                     f'{_esc(e.submission)}: {y:.4f} at {e.relative_flops:.2f}x ({_esc(e.status)})</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def to_html(board: Board) -> str:
    metric = "private" if board.reveal_private else "public"
    notes = "".join(f"<li>{_esc(team)}: {_esc(note)}</li>" for team, note in sorted(board.team_notes.items()))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Capstone leaderboard</title>
<style>{STYLE}</style></head>
<body>
<h1>Capstone leaderboard</h1>
<p>Teams are ranked by the best {metric} score among their (at most 2) final submissions; equal scores go to
the earlier submission. Budget: {board.budget:g}x the FLOPs per example of {_esc(REFERENCE_MODEL)}.
{"Private scores are revealed." if board.reveal_private else "Private scores are hidden until the end."}
Click a column header to sort.</p>
{f"<ul>{notes}</ul>" if notes else ""}
{_table(board)}
<h2>Accuracy against cost</h2>
<p>Circles: submissions with a score (blue: valid, red: over budget). Green: the reference solutions and
their frontier (no point is both cheaper and more accurate). Dashed: the budget.</p>
{_plot(board)}
<script>{SORT_JS}</script>
</body></html>
"""
