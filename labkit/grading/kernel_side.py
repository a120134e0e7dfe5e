"""The only grading code that runs in a student's kernel: call the student's function on given inputs.

``labkit grade`` writes one request per question and round (the inputs of some calls, as data: see
``wire``) into a folder the kernel may read, and runs ``serve(request, response_dir)`` in the kernel.
For each call it decodes the inputs, calls the function of that name in the notebook's namespace and
writes back what it returned, or the exception it raised, one file per call as soon as that call ends.
Nothing here knows an expected value, a hidden case's verdict or a grade: a student who changes this
module in their own kernel can only change their own outputs, which the grader then judges.
"""
from __future__ import annotations

import linecache
import random
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from . import wire
from .lock import runtime_lock_check


def _namespace() -> dict:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            return shell.user_ns
    except Exception:  # noqa: BLE001 - not in IPython: the __main__ module's globals
        pass
    import __main__

    return vars(__main__)


def _where(exc: BaseException) -> dict:
    """The student's deepest line in the traceback (outside the libraries and labkit)."""
    from .questions import _is_student_frame

    best = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        if _is_student_frame(code.co_filename):
            best = (code.co_filename, lineno, code.co_name)
    if best is None:
        return {}
    return {"line": int(best[1]), "func": str(best[2])[:100],
            "text": linecache.getline(best[0], best[1]).strip()[:200]}


def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def _call(fn, call: dict, tensors: dict):
    args = wire.decode(call["args"], tensors, inputs=True)
    kwargs = wire.decode(call["kwargs"], tensors, inputs=True)
    grad = call.get("grad")
    if not grad:
        return fn(*args, **kwargs)
    wrt = [int(i) for i in grad["wrt"]]
    args = list(args)
    for i in wrt:
        args[i] = args[i].detach().clone().requires_grad_(True)
    out = fn(*args, **kwargs)
    weight = wire.decode(grad["weight"], tensors, inputs=True) if grad.get("weight") else None
    if not isinstance(out, torch.Tensor):
        return {"out": out, "grads": None}
    loss = (out * weight).sum() if weight is not None else out.sum()
    grads = torch.autograd.grad(loss, [args[i] for i in wrt], allow_unused=True)
    return {"out": out.detach(), "grads": [None if g is None else g.detach() for g in grads]}


def serve(request: str, response_dir: str) -> None:
    """Run every call of one request file; write ``response_dir/<call id>.json`` after each call."""
    req_path, out = Path(request), Path(response_dir)
    tree, tensors = wire.load(req_path, inputs=True)
    ns = _namespace()
    fn = ns.get(tree["function"])
    for call in tree["calls"]:
        cid = str(call["id"])
        if fn is None:
            wire.save(out / f"{cid}.json", {"kind": "missing"}, {})
            continue
        t0 = time.monotonic()
        result_tensors: dict = {}
        with runtime_lock_check(tree.get("locked", [])) as seen:
            try:
                _seed()
                value = _call(fn, call, {k: v.clone() for k, v in tensors.items()})
                result = {"kind": "ok", "value": wire.encode(value, result_tensors)}
            except KeyboardInterrupt:
                raise  # the grader's interrupt: this call ran out of time
            except BaseException as e:  # noqa: BLE001 - SystemExit included: it is the answer's doing
                result_tensors = {}
                try:
                    message = str(e)
                except Exception:  # noqa: BLE001 - a __str__ that raises
                    message = ""
                result = {"kind": "raised", "type": type(e).__name__[:100], "message": message[:wire.MAX_STR],
                          "where": _where(e)}
        result["locked_calls"] = sorted(seen)
        result["seconds"] = time.monotonic() - t0
        try:
            wire.save(out / f"{cid}.json", result, result_tensors)
        except Exception as e:  # noqa: BLE001 - e.g. an output too large to encode
            wire.save(out / f"{cid}.json", {"kind": "unsendable", "message": f"{type(e).__name__}: {str(e)[:200]}",
                                            "locked_calls": sorted(seen)}, {})


def preload() -> None:
    """Import what serving needs, so no question's time limit pays for imports."""
    import safetensors.torch  # noqa: F401
