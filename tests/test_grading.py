"""The question API: expect_* messages and tolerances, check() verdicts, the registry and the banks."""
import math
import random

import numpy as np
import pytest
import torch

from labkit.grading import (CheckFailure, Question, check, default_tolerance, expect_close, expect_equal,
                            expect_raises, expect_true, questions_for, register)
from labkit.grading import questions as qmod


def fails(fn, *args, **kw) -> str:
    with pytest.raises(CheckFailure) as e:
        fn(*args, **kw)
    return str(e.value)


# ---------------------------------------------------------------- expect_close


def test_expect_close_passes_within_default_float32_tolerance():
    e = torch.tensor([1.0, -2.0, 1000.0])
    expect_close(e + torch.tensor([9e-6, -9e-6, 9e-3]), e)  # atol 1e-5 + rtol 1e-5 * |e|


def test_expect_close_reports_count_max_error_index_values_and_tolerance():
    e = torch.zeros(2, 3)
    g = e.clone()
    g[1, 2] = 0.5
    g[0, 0] = 0.25
    msg = fails(expect_close, g, e, "log-probs")
    assert msg == ("log-probs: 2 of 6 values differ (shape [2, 3], torch.float32 on cpu); max abs error 0.5 at [1, 2]: "
                   "got 0.5, expected 0; tolerance atol=1e-05 + rtol=1e-05*|expected|")


def test_expect_close_tolerance_boundary_is_atol_plus_rtol_times_expected():
    e = torch.tensor([100.0], dtype=torch.float64)
    expect_close(e + 0.9 * (1e-3 + 1e-4 * 100), e, rtol=1e-4, atol=1e-3)
    msg = fails(expect_close, e + 1.1 * (1e-3 + 1e-4 * 100), e, rtol=1e-4, atol=1e-3)
    assert "(shape [1], torch.float64 on cpu)" in msg and "tolerance atol=0.001 + rtol=0.0001*|expected|" in msg


def test_expect_close_shape_dtype_device_and_type_mismatches():
    e = torch.zeros(2, 2)
    assert fails(expect_close, torch.zeros(4), e, "probs") == "probs: shape [4], expected [2, 2]"
    assert "dtype torch.float64, expected torch.float32 (shape [2, 2] is right)" in fails(
        expect_close, torch.zeros(2, 2, dtype=torch.float64), e)
    assert "expected a torch.Tensor of shape [2, 2], got list" in fails(expect_close, [[0, 0], [0, 0]], e)
    assert "expected a torch.Tensor" in fails(expect_close, None, e)
    expect_close(torch.zeros(2, 2, dtype=torch.float64), e, check_dtype=False)
    if torch.cuda.is_available():
        assert "on device" in fails(expect_close, torch.zeros(2, 2), e.cuda())


def test_expect_close_nans_and_infs():
    e = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    g = e.clone()
    g[0, 1] = float("nan")
    assert "1 NaN value(s) of 4, first at [0, 1] where 2 was expected" in fails(expect_close, g, e)
    both = torch.tensor([float("nan"), 1.0])
    expect_close(both.clone(), both)  # NaN where the reference has NaN is fine
    assert "expected NaN at [0]" in fails(expect_close, torch.tensor([0.0, 1.0]), both)
    inf = torch.tensor([float("-inf"), 0.0])
    expect_close(inf.clone(), inf)
    assert "at [0] got inf, expected -inf" in fails(expect_close, torch.tensor([float("inf"), 0.0]), inf)


def test_expect_close_scalars_numpy_and_nested():
    expect_close(torch.tensor(0.75), 0.75)
    expect_close(np.float64(0.75), 0.75)
    expect_close(0.75 + 1e-9, 0.75)
    assert "got 0.7, expected 0.75" in fails(expect_close, 0.7, 0.75, "accuracy")
    assert "expected a number close to 0.75, got str" in fails(expect_close, "0.75", 0.75)
    assert "expected a single number, got a tensor of shape [2]" in fails(expect_close, torch.zeros(2), 0.0)
    assert "got NaN, expected 1" in fails(expect_close, math.nan, 1.0)
    expect_close((torch.ones(2), 1.0), (torch.ones(2), 1.0))
    assert fails(expect_close, (torch.ones(2), torch.zeros(1)), (torch.ones(2), torch.ones(1)), "out").startswith("out[1]: ")
    assert "expected 2 items, got 1" in fails(expect_close, [torch.ones(1)], [torch.ones(1), torch.ones(1)])
    assert "keys differ: missing ['b']" in fails(expect_close, {"a": 1.0}, {"a": 1.0, "b": 2.0})
    expect_close(torch.tensor([1.0, 2.0]), [1.0, 2.0], check_dtype=False)


def test_expect_close_integer_tensors_are_exact():
    e = torch.tensor([1, 2, 3])
    expect_close(e.clone(), e)
    assert "1 of 3 values differ" in fails(expect_close, torch.tensor([1, 2, 4]), e)


def test_default_tolerance_by_dtype_and_device():
    assert default_tolerance(torch.float32, "cpu") == (1e-5, 1e-5)
    assert default_tolerance(torch.float64) == (1e-7, 1e-7)
    r16, a16 = default_tolerance(torch.bfloat16)
    assert r16 > 1e-3 and a16 > 1e-3  # bf16 keeps ~3 significant digits
    assert default_tolerance(torch.float32, "cuda") > default_tolerance(torch.float32, "cpu")
    assert default_tolerance(torch.int64) == (0.0, 0.0)
    # bf16 answers are judged with bf16 tolerance, not float32's
    e = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    expect_close(e + torch.tensor([0.0078, 0.0, 0.0], dtype=torch.bfloat16), e)


# ---------------------------------------------------------------- other helpers


def test_expect_equal():
    expect_equal(torch.tensor([1, 2]), torch.tensor([1, 2]))
    assert "1 of 3 values differ, first at [2]: got 9, expected 3" in fails(
        expect_equal, torch.tensor([1, 2, 9]), torch.tensor([1, 2, 3]), "labels")
    assert "dtype torch.int32, expected torch.int64" in fails(expect_equal, torch.tensor([1], dtype=torch.int32), torch.tensor([1]))
    assert fails(expect_equal, "abc", "abd", "answer") == "answer: got 'abc', expected 'abd'"
    assert "got '3' (str), expected 3" in fails(expect_equal, "3", 3)
    expect_equal(torch.tensor(3), 3)


def test_expect_raises_and_true():
    def bad(x):
        if x < 0:
            raise ValueError("negative")
        if x == 0:
            raise TypeError("zero")
        return x

    assert str(expect_raises(ValueError, bad, -1)) == "negative"
    assert fails(expect_raises, ValueError, bad, 1, what="x=1") == "expected ValueError for x=1, but nothing was raised"
    assert fails(expect_raises, ValueError, bad, 0) == "expected ValueError, got TypeError: zero"
    with pytest.raises(NotImplementedError):  # passes through: the verdict should say "not implemented"
        expect_raises(ValueError, lambda: (_ for _ in ()).throw(NotImplementedError("todo")))
    expect_true(torch.tensor([True, True]), "never")
    assert fails(expect_true, False, "rows must sum to 1") == "rows must sum to 1"


# ---------------------------------------------------------------- check()


@pytest.fixture
def demo_question():
    def ref(x, t=1.0):
        return torch.softmax(x / t, -1)

    def case_basic(f):
        x = torch.randn(3, 5)
        expect_close(f(x), ref(x), "probs")

    def case_temp(f):
        x = torch.randn(3, 5)
        expect_close(f(x, 0.5), ref(x, 0.5), "probs at T=0.5")

    def case_bad_t(f):
        expect_raises(ValueError, f, torch.randn(3), 0.0, what="T=0")

    q = register(Question(id="zztest.softmax", notebook="zz_test", function="softmax", points=3,
                          groups={"core": 2, "errors": 1},
                          visible=[("basic", case_basic), ("temperature", case_temp)],
                          hidden=[("T=0 raises", case_bad_t, "errors")]))
    yield q
    qmod._REGISTRY.pop(q.id, None)


def _good(x, t=1.0):
    if t <= 0:
        raise ValueError("t")
    return torch.softmax(x / t, -1)


def test_check_all_pass_prints_one_line_per_case(demo_question, capsys):
    r = check("zztest.softmax", _good)
    out = capsys.readouterr().out
    assert out.splitlines() == ["✓ zztest.softmax: 2/2 visible cases passed", "  ✓ basic", "  ✓ temperature"]
    assert (r.passed, r.total, r.ok) == (2, 2, True)
    r = check("zztest.softmax", _good, hidden=True)
    assert (r.passed, r.total, r.points) == (3, 3, 3)
    assert "  ✓ T=0 raises [hidden]" in capsys.readouterr().out


def test_check_wrong_answer_scores_by_group_with_a_core_group_first(demo_question, capsys):
    def forgets_t(x, t=1.0):
        return torch.softmax(x, -1)

    r = check("zztest.softmax", forgets_t, hidden=True, strict=False)
    out = capsys.readouterr().out
    # one core case fails: nothing counts, not even a passing non-core case
    assert out.splitlines()[0] == "✗ zztest.softmax: 1/3 cases (visible + hidden) passed, 0/3 points"
    assert "✗ temperature: probs at T=0.5: 15 of 15 values differ (shape [3, 5], torch.float32 on cpu); max abs error" in out
    assert "✗ T=0 raises [hidden]: expected ValueError for T=0, but nothing was raised" in out
    assert r.points == 0.0 and "Traceback" not in out

    r = check("zztest.softmax", lambda x, t=1.0: torch.softmax(x / t, -1), hidden=True, strict=False)  # core only
    assert (r.passed, r.points) == (2, 2.0)  # the core group's weight 2 of 3


def test_score_cases_policy():
    from labkit.grading import CaseResult, score_cases

    groups = {"core": 3, "stable": 1, "errors": 1}
    cases = lambda *st: [CaseResult(f"c{i}", s, group=g) for i, (s, g) in enumerate(st)]  # noqa: E731
    assert score_cases(cases(("pass", "core"), ("pass", "stable"), ("pass", "errors")), groups, 2) == 2
    assert score_cases(cases(("pass", "core"), ("fail", "stable"), ("pass", "errors")), groups, 2) == 1.6
    assert score_cases(cases(("fail", "core"), ("pass", "stable"), ("pass", "errors")), groups, 2) == 0
    assert score_cases(cases(("pass", "core"), ("pass", "core"), ("error", "errors")), groups, 5) == 3.75
    # a group without cases here (a visible-only check) is left out of the share
    assert score_cases(cases(("pass", "core")), groups, 2) == 2


def test_check_summarises_student_exception_with_line(demo_question, capsys):
    def crashes(x, t=1.0):
        y = x.exp()
        return y[10]  # out of range

    r = check("zztest.softmax", crashes)
    out = capsys.readouterr().out
    assert r.passed == 0
    assert ("✗ basic: your code raised IndexError: index 10 is out of bounds for dimension 0 with size 3 "
            "(line") in out
    assert "in crashes: `return y[10]  # out of range`)" in out
    assert "Traceback" not in out


def test_check_wrong_return_type_points_at_the_value(demo_question, capsys):
    def returns_list(x, t=1.0):
        return x.tolist()

    check("zztest.softmax", returns_list)
    assert "probs: expected a torch.Tensor of shape [3, 5], got list" in capsys.readouterr().out


def test_check_error_inside_the_test_code_is_labelled(capsys):
    def case(f):
        f(1).shape  # the student returned an int: the case's own code fails

    q = register(Question(id="zztest.shape", notebook="zz_test", function="f", points=1, visible=[("c", case)]))
    try:
        check("zztest.shape", lambda x: x)
    finally:
        qmod._REGISTRY.pop(q.id)
    out = capsys.readouterr().out
    assert "checking your answer raised AttributeError: 'int' object has no attribute 'shape'" in out
    assert "does your function return the right kind of value?" in out


def test_check_not_implemented_is_one_line(demo_question, capsys):
    def stub(x, t=1.0):
        raise NotImplementedError("TODO: implement softmax()")

    r = check("zztest.softmax", stub, hidden=True, strict=False)
    assert capsys.readouterr().out.strip() == "✗ zztest.softmax: not implemented yet, 0/3 cases (visible + hidden) passed, 0/3 points"
    assert r.cases[0].status == "todo" and r.points == 0


def test_check_seeds_cases_and_restores_the_notebook_rng(demo_question, capsys):
    seen = []

    def spy(x, t=1.0):
        seen.append(x.clone())
        return _good(x, t)

    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    check("zztest.softmax", spy)
    check("zztest.softmax", spy)
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[3])  # same inputs every run


def test_check_unknown_id_lists_the_notebooks_ids(demo_question):
    with pytest.raises(LookupError) as e:
        check("zztest.softmx", _good)
    assert "unknown question id 'zztest.softmx'" in str(e.value)
    assert "Known ids of notebook zz_test: zztest.softmax" in str(e.value)
    with pytest.raises(LookupError) as e:
        check("nosuchtopic.x", _good)
    assert "00_welcome: welcome.softmax" in str(e.value)


def test_check_strict_mode_raises_after_printing(demo_question, monkeypatch, capsys):
    monkeypatch.setenv("LABKIT_CHECK_STRICT", "1")
    with pytest.raises(CheckFailure, match="zztest.softmax: 0/2 cases passed"):
        check("zztest.softmax", lambda x, t=1.0: x)
    assert "✗ basic" in capsys.readouterr().out
    check("zztest.softmax", _good)  # a passing check never raises


def test_hidden_check_raises_after_printing_so_nbgrader_scores_a_wrong_answer_zero(demo_question, capsys):
    # nbgrader gives a graded test cell full marks unless it raises: the hidden cells must raise
    with pytest.raises(AssertionError, match="zztest.softmax: 1/3 cases passed"):
        check("zztest.softmax", lambda x, t=1.0: torch.softmax(x, -1), hidden=True)
    assert "✗ temperature" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="0/3 cases passed"):
        check("zztest.softmax", lambda x, t=1.0: (_ for _ in ()).throw(NotImplementedError()), hidden=True)
    assert check("zztest.softmax", _good, hidden=True).ok  # a right answer never raises
    assert not check("zztest.softmax", lambda x, t=1.0: x).ok  # the visible check is a learning aid: no raise


def test_result_display_is_silent_and_repr_is_short(demo_question, capsys):
    r = check("zztest.softmax", _good)
    assert r._ipython_display_() is None
    assert repr(r) == "CheckResult('zztest.softmax', passed=2/2, points=3.0/3)"
    assert r.to_dict()["cases"][0] == {"name": "basic", "status": "pass", "message": "", "hidden": False,
                                          "group": "core"}


# ---------------------------------------------------------------- registry and banks


def _case(f):
    pass


@pytest.mark.parametrize("kwargs, match", [
    (dict(id="nodot"), "must look like 'topic.name'"),
    (dict(notebook="x.ipynb"), "must be a notebook stem"),
    (dict(function="not an identifier"), "must be a Python identifier"),
    (dict(points=0), "points must be a positive number"),
    (dict(visible=[]), "at least one visible case"),
    (dict(visible=[_case]), r"must be a \(name, case_fn\[, group\]\) tuple"),
    (dict(visible=[("a", _case, "nogroup")]), "names group 'nogroup', not one of"),
    (dict(implemented_by="labkit.x"), "implemented_by must list dotted names"),
    (dict(groups={"core": 1, "errors": 1}, visible=[("a", _case, "errors")]), "core group 'core' needs a visible"),
    (dict(hidden=[("a", _case), ("a", _case)]), "duplicate hidden case names"),
])
def test_register_rejects_bad_questions(kwargs, match):
    base = dict(id="zztest.bad", notebook="zz_test", function="f", points=1, visible=[("a", _case)])
    with pytest.raises(ValueError, match=match):
        register(Question(**{**base, **kwargs}))
    assert "zztest.bad" not in qmod._REGISTRY
    with pytest.raises(TypeError):
        register({"id": "zztest.bad"})


def test_register_refuses_one_id_from_two_modules():
    q = Question(id="welcome.softmax", notebook="zz_test", function="f", points=1, visible=[("a", _case)])
    questions_for("00_welcome")  # banks loaded: welcome.softmax belongs to bank.welcome
    with pytest.raises(ValueError, match="declared twice"):
        register(q)


def test_every_bank_module_imports_and_welcome_questions_exist():
    assert qmod.load_banks() == {}
    ids = [q.id for q in questions_for("00_welcome")]
    assert ids == ["welcome.softmax", "welcome.accuracy", "welcome.average_probs", "welcome.agreement"]
    assert questions_for("00_welcome.ipynb") == questions_for("00_welcome")
    for q in qmod.all_questions().values():
        assert q.visible and q.module.startswith("labkit.grading.bank."), q.id
        assert isinstance(q.implemented_by, list), q.id


def test_welcome_questions_accept_a_correct_answer_and_reject_a_wrong_one(capsys):
    def softmax_t(logits, temperature=1.0):
        if temperature <= 0:
            raise ValueError
        return torch.softmax(logits.double() / temperature, -1).to(logits.dtype)

    def accuracy(logits, labels):
        if len(logits) != len(labels):
            raise ValueError
        return (logits.argmax(-1) == labels).double().mean().item()

    def average_probs(probs, weights=None):
        w = torch.full((probs.shape[0],), 1 / probs.shape[0]) if weights is None else weights
        if w.shape != probs.shape[:1] or abs(w.sum().item() - 1) > 1e-6:
            raise ValueError
        return (w[:, None, None].to(probs.dtype) * probs).sum(0)

    def agreement(a, b):
        if a.shape != b.shape:
            raise ValueError
        return (a == b).double().mean().item()

    for qid, fn in [("welcome.softmax", softmax_t), ("welcome.accuracy", accuracy),
                    ("welcome.average_probs", average_probs), ("welcome.agreement", agreement)]:
        assert check(qid, fn, hidden=True).ok, capsys.readouterr().out
    naive = check("welcome.softmax", lambda z, temperature=1.0: z.div(temperature).exp() / z.div(temperature).exp().sum(-1, keepdim=True),
                  hidden=True, strict=False)
    assert [c.name for c in naive.cases if not c.passed] == ["large logits stay finite", "T <= 0 raises ValueError"]


def test_hidden_cases_and_references_are_not_in_the_package():
    import ast
    import tomllib
    from fnmatch import fnmatch
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    conf = tomllib.loads((root / "pyproject.toml").read_text())
    include = conf["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(fnmatch("instructor", pat) or fnmatch("instructor.bank", pat) for pat in include)
    assert (root / "instructor" / "bank").is_dir() and not (root / "labkit" / "instructor").exists()
    for path in (root / "labkit" / "grading" / "bank").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not any(n.endswith("_ref") for n in names), (path.name, names)
        assert "add_hidden" not in calls and "hidden=" not in path.read_text(), path.name
    for q in qmod.all_questions().values():
        assert q.hidden, f"{q.id}: no hidden case loaded from instructor/bank"


def test_visible_data_agrees_with_the_instructor_references():
    import json
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    build = runpy.run_path(str(root / "instructor" / "make_visible_data.py"))["build"]
    from labkit.grading.bank._data import PATH

    stored = json.loads(PATH.read_text())
    fresh = build()
    assert set(stored) == set(fresh)
    for key in stored:
        for name in stored[key]:
            a, b = stored[key][name], fresh[key][name]
            if "data" in a:
                assert a["dtype"] == b["dtype"] and a["shape"] == b["shape"], (key, name)
                assert np.allclose(np.array(a["data"], dtype=float), np.array(b["data"], dtype=float),
                                   rtol=1e-6, atol=1e-7), (key, name)


def test_hidden_check_needs_the_instructor_bank(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import torch\nfrom labkit.grading import check, instructor_bank\n"
            "f = lambda a, b: (a == b).double().mean().item()\n"
            "r = check('welcome.agreement', f, hidden=True, strict=False)\n"
            "print('bank', instructor_bank(), 'cases', r.total)\n"
            "try:\n    check('welcome.agreement', f, hidden=True)\nexcept AssertionError as e:\n    print('raised:', e)")
    env = dict(os.environ, LABKIT_BANK=str(tmp_path / "no-bank-here"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "only available where the instructor bank is present" in out
    assert "bank None cases 1" in out  # only the visible case ran
    # a strict (nbgrader) hidden check must not pass tests it could not run
    assert "raised: welcome.agreement: the hidden cases could not run (no instructor bank)" in out


def test_grade_refuses_a_missing_bank_and_a_bad_memory_limit(tmp_path, capsys):
    from labkit.cli import main

    nb = tmp_path / "alice_00_welcome.ipynb"
    nb.write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    assert main(["grade", str(nb), "--out", str(tmp_path / "g"), "--bank", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "no instructor bank at" in err and len(err.strip().splitlines()) == 1
    assert main(["grade", str(nb), "--out", str(tmp_path / "g"), "--memory-gb", "0"]) == 2
    assert "--memory-gb must be a positive number of GiB" in capsys.readouterr().err
