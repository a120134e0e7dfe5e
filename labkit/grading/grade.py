"""``labkit grade``: execute submissions and score every question of their notebook.

Per submission (in parallel, one process and one fresh kernel each):
  1. copy the file into a temporary folder (the submission itself is only ever read);
  2. run its code cells in order, each with the per-cell timeout (an endless cell is interrupted and
     the next cell runs) and all of them within the per-notebook budget; errors do not stop the run;
  3. in the same kernel, run each question of that notebook (visible + hidden cases) against the
     function of that name in the notebook's namespace, one question per execution, each with the
     per-cell timeout: a crash, a wrong answer, a missing function or an endless loop costs that
     question only. A kernel that dies or ignores interrupts is restarted and the cells that ran
     fine are replayed before grading goes on.
Then grades.csv (one row per submission: points per question, total, max) and one markdown feedback
file per submission are written, and a one-line summary is printed.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import secrets
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

_MARK = "@@labkit-grade@@"
_PROBE_TIMEOUT = 15.0  # seconds a kernel gets to answer "pass" after an interrupt before it is restarted
_PRELOAD_TIMEOUT = 300.0  # importing the question banks (torch, transformers) in a fresh kernel


class GradeError(Exception):
    """A submission that cannot be graded (unreadable, unknown notebook, no questions)."""


@dataclass
class Submission:
    path: Path
    student: str
    notebook: str
    raw: bytes
    questions: list[dict] = field(default_factory=list)  # [{"qid", "function", "points"}]


# ----------------------------------------------------------------------------------------------
# Which notebook is this?


def identify_notebook(nb, path: str | Path, known: list[str]) -> str:
    """The notebook stem of a submission: its ``labkit.notebook`` metadata, else its file name.

    The file name matches when it equals a known stem or contains one (e.g. "alice_00_welcome").
    """
    from .notebook_tools import notebook_name

    name = notebook_name(nb)
    if name:
        if name not in known:
            raise GradeError(f"{path}: its metadata names notebook {name!r}, which has no questions in the bank "
                             f"(known: {', '.join(known) or 'none'})")
        return name
    stem = Path(path).stem
    if stem in known:
        return stem
    hits = sorted((k for k in known if k in stem), key=len, reverse=True)
    if hits:
        return hits[0]
    raise GradeError(f"{path}: cannot tell which notebook this is: no labkit metadata, and the file name matches "
                     f"none of {', '.join(known) or 'no known notebooks'}")


# ----------------------------------------------------------------------------------------------
# Inside the kernel


def _kernel_preload() -> None:
    """Import the grading code and every question bank, so no question's time limit pays for imports."""
    from labkit.grading.questions import load_banks

    load_banks()


def _kernel_question(qid: str, function: str, nonce: str) -> None:
    """Run one question against the notebook's namespace and print its result as one JSON line."""
    try:
        from IPython import get_ipython

        ns = get_ipython().user_ns
    except Exception:  # noqa: BLE001 - not in IPython: the __main__ module's globals
        import __main__

        ns = vars(__main__)
    from labkit.grading.questions import get_question, run_question

    if function not in ns:
        q = get_question(qid)
        payload = {"qid": qid, "status": "missing", "points": 0.0, "max_points": q.points, "cases": [],
                   "passed": 0, "total": len(q.cases(hidden=True)),
                   "message": f"`{function}` is not defined in the notebook (did the cell defining it run without error?)"}
    else:
        payload = {"status": "ran", "message": "", **run_question(qid, ns[function], hidden=True).to_dict()}
    print(f"\n{_MARK}{nonce} {json.dumps(payload)}", flush=True)


# ----------------------------------------------------------------------------------------------
# One kernel, driven cell by cell


class _Kernel:
    """A fresh ipykernel in ``workdir``; ``run(source, timeout)`` -> (status, outputs, reply content)."""

    def __init__(self, workdir: str, log_path: str):
        self.workdir, self.log_path = workdir, log_path
        self.client = None
        self.restarts = 0

    def start(self) -> None:
        from nbclient import NotebookClient

        from ..course.kernel import CurrentEnvKernelManager

        self._timeout = None
        self._reply: dict = {}
        self.client = NotebookClient(
            nbformat.v4.new_notebook(), kernel_name="python3", kernel_manager_class=CurrentEnvKernelManager,
            allow_errors=True, interrupt_on_timeout=True,
            error_on_timeout={"ename": "LabkitCellTimeout", "evalue": "", "traceback": []},
            timeout_func=lambda cell: self._timeout, startup_timeout=180, iopub_timeout=5,
            shutdown_kernel="immediate", record_timing=False, resources={"metadata": {"path": self.workdir}},
            on_cell_executed=lambda cell, cell_index, execute_reply: self._reply.update(execute_reply or {}),
        )
        self.client.km = self.client.create_kernel_manager()
        env = dict(os.environ, PYDEVD_DISABLE_FILE_VALIDATION="1", LABKIT_GRADING="1")
        # the kernel's own stderr (startup chatter, C-level crash messages) goes to a log, not the console
        self._log = open(self.log_path, "ab")
        self.client.start_new_kernel(env=env, stdout=self._log, stderr=self._log)
        self.client.start_new_kernel_client()
        status, _, content = self.run("__import__('labkit.grading.grade', fromlist=['_'])._kernel_preload()",
                                      _PRELOAD_TIMEOUT)
        if status != "ok":
            raise RuntimeError(f"the kernel could not import the question banks ({status}: "
                               f"{content.get('ename', '')} {_one_line(content.get('evalue', ''))})")

    def stop(self) -> None:
        if self.client is not None and self.client.km is not None:
            try:
                self.client._cleanup_kernel()
            except Exception:  # noqa: BLE001 - a dead kernel may not clean up politely; it is gone anyway
                pass
        self.client = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 3) -> str:
        """The last lines the kernel wrote to stderr (why it died, when it says so)."""
        try:
            lines = [ln for ln in Path(self.log_path).read_text(errors="replace").splitlines()
                     if ln.strip() and "over TCP without encryption" not in ln]
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()

    def run(self, source: str, timeout: float) -> tuple[str, list, dict]:
        from nbclient.exceptions import DeadKernelError

        cell = nbformat.v4.new_code_cell(source)
        self.client.nb.cells = [cell]
        self._timeout, self._reply = max(1.0, float(timeout)), {}
        try:
            self.client.execute_cell(cell, 0)
        except DeadKernelError:
            return "dead", list(cell.get("outputs", [])), {}
        content = self._reply.get("content", {})
        if content.get("status") == "error":
            return ("timeout" if content.get("ename") == "LabkitCellTimeout" else "error"), list(cell.outputs), content
        return "ok", list(cell.outputs), content

    def responsive(self) -> bool:
        """After an interrupt: does the kernel answer again, or is it stuck (the code ignored the interrupt)?"""
        status, _, _ = self.run("pass", _PROBE_TIMEOUT)
        return status == "ok"


def _stdout(outputs: list) -> str:
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stdout")


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def grade_one(sub: dict, cell_timeout: float, timeout: float, executed_dir: str | None = None) -> dict:
    """Grade one submission (``sub``: student, notebook, name, raw bytes, questions); returns a plain dict.

    Runs in a worker process. The submission's bytes are written to a temporary copy; the original file
    is never opened for writing.
    """
    t0 = time.monotonic()
    notes: list[str] = []
    results: dict[str, dict] = {}
    nb = nbformat.reads(sub["raw"].decode("utf-8"), as_version=4)
    nonce = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="labkit-grade-") as tmp:
        workdir = Path(tmp) / "work"
        workdir.mkdir()
        (workdir / sub["name"]).write_bytes(sub["raw"])  # the copy the student code sees
        kernel = _Kernel(str(workdir), str(Path(tmp) / "kernel.log"))
        try:
            kernel.start()
        except Exception as e:  # noqa: BLE001 - no kernel: nothing can be graded
            return {**_blank(sub, f"could not start a kernel: {type(e).__name__}: {e}"), "seconds": time.monotonic() - t0}
        ok_sources: list[str] = []

        def recover(why: str) -> None:
            """Restart a dead or stuck kernel and replay the cells that had run fine."""
            tail = kernel.log_tail()
            if tail:
                why += f" (kernel said: {_one_line(tail, 200)})"
            notes.append(f"{why}; the kernel was restarted and the {len(ok_sources)} cell(s) that had run fine were replayed")
            kernel.restart()
            for src in ok_sources:
                kernel.run(src, cell_timeout)

        try:
            deadline = t0 + timeout
            code_cells = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()]
            for i, cell in code_cells:
                label = f"cell {i + 1}"
                remaining = deadline - time.monotonic()
                if remaining <= 1:
                    notes.append(f"{label} and the cells after it were not run: the notebook used up its {timeout:g} s budget")
                    break
                limit = min(cell_timeout, remaining)
                status, outputs, content = kernel.run(cell.source, limit)
                cell.outputs = outputs
                if status == "ok":
                    ok_sources.append(cell.source)
                elif status == "error":
                    notes.append(f"{label} raised {content.get('ename')}: {_one_line(content.get('evalue', ''))}")
                elif status == "timeout":
                    notes.append(f"{label} was stopped after {limit:g} s (an endless loop?); the cells after it still ran")
                    if not kernel.responsive():
                        recover(f"{label} ignored the interrupt")
                else:
                    recover(f"the kernel died while running {label}")
            for q in sub["questions"]:
                src = (f"__import__('labkit.grading.grade', fromlist=['_'])._kernel_question("
                       f"{q['qid']!r}, {q['function']!r}, {nonce!r})")
                status, outputs, content = kernel.run(src, cell_timeout)
                res = None
                for line in _stdout(outputs).splitlines():
                    if line.startswith(f"{_MARK}{nonce} "):
                        res = json.loads(line.split(" ", 1)[1])
                if status == "timeout":
                    res = _failed(q, "timeout", f"stopped after {cell_timeout:g} s: the answer did not finish (an endless loop?)")
                    if not kernel.responsive():
                        recover(f"question {q['qid']} ignored the interrupt")
                elif status == "dead":
                    res = _failed(q, "dead", "the kernel died while testing this answer")
                    recover(f"the kernel died while testing {q['qid']}")
                elif res is None:
                    why = (f"{content.get('ename')}: {_one_line(content.get('evalue', ''))}" if status == "error"
                           else "no result came back")
                    res = _failed(q, "error", f"testing this answer failed: {why}")
                results[q["qid"]] = res
        finally:
            kernel.stop()
    if executed_dir:
        try:
            nbformat.write(nb, str(Path(executed_dir) / f"{sub['student']}.ipynb"))
        except Exception as e:  # noqa: BLE001 - the executed copy is a convenience; grades matter more
            notes.append(f"could not save the executed copy: {e}")
    return {"student": sub["student"], "notebook": sub["notebook"], "results": results, "notes": notes,
            "error": None, "seconds": time.monotonic() - t0}


def _failed(q: dict, status: str, message: str) -> dict:
    return {"qid": q["qid"], "status": status, "message": message, "points": 0.0, "max_points": q["points"],
            "passed": 0, "total": 0, "cases": []}


def _blank(sub: dict, error: str) -> dict:
    return {"student": sub["student"], "notebook": sub["notebook"], "notes": [], "error": error,
            "results": {q["qid"]: _failed(q, "error", error) for q in sub["questions"]}}


def _grade_star(args):
    return grade_one(*args)


# ----------------------------------------------------------------------------------------------
# Reports


def _pts(x: float) -> str:
    return f"{round(float(x), 2):g}"


def feedback_markdown(graded: dict, questions: list[dict]) -> str:
    """The feedback file of one submission: total, a table per question, each case's verdict, run notes."""
    res = graded["results"]
    total = sum(r["points"] for r in res.values())
    max_total = sum(q["points"] for q in questions)
    lines = [f"# Feedback: {graded['student']} ({graded['notebook']})", "",
             f"**Total: {_pts(total)} / {_pts(max_total)} points**", ""]
    if graded.get("error"):
        lines += [f"Grading failed: {graded['error']}", ""]
    lines += ["| question | points | cases passed |", "|---|---|---|"]
    for q in questions:
        r = res[q["qid"]]
        cases = f"{r['passed']}/{r['total']}" if r["total"] else "-"
        lines.append(f"| {q['qid']} | {_pts(r['points'])} / {_pts(q['points'])} | {cases} |")
    for q in questions:
        r = res[q["qid"]]
        lines += ["", f"## {q['qid']} (`{q['function']}`): {_pts(r['points'])} / {_pts(q['points'])}", ""]
        if r.get("message"):
            lines.append(r["message"])
        if r["cases"] and all(c["status"] == "todo" for c in r["cases"]):
            lines.append("Not implemented yet (the function still raises NotImplementedError).")
        else:
            for c in r["cases"]:
                mark = "✓" if c["status"] == "pass" else "✗"
                tag = " [hidden]" if c["hidden"] else ""
                lines.append(f"- {mark} {c['name']}{tag}" + (f": {c['message']}" if c["message"] else ""))
    if graded["notes"]:
        lines += ["", "## Notes from running your notebook", ""] + [f"- {n}" for n in graded["notes"]]
    return "\n".join(lines) + "\n"


def _write_reports(graded: list[dict], subs: dict[str, Submission], out: Path, problems: list[str] = (),
                   roster=None):
    """The gradebook (labkit.grading.gradebook): gradebook.csv, grades.csv, report.md, histograms/ and
    feedback/STUDENT/LAB.md; returns it."""
    from . import gradebook
    from .questions import notebooks

    book = gradebook.build([(subs[g["student"]].path, g) for g in graded], roster, problems, labs=notebooks())

    def feedback(entry) -> str:
        questions = subs[entry.result["student"]].questions
        return feedback_markdown({**entry.result, "student": entry.student}, questions)

    gradebook.write(book, out, feedback)
    return book


# ----------------------------------------------------------------------------------------------
# Entry points


def prepare(paths: list[str | Path]) -> tuple[list[Submission], list[str]]:
    """Read and identify each submission; return (gradable submissions, "path: why" for the others)."""
    from .questions import notebooks, questions_for

    known = notebooks()
    subs, problems, used = [], [], set()
    for p in map(Path, paths):
        try:
            raw = p.read_bytes()
        except OSError as e:
            problems.append(f"{p}: cannot read it ({e.strerror or e})")
            continue
        try:
            nb = nbformat.reads(raw.decode("utf-8"), as_version=4)
        except Exception as e:  # noqa: BLE001 - broken JSON, wrong encoding, not a notebook
            problems.append(f"{p}: not a readable notebook ({type(e).__name__}: {_one_line(e, 120)})")
            continue
        try:
            name = identify_notebook(nb, p, known)
        except GradeError as e:
            problems.append(str(e))
            continue
        student, n = p.stem, 2
        while student in used:  # two files with one stem in different folders
            student, n = f"{p.stem}-{n}", n + 1
        used.add(student)
        qs = [{"qid": q.id, "function": q.function, "points": q.points} for q in questions_for(name)]
        subs.append(Submission(p, student, name, raw, qs))
    return subs, problems


def grade(paths: list[str | Path], out: str | Path, cell_timeout: float = 120.0, timeout: float = 900.0,
          jobs: int | None = None, save_executed: bool = True, roster=None):
    """Grade submissions and write the gradebook into ``out``; return (graded dicts, problems, gradebook).

    ``roster``: gradebook.read_roster's entries (None: students are named by their files)."""
    out = Path(out)
    subs, problems = prepare(paths)
    hashes = {s.path: hashlib.sha256(s.raw).hexdigest() for s in subs}
    executed = None
    if save_executed and subs:
        executed = out / "executed"
        executed.mkdir(parents=True, exist_ok=True)
    work = [({"student": s.student, "notebook": s.notebook, "name": s.path.name, "raw": s.raw,
              "questions": s.questions}, cell_timeout, timeout, str(executed) if executed else None) for s in subs]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work) or 1))
    if jobs == 1:
        graded = [_grade_star(w) for w in work]
    else:
        # spawn: each worker starts clean (no inherited threads or torch state) and drives its own kernel
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            graded = list(pool.map(_grade_star, work))
    for s in subs:  # belt and braces: grading must never change a submission
        if s.path.exists() and hashlib.sha256(s.path.read_bytes()).hexdigest() != hashes[s.path]:
            problems.append(f"{s.path}: the file changed while it was being graded (by something else)")
    for g in graded:
        if g.get("error"):
            problems.append(f"{g['student']}: {g['error']}")
    book = _write_reports(graded, {s.student: s for s in subs}, out, problems, roster)
    return graded, problems, book


def grade_cli(args) -> int:
    """Exit 0: every file graded and counted; 1: a file could not be graded or counted (named on stderr);
    bad arguments raise ValueError (the CLI prints one line and exits 2). The numbers are checked by
    labkit.cli."""
    from . import gradebook

    t0 = time.monotonic()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    roster = gradebook.read_roster(args.roster) if getattr(args, "roster", None) else None
    paths = gradebook.find_submissions(args.submissions, out)
    graded, problems, book = grade(paths, out, cell_timeout=args.cell_timeout, timeout=args.timeout,
                                   jobs=getattr(args, "jobs", None), roster=roster)
    for line in book.notices():
        print(f"labkit grade: {line}", file=sys.stderr)
    for s in book.summaries():
        stats = (f"mean {s.mean:.2f}, median {_pts(s.median)}, min {_pts(min(s.totals))}, max {_pts(max(s.totals))}"
                 if s.totals else "none counted")
        print(f"{s.lab}: {s.n} counted of {_pts(s.max_points)} points: {stats}")
    print(f"graded {len(graded)} of {len(paths)} file(s) for {len(book.students)} student(s) in "
          f"{time.monotonic() - t0:.0f} s -> {out / 'gradebook.csv'}, {out / 'report.md'}, {out / 'feedback'}/")
    failed = problems or book.duplicates or any(g.get("error") for g in graded)
    return 1 if failed else 0
