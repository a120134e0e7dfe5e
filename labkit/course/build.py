"""Build the graded notebooks from their sources: ``labkit build-notebooks [NAMES] [--check]``.

A source ``notebooks/src/NN_name.py`` is a jupytext percent script, real Python that ruff and editors
read, and ``notebooks/NN_name.ipynb`` is built from it::

    # Comment lines before the first cell marker describe the file; they are not a cell.

    # %% [markdown]
    # # 00 · Title           <- the first cell: markdown opening with the title line; the build adds
    #                           the Colab badge under the title and the install cell after the cell
    # Intro ...

    # %%
    import torch           <- a code cell ("# NBVAL_IGNORE_OUTPUT" first when its output varies)

    # %% tags=["solution"]
    def softmax(z):        <- a solution cell: nbgrader's ### BEGIN / END SOLUTION region(s);
        ### BEGIN SOLUTION    its grade id is "<first function>_solution"
        return ...
        ### END SOLUTION

    # %% tags=["tests"]
    check("welcome.softmax", softmax)   <- exactly one check call: becomes the read-only visible test
                                           cell and the hidden, graded one carrying the question's
                                           points from the bank (labkit/grading/bank/)

Other tags (e.g. ``raises-exception``) are kept. Building keeps the stored outputs (with cell ids,
timings, the kernel's language info and the widget state) of the cells whose type and source did not
change, and says how many code cells are left to execute: execute the notebook after a build.
``--check`` writes nothing and fails when a notebook differs from its source (tests/test_notebooks.py
runs the same comparison).
"""
from __future__ import annotations

import difflib
import os
import re
import sys
import tempfile
from pathlib import Path

import nbformat

from ..grading import notebook_tools as nt

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = NOTEBOOKS / "src"
SOLUTION, TESTS = "solution", "tests"
_CHECK_CALL = re.compile(r'check\("(?P<qid>[\w.]+)", (?P<function>\w+)\)')
# nbclient's per-cell timings: part of an execution, like outputs
_EXECUTION_KEYS = ("execution",)


class SourceError(ValueError):
    """A notebook source breaks the rules above; the message names the file and the cell."""


def source_path(name: str) -> Path:
    return SOURCES / f"{name}.py"


def notebook_path(name: str) -> Path:
    return NOTEBOOKS / f"{name}.ipynb"


def source_names() -> list[str]:
    """The stems of every notebook source, sorted (``["00_welcome", "01_ensembling", ...]``)."""
    return sorted(p.stem for p in SOURCES.glob("[0-9][0-9]_*.py"))


def _split_preamble(text: str) -> tuple[str, int]:
    """(the text from the first cell marker on, how many lines came before it)."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("# %%"):
            return "".join(lines[i:]), i
    return "", len(lines)


def read_source(path: str | Path) -> list[dict]:
    """The cells of a percent source: ``[{"type", "source", "tags", "where"}]``, in order."""
    import jupytext

    path = Path(path)
    text, skipped = _split_preamble(path.read_text(encoding="utf-8"))
    nb = jupytext.reads(text, fmt="py:percent")
    # the line of each cell's marker, so that an error points at the line to edit
    markers = [skipped + i + 1 for i, line in enumerate(text.splitlines()) if line.startswith("# %%")]
    cells = []
    for i, cell in enumerate(nb.cells):
        tags = list(cell.metadata.get("tags", []))
        line = f"{path.name}:{markers[i]}" if len(markers) == len(nb.cells) else path.name
        cells.append({"type": cell.cell_type, "source": cell.source, "tags": tags,
                      "where": f"{line} (cell {i + 1})"})
    if not cells:
        raise SourceError(f"{path}: no cells (each cell starts with a '# %%' line)")
    return cells


def _test_cells(cell: dict) -> list:
    m = _CHECK_CALL.fullmatch(cell["source"].strip())
    if m is None:
        raise SourceError(f'{cell["where"]}: a "tests" cell holds exactly one call check("<question id>", '
                          f"<function>), got:\n{cell['source'][:200]}")
    try:
        visible, hidden = nt.tests(m["qid"], m["function"])
    except LookupError as e:  # an id the bank does not know
        raise SourceError(f"{cell['where']}: {e}") from None
    return [visible, hidden]


def build_cells(name: str, cells: list[dict]) -> list:
    """The notebook cells for source ``cells`` (see the module docstring for what each kind becomes)."""
    first = cells[0]
    title, _, intro = first["source"].partition("\n")
    if first["type"] != "markdown" or not title.startswith("# "):
        raise SourceError(f"{first['where']}: the first cell must be markdown opening with the '# Title' line")
    out = nt.header(name, title[2:].strip(), intro)
    for cell in cells[1:]:
        tags = cell["tags"]
        if cell["type"] == "markdown":
            if SOLUTION in tags or TESTS in tags:
                raise SourceError(f"{cell['where']}: tags {tags} belong on code cells")
            new = [nbformat.v4.new_markdown_cell(cell["source"])]
        elif SOLUTION in tags and TESTS in tags:
            raise SourceError(f"{cell['where']}: a cell is either a solution or a tests cell, not both")
        elif SOLUTION in tags:
            try:
                new = [nt.solution(cell["source"])]
            except ValueError as e:  # no markers, or no function to name the grade id after
                raise SourceError(f"{cell['where']}: {e}") from None
        elif TESTS in tags:
            new = _test_cells(cell)
        else:
            new = [nbformat.v4.new_code_cell(cell["source"])]
        other = [t for t in tags if t not in (SOLUTION, TESTS)]
        for c in new:
            if other:
                c.metadata["tags"] = other
        out.extend(new)
    return out


def build_notebook(name: str, source: str | Path | None = None):
    """The notebook built from ``notebooks/src/<name>.py`` (or ``source``), without outputs."""
    path = Path(source) if source is not None else source_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no notebook source {path}")
    cells = build_cells(name, read_source(path))
    try:
        return nt.new_notebook(name, cells)
    except ValueError as e:  # duplicate grade ids
        raise SourceError(f"{path}: {e}") from None


def _key(cell) -> tuple[str, str]:
    return cell.cell_type, cell.source


def carry_outputs(new, old) -> int:
    """Copy outputs, execution counts, timings and ids from ``old`` into the cells of ``new`` whose type
    and source are unchanged (matched in order); return how many code cells of ``new`` had no match."""
    matcher = difflib.SequenceMatcher(a=[_key(c) for c in old.cells], b=[_key(c) for c in new.cells],
                                      autojunk=False)
    matched = set()
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            src, dst = old.cells[block.a + k], new.cells[block.b + k]
            if "id" in src:
                dst["id"] = src["id"]
            for key in _EXECUTION_KEYS:
                if key in src.metadata:
                    dst.metadata[key] = src.metadata[key]
            if dst.cell_type == "code":
                dst.outputs, dst.execution_count = src.get("outputs", []), src.get("execution_count")
            matched.add(block.b + k)
    for key in ("language_info", "widgets"):  # the kernel's details and the stored widgets' state
        if key in old.metadata:
            new.metadata[key] = old.metadata[key]
    return sum(c.cell_type == "code" and i not in matched for i, c in enumerate(new.cells))


def _comparable(cell) -> dict:
    meta = {k: v for k, v in cell.metadata.items() if k not in _EXECUTION_KEYS}
    return {"cell_type": cell.cell_type, "source": cell.source, "metadata": meta}


def differences(name: str) -> list[str]:
    """How ``notebooks/<name>.ipynb`` differs from what its source builds (outputs, execution counts,
    timings and cell ids aside); [] when it is up to date."""
    built = build_notebook(name)
    path = notebook_path(name)
    if not path.is_file():
        return [f"{path} does not exist"]
    stored = nbformat.read(path, as_version=4)
    out = []
    if stored.metadata.get("labkit") != built.metadata["labkit"]:
        out.append(f"metadata.labkit is {stored.metadata.get('labkit')}, the build gives {built.metadata['labkit']}")
    a, b = [_comparable(c) for c in stored.cells], [_comparable(c) for c in built.cells]
    for i, (s, t) in enumerate(zip(a, b)):
        if s != t:
            what = [k for k in ("cell_type", "source", "metadata") if s[k] != t[k]]
            out.append(f"cell {i + 1}: {', '.join(what)} differ (stored {s['source'][:60]!r}, "
                       f"built {t['source'][:60]!r})")
    if len(a) != len(b):
        out.append(f"{len(a)} cells stored, {len(b)} built")
    return out


def _write_atomically(nb, path: Path) -> None:
    nbformat.validate(nb)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644  # mkstemp's file is private (0600)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build(name: str) -> tuple[Path, int]:
    """Build ``notebooks/<name>.ipynb`` from its source, keeping the outputs of unchanged cells;
    return (path, number of code cells without outputs: new or changed)."""
    nb = build_notebook(name)
    path = notebook_path(name)
    stale = sum(c.cell_type == "code" for c in nb.cells)
    if path.is_file():
        stale = carry_outputs(nb, nbformat.read(path, as_version=4))
    _write_atomically(nb, path)
    return path, stale


def _resolve(names: list[str]) -> list[str]:
    known = source_names()
    if not names:
        return known
    out = []
    for n in names:
        stem = Path(n).stem  # "00_welcome", "notebooks/src/00_welcome.py" or "00_welcome.ipynb"
        matches = [k for k in known if k == stem or k.startswith(f"{stem}_")]  # "00" selects "00_welcome"
        if len(matches) != 1:
            raise ValueError(f"notebook {n!r}: {'no' if not matches else 'more than one'} source in {SOURCES} "
                             f"matches (sources: {', '.join(known)})")
        out.append(matches[0])
    return out


def build_cli(args) -> int:
    names = _resolve(args.names)
    if args.check:
        bad = 0
        for name in names:
            diff = differences(name)
            if diff:
                bad += 1
                print(f"{name}: differs from {source_path(name).relative_to(ROOT)}:\n  " + "\n  ".join(diff[:10]))
            else:
                print(f"{name}: up to date")
        return 1 if bad else 0
    for name in names:
        path, stale = build(name)
        rel = path.relative_to(ROOT)
        note = "outputs kept" if stale == 0 else f"{stale} code cell(s) new or changed: execute it"
        print(f"wrote {rel} ({note})")
        if stale:
            print(f"  LABKIT_MODE=smoke LABKIT_HEADLESS=1 OMP_NUM_THREADS=1 jupyter nbconvert --to notebook --execute "
                  f"--inplace {rel}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m labkit.course.build``: the same as ``labkit build-notebooks``."""
    from ..cli import main as labkit_main

    return labkit_main(["build-notebooks", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
