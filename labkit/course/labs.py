"""``labkit labs``: run every solution notebook headless and write a short report.

Each notebook runs in a fresh kernel with its own folder as the working directory, with
``LABKIT_MODE`` set and ``LABKIT_REPORT_FILE`` pointing at a per-notebook file that
``labkit.course.report.record`` / ``claim`` append to. The executed notebooks go to OUT/executed/, the
report to OUT/report.md and OUT/report.json: per lab its key results, its claims (reproduced or not),
its error if it failed, its wall time, plus the device and the mode; and per syllabus claim (1-20) its
status across every lab's checks of it: reproduced (all pass), not reproduced (all fail), partly
(mixed) or not yet taught (no lab checks it), with the checks behind it.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import nbformat


class _NotebookTimeout(Exception):
    pass


def _versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "datasets", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is reported as such
            out[name] = "missing"
    from .. import __version__

    out["labkit"] = __version__
    return out


def run_notebook(path: Path, out: Path, mode: str, timeout: float, cell_timeout: float = 600.0) -> dict:
    """Execute one notebook into out/executed/; return its lab entry for the report.

    A cell gets at most ``cell_timeout`` seconds (and never more than what is left of the notebook's
    ``timeout``). A cell that times out is reported as such with its number (``entry["timed_out_cell"]``),
    so a hung kernel costs minutes, not the whole notebook budget."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    from .kernel import CurrentEnvKernelManager
    from .report import read_report_file

    stem = path.stem
    records_file = out / "records" / f"{stem}.jsonl"
    records_file.unlink(missing_ok=True)
    entry = {"notebook": stem, "path": str(path), "ok": False, "error": None, "seconds": 0.0,
             "records": {}, "claims": [], "timed_out_cell": None}
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:  # noqa: BLE001 - an unreadable notebook is this lab's error, not the run's end
        entry["error"] = f"not a readable notebook: {type(e).__name__}: {e}"
        return entry
    t0 = time.monotonic()
    deadline = t0 + timeout

    def check_budget(cell=None, cell_index=None, **_):
        if time.monotonic() > deadline:
            raise _NotebookTimeout(f"the notebook ran past its {timeout:g} s budget "
                                   f"(stopped before cell {cell_index + 1})")

    client = NotebookClient(
        nb, kernel_name="python3", kernel_manager_class=CurrentEnvKernelManager, allow_errors=False,
        record_timing=True, startup_timeout=180,
        timeout_func=lambda cell: max(1.0, min(cell_timeout, deadline - time.monotonic())), shutdown_kernel="immediate",
        resources={"metadata": {"path": str(path.parent.resolve())}}, on_cell_start=check_budget,
    )
    env = dict(os.environ, LABKIT_MODE=mode, LABKIT_REPORT_FILE=str(records_file.resolve()),
               PYDEVD_DISABLE_FILE_VALIDATION="1", LABKIT_HEADLESS="1")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with open(out / "logs" / f"{stem}.log", "wb") as log:
        try:
            client.execute(env=env, stdout=log, stderr=log)
            entry["ok"] = True
        except CellExecutionError as e:
            entry["error"] = _cell_error(nb, e)
        except CellTimeoutError:
            index = _running_cell(nb)
            entry["timed_out_cell"] = index
            where = f"cell {index + 1}" if index is not None else "a cell"
            entry["error"] = (f"{where} ran past its time limit ({cell_timeout:g} s per cell, {timeout:g} s per "
                              "notebook)")
        except _NotebookTimeout as e:
            entry["error"] = str(e)
        except DeadKernelError:
            entry["error"] = f"the kernel died (see {out / 'logs' / (stem + '.log')})"
        except Exception as e:  # noqa: BLE001 - e.g. no kernel could start: report it for this lab
            entry["error"] = f"{type(e).__name__}: {e}"
    entry["seconds"] = round(time.monotonic() - t0, 1)
    nbformat.write(nb, str(out / "executed" / path.name))
    entry.update(read_report_file(records_file))
    return entry


def _running_cell(nb) -> int | None:
    """The index of the code cell that was running: the first one nbclient started but did not finish."""
    for i, cell in enumerate(nb.cells):
        timing = cell.get("metadata", {}).get("execution", {})
        if cell.cell_type == "code" and "iopub.execute_input" in timing and "shell.execute_reply" not in timing:
            return i
    return None


def _cell_error(nb, err) -> str:
    """'cell 7: ValueError: ...' for the first cell whose outputs hold an error."""
    for i, cell in enumerate(nb.cells):
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                return f"cell {i + 1}: {o.get('ename')}: {' '.join(str(o.get('evalue', '')).split())[:300]}"
    return " ".join(str(err).split())[:300]


REPRODUCED, NOT_REPRODUCED, PARTLY, NOT_TAUGHT = "reproduced", "not reproduced", "partly", "not yet taught"


def syllabus_table(labs: list[dict]) -> list[dict]:
    """One row per syllabus claim: {"claim", "title", "status", "labs", "checks"}.

    A check (one ``claim(...)`` call) counts for every syllabus number it carries. The status is
    reproduced when all of a claim's checks passed, not reproduced when none did, partly when some did,
    and not yet taught when no lab checked it (a lab that failed before its claims checks nothing).
    """
    from .report import SYLLABUS_CLAIMS

    rows = []
    for number, title in SYLLABUS_CLAIMS.items():
        checks = [{"lab": lab["notebook"], "text": c["text"], "passed": c["passed"], "detail": c["detail"]}
                  for lab in labs for c in lab["claims"] if number in c.get("syllabus", [])]
        n_passed = sum(c["passed"] for c in checks)
        status = (NOT_TAUGHT if not checks else REPRODUCED if n_passed == len(checks)
                  else NOT_REPRODUCED if n_passed == 0 else PARTLY)
        rows.append({"claim": number, "title": title, "status": status,
                     "labs": sorted({c["lab"] for c in checks}), "checks": checks})
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        s = json.dumps(v)
        return s if len(s) <= 80 else s[:77] + "..."
    return str(v)


def report_markdown(report: dict) -> str:
    """The human-readable report: a summary table, then per lab its claims and key results."""
    v = report["versions"]
    lines = ["# labkit labs report", "",
             f"Device: {report['device']} · mode: {report['mode']} · torch {v.get('torch')} · "
             f"transformers {v.get('transformers')} · Python {v.get('python')} · labkit {v.get('labkit')}", "",
             "| lab | status | claims reproduced | wall time |", "|---|---|---|---|"]
    for lab in report["labs"]:
        n_ok = sum(c["passed"] for c in lab["claims"])
        status = "ok" if lab["ok"] else "**error**"
        lines.append(f"| {lab['notebook']} | {status} | {n_ok}/{len(lab['claims'])} | {lab['seconds']:.0f} s |")
    lines += ["", "## Syllabus claims", ""]
    if any(not lab["ok"] for lab in report["labs"]):
        lines += ["A lab failed: claims it would have checked after its error show as not yet taught.", ""]
    lines += ["| # | claim | status | checks passed | checks |", "|---|---|---|---|---|"]
    for row in report.get("syllabus") or syllabus_table(report["labs"]):
        n_ok = sum(c["passed"] for c in row["checks"])
        count = f"{n_ok}/{len(row['checks'])}" if row["checks"] else "-"
        status = row["status"] if row["status"] in (REPRODUCED, NOT_TAUGHT) else f"**{row['status']}**"
        checks = "<br>".join(f"{'✓' if c['passed'] else '✗'} {c['lab']}: {c['text']}".replace("|", "\\|")
                            for c in row["checks"])
        lines.append(f"| {row['claim']} | {row['title']} | {status} | {count} | {checks or '-'} |")
    for lab in report["labs"]:
        lines += ["", f"## {lab['notebook']}", ""]
        if lab["error"]:
            lines += [f"Error: {lab['error']}", ""]
        if lab.get("retried_after"):
            lines += [f"Rerun in a fresh kernel after: {lab['retried_after']}", ""]
        if lab["claims"]:
            lines += ["Claims:", ""]
            for c in lab["claims"]:
                detail = f" ({c['detail']})" if c["detail"] else ""
                numbers = ", ".join(map(str, c.get("syllabus", [])))
                lines.append(f"- {'✓' if c['passed'] else '✗'} [{numbers}] {c['text']}{detail}")
            lines.append("")
        if lab["records"]:
            lines += ["| key result | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(val)} |" for k, val in lab["records"].items()]
        if not (lab["claims"] or lab["records"] or lab["error"]):
            lines.append("(no key results recorded)")
    return "\n".join(lines) + "\n"


def run_labs(notebooks: list[str | Path], out: str | Path, mode: str | None = None, timeout: float = 1800.0,
             echo=print, cell_timeout: float = 600.0, retries: int = 1) -> dict:
    """Run the notebooks one after the other; write OUT/report.{md,json}; return the report dict."""
    from ..device import device_name, run_mode

    mode = mode or run_mode()
    out = Path(out)
    (out / "executed").mkdir(parents=True, exist_ok=True)
    (out / "records").mkdir(parents=True, exist_ok=True)
    report = {"mode": mode, "device": device_name(), "versions": _versions(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "labs": []}
    for p in map(Path, notebooks):
        lab = run_notebook(p, out, mode, timeout, cell_timeout)
        for _ in range(retries):
            # A hung cell (once seen in 02_merging under heavy load: kernel idle, client still waiting for
            # the reply) is rerun from a fresh kernel, and the report says so; an error is never rerun.
            if lab["timed_out_cell"] is None:
                break
            first = lab["error"]
            echo(f"retry {lab['notebook']}: {first}; running it again in a fresh kernel")
            lab = run_notebook(p, out, mode, timeout, cell_timeout)
            lab["retried_after"] = first
        report["labs"].append(lab)
        n_ok = sum(c["passed"] for c in lab["claims"])
        status = "ok   " if lab["ok"] else "ERROR"
        echo(f"{status} {lab['notebook']:<28} {n_ok}/{len(lab['claims'])} claims  {lab['seconds']:6.0f} s"
             + (f"  {lab['error']}" if lab["error"] else ""))
    report["syllabus"] = syllabus_table(report["labs"])
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
    return report


def labs_cli(args) -> int:
    notebooks = list(args.notebooks or []) or sorted(str(p) for p in Path("notebooks").glob("*.ipynb"))
    if not notebooks:
        print("labkit labs: no notebooks given and none found in notebooks/", file=sys.stderr)
        return 2
    report = run_labs(notebooks, args.out, mode=args.mode, timeout=args.timeout,
                      cell_timeout=getattr(args, "cell_timeout", 600.0), retries=getattr(args, "retries", 1))
    labs = report["labs"]
    failed = [lab["notebook"] for lab in labs if not lab["ok"]]
    claims = [c for lab in labs for c in lab["claims"]]
    seconds = sum(lab["seconds"] for lab in labs)
    statuses = [row["status"] for row in report["syllabus"]]
    print(f"labs: {len(labs) - len(failed)}/{len(labs)} notebooks ran, "
          f"{sum(c['passed'] for c in claims)}/{len(claims)} checks passed; syllabus claims: "
          + ", ".join(f"{statuses.count(s)} {s}" for s in (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_TAUGHT))
          + ", "
          f"{seconds:.0f} s on {report['device']} ({report['mode']} mode) -> {Path(args.out) / 'report.md'}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
