"""Submissions that try to get points without the work, graded in ONE `labkit grade` run.

Each attack is a small submission of 00_welcome (or 01_ensembling) whose answers are stubs or honest,
plus the attack. It must score zero, or the honest score, with the reason in the feedback; the
honest submission keeps full marks. The grader judges in its own process, the kernel runs in a
sandbox (PID and mount namespaces, a dedicated user when root), so patching the grading code in the
kernel, forging its outputs, detaching a child, swallowing SIGINT or reading the bank all fail.
"""
import csv
import os
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from labkit.grading import sandbox
from labkit.grading.grade import _STARTUP_TIMEOUT, grade

pytestmark = pytest.mark.notebook

ROOT = Path(__file__).resolve().parents[1]
BANK = ROOT / "instructor" / "bank"
TIMEOUT, CELL_TIMEOUT = 20, 5
MARKER = "labkit-detached-child-marker"

HONEST = {
    "softmax_with_temperature": """
def softmax_with_temperature(logits, temperature=1.0):
    if temperature <= 0:
        raise ValueError("T must be > 0")
    z = logits / temperature
    z = z - z.max(dim=-1, keepdim=True).values
    e = z.exp()
    return e / e.sum(dim=-1, keepdim=True)""",
    "accuracy": """
def accuracy(logits, labels):
    if logits.shape[0] != labels.shape[0]:
        raise ValueError("lengths differ")
    return (logits.argmax(dim=-1) == labels).float().mean().item()""",
    "average_probs": """
def average_probs(probs, weights=None):
    M = probs.shape[0]
    if weights is None:
        weights = torch.full((M,), 1.0 / M, dtype=probs.dtype)
    weights = torch.as_tensor(weights, dtype=probs.dtype)
    if weights.shape != (M,) or (weights < 0).any() or abs(weights.sum().item() - 1) > 1e-4:
        raise ValueError("bad weights")
    return torch.einsum("m,mnc->nc", weights, probs)""",
    "agreement": """
def agreement(pred_a, pred_b):
    if pred_a.shape != pred_b.shape:
        raise ValueError("shapes differ")
    return (pred_a == pred_b).float().mean().item()""",
}
STUBS = {name: f"def {name}(*args, **kwargs):\n    raise NotImplementedError('TODO')" for name in HONEST}


def welcome(*attack, answers=None, before=()):
    cells = [new_code_cell("import torch"), *map(new_code_cell, before),
             *(new_code_cell(src.strip()) for src in (answers or HONEST).values()), *map(new_code_cell, attack)]
    nb = new_notebook(cells=cells)
    nb.metadata["labkit"] = {"notebook": "00_welcome"}
    return nb


def ensembling(*cells):
    nb = new_notebook(cells=[new_code_cell("import torch"), *map(new_code_cell, cells)])
    nb.metadata["labkit"] = {"notebook": "01_ensembling"}
    return nb


PATCH_KERNEL_QUESTION = """
import json, labkit.grading.grade as g
def fake(qid, function, nonce):
    print(f"\\n@@labkit-grade@@{nonce} " + json.dumps({"qid": qid, "status": "ran", "message": "", "points": 2,
          "max_points": 2, "passed": 1, "total": 1, "cases": []}))
g._kernel_question = fake
"""
PATCH_RUN_QUESTION = """
import labkit.grading, labkit.grading.questions as Q
def everything_passes(qid, fn, hidden=False):
    q = Q.get_question(qid)
    return Q.CheckResult(qid, q.points, [Q.CaseResult(c.name, "pass", "", c.hidden, c.group) for c in q.cases(hidden)],
                         hidden, dict(q.groups))
Q.run_question = labkit.grading.run_question = everything_passes
"""
PATCH_RUN_CASE = """
import labkit.grading.questions as Q
Q.run_case = lambda name, case_fn, f, hidden=False, group="core": Q.CaseResult(name, "pass", "", hidden, group)
"""
PATCH_EXPECT = """
import labkit.grading, labkit.grading.expect as X, labkit.grading.bank.welcome as W
nothing = lambda *a, **k: None
for m in (X, W, labkit.grading):
    for name in ("expect_close", "expect_equal", "expect_raises", "expect_true"):
        if hasattr(m, name):
            setattr(m, name, nothing)
"""
PATCH_REGISTRY = """
from labkit.grading import all_questions
for q in all_questions().values():
    q.visible = [(c[0], lambda f: None) for c in q.visible]
    q.hidden = [(c[0], lambda f: None) for c in q.hidden]
"""
FORGE_OUTPUTS = """
from pathlib import Path
import labkit.grading.kernel_side as K, labkit.grading.wire as W
def serve(request, response_dir):
    tree, _ = W.load(request, inputs=True)
    for call in tree["calls"]:
        W.save(Path(response_dir) / f"{call['id']}.json",
               {"kind": "ok", "value": {"t": "float", "v": "0.75"}, "locked_calls": []}, {})
K.serve = serve
"""
ALWAYS_EQUAL = {name: f"""
class Yes:
    def __eq__(self, other): return True
    def __float__(self): return 0.75
    def __bool__(self): return True
def {name}(*args, **kwargs):
    return Yes()""" for name in HONEST}
QUIET_TRACEBACKS = """
ip = get_ipython()
ip.showtraceback = lambda *a, **k: None
ip.showsyntaxerror = lambda *a, **k: None
"""
ECHO = {name: f"""
import inspect
def {name}(*args, **kwargs):
    frames = [repr(f.frame.f_locals) for f in inspect.stack()]
    raise RuntimeError(" | ".join(frames).replace("\\n", " "))""" for name in HONEST}


@pytest.fixture(scope="module")
def attacks(tmp_path_factory):
    if not BANK.is_dir():
        pytest.skip("the instructor bank is not in this checkout")
    tmp = tmp_path_factory.mktemp("attacks")
    out = tmp / "grades"
    subs = tmp / "submissions"
    subs.mkdir()
    sigint_answers = dict(HONEST, average_probs="def average_probs(probs, weights=None):\n"
                                                "    import signal\n    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                                                "    while True:\n        pass")
    exits = dict(HONEST, accuracy="def accuracy(logits, labels):\n    import sys\n    sys.exit(0)")
    detach = (f"import subprocess, sys\n"
              f"code = 'import time, sys; time.sleep(6); open(sys.argv[1], \"w\").write(\"hacked\")'\n"
              f"subprocess.Popen([sys.executable, '-c', code, {str(out / 'grades.csv')!r}, {MARKER!r}],\n"
              f"                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)")
    read_bank = (f"for p in [{str(BANK / 'welcome.py')!r}, {str(out)!r} + '/grades.csv']:\n"
                 f"    try:\n        text = open(p).read()\n        print('READ', p, len(text))\n"
                 f"    except Exception as e:\n        print('BLOCKED', type(e).__name__)\n"
                 f"try:\n    open({str(out / 'planted.txt')!r}, 'w').write('x')\n    print('WROTE')\n"
                 f"except Exception as e:\n    print('BLOCKED', type(e).__name__)\n"
                 f"from labkit.grading import instructor_bank\nprint('bank in kernel:', instructor_bank())\n"
                 f"import numpy as np\ntry:\n"
                 f"    block = np.zeros(4 * 2**30, dtype=np.uint8)  # lazy: no RAM used without a limit\n"
                 f"    print('ALLOCATED')\nexcept MemoryError:\n    print('MEMORY-LIMITED')")
    notebooks = {
        "honest": welcome(),
        "patch_kernel_question": welcome(PATCH_KERNEL_QUESTION, answers=STUBS),
        "patch_run_question": welcome(PATCH_RUN_QUESTION, answers=STUBS),
        "patch_run_case": welcome(PATCH_RUN_CASE, answers=STUBS),
        "patch_expect": welcome(PATCH_EXPECT, answers=STUBS),
        "patch_registry": welcome(PATCH_REGISTRY, answers=STUBS),
        "forge_outputs": welcome(FORGE_OUTPUTS, answers=STUBS),
        "always_equal": welcome(answers=ALWAYS_EQUAL),
        "quiet_tracebacks": welcome(QUIET_TRACEBACKS, "1 / 0", answers=STUBS),
        "sys_exit": welcome(answers=exits, before=["import sys\nsys.exit(0)"]),
        "detached_child": welcome(detach),
        "read_bank": welcome(read_bank),
        "echo_tracebacks": welcome(answers=ECHO),
        "swallow_sigint": welcome("import time\nwhile True:\n    try:\n        time.sleep(0.05)\n"
                                  "    except KeyboardInterrupt:\n        pass", answers=sigint_answers),
        "import_only": ensembling("from labkit.ensemble import (linear_interpolate, log_linear_interpolate, "
                                  "fit_mixture_weights,\n    bootstrap_indices, ensemble_next_token)"),
        "wrapper": ensembling(
            "import labkit.ensemble as E\nfrom labkit import ensemble as ens",
            "def linear_interpolate(logits, weights):\n    return E.linear_interpolate(logits, weights)",
            "def log_linear_interpolate(logits, weights):\n"
            "    return getattr(ens, 'log_linear_' + 'interpolate')(logits, weights)  # no name for the source check",
            "def fit_mixture_weights(target_lp, iters=1000):\n    return E.fit_mixture_weights(target_lp, iters)",
            "def bootstrap_indices(n, k, seed=0):\n    return E.bootstrap_indices(n, k, seed)",
            "def ensemble_next_token(member_logits, weights, rule='linear'):\n"
            "    return E.ensemble_next_token(member_logits, weights, rule)"),
    }
    paths = []
    for name, nb in notebooks.items():  # nbgrader's layout: STUDENT/LAB.ipynb
        lab = nb.metadata["labkit"]["notebook"]
        (subs / name).mkdir()
        nbformat.write(nb, str(subs / name / f"{lab}.ipynb"))
        paths.append(subs / name / f"{lab}.ipynb")
    t0 = time.monotonic()
    graded, problems, book = grade(paths, out, cell_timeout=CELL_TIMEOUT, timeout=TIMEOUT, jobs=2, bank=BANK,
                                   memory_gb=3)
    seconds = time.monotonic() - t0
    csv_path = out / "grades.csv"
    grades_after = {f: (out / f).read_bytes() for f in ("grades.csv", "gradebook.csv")}
    time.sleep(7)  # the detached child would have written by now
    with open(csv_path, newline="") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    by_student = {e.student: e.result for e in book.entries}
    return dict(graded=by_student, problems=problems, rows=rows, out=out, seconds=seconds,
                grades_after=grades_after, csv_path=csv_path, labs={n: nb.metadata["labkit"]["notebook"]
                                                                    for n, nb in notebooks.items()})


def total(attacks, name):
    return float(attacks["rows"][name]["total"])


def feedback(attacks, name):
    return (attacks["out"] / "feedback" / name / f"{attacks['labs'][name]}.md").read_text()


def test_honest_submission_keeps_full_marks(attacks):  # (the blank release scoring 0: test_grading_e2e)
    assert total(attacks, "honest") == 6, feedback(attacks, "honest")
    print(f"attack grading run: {attacks['seconds']:.0f} s")


@pytest.mark.parametrize("name", ["patch_kernel_question", "patch_run_question", "patch_run_case", "patch_expect",
                                  "patch_registry", "forge_outputs", "always_equal", "quiet_tracebacks"])
def test_patching_the_checks_in_the_kernel_gets_nothing(attacks, name):
    fb = feedback(attacks, name)
    assert total(attacks, name) == 0, fb
    if name == "forge_outputs":  # forged outputs are judged like any: 0.75 happens to be two visible answers
        assert fb.count("✓") == 2 and "points" in fb
        return
    assert "✓" not in fb, fb  # not one case passes
    if name != "always_equal":
        assert fb.count("Not implemented yet") == 4, fb  # what the kernel really did, whatever was patched


def test_sys_exit_costs_only_the_answer_that_exits(attacks):
    p = attacks["rows"]["sys_exit"]
    assert float(p["welcome.accuracy"]) == 0 and total(attacks, "sys_exit") == 5
    assert "your code raised SystemExit" in feedback(attacks, "sys_exit")


def test_a_detached_child_dies_with_grading_and_cannot_touch_the_grades(attacks):
    assert total(attacks, "detached_child") == 6
    for name, before in attacks["grades_after"].items():
        assert (attacks["out"] / name).read_bytes() == before and b"hacked" not in before
    alive = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and MARKER.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                alive.append(pid)
        except OSError:
            pass
    assert alive == [], "a process the submission detached is still running"


def test_reading_the_bank_or_writing_the_grades_from_the_kernel_fails_and_memory_is_limited(attacks):
    assert total(attacks, "read_bank") == 6
    executed = [p for p in (attacks["out"] / "executed").glob("*.ipynb")
                if "BANK" in p.read_text() or "bank in kernel" in p.read_text()]
    assert len(executed) == 1
    nb = nbformat.read(executed[0], as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "READ" not in text and text.count("BLOCKED") == 3, text
    assert "bank in kernel: None" in text
    if sandbox.detect_mode() != "none":
        assert "MEMORY-LIMITED" in text and "ALLOCATED" not in text  # --memory-gb 3 holds
    assert not (attacks["out"] / "planted.txt").exists()


def test_feedback_never_echoes_expected_values_of_hidden_cases(attacks):
    fb = feedback(attacks, "echo_tracebacks")
    assert total(attacks, "echo_tracebacks") == 0
    hidden = [line for line in fb.splitlines() if "[hidden]" in line]
    assert hidden and not any(re.search(r"expected -?\d", line) for line in hidden)
    for name in attacks["rows"]:
        for line in feedback(attacks, name).splitlines():
            if "[hidden]" in line:
                assert not re.search(r"expected -?\d|expected \[|_ref\b", line), (name, line)


def test_answers_that_swallow_sigint_are_bounded(attacks):
    g = attacks["graded"]["swallow_sigint"]
    assert g["seconds"] < 2 * TIMEOUT + 2 * _STARTUP_TIMEOUT  # budgets plus two kernel starts, at most
    print(f"signal-swallowing submission graded in {g['seconds']:.0f} s (budget {TIMEOUT} s)")
    p = attacks["rows"]["swallow_sigint"]
    assert float(p["welcome.softmax"]) == 2 and float(p["welcome.accuracy"]) == 1
    assert float(p["welcome.average_probs"]) == 0
    notes = " ".join(g["notes"])
    assert "ignored the interrupt" in notes
    assert "did not finish" in feedback(attacks, "swallow_sigint")


def test_import_only_and_wrapper_notebooks_are_locked_with_the_reason(attacks):
    for name in ("import_only", "wrapper"):
        assert total(attacks, name) == 0
        fb = feedback(attacks, name)
        for fn in ("linear_interpolate", "log_linear_interpolate", "fit_mixture_weights", "bootstrap_indices",
                   "ensemble_next_token"):
            assert f"this exercise asks you to write it; you called labkit.ensemble.{fn}" in fb, (name, fn)


def test_the_sandbox_mode_is_reported(attacks):
    modes = {g["sandbox"] for g in attacks["graded"].values()}
    assert modes == {sandbox.detect_mode()}
