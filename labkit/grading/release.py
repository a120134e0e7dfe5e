"""``labkit release``: write the student versions of the solution notebooks.

For each notebook: solution regions become a TODO stub that raises NotImplementedError (the ``def``
line, the docstring and the indentation stay), hidden-test regions are deleted (and a cell left empty
by that is dropped), outputs and execution counts are cleared, and every Colab link and the install
cell's ``git clone`` point at the student release (``ReleaseURL``), never at the solution notebooks.
nbgrader and labkit metadata stay, so the released notebook can still be graded and recognised. The
sources are only read.
"""
from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

from . import notebook_tools as nt

ROOT = Path(__file__).resolve().parents[2]  # the kit's checkout (an editable install)
DEFAULT_RELEASE_PATH = "release"
_GITHUB = re.compile(r"^https://github\.com/(?P<repo>[\w.-]+/[\w.-]+?)(?:\.git)?"
                     r"(?:/tree/(?P<branch>[\w.-]+)(?:/(?P<path>[\w./-]*?))?)?/?$")
_COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/[^\s)\]\"'<>]+?/(?P<name>[\w.-]+)\.ipynb")
_URL_IN_QUOTES = re.compile(r"""(["'])https?://[^"']+\1""")


@dataclass(frozen=True)
class ReleaseURL:
    """Where the student release lives on GitHub: repository ``OWNER/REPO``, ``branch``, folder ``path``.

    Students open ``https://colab.research.google.com/github/OWNER/REPO/blob/BRANCH/PATH/NAME.ipynb``
    (the badge) and their install cell clones ``https://github.com/OWNER/REPO``, which must hold the kit
    (the ``labkit`` package and ``data/zoo``) next to the released notebooks.
    """
    repo: str
    branch: str = "main"
    path: str = DEFAULT_RELEASE_PATH

    @classmethod
    def parse(cls, url: str) -> "ReleaseURL":
        """``https://github.com/OWNER/REPO/tree/BRANCH/PATH`` or ``https://github.com/OWNER/REPO`` (then
        the ``release/`` folder on ``main``)."""
        m = _GITHUB.match(str(url).strip())
        if not m:
            raise ValueError(f"release URL {url!r} is not a GitHub repository or folder URL "
                             f"(https://github.com/OWNER/REPO or https://github.com/OWNER/REPO/tree/BRANCH/FOLDER; "
                             f"Colab opens notebooks from GitHub)")
        if m["branch"] is None:
            return cls(m["repo"])
        return cls(m["repo"], m["branch"], (m["path"] or "").strip("/"))

    @property
    def clone_url(self) -> str:
        return f"https://github.com/{self.repo}"

    def colab(self, name: str) -> str:
        folder = f"{self.path}/" if self.path else ""
        return f"https://colab.research.google.com/github/{self.repo}/blob/{self.branch}/{folder}{name}.ipynb"

    def __str__(self) -> str:
        return f"https://github.com/{self.repo}/tree/{self.branch}" + (f"/{self.path}" if self.path else "")


def _pyproject(root: Path | None = None) -> dict:
    path = (root or ROOT) / "pyproject.toml"
    if not path.is_file():
        return {}
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the release settings ({e})") from None


def source_repository(root: Path | None = None) -> str | None:
    """``[project.urls] Repository`` of the kit's pyproject.toml: where the solution notebooks live."""
    url = _pyproject(root).get("project", {}).get("urls", {}).get("Repository")
    return url.rstrip("/") if isinstance(url, str) and url.strip() else None


def release_url(url: str | None = None, root: Path | None = None) -> ReleaseURL:
    """The release URL: ``url`` if given, else ``[tool.labkit] release-url`` of the kit's pyproject.toml,
    else the repository (``[project.urls] Repository``) with its ``release/`` folder on ``main``."""
    if url:
        return ReleaseURL.parse(url)
    data = _pyproject(root)
    setting = data.get("tool", {}).get("labkit", {}).get("release-url")
    if setting:
        try:
            return ReleaseURL.parse(setting)
        except ValueError as e:
            raise ValueError(f"{(root or ROOT) / 'pyproject.toml'}: [tool.labkit] release-url: {e}") from None
    repo = source_repository(root)
    if not repo:
        raise ValueError("no release URL: pass --url https://github.com/OWNER/REPO/tree/BRANCH/FOLDER "
                         "or set [tool.labkit] release-url in pyproject.toml")
    return ReleaseURL.parse(repo)


def point_at_release(nb, url: ReleaseURL, source_repo: str | None = None) -> int:
    """Point the Colab links and the install cell's ``git clone`` of ``nb`` at the release; return the
    number of URLs rewritten. ``nb`` is modified in place.

    A Colab link into ``source_repo`` (the kit's repository; None: any Colab link to GitHub) keeps the
    notebook it names (the badge of 01 opens the released 01); a clone URL is any quoted URL on a line
    of a code cell that runs ``git clone``.
    """
    links = _COLAB_LINK
    if source_repo:
        repo = re.escape(source_repo.removeprefix("https://github.com/"))
        links = re.compile(rf"https://colab\.research\.google\.com/github/{repo}/[^\s)\]\"'<>]*?/(?P<name>[\w.-]+)\.ipynb")
    n = 0
    for cell in nb.cells:
        source = nt._source(cell)
        new, k = links.subn(lambda m: url.colab(m["name"]), source)
        n += k
        if cell.cell_type == "code":
            lines = new.split("\n")
            for i, line in enumerate(lines):
                if "clone" in line and "git" in line:
                    lines[i], k = _URL_IN_QUOTES.subn(lambda m: f"{m[1]}{url.clone_url}{m[1]}", line)
                    n += k
            new = "\n".join(lines)
        cell.source = new
    return n


def _links_to_solutions(nb, solution_repo: str | None) -> list[int]:
    """Indexes of cells that still link to the solution notebooks (``REPO/blob/*/notebooks/``)."""
    if not solution_repo:
        return []
    repo = solution_repo.removeprefix("https://github.com/")
    pattern = re.compile(rf"(github\.com|colab\.research\.google\.com/github)/{re.escape(repo)}"
                         r"/blob/[^/\s]+/notebooks/")
    return [i for i, c in enumerate(nb.cells) if pattern.search(nt._source(c))]


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


def student_version(nb, path: str | Path = "notebook", url: ReleaseURL | None = None,
                    solution_repo: str | None = None):
    """(student notebook, solutions stubbed, hidden-test regions removed); ``nb`` is not modified.

    With ``url``, Colab links and the install cell point at the release (``point_at_release``), and a cell
    that still links to the solution notebooks of ``solution_repo`` is refused (ValueError).
    """
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
    if url is not None:
        point_at_release(nb, url, solution_repo)
        leaks = _links_to_solutions(nb, solution_repo)
        if leaks:
            raise ValueError(f"{_where(path, leaks[0], nb.cells[leaks[0]])} links to the solution notebooks "
                             f"({solution_repo}/.../notebooks/); link to the release instead")
    nbformat.validate(nb)
    return nb, n_solutions, n_hidden


def release(notebooks: list[str | Path], out: str | Path, force: bool = False, url: str | ReleaseURL | None = None,
            root: Path | None = None) -> list[Released]:
    """Write student versions of ``notebooks`` into ``out``; nothing is written if any notebook fails.

    ``url``: where the release is published (a ReleaseURL or its GitHub URL; None: ``release_url()``,
    from the kit's pyproject.toml). Raises FileExistsError when a target exists (unless ``force``),
    ValueError when a target would be a source, when ``out`` is a file, when the release URL is the
    solution notebooks' folder or is not a GitHub URL, nt.MarkerError for unbalanced markers,
    FileNotFoundError for a missing notebook.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    url = url if isinstance(url, ReleaseURL) else release_url(url, root)
    solution_repo = source_repository(root)
    if solution_repo and url.clone_url == solution_repo and url.path == "notebooks":
        raise ValueError(f"release URL {url} is the folder of the solution notebooks; "
                         f"pick another folder or repository")
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
            raise ValueError(f"{src}: not a readable notebook ({type(e).__name__}: {_one_line(e)})") from None
        student, n_sol, n_hid = student_version(nb, src, url, solution_repo)
        done.append(Released(src, target, student, n_sol, n_hid))
    names = [r.target.name for r in done]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two notebooks would be released under the same name: {dup}")
    out.mkdir(parents=True, exist_ok=True)
    for r in done:
        tmp = r.target.with_name(f".{r.target.name}.tmp")
        try:
            nt.write(r.nb, tmp)
            tmp.replace(r.target)  # a whole file or the old one, never half a notebook
        finally:
            tmp.unlink(missing_ok=True)
    return done


def _one_line(e, limit: int = 160) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def release_cli(args) -> int:
    """Exit 0 when every notebook was released, 2 (one line on stderr, nothing written) otherwise."""
    import os

    notebooks = list(args.notebooks or [])
    try:
        if not notebooks:
            notebooks = sorted(str(p) for p in (ROOT / "notebooks").glob("*.ipynb"))
            if not notebooks:
                raise ValueError(f"no notebooks given and none found in {ROOT / 'notebooks'}/")
        out = getattr(args, "out", None)
        if not out:
            if not (ROOT / "pyproject.toml").is_file():  # an installed wheel: no checkout to write into
                raise ValueError("give --out DIR: labkit is not installed from a checkout of the kit")
            out = ROOT / DEFAULT_RELEASE_PATH
        url = release_url(getattr(args, "url", None))
        done = release(notebooks, out, force=getattr(args, "force", False), url=url)
    except (OSError, ValueError) as e:
        if os.environ.get("LABKIT_DEBUG") == "1":
            raise
        print(f"labkit release: error: {_one_line(e, 400)}", file=sys.stderr)
        return 2
    for r in done:
        print(f"released {r.source} -> {r.target} ({r.solutions} solution region(s) stubbed, "
              f"{r.hidden_cells} hidden test region(s) removed)")
    print(f"Colab badges open {url.colab('NAME')}; the install cell clones {url.clone_url}")
    if url.clone_url == source_repository():
        print(f"note: {url.clone_url} also holds the solution notebooks (notebooks/); to keep them from students, "
              f"publish the release with the kit in a repository of its own and pass --url "
              f"(or set [tool.labkit] release-url)")
    return 0
