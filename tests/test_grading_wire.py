"""The grader's side of `labkit grade` without a kernel: the data-only wire, strict decoding, and judging
every question by replaying its cases against outputs that come back as data."""
import json
import math

import numpy as np
import pytest
import torch

from labkit import ensemble as ens
from labkit import merge as mg
from labkit import moe
from labkit import moe_dispatch as md
from labkit.grading import all_questions, get_question, run_question, wire
from labkit.grading import kernel_side
from labkit.grading.grade import _read_outcomes, _rename_tensors, _runtime_locked
from labkit.grading.judge import judge_question


def roundtrip(value, tmp_path, inputs=False):
    tensors = {}
    tree = wire.encode(value, tensors, inputs=inputs)
    wire.save(tmp_path / "v.json", tree, tensors)
    tree, tensors = wire.load(tmp_path / "v.json")
    return wire.decode(tree, tensors, inputs=inputs)


def test_values_round_trip_as_data(tmp_path):
    v = {"w": torch.randn(3, 2).to(torch.bfloat16), "n": 3, "x": 0.1, "nan": math.nan, "s": "hi", "b": True,
         "none": None, "l": [torch.arange(4), (1, 2.5)], "np": np.float64(0.75), "arr": np.ones((2, 2))}
    got = roundtrip(v, tmp_path)
    assert torch.equal(got["w"], v["w"]) and got["w"].dtype == torch.bfloat16
    assert (got["n"], got["x"], got["s"], got["b"], got["none"]) == (3, 0.1, "hi", True, None)
    assert math.isnan(got["nan"]) and got["l"][1] == (1, 2.5) and torch.equal(got["l"][0], torch.arange(4))
    assert isinstance(got["np"], np.ndarray) and got["np"].item() == 0.75 and got["arr"].shape == (2, 2)


def test_unknown_objects_arrive_as_opaque_and_equal_nothing(tmp_path):
    class AlwaysEqual:
        def __eq__(self, other):
            return True

    class Sneaky(torch.Tensor):
        def __eq__(self, other):
            return True

    got = roundtrip([AlwaysEqual(), torch.zeros(2).as_subclass(Sneaky)], tmp_path)
    assert isinstance(got[0], wire.Opaque) and got[0] != got[0] and not (got[0] == 1)
    assert type(got[1]) is torch.Tensor  # a tensor subclass loses its class (and its __eq__)


@pytest.mark.parametrize("tree, match", [
    ({"t": "pickle", "v": "gASV"}, "not accepted"),
    ({"t": "float", "v": "__import__('os')"}, "malformed float"),
    ({"t": "int", "v": "9" * 500}, "malformed int"),
    ({"t": "tensor", "k": "missing"}, "names no stored tensor"),
    ({"t": "callable", "name": "closeness", "kwargs": {"t": "dict", "v": []}}, "not accepted"),  # outputs: no callables
    ({"t": "list", "v": [{"t": "none"}] * 2_000_00 + [{"t": "none"}] * 10}, "too large"),
])
def test_decoding_is_strict(tree, match):
    with pytest.raises(wire.WireError, match=match):
        wire.decode(tree, {})


def test_files_are_read_without_following_links_and_within_limits(tmp_path, monkeypatch):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"t": "str", "v": "bank"}))
    (tmp_path / "out.json").symlink_to(secret)
    with pytest.raises((wire.WireError, OSError)):
        wire.load(tmp_path / "out.json")
    wire.save(tmp_path / "big.json", {"t": "none"}, {"t0": torch.zeros(1000)})
    monkeypatch.setattr(wire, "MAX_FILE_BYTES", 100)
    with pytest.raises(wire.WireError, match="limit"):
        wire.load(tmp_path / "big.json")


# --------------------------------------------------------------------------------- judging through the wire


def local_sender(fn, tmp_path, monkeypatch, lock=True):
    """send() as the grader does it, with kernel_side.serve run here on ``fn`` instead of in a kernel.

    ``lock=False``: no run-time lock (the reference answers below call the kit from this file)."""
    monkeypatch.setattr(kernel_side, "_namespace", lambda: {"answer": fn})
    counter = [0]

    def send(question, calls):
        counter[0] += 1
        req, resp = tmp_path / f"q{counter[0]}.json", tmp_path / f"r{counter[0]}"
        resp.mkdir()
        tensors, tree = {}, {"function": "answer", "locked": question.implemented_by if lock else [], "calls": []}
        for cid, call_tree, call_tensors, _ in calls:
            tree["calls"].append({"id": cid, **_rename_tensors(call_tree, call_tensors, tensors, cid)})
        wire.save(req, tree, tensors)
        kernel_side.serve(str(req), str(resp))
        return _read_outcomes(resp, calls, "error", "no result came back"), _runtime_locked(resp, calls)

    return send


def _sort_by_expert(experts, num_experts):
    perm, _, offsets = md.sort_by_expert(experts, num_experts)
    return perm, torch.diff(offsets, prepend=offsets.new_zeros(1))


def _own(fn):
    """The kit's function behind a wrapper defined here (a test file is not student code: no lock)."""
    return lambda *a, **k: fn(*a, **k)


REFERENCE = {
    "welcome.softmax": lambda z, temperature=1.0: (_ for _ in ()).throw(ValueError("T")) if temperature <= 0
    else torch.softmax(z.double() / temperature, -1).to(z.dtype),
    "welcome.accuracy": lambda lg, y: (_ for _ in ()).throw(ValueError("n")) if len(lg) != len(y)
    else (lg.argmax(-1) == y).double().mean().item(),
    "welcome.agreement": lambda a, b: (_ for _ in ()).throw(ValueError("n")) if a.shape != b.shape
    else (a == b).double().mean().item(),
    "ensemble.linear_interpolate": ens.linear_interpolate,
    "ensemble.log_linear_interpolate": ens.log_linear_interpolate,
    "ensemble.fit_mixture_weights": lambda t, iters=200: ens.fit_mixture_weights(t, iters),
    "ensemble.bootstrap_indices": ens.bootstrap_indices,
    "ensemble.ensemble_next_token": lambda logits, w, rule: ens.ensemble_next_token(logits, w, rule),
    "merge.greedy_soup": lambda models, score: (lambda r: (r.state_dict, r.chosen))(mg.greedy_soup(models, score)),
    "moe.top_k_gating": moe.softmax_topk,
    "moe.load_balancing_loss": moe.load_balancing_loss,
    "moe.sort_by_expert": _sort_by_expert,
    "moe.sort_dispatch": lambda x, e, w, gu, dn: md.dispatch(x, e, w, gu, dn, backend="sort"),
}


@pytest.mark.parametrize("qid", sorted(REFERENCE))
def test_judging_through_the_wire_agrees_with_running_in_process(qid, tmp_path, monkeypatch):
    fn = REFERENCE[qid]
    q = get_question(qid)
    here = run_question(qid, fn, hidden=True)
    judged = judge_question(q, local_sender(fn, tmp_path, monkeypatch, lock=False), hidden=True)
    assert [(c["name"], c["status"]) for c in judged["cases"]] == [(c.name, c.status) for c in here.cases]
    assert judged["points"] == here.points
    if qid != "merge.greedy_soup":
        assert here.ok, here.verdict()


def test_wrong_answers_and_errors_are_judged_in_the_grader(tmp_path, monkeypatch):
    def without_replacement(n, k, seed):
        if n < 1 or k < 1:
            raise ValueError("bad")
        gen = torch.Generator().manual_seed(seed)
        return torch.stack([torch.randperm(n, generator=gen) for _ in range(k)])

    q = get_question("ensemble.bootstrap_indices")
    judged = judge_question(q, local_sender(without_replacement, tmp_path, monkeypatch))
    assert judged["points"] == 0  # the core idea (with replacement) is a visible case of the core group
    bad = {c["name"]: c for c in judged["cases"]}["drawn with replacement (~63.2% distinct)"]
    assert bad["status"] == "fail" and "63.2%" in bad["message"]

    def exits(logits, labels):
        raise SystemExit(0)

    (tmp_path / "x").mkdir()
    judged = judge_question(get_question("welcome.accuracy"), local_sender(exits, tmp_path / "x", monkeypatch))
    assert judged["points"] == 0
    assert all("SystemExit" in c["message"] for c in judged["cases"]), judged["cases"]


def test_hidden_failures_never_show_expected_values(tmp_path, monkeypatch):
    q = get_question("welcome.accuracy")
    judged = judge_question(q, local_sender(lambda lg, y: 0.123456, tmp_path, monkeypatch))
    hidden = [c for c in judged["cases"] if c["hidden"] and c["status"] == "fail"]
    assert hidden and all("wrong answer (the values of hidden cases are not shown)" in c["message"] for c in hidden)
    assert all("expected" not in c["message"] for c in hidden)
    visible = [c for c in judged["cases"] if not c["hidden"] and c["status"] == "fail"]
    assert any("expected 0.75" in c["message"] for c in visible)  # visible cases say what was expected


def test_runtime_lock_evidence_from_the_kernel_zeroes_the_question(tmp_path, monkeypatch):
    def sneaky(logits, weights):
        return getattr(ens, "linear_" + "interpolate")(logits, weights)

    sneaky.__code__ = sneaky.__code__.replace(co_filename="/tmp/ipykernel_1/1.py")  # as a notebook cell
    judged = judge_question(get_question("ensemble.linear_interpolate"), local_sender(sneaky, tmp_path, monkeypatch))
    assert judged["status"] == "locked" and judged["points"] == 0
    assert "you called labkit.ensemble.linear_interpolate" in judged["message"]


def test_every_question_runs_through_the_wire_without_bank_errors(tmp_path, monkeypatch):
    # a function that raises NotImplementedError: every case of every question is "todo", none crashes the judge
    def todo(*a, **k):
        raise NotImplementedError("TODO")

    for i, q in enumerate(all_questions().values()):
        (tmp_path / str(i)).mkdir()
        judged = judge_question(q, local_sender(todo, tmp_path / str(i), monkeypatch))
        assert judged["points"] == 0 and {c["status"] for c in judged["cases"]} == {"todo"}, q.id
