"""The assertions a question's test cases use: each raises ``CheckFailure`` with a precise message.

A test case is a function ``case(student_fn)`` that calls the student's function and checks the
answer with these helpers. The messages are what the student reads, so they say *what* differs
(shape, dtype, device, NaNs, which element and by how much) and the tolerance that was applied.
"""
from __future__ import annotations

import math
from numbers import Number

import numpy as np
import torch


class CheckFailure(AssertionError):
    """A test case found a wrong answer. The message is shown to the student as is."""


# Default tolerances (rtol, atol) by dtype, then by device type. CPU float32 is tight enough to catch
# real bugs yet loose enough for a different but correct summation order (log-sum-exp vs log(sum(exp)));
# accelerators get more room because their kernels (TF32 convolutions, fused reductions) differ more.
_TOLERANCES = {
    torch.float64: {"cpu": (1e-7, 1e-7), "other": (1e-7, 1e-7)},
    torch.float32: {"cpu": (1e-5, 1e-5), "other": (1e-3, 1e-4)},
    torch.float16: {"cpu": (1e-3, 1e-3), "other": (2e-3, 2e-3)},
    torch.bfloat16: {"cpu": (1.6e-2, 1e-2), "other": (1.6e-2, 1e-2)},
}


def default_tolerance(dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[float, float]:
    """(rtol, atol) used by ``expect_close`` when none is given; 0 for integer and bool dtypes."""
    if not (dtype.is_floating_point or dtype.is_complex):
        return 0.0, 0.0
    if dtype.is_complex:
        dtype = torch.float64 if dtype == torch.complex128 else torch.float32
    table = _TOLERANCES.get(dtype, _TOLERANCES[torch.float32])
    return table["cpu" if torch.device(device).type == "cpu" else "other"]


def _num(x: float) -> str:
    """A number in 4 significant digits: 0.1235, -3.5e-07, 12.00."""
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.4g}"


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _index(flat: int, shape: torch.Size) -> str:
    if len(shape) == 0:
        return "[]"
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat, tuple(shape))) + "]"


def _typename(x) -> str:
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__.split('.')[0]}.{t.__name__}"


def _short(x, limit: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _prefix(what: str) -> str:
    return f"{what}: " if what else ""


def _as_tensor(got, expected: torch.Tensor, what: str) -> torch.Tensor:
    """Turn the student's value into a tensor comparable with ``expected`` or fail saying why."""
    if isinstance(got, torch.Tensor):
        return got
    raise CheckFailure(f"{_prefix(what)}expected a torch.Tensor of shape {_shape(expected)}, "
                       f"got {_typename(got)} {_short(got, 60)}")


def _to_expected_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    return torch.as_tensor(x)


def expect_close(got, expected, what: str = "value", rtol: float | None = None,
                 atol: float | None = None, check_dtype: bool = True) -> None:
    """Fail unless ``|got - expected| <= atol + rtol * |expected|`` elementwise (NaN only where expected is NaN).

    ``expected`` is a tensor, an array, a number, or a list/tuple/dict of those (compared item by
    item). Tensors must match in shape, dtype (unless ``check_dtype=False``) and device. The default
    tolerance depends on the dtype and the device (see ``default_tolerance``).
    """
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            raise CheckFailure(f"{_prefix(what)}expected a dict, got {_typename(got)}")
        if set(got) != set(expected):
            missing, extra = sorted(map(str, set(expected) - set(got))), sorted(map(str, set(got) - set(expected)))
            raise CheckFailure(f"{_prefix(what)}keys differ: missing {missing}, unexpected {extra}")
        for k in expected:
            expect_close(got[k], expected[k], f"{what}[{k!r}]", rtol, atol, check_dtype)
        return
    if isinstance(expected, (list, tuple)) and not _is_numeric_sequence(expected):
        if not isinstance(got, (list, tuple)):
            raise CheckFailure(f"{_prefix(what)}expected a {type(expected).__name__} of {len(expected)} items, "
                               f"got {_typename(got)}")
        if len(got) != len(expected):
            raise CheckFailure(f"{_prefix(what)}expected {len(expected)} items, got {len(got)}")
        for i, (g, e) in enumerate(zip(got, expected)):
            expect_close(g, e, f"{what}[{i}]", rtol, atol, check_dtype)
        return
    if isinstance(expected, Number) or (isinstance(expected, np.generic)):
        _expect_close_scalar(got, float(expected), what, rtol, atol)
        return
    expected = _to_expected_tensor(expected)
    got = _as_tensor(got, expected, what)
    _expect_close_tensor(got, expected, what, rtol, atol, check_dtype)


def _is_numeric_sequence(x) -> bool:
    """A (nested) list of plain numbers, compared as one tensor; a list of tensors is compared item by item."""
    return all(isinstance(v, Number) or (isinstance(v, (list, tuple)) and _is_numeric_sequence(v)) for v in x)


def _expect_close_scalar(got, expected: float, what: str, rtol, atol) -> None:
    if isinstance(got, torch.Tensor):
        if got.numel() != 1 or got.dim() > 1:
            raise CheckFailure(f"{_prefix(what)}expected a single number, got a tensor of shape {_shape(got)}")
        got = got.item()
    elif isinstance(got, np.ndarray) and got.size == 1 and got.ndim <= 1:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, (Number, np.generic)):
        raise CheckFailure(f"{_prefix(what)}expected a number close to {_num(expected)}, "
                           f"got {_typename(got)} {_short(got, 60)}")
    got = float(got)
    d_rtol, d_atol = default_tolerance(torch.float64)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    if math.isnan(expected) and math.isnan(got):
        return
    if math.isnan(got):
        raise CheckFailure(f"{_prefix(what)}got NaN, expected {_num(expected)}")
    if got == expected:
        return
    err = abs(got - expected)
    if not err <= atol + rtol * abs(expected):
        raise CheckFailure(f"{_prefix(what)}got {_num(got)}, expected {_num(expected)} "
                           f"(abs error {_num(err)} > tolerance atol={_num(atol)} + rtol={_num(rtol)}*|expected|)")


def _expect_close_tensor(got: torch.Tensor, expected: torch.Tensor, what: str, rtol, atol, check_dtype) -> None:
    if got.shape != expected.shape:
        raise CheckFailure(f"{_prefix(what)}shape {_shape(got)}, expected {_shape(expected)}")
    if check_dtype and got.dtype != expected.dtype:
        raise CheckFailure(f"{_prefix(what)}dtype {got.dtype}, expected {expected.dtype} (shape {_shape(got)} is right)")
    if got.device != expected.device:
        raise CheckFailure(f"{_prefix(what)}on device {got.device}, expected {expected.device} "
                           f"(create new tensors on the input's device, e.g. torch.zeros(..., device=x.device))")
    # The looser tolerance of the two dtypes: a float32 answer against a float64 reference is judged as float32.
    loosest = max((default_tolerance(got.dtype, got.device), default_tolerance(expected.dtype, expected.device)))
    rtol = loosest[0] if rtol is None else rtol
    atol = loosest[1] if atol is None else atol
    g = got.detach().to("cpu", torch.float64) if not got.is_complex() else got.detach().cpu().to(torch.complex128)
    e = expected.detach().to("cpu", torch.float64) if not expected.is_complex() else expected.detach().cpu().to(torch.complex128)
    if g.numel() == 0:
        return
    tol_text = f"tolerance atol={_num(atol)} + rtol={_num(rtol)}*|expected|"
    # NaNs: allowed only where the reference has them too.
    g_nan, e_nan = torch.isnan(g), torch.isnan(e)
    bad_nan = g_nan & ~e_nan
    if bad_nan.any():
        first = int(bad_nan.flatten().nonzero()[0])
        raise CheckFailure(f"{_prefix(what)}{int(bad_nan.sum())} NaN value(s) of {g.numel()}, first at "
                           f"{_index(first, g.shape)} where {_num(e.flatten()[first].item())} was expected")
    missing_nan = e_nan & ~g_nan
    if missing_nan.any():
        first = int(missing_nan.flatten().nonzero()[0])
        raise CheckFailure(f"{_prefix(what)}expected NaN at {_index(first, g.shape)}, got {_num(g.flatten()[first].item())}")
    # Infinities must match exactly (same sign, same place).
    g_inf, e_inf = torch.isinf(g), torch.isinf(e)
    bad_inf = (g_inf | e_inf) & (g != e)
    if bad_inf.any():
        first = int(bad_inf.flatten().nonzero()[0])
        raise CheckFailure(f"{_prefix(what)}at {_index(first, g.shape)} got {_num(g.flatten()[first].item())}, "
                           f"expected {_num(e.flatten()[first].item())}")
    finite = ~(g_nan | e_nan | g_inf | e_inf)
    err = torch.where(finite, (g - e).abs(), torch.zeros((), dtype=torch.float64))
    tol = atol + rtol * e.abs().where(finite, torch.zeros((), dtype=torch.float64))
    bad = err > tol
    if bad.any():
        n_bad = int(bad.sum())
        worst = int(torch.where(bad, err, torch.full_like(err, -1.0)).flatten().argmax())  # largest failing error
        where = _index(worst, g.shape)
        gv, ev = g.flatten()[worst].item(), e.flatten()[worst].item()
        max_err = err.flatten()[worst].item()
        count = f"{n_bad} of {g.numel()} values differ" if g.numel() > 1 else "value differs"
        at = f" at {where}" if g.dim() > 0 else ""
        layout = f"shape {_shape(got)}, {got.dtype} on {got.device.type}"
        raise CheckFailure(f"{_prefix(what)}{count} ({layout}); max abs error {_num(max_err)}{at}: "
                           f"got {_num(gv)}, expected {_num(ev)}; {tol_text}")


def expect_equal(got, expected, what: str = "value") -> None:
    """Fail unless ``got`` equals ``expected`` exactly (tensors: same shape, dtype and every element)."""
    if isinstance(expected, (torch.Tensor, np.ndarray)):
        expected = _to_expected_tensor(expected)
        got = _as_tensor(got, expected, what)
        if got.shape != expected.shape:
            raise CheckFailure(f"{_prefix(what)}shape {_shape(got)}, expected {_shape(expected)}")
        if got.dtype != expected.dtype:
            raise CheckFailure(f"{_prefix(what)}dtype {got.dtype}, expected {expected.dtype} (shape {_shape(got)} is right)")
        if got.device != expected.device:
            raise CheckFailure(f"{_prefix(what)}on device {got.device}, expected {expected.device}")
        diff = got.cpu() != expected.cpu()
        if diff.any():
            first = int(diff.flatten().nonzero()[0])
            at = f" first at {_index(first, got.shape)}" if got.dim() > 0 else ""
            raise CheckFailure(f"{_prefix(what)}{int(diff.sum())} of {got.numel()} values differ,{at}: "
                               f"got {_short(got.flatten()[first].item())}, expected {_short(expected.flatten()[first].item())}")
        return
    if isinstance(got, torch.Tensor) and got.numel() == 1 and isinstance(expected, Number):
        got = got.item()
    try:
        same = bool(got == expected)
    except Exception:  # noqa: BLE001 - e.g. comparing a tensor with a list: not equal, and say so
        same = False
    if not same:
        got_t = "" if type(got) is type(expected) else f" ({_typename(got)})"
        raise CheckFailure(f"{_prefix(what)}got {_short(got)}{got_t}, expected {_short(expected)}")


def expect_raises(exc_type, fn, *args, what: str = "", **kwargs) -> BaseException:
    """Fail unless ``fn(*args, **kwargs)`` raises ``exc_type``; return the exception.

    A ``NotImplementedError`` that was not asked for passes through, so the verdict says
    "not implemented yet" instead of "raised the wrong exception".
    """
    name = getattr(exc_type, "__name__", str(exc_type))
    if isinstance(exc_type, tuple):
        name = " or ".join(t.__name__ for t in exc_type)
    label = f" for {what}" if what else ""
    try:
        fn(*args, **kwargs)
    except exc_type as e:
        return e
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001 - any other exception is the wrong answer
        msg = " ".join(str(e).split())
        msg = msg if len(msg) <= 120 else msg[:117] + "..."
        raise CheckFailure(f"expected {name}{label}, got {type(e).__name__}: {msg}") from None
    raise CheckFailure(f"expected {name}{label}, but nothing was raised")


def expect_true(cond, message: str) -> None:
    """Fail with ``message`` unless ``cond`` is true."""
    if isinstance(cond, torch.Tensor):
        cond = bool(cond.all())
    if not cond:
        raise CheckFailure(message)
