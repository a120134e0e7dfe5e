"""Find the nbgrader regions in notebook cells, and build graded cells.

The notebooks are built from jupytext sources by ``labkit build-notebooks`` (labkit/course/build.py),
which turns each source cell into one of the cells below::

    from labkit.grading import notebook_tools as nt
    cells = nt.header("00_welcome", "Welcome to labkit", "What this notebook shows...")
    cells += [nt.markdown("## Softmax with a temperature ..."),
              nt.solution('''def softmax(logits, temperature=1.0):
        \"\"\"...\"\"\"
        ### BEGIN SOLUTION
        return torch.softmax(logits / temperature, dim=-1)
        ### END SOLUTION'''),
              *nt.tests("welcome.softmax")]
    nt.write(nt.new_notebook("00_welcome", cells), "notebooks/00_welcome.ipynb")

Markers are nbgrader's, so instructors on nbgrader can use the notebooks as they are. The visible
test cell is read-only and ungraded (it shows the student what is tested); the hidden test cell is the
graded one and carries the question's points, so nbgrader's total equals labkit's.
"""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell

from ..course import colab_url, repo_url

BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def install_cell() -> str:
    """The notebooks' second cell: a no-op where labkit is importable, else clone the kit and install it.

    A clone, not ``pip install git+...``: the zoo's checkpoints live in the repository's data/ folder.
    An editable install keeps them next to the package; Colab's own torch satisfies the range and stays.
    The URL is the project's one setting (``labkit.course.repo_url()``).
    """
    return f'''try:
    import labkit
except ImportError:  # on Colab (or anywhere labkit is missing): clone the kit with its zoo and install it
    import subprocess, sys
    subprocess.run(["git", "clone", "--depth", "1", "{repo_url()}", "labkit-repo"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "labkit-repo"], check=True)
    sys.path.insert(0, "labkit-repo")
    import labkit'''


class MarkerError(ValueError):
    """Unbalanced or nested ``### BEGIN ...`` / ``### END ...`` markers; the message names the cell and line."""


def _source(cell) -> str:
    src = cell.get("source", "") if isinstance(cell, dict) else cell
    return "".join(src) if isinstance(src, list) else src


def find_regions(source: str, begin: str, end: str, where: str = "") -> list[tuple[int, int]]:
    """[(begin_line, end_line)] (0-based, inclusive) of each ``begin``..``end`` region in ``source``.

    A marker is a line whose stripped text is exactly the marker. Raises MarkerError naming ``where``
    (e.g. "notebooks/00_welcome.ipynb, cell 7") and the 1-based line for an unmatched or nested marker.
    """
    at = f"{where}: " if where else ""
    regions, start = [], None
    lines = source.splitlines()
    for i, line in enumerate(lines):
        text = line.strip()
        if text == begin:
            if start is not None:
                raise MarkerError(f"{at}'{begin}' on line {i + 1} is nested inside the one on line {start + 1}")
            start = i
        elif text == end:
            if start is None:
                raise MarkerError(f"{at}'{end}' on line {i + 1} has no '{begin}' before it")
            regions.append((start, i))
            start = None
    if start is not None:
        raise MarkerError(f"{at}'{begin}' on line {start + 1} has no matching '{end}'")
    return regions


def solution_regions(source, where: str = "") -> list[tuple[int, int]]:
    return find_regions(_source(source), BEGIN_SOLUTION, END_SOLUTION, where)


def hidden_regions(source, where: str = "") -> list[tuple[int, int]]:
    return find_regions(_source(source), BEGIN_HIDDEN, END_HIDDEN, where)


def _enclosing_def(lines: list[str], line_no: int, indent: int) -> str | None:
    """The name of the function whose body holds line ``line_no`` (indented by ``indent``), if any."""
    for line in reversed(lines[:line_no]):
        stripped = line.lstrip()
        if not stripped or len(line) - len(stripped) >= indent:
            continue
        m = re.match(r"(?:async\s+)?def\s+(\w+)", stripped)
        if m:
            return m.group(1)
        if not stripped.startswith(("@", "#")):
            # a less-indented non-def line (class, if, for ...): keep looking for a def further out
            indent = len(line) - len(stripped)
    return None


def stub_solutions(source: str, where: str = "", markdown: bool = False) -> tuple[str, int]:
    """Replace each solution region by a TODO stub; return (new source, number of regions).

    Code: the region becomes ``# YOUR CODE HERE`` + ``raise NotImplementedError("TODO: ...")`` at the
    indentation of its BEGIN marker (the ``def`` line and docstring above it stay). Markdown: the region
    becomes "YOUR ANSWER HERE".
    """
    lines = source.splitlines()
    regions = find_regions(source, BEGIN_SOLUTION, END_SOLUTION, where)
    for start, stop in reversed(regions):
        pad = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
        if markdown:
            stub = ["YOUR ANSWER HERE"]
        else:
            name = _enclosing_def(lines, start, len(pad))
            todo = f"TODO: implement {name}()" if name else "TODO: your code here"
            stub = [f"{pad}# YOUR CODE HERE", f"{pad}raise NotImplementedError({json.dumps(todo)})"]
        lines[start: stop + 1] = stub
    return "\n".join(lines), len(regions)


def remove_hidden_tests(source: str, where: str = "") -> tuple[str, int]:
    """Delete every hidden-test region (markers included); return (new source, number of regions)."""
    lines = source.splitlines()
    regions = find_regions(source, BEGIN_HIDDEN, END_HIDDEN, where)
    for start, stop in reversed(regions):
        del lines[start: stop + 1]
    return "\n".join(lines), len(regions)


# ----------------------------------------------------------------------------------------------
# Cell builders


def _nbgrader(grade_id: str, *, solution: bool, grade: bool, locked: bool, points: float | None = None) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3, "solution": solution}
    if points is not None:
        meta["points"] = points
    return {"nbgrader": meta}


def _clean(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def markdown(text: str):
    """A markdown cell (the text is dedented, so triple-quoted strings can be indented in the script)."""
    return new_markdown_cell(_clean(text))


def code(source: str, tags: list[str] | None = None):
    """A plain code cell; ``tags`` e.g. ["raises-exception"]. Start the source with "# NBVAL_IGNORE_OUTPUT"
    when its output is not reproducible (timings, hardware, raw floats)."""
    cell = new_code_cell(_clean(source))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def solution(source: str, grade_id: str | None = None):
    """A solution cell: code with at least one ``### BEGIN SOLUTION`` / ``### END SOLUTION`` region.

    ``grade_id`` defaults to "<first function name>_solution".
    """
    source = _clean(source)
    if not solution_regions(source, "solution cell"):
        raise MarkerError(f"solution cell has no '{BEGIN_SOLUTION}' / '{END_SOLUTION}' region:\n{source[:200]}")
    if grade_id is None:
        m = re.search(r"^\s*def\s+(\w+)", source, re.MULTILINE)
        if not m:
            raise ValueError("solution(): give a grade_id for a cell that defines no function")
        grade_id = f"{m.group(1)}_solution"
    cell = new_code_cell(source)
    cell.metadata.update(_nbgrader(grade_id, solution=True, grade=False, locked=False))
    return cell


def tests(qid: str, function: str | None = None) -> list:
    """[visible test cell, hidden test cell] for question ``qid`` (looked up in the bank: it must exist).

    The visible cell runs ``check(qid, fn)``; the hidden one ``check(qid, fn, hidden=True)`` between the
    hidden-test markers and carries the question's points.
    """
    from .questions import get_question

    q = get_question(qid)
    function = function or q.function
    base = qid.replace(".", "_")
    visible = new_code_cell(f"check({qid!r}, {function})".replace("'", '"'))
    visible.metadata.update(_nbgrader(f"{base}_visible", solution=False, grade=False, locked=True))
    hidden = new_code_cell(f'{BEGIN_HIDDEN}\ncheck("{qid}", {function}, hidden=True)\n{END_HIDDEN}')
    hidden.metadata.update(_nbgrader(f"{base}_hidden", solution=False, grade=True, locked=True, points=q.points))
    return [visible, hidden]


def header(name: str, title: str, intro: str = "") -> list:
    """The two cells every notebook opens with: title + Colab badge (+ intro), then the install cell."""
    text = f"# {title}\n\n{BADGE.format(url=colab_url(name))}"
    if intro:
        text += "\n\n" + _clean(intro)
    return [new_markdown_cell(text), new_code_cell(install_cell())]


def new_notebook(name: str, cells: list):
    """A v4 notebook with the kernel metadata and ``labkit: {"notebook": name}`` (how ``labkit grade``
    recognises a submission, whatever the student renamed the file to)."""
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata.update({
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python", "pygments_lexer": "ipython3"},
        "labkit": {"notebook": name},
    })
    grade_ids = [c.metadata["nbgrader"]["grade_id"] for c in cells if "nbgrader" in c.metadata]
    dup = sorted({g for g in grade_ids if grade_ids.count(g) > 1})
    if dup:
        raise ValueError(f"notebook {name}: duplicate nbgrader grade_id(s) {dup}")
    return nb


def write(nb, path: str | Path) -> Path:
    """Validate and write a notebook (creating its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.validate(nb)
    with open(path, "w", encoding="utf-8") as f:
        nbformat.write(nb, f)
    return path


def notebook_name(nb) -> str | None:
    """The notebook's stem from its ``labkit`` metadata, else None."""
    meta = nb.get("metadata", {}).get("labkit", {})
    name = meta.get("notebook") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and name else None
