"""``labkit grade``: execute submissions and score every question of their notebook.

The rule: this process (the grader) never imports or runs a submission's code. Per submission (in
parallel, one worker process and one fresh kernel each):
  1. copy the file into the submission's sandbox folder (the submission itself is only ever read);
  2. start a kernel in a sandbox (``sandbox``: its own PID and mount namespaces, a dedicated user id
     when the grader is root, memory/CPU limits; the instructor bank, the grades folder and the other
     submissions are not visible in it) and run the notebook's code cells in order, each with the
     per-cell timeout, all within the per-notebook budget; errors do not stop the run;
  3. for each question, run its test cases (visible and hidden, from the instructor bank) *here*: a
     case makes its inputs, the kernel is asked to call the student's function on them and to write
     back the outputs as data (``wire``: JSON + safetensors, no pickle), and the case judges them
     here (``judge``). The kernel never sees an expected value or a verdict. An answer that calls the
     function that answers its exercise (``Question.implemented_by``) scores 0 (``lock``);
  4. kill every process of the sandbox (detached children included) and wait until they are gone.
Then, with every sandbox gone, grades.csv (one row per submission: points per question, total, max)
and one markdown feedback file per submission are written (atomically), and a one-line summary is
printed. A crash, a wrong answer or an endless loop costs that question only; a kernel that dies or
ignores interrupts is restarted and the cells that ran fine are replayed, within the budgets.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from . import sandbox, wire

_PROBE_TIMEOUT = 15.0  # seconds a kernel gets to answer "pass" after an interrupt before it is restarted
_PRELOAD_TIMEOUT = 120.0  # importing torch and the call runner in a fresh kernel
_STARTUP_TIMEOUT = 120.0  # seconds a kernel gets to start


class GradeError(ValueError):
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
            hint = ("; the capstone is graded by `labkit leaderboard` on the submission folders it packs"
                    if name.endswith("_capstone") else "")
            raise GradeError(f"{path}: its metadata names notebook {name!r}, which has no questions in the bank "
                             f"(known: {', '.join(known) or 'none'}){hint}")
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
# One sandboxed kernel, driven cell by cell


class _Kernel:
    """A fresh ipykernel in the sandbox of ``job``; ``run(source, timeout)`` -> (status, outputs, reply content)."""

    def __init__(self, job: "_Job"):
        self.job = job
        self.client = None
        self.restarts = 0
        self.launcher_pid = None

    def start(self) -> None:
        from nbclient import NotebookClient

        from .sandbox import SandboxKernelSpecManager

        self._timeout = None
        self._reply: dict = {}
        ksm = SandboxKernelSpecManager()
        ksm.sandbox_config = str(self.job.config_path)
        self.client = NotebookClient(
            nbformat.v4.new_notebook(), kernel_name="python3",
            allow_errors=True, interrupt_on_timeout=True,
            error_on_timeout={"ename": "LabkitCellTimeout", "evalue": "", "traceback": []},
            timeout_func=lambda cell: self._timeout, startup_timeout=_STARTUP_TIMEOUT, iopub_timeout=5,
            shutdown_kernel="immediate", record_timing=False, resources={"metadata": {"path": str(self.job.work)}},
            on_cell_executed=lambda cell, cell_index, execute_reply: self._reply.update(execute_reply or {}),
        )
        from jupyter_client.manager import AsyncKernelManager

        self.client.km = AsyncKernelManager(kernel_spec_manager=ksm, kernel_name="python3")
        self.client.km.connection_file = str(self.job.root / "connection.json")
        # the kernel's own stderr (startup chatter, C-level crash messages) goes to a log, not the console
        self._log = open(self.job.log, "ab")
        self.client.start_new_kernel(env=self.job.env(), stdout=self._log, stderr=self._log)
        self.client.start_new_kernel_client()
        try:
            self.launcher_pid = self.client.km.provisioner.process.pid
        except Exception:  # noqa: BLE001 - the pid is only needed for the final sweep
            self.launcher_pid = None
        self.job.launchers.append(self.launcher_pid)
        if self.launcher_pid:
            try:  # without namespaces, the kernel's process group is what can be found again
                self.job.groups.append(os.getpgid(self.launcher_pid))
            except OSError:
                pass
        status, _, content = self.run("__import__('labkit.grading.kernel_side', fromlist=['_']).preload()",
                                      _PRELOAD_TIMEOUT)
        if status != "ok":
            raise RuntimeError(f"the kernel could not import the grading code ({status}: "
                               f"{content.get('ename', '')} {_one_line(content.get('evalue', ''))})")

    def stop(self) -> None:
        if self.client is not None and self.client.km is not None:
            try:
                self.client._cleanup_kernel()
            except Exception:  # noqa: BLE001 - a dead kernel may not clean up politely; it is gone anyway
                pass
        self.client = None
        self.job.sweep()  # the whole sandbox of this kernel, detached children included
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 3) -> str:
        """The last lines the kernel wrote to stderr (why it died, when it says so)."""
        try:
            lines = [ln for ln in Path(self.job.log).read_text(errors="replace").splitlines()
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

        if self.client is None:
            return "dead", [], {}
        cell = nbformat.v4.new_code_cell(source)
        self.client.nb.cells = [cell]
        self._timeout, self._reply = max(1.0, float(timeout)), {}
        try:
            self.client.execute_cell(cell, 0)
        except DeadKernelError:
            return "dead", list(cell.get("outputs", [])), {}
        except Exception as e:  # noqa: BLE001 - e.g. the channels closed when the sandbox was killed
            return "dead", list(cell.get("outputs", [])), {"ename": type(e).__name__, "evalue": str(e)}
        content = self._reply.get("content", {})
        if content.get("status") == "error":
            return ("timeout" if content.get("ename") == "LabkitCellTimeout" else "error"), list(cell.outputs), content
        return "ok", list(cell.outputs), content

    def responsive(self, timeout: float = _PROBE_TIMEOUT) -> bool:
        """After an interrupt: does the kernel answer again, or is it stuck (the code ignored the interrupt)?"""
        status, _, _ = self.run("pass", min(_PROBE_TIMEOUT, max(1.0, timeout)))
        return status == "ok"


class _Job:
    """The folders, user id, limits and processes of one submission's sandbox.

    root/ (the grader's, read-only to the kernel): connection.json, sandbox.json, kernel.log
    root/work/ the kernel's working folder (the notebook's copy), root/req/ the inputs the grader
    writes (read-only in the sandbox), root/resp/ where the kernel writes outputs.
    """

    def __init__(self, base: Path, name: str, hide: list[str], memory_bytes: int, cpu_seconds: int):
        self.mode = sandbox.detect_mode()
        self.base = base
        self.root = Path(tempfile.mkdtemp(prefix="job-", dir=base))
        os.chmod(self.root, 0o755)
        self.work, self.req, self.resp = self.root / "work", self.root / "req", self.root / "resp"
        for d in (self.work, self.req, self.resp):
            d.mkdir()
        self.log = self.root / "kernel.log"
        self.launchers: list = []
        self.groups: list = []
        self.uid = self.gid = None
        if self.mode == "uid":
            self.uid = self.gid = _free_uid()
            for d in (self.work, self.resp):
                os.chown(d, self.uid, self.gid)
                os.chmod(d, 0o700)
        self.config_path = self.root / "sandbox.json"
        limits = {"data": memory_bytes, "cpu": cpu_seconds, "fsize": 2 * 2**30}
        if self.mode == "uid":
            limits["nproc"] = 512
        cfg = {"mode": self.mode, "uid": self.uid, "gid": self.gid, "job_dir": str(self.root),
               "work_dir": str(self.work), "base_dir": str(base), "hide": hide, "read_only": [str(self.req)],
               "limits": limits, "expose": _needed_paths()}
        self.config_path.write_text(json.dumps(cfg))
        self.counter = 0

    def env(self) -> dict:
        w = str(self.work)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABKIT_BANK", "JPY_", "JUPYTER_"))}
        env.update(PYDEVD_DISABLE_FILE_VALIDATION="1", LABKIT_GRADING="1", LABKIT_GRADING_KERNEL="1", HOME=w,
                   LABKIT_HEADLESS="1",  # sliders draw once (labkit.course.interactive): no hang on interact
                   IPYTHONDIR=f"{w}/.ipython", MPLCONFIGDIR=f"{w}/.matplotlib", XDG_CACHE_HOME=f"{w}/.cache",
                   XDG_CONFIG_HOME=f"{w}/.config", JUPYTER_RUNTIME_DIR=f"{w}/.jupyter", TMPDIR=w,
                   HF_HOME=f"{w}/.cache/huggingface", PYTHONDONTWRITEBYTECODE="1")
        return env

    def new_exchange(self) -> tuple[Path, Path]:
        """A fresh (request file, response folder) pair for one kernel call."""
        self.counter += 1
        resp = self.resp / f"r{self.counter}"
        resp.mkdir()
        if self.uid is not None:
            os.chown(resp, self.uid, self.gid)
        return self.req / f"q{self.counter}.json", resp

    def sweep(self) -> list[int]:
        """Kill every process of this sandbox and wait until they are gone; returns the pids that survived."""
        child = None
        try:
            text = (self.root / "sandbox.pid").read_text().strip()
            child = int(text) if text.isdigit() else None
            (self.root / "sandbox.pid").unlink()
        except OSError:
            pass
        ns = sandbox.pid_namespace(child) if child else None
        if ns == sandbox.pid_namespace(os.getpid()):
            ns = None  # never the grader's own namespace
        left = []
        for launcher in [p for p in self.launchers if p] or [None]:
            left = sandbox.kill_all(launcher, child, ns, self.uid)
        self.launchers.clear()
        if self.mode == "none":
            left += _kill_sessions(self.groups)
        return left


def _needed_paths() -> list[str]:
    """Folders the kernel must be able to read: the interpreter, its libraries, the kit and its zoo."""
    import labkit

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             str(Path(labkit.__file__).resolve().parents[1])}
    paths |= {p for p in sys.path if p and os.path.isdir(p)}
    out = sorted({str(Path(p).resolve()) for p in paths})
    # keep the outermost of nested paths: binding a folder brings its subfolders along
    return [p for p in out if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in out)]


def _free_uid() -> int:
    """A user id for one submission's kernel: unused by any process, outside the usual account range."""
    for _ in range(100):
        uid = 2_000_000_000 + secrets.randbelow(100_000_000)
        if not sandbox.processes_of_uid(uid):
            return uid
    raise RuntimeError("no free user id for the sandbox")


def _kill_sessions(groups: list[int]) -> list[int]:
    """Best effort without namespaces: SIGKILL the kernel's process groups and sessions (a child that
    started its own session escapes this; ``grade`` warns about it)."""
    import signal

    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except OSError:
            pass
    left = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            pgrp, sid = int(fields[2]), int(fields[3])
        except (OSError, IndexError, ValueError):
            continue
        if (pgrp in groups or sid in groups) and int(entry) != os.getpid():
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                left.append(int(entry))
    return left


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_outcomes(resp: Path, calls: list, status: str, why: str) -> dict:
    """{call id: Outcome} from the kernel's response files, validated; a missing file gets ``status``/``why``."""
    from .judge import Outcome

    out = {}
    for cid, _, _, is_grad in calls:
        path = resp / f"{cid}.json"
        if not path.exists():
            out[cid] = Outcome(status, message=why)
            continue
        try:
            tree, tensors = wire.load(path)
            if not isinstance(tree, dict):
                raise wire.WireError("malformed result")
            kind = tree.get("kind")
            if kind == "ok":
                out[cid] = Outcome("ok", wire.decode(tree.get("value"), tensors), grad=is_grad)
            elif kind == "raised":
                where = tree.get("where") if isinstance(tree.get("where"), dict) else {}
                where = {"line": where.get("line") if isinstance(where.get("line"), int) else None,
                         "func": str(where.get("func", ""))[:100], "text": str(where.get("text", ""))[:200]}
                out[cid] = Outcome("raised", type_name=str(tree.get("type", "Exception"))[:100],
                                   message=str(tree.get("message", ""))[: wire.MAX_STR], where=where)
            elif kind == "missing":
                out[cid] = Outcome("missing")
            else:
                out[cid] = Outcome("error", message=f"the answer's output could not be sent back "
                                                    f"({_one_line(tree.get('message', ''), 120)})")
        except wire.WireError as e:
            out[cid] = Outcome("error", message=f"the answer's output was refused: {e}")
    return out


def _runtime_locked(resp: Path, calls: list) -> set:
    seen = set()
    for cid, *_ in calls:
        try:
            tree, _ = wire.load(resp / f"{cid}.json")
            names = tree.get("locked_calls", []) if isinstance(tree, dict) else []
            seen |= {n for n in names if isinstance(n, str)}
        except (wire.WireError, OSError):
            continue
    return seen


def grade_one(sub: dict, cell_timeout: float, timeout: float, executed_dir: str | None = None,
              bank: str | None = None, base_dir: str | None = None, hide: list | None = None,
              memory_gb: float = 6.0) -> dict:
    """Grade one submission (``sub``: student, notebook, name, raw bytes, questions); returns a plain dict.

    Runs in a worker process; the student's code runs only in the sandboxed kernel (see ``sandbox``).
    Budgets: the notebook's cells share ``timeout`` (each at most ``cell_timeout``); testing the answers
    gets another ``timeout`` (each call round at most ``cell_timeout``); a watchdog kills the sandbox at
    2 x ``timeout`` plus two kernel start-up allowances, whatever the kernel does with signals.
    """
    from .judge import judge_question
    from .lock import static_lock_check
    from .questions import get_question, load_banks, load_instructor_bank

    if bank:
        load_instructor_bank(bank)
    else:
        load_banks()
    t0 = time.monotonic()
    notes: list[str] = []
    results: dict[str, dict] = {}
    nb = nbformat.reads(sub["raw"].decode("utf-8"), as_version=4)
    own_base = base_dir is None
    base = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="labkit-grade-"))
    os.chmod(base, 0o755)
    hard_deadline = t0 + 2 * timeout + 2 * _STARTUP_TIMEOUT  # two budgets, two kernel starts at most
    cpu = int(2 * timeout + 2 * _STARTUP_TIMEOUT) * 4
    job = _Job(base, sub["name"], list(hide or []), int(memory_gb * 2**30), cpu)
    try:
        (job.work / sub["name"]).write_bytes(sub["raw"])  # the copy the student code sees
        if job.uid is not None:
            os.chown(job.work / sub["name"], job.uid, job.gid)
        kernel = _Kernel(job)
        stop_watch, killed = threading.Event(), threading.Event()

        def watchdog():
            if not stop_watch.wait(max(1.0, hard_deadline - time.monotonic())):
                killed.set()  # no restart after this: whatever runs now is the last of this submission
                notes.append(f"the submission ran past its hard limit of {2 * timeout + 2 * _STARTUP_TIMEOUT:g} s "
                             f"and was killed")
                job.sweep()

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            kernel.start()
        except Exception as e:  # noqa: BLE001 - no kernel: nothing can be graded
            stop_watch.set()
            kernel.stop()
            tail = kernel.log_tail()
            return {**_blank(sub, f"could not start a kernel: {type(e).__name__}: {e}"
                                  + (f" (kernel said: {_one_line(tail, 200)})" if tail else "")),
                    "seconds": time.monotonic() - t0}
        ok_sources: list[str] = []

        def recover(why: str, deadline: float) -> bool:
            """Restart a dead or stuck kernel and replay the cells that had run fine (within ``deadline``)."""
            tail = kernel.log_tail()
            if tail:
                why += f" (kernel said: {_one_line(tail, 200)})"
            if killed.is_set():
                notes.append(f"{why}; the kernel was not restarted (the submission's hard time limit had passed)")
                kernel.stop()
                return False
            if deadline - time.monotonic() < 5:
                notes.append(f"{why}; no time was left to restart the kernel")
                kernel.stop()
                return False
            notes.append(f"{why}; the kernel was restarted and the {len(ok_sources)} cell(s) that had run fine "
                         f"were replayed")
            try:
                kernel.restart()
            except Exception as e:  # noqa: BLE001
                notes.append(f"the kernel could not be restarted: {type(e).__name__}: {_one_line(e)}")
                kernel.stop()
                return False
            for src in ok_sources:
                remaining = deadline - time.monotonic()
                if remaining <= 1:
                    notes.append("the replay of the cells ran out of time")
                    break
                kernel.run(src, min(cell_timeout, remaining))
            return True

        try:
            deadline = time.monotonic() + timeout
            code_cells = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()]
            for i, cell in code_cells:
                label = f"cell {i + 1}"
                remaining = deadline - time.monotonic()
                if remaining <= 1 or killed.is_set():
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
                    if not kernel.responsive(min(cell_timeout, deadline - time.monotonic())):
                        if not recover(f"{label} ignored the interrupt", deadline):
                            break
                else:
                    if not recover(f"the kernel died while running {label}", deadline):
                        break
            sources = [c.source for c in nb.cells if c.cell_type == "code"]
            if kernel.client is None:  # the notebook's budget ran out with a stuck kernel: a fresh one to test
                recover("the kernel was stopped when the notebook's budget ran out",
                        time.monotonic() + timeout + _STARTUP_TIMEOUT)
            test_deadline = time.monotonic() + timeout
            for q in sub["questions"]:
                question = get_question(q["qid"])
                static = static_lock_check(sources, q["function"], question.implemented_by)
                state = {"dead": False}

                def send(question, calls, q=q, state=state):
                    remaining = test_deadline - time.monotonic()
                    if killed.is_set():
                        remaining = 0
                    if state["dead"] or kernel.client is None or remaining <= 1:
                        why = ("testing stopped: the submission used up its time budget" if remaining <= 1
                               else "not tested: an earlier call of this answer did not finish" if state["dead"]
                               else "not tested: no kernel was left (an earlier answer hung and time ran out)")
                        return {cid: _lost(why) for cid, *_ in calls}, set()
                    req, resp = job.new_exchange()
                    tensors: dict = {}
                    tree = {"function": q["function"], "qid": q["qid"], "locked": list(question.implemented_by),
                            "calls": []}
                    for cid, call_tree, call_tensors, _ in calls:
                        renamed = _rename_tensors(call_tree, call_tensors, tensors, cid)
                        tree["calls"].append({"id": cid, **renamed})
                    wire.save(req, tree, tensors)
                    if job.uid is not None:
                        for p in (req, req.with_suffix(".safetensors")):
                            os.chmod(p, 0o644)
                    src = (f"__import__('labkit.grading.kernel_side', fromlist=['_']).serve("
                           f"{str(req)!r}, {str(resp)!r})")
                    limit = min(cell_timeout, remaining)
                    status, _, content = kernel.run(src, limit)
                    if status == "timeout":
                        why = f"stopped after {limit:g} s: the answer did not finish (an endless loop?)"
                        outcomes = _read_outcomes(resp, calls, "timeout", why)
                        state["dead"] = True
                        if not kernel.responsive(min(cell_timeout, test_deadline - time.monotonic())):
                            recover(f"question {q['qid']} ignored the interrupt", test_deadline)
                    elif status == "dead":
                        outcomes = _read_outcomes(resp, calls, "dead", "the kernel died while testing this answer")
                        state["dead"] = True
                        recover(f"the kernel died while testing {q['qid']}", test_deadline)
                    else:
                        why = ("no result came back" if status == "ok" else
                               f"testing this answer failed: {content.get('ename')}: "
                               f"{_one_line(content.get('evalue', ''))}")
                        outcomes = _read_outcomes(resp, calls, "error", why)
                    return outcomes, _runtime_locked(resp, calls)

                try:
                    res = judge_question(question, send, hidden=True, static_lock=static)
                except Exception as e:  # noqa: BLE001 - a bank bug must not take the other questions down
                    res = _failed(q, "error", f"grading this question failed: {type(e).__name__}: {_one_line(e)}")
                results[q["qid"]] = res
        finally:
            stop_watch.set()
            kernel.stop()
        left = job.sweep()
        if left:
            notes.append(f"{len(left)} process(es) of this submission could not be killed")
    finally:
        shutil.rmtree(job.root, ignore_errors=True)
        if own_base:
            shutil.rmtree(base, ignore_errors=True)
    if executed_dir:
        try:
            nbformat.write(nb, str(Path(executed_dir) / f"{sub['student']}.ipynb"))
        except Exception as e:  # noqa: BLE001 - the executed copy is a convenience; grades matter more
            notes.append(f"could not save the executed copy: {e}")
    return {"student": sub["student"], "notebook": sub["notebook"], "results": results, "notes": notes,
            "error": None, "seconds": time.monotonic() - t0, "sandbox": job.mode}


def _lost(why: str):
    from .judge import Outcome

    return Outcome("error", message=why)


def _rename_tensors(tree, tensors: dict, into: dict, prefix: str) -> dict:
    """Move one call's tensors into the request's shared file under ``prefix``-ed keys."""
    mapping = {k: f"{prefix}_{k}" for k in tensors}
    for k, v in tensors.items():
        into[mapping[k]] = v

    def walk(node):
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            if node.get("t") in ("tensor", "ndarray") and node.get("k") in mapping:
                out["k"] = mapping[node["k"]]
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(tree)


def _failed(q: dict, status: str, message: str) -> dict:
    return {"qid": q["qid"], "status": status, "message": message, "points": 0.0, "max_points": q["points"],
            "passed": 0, "total": 0, "cases": []}


def _blank(sub: dict, error: str) -> dict:
    return {"student": sub["student"], "notebook": sub["notebook"], "notes": [], "error": error,
            "results": {q["qid"]: _failed(q, "error", error) for q in sub["questions"]}}


def _grade_star(args):
    return grade_one(*args[:4], **args[4])


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


def _hide_list(bank: Path, out: Path, paths: list[Path]) -> list[str]:
    """Folders the kernel must not see: the instructor bank(s), the grades, the submissions' folders.

    A folder that holds the Python environment or the kit itself stays visible (the kernel needs it).
    """
    import labkit

    keep = [Path(sys.prefix).resolve(), Path(labkit.__file__).resolve().parent, Path(sys.base_prefix).resolve()]
    hide = {bank.resolve(), out.resolve()}
    default = Path(labkit.__file__).resolve().parents[1] / "instructor"
    if default.is_dir():
        hide.add(default)
    for p in paths:
        hide.add(p.resolve().parent)
    safe = []
    for h in sorted(hide):
        if any(k == h or h in k.parents for k in keep) or h == Path("/"):
            continue
        safe.append(str(h))
    return safe


def grade(paths: list[str | Path], out: str | Path, cell_timeout: float = 120.0, timeout: float = 900.0,
          jobs: int | None = None, save_executed: bool = True, roster=None, bank: str | Path | None = None,
          memory_gb: float = 6.0):
    """Grade submissions and write the gradebook into ``out``; return (graded dicts, problems, gradebook).

    ``roster``: gradebook.read_roster's entries (None: students are named by their files).
    ``bank``: the instructor bank folder with the hidden cases (default: ``LABKIT_BANK`` or the
    repository's ``instructor/bank``); GradeError (a ValueError) when there is none. ``memory_gb``: the
    data-segment limit of each kernel.
    """
    from .questions import default_instructor_bank, load_instructor_bank

    if not (isinstance(memory_gb, (int, float)) and 0 < memory_gb < float("inf")):
        raise ValueError(f"--memory-gb must be a positive number of GiB, got {memory_gb}")
    out = Path(out)
    bank_path = Path(bank) if bank else default_instructor_bank()
    if bank_path is None or not Path(bank_path).is_dir():
        raise GradeError(f"no instructor bank at {bank_path}: the hidden cases are needed to grade (pass --bank DIR, "
                         f"or set LABKIT_BANK)" if bank_path else
                         "no instructor bank found (instructor/bank next to the package, LABKIT_BANK, or --bank DIR): "
                         "the hidden cases are needed to grade")
    bank_path = Path(bank_path).resolve()
    load_instructor_bank(bank_path)
    subs, problems = prepare(paths)
    hashes = {s.path: hashlib.sha256(s.raw).hexdigest() for s in subs}
    executed = None
    if save_executed and subs:
        executed = out / "executed"
        executed.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="labkit-grade-"))
    os.chmod(base, 0o755)
    hide = _hide_list(bank_path, out, [s.path for s in subs])
    options = {"bank": str(bank_path), "base_dir": str(base), "hide": hide, "memory_gb": memory_gb}
    work = [({"student": s.student, "notebook": s.notebook, "name": s.path.name, "raw": s.raw,
              "questions": s.questions}, cell_timeout, timeout, str(executed) if executed else None, options)
            for s in subs]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work) or 1))
    try:
        if jobs == 1:
            graded = [_grade_star(w) for w in work]
        else:
            # spawn: each worker starts clean (no inherited threads or torch state) and drives its own kernel
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                graded = list(pool.map(_grade_star, work))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if graded and sandbox.detect_mode() == "none":  # a warning, not a file that could not be graded
        print("labkit grade: warning: neither root nor user namespaces are available here, so a process a "
              "submission detached could outlive grading, and kernels can read what the grader's user can read",
              file=sys.stderr)
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
                                   jobs=getattr(args, "jobs", None), roster=roster, bank=getattr(args, "bank", None),
                                   memory_gb=getattr(args, "memory_gb", 6.0))
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
