"""``labkit release``: write the student versions of the solution notebooks.

For each notebook: solution regions become a TODO stub that raises NotImplementedError (the ``def``
line, the docstring and the indentation stay), hidden-test regions are deleted (and a cell left empty
by that is dropped), outputs and execution counts are cleared. nbgrader and labkit metadata stay, so
the released notebook can still be graded and recognised. The sources are only read.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

from . import notebook_tools as nt


@dataclass
class Released:
    source: Path
    target: Path
    nb: object
    solutions: int
    hidden_cells: int


def _where(path: Path, index: int, cell) -> str:
    gid = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
    return f"{path}, cell {index + 1}" + (f" (grade_id {gid!r})" if gid else "")


def student_version(nb, path: str | Path = "notebook"):
    """(student notebook, solutions stubbed, hidden-test regions removed); ``nb`` is not modified."""
    path = Path(path)
    nb = copy.deepcopy(nb)
    cells, n_solutions, n_hidden = [], 0, 0
    for i, cell in enumerate(nb.cells):
        where = _where(path, i, cell)
        source = nt._source(cell)
        if cell.cell_type in ("code", "markdown"):
            source, n = nt.remove_hidden_tests(source, where)
            n_hidden += n
            if n and not source.strip():
                continue  # a hidden-test cell: gone
            source, n = nt.stub_solutions(source, where, markdown=cell.cell_type == "markdown")
            n_solutions += n
        cell.source = source
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)  # timings recorded by nbclient
        cells.append(cell)
    nb.cells = cells
    nb.metadata.pop("widgets", None)  # widget state belongs to outputs that are gone
    labkit_meta = nb.metadata.setdefault("labkit", {})
    labkit_meta.setdefault("notebook", path.stem)
    nbformat.validate(nb)
    return nb, n_solutions, n_hidden


def release(notebooks: list[str | Path], out: str | Path, force: bool = False) -> list[Released]:
    """Write student versions of ``notebooks`` into ``out``; nothing is written if any notebook fails.

    Raises FileExistsError when a target exists (unless ``force``), ValueError when a target would be a
    source, nt.MarkerError for unbalanced markers, FileNotFoundError for a missing notebook.
    """
    out = Path(out)
    sources = [Path(p) for p in notebooks]
    resolved_sources = {p.resolve() for p in sources}
    done: list[Released] = []
    for src in sources:
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such notebook")
        target = out / src.name
        if target.resolve() in resolved_sources:
            raise ValueError(f"{src}: releasing into {out}/ would overwrite the source notebook; pick another --out")
        if target.exists() and not force:
            raise FileExistsError(f"{target} exists; pass --force to overwrite it")
        try:
            nb = nbformat.read(src, as_version=4)
        except Exception as e:  # noqa: BLE001 - unreadable JSON or schema: say which file
            raise ValueError(f"{src}: not a readable notebook ({type(e).__name__}: {e})") from None
        student, n_sol, n_hid = student_version(nb, src)
        done.append(Released(src, target, student, n_sol, n_hid))
    names = [r.target.name for r in done]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two notebooks would be released under the same name: {dup}")
    out.mkdir(parents=True, exist_ok=True)
    for r in done:
        nt.write(r.nb, r.target)
    return done


def release_cli(args) -> int:
    notebooks = list(args.notebooks or [])
    if not notebooks:
        notebooks = sorted(str(p) for p in Path("notebooks").glob("*.ipynb"))
        if not notebooks:
            print("labkit release: no notebooks given and none found in notebooks/", file=sys.stderr)
            return 2
    try:
        done = release(notebooks, args.out, force=getattr(args, "force", False))
    except (OSError, ValueError) as e:
        print(f"labkit release: error: {e}", file=sys.stderr)
        return 1
    for r in done:
        print(f"released {r.source} -> {r.target} ({r.solutions} solution region(s) stubbed, "
              f"{r.hidden_cells} hidden test region(s) removed)")
    return 0
