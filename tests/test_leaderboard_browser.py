"""leaderboard.html in a real browser: headless Chromium opens it from file:// (it must need nothing
else), the table shows one row per submission, clicking a header sorts, and the SVG plot has one
point per scored submission plus the reference frontier.

Needs Chromium and Playwright (``make browser-setup``) and skips with a one-line reason otherwise;
Chromium is ``$LABKIT_CHROMIUM`` or ``chromium`` / ``chromium-browser`` / ``google-chrome`` on the PATH.
A screenshot goes to ``reports/browser/leaderboard.png`` (gitignored) for a person to look at.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from labkit.capstone.challenge import load_hidden
from labkit.capstone.make_class import make_class
from labkit.cli import main

pytestmark = [pytest.mark.browser]

SCREENSHOTS = Path(__file__).resolve().parents[1] / "reports" / "browser"


@pytest.fixture(scope="module")
def page(tmp_path_factory, playwright_chromium):
    sync_api, chromium = playwright_chromium
    tmp = tmp_path_factory.mktemp("leaderboard")
    klass = make_class(tmp / "class")
    out = tmp / "out"
    assert main(["leaderboard", str(klass), "--out", str(out), "--latency-repeats", "1", "--reveal-private"]) == 0
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            requests = []
            pg = context.new_page()
            pg.on("request", lambda r: requests.append(r.url))
            errors = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.goto((out / "leaderboard.html").as_uri())
            yield pg, rows, requests, errors
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            pg.screenshot(path=str(SCREENSHOTS / "leaderboard.png"), full_page=True)
        finally:
            browser.close()


def _column(pg, name: str) -> list[str]:
    return pg.eval_on_selector_all(
        "#board tbody tr", f"(rows) => rows.map(r => r.querySelector('td:nth-child(' + "
        f"(Array.from(document.querySelectorAll('#board th')).findIndex(h => h.dataset.column === '{name}') + 1)"
        " + ')').textContent)")


def test_table_renders_every_submission(page):
    pg, rows, requests, errors = page
    assert not errors, errors
    assert all(u.startswith("file://") for u in requests), f"the page fetched {requests}"
    assert pg.locator("#board tbody tr").count() == len(rows) >= 8
    assert _column(pg, "team") == [r["team"] for r in rows]
    assert _column(pg, "submission") == [r["submission"] for r in rows]
    assert _column(pg, "private_accuracy") == [r["private_accuracy"] for r in rows]
    assert pg.locator("#board tr.ranked").count() == sum(1 for r in rows if r["rank"])
    assert "over budget" in pg.locator("#board tr.disqualified").first.inner_text()


def test_clicking_a_header_sorts(page):
    pg, rows, _, _ = page
    header = pg.locator("#board th[data-column='public_accuracy']")
    header.click()
    assert header.get_attribute("aria-sort") == "ascending"
    values = _column(pg, "public_accuracy")
    numbers = [float(v) for v in values if v]
    assert numbers == sorted(numbers) and values[len(numbers):] == [""] * (len(values) - len(numbers))
    header.click()
    assert header.get_attribute("aria-sort") == "descending"
    numbers = [float(v) for v in _column(pg, "public_accuracy") if v]
    assert numbers == sorted(numbers, reverse=True)
    pg.locator("#board th[data-column='team']").click()
    teams = _column(pg, "team")
    assert teams == sorted(teams)
    pg.locator("#board th[data-column='rank']").click()   # back to the ranking
    ranks = [int(r) for r in _column(pg, "rank") if r]
    assert ranks == list(range(1, len(ranks) + 1))


def test_plot_has_a_point_per_scored_submission_and_the_frontier(page):
    pg, rows, _, _ = page
    scored = [r for r in rows if r["private_accuracy"]]
    assert pg.locator("svg#plot circle.point").count() == len(scored)
    assert pg.locator("svg#plot circle.point.disqualified").count() == sum(r["status"] == "disqualified" for r in rows)
    frontier = load_hidden(with_metadata=True)[4]["frontier"]
    assert pg.locator("svg#plot rect.ref").count() == len(frontier)
    # a staircase through the Pareto-optimal references, out to the right edge
    points = pg.locator("svg#plot polyline.frontier").get_attribute("points").split()
    assert 2 <= len(points) <= 2 * len(frontier)
    assert pg.locator("svg#plot line.budget").count() == 1
    box = pg.locator("svg#plot").bounding_box()
    assert box["width"] > 300 and box["height"] > 200   # rendered, not collapsed
    # every point lies inside the plot
    for c in pg.locator("svg#plot circle.point").all():
        assert 0 <= float(c.get_attribute("cx")) <= box["width"] and 0 <= float(c.get_attribute("cy")) <= box["height"]
