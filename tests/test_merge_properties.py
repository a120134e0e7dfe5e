"""Property test of the YAML runner: random configs, parameters (valid, out of range, of the wrong
type, NaN/inf) and tensors (random shapes incl. empty and 0-d, mixed float dtypes, NaN/inf values,
mismatched shapes, integer buffers). Whatever comes in, ``run_merge_config`` either refuses with a
one-line ValueError (and writes nothing) or produces exactly what the in-memory ``labkit.merge.merge``
computes from the same state dicts; it never raises anything else and never modifies an input."""
import json
import re
import math
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from labkit import merge as M  # noqa: E402
from labkit.merge.registry import REQUIRED  # noqa: E402
from labkit.merge.safetensors_io import ModelDir  # noqa: E402
from labkit.merge.yaml_runner import run_merge_config  # noqa: E402

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SPECIAL = [math.nan, math.inf, -math.inf]


def values(n: int, adversarial: bool):
    finite = st.floats(-4, 4, width=32)
    value = st.integers(0, 9).flatmap(lambda k: st.sampled_from(SPECIAL) if k == 0 else finite)
    return st.lists(value, min_size=n, max_size=n)


def param_value(p, adversarial: bool):
    """A valid value of the declared parameter, or (when adversarial, often) one it must refuse."""
    if p.kind == "bool":
        valid = st.booleans()
    else:
        low = p.low if math.isfinite(p.low) else -2.0
        high = p.high if math.isfinite(p.high) else 2.0
        valid = st.floats(low, high, width=32)
    if not adversarial:
        return valid
    wrong = [math.nan, math.inf, "half", None, [1, "x"]]
    wrong += [3] if p.kind == "bool" else [True]
    wrong += [p.low - 0.5] if math.isfinite(p.low) else []
    wrong += [p.high + 0.5] if math.isfinite(p.high) else []
    return st.one_of(valid, st.sampled_from(wrong))


@st.composite
def merges(draw, method):
    """(method, state dicts with the base first, global params, per-model params, dtype, allow_nonfinite).
    Two in three examples are well formed (so that merges happen and are compared); the third is
    adversarial: bad parameter values, NaN/inf, shapes that do not fit."""
    adversarial = draw(st.integers(0, 2)) == 0
    m = M.METHODS[method]
    n_models = draw(st.integers(m.min_models, m.max_models or 3) if not adversarial else st.integers(1, 3))
    names = ["model.layers.0.w", "model.layers.1.w", "head"][:draw(st.integers(1, 3))]
    shapes = {n: tuple(draw(st.lists(st.integers(0, 6), max_size=2))) for n in names}
    with_int = draw(st.booleans())
    models = []
    for i in range(n_models + (1 if m.needs_base else 0)):
        dtype = draw(st.sampled_from(FLOAT_DTYPES))
        sd = {}
        for n, shape in shapes.items():
            if adversarial and draw(st.integers(0, 5)) == 0:  # a model that does not fit
                shape = shape + (1,)
            if adversarial:  # hypothesis' own values: zeros, extremes, NaN/inf
                x = torch.tensor(draw(values(math.prod(shape), adversarial)), dtype=torch.float32).reshape(shape)
            else:  # realistic weights: random normal, a different stream per model and tensor
                x = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))))
            sd[n] = x.to(dtype)
        if with_int:
            sd["step"] = torch.tensor([i, 7])
        models.append(sd)
    globals_ = {p.name: draw(param_value(p, adversarial)) for p in m.parameters
                if not p.per_model and (p.default is REQUIRED or draw(st.booleans()))}
    per_model = [{p.name: draw(param_value(p, adversarial)) for p in m.parameters
                  if p.per_model and (p.default is REQUIRED or draw(st.booleans()))} for _ in range(n_models)]
    out_dtype = draw(st.sampled_from([None, "float32", "float16", "bfloat16"]))
    return method, models, globals_, per_model, out_dtype, draw(st.booleans())


def _write_model(folder: Path, sd: dict) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    "num_hidden_layers": 2}))
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _reference(method, sds, globals_, per_model, out_dtype, allow_nonfinite):
    m = M.METHODS[method]
    base, others = (sds[0], sds[1:]) if m.needs_base else (None, sds)
    kwargs = dict(globals_)
    for p in m.parameters:
        if p.per_model and any(p.name in pm for pm in per_model):
            kwargs[p.name] = [pm.get(p.name, p.default) for pm in per_model]
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(out_dtype)
    return M.merge(method, others, base, device="cpu", out_dtype=dtype, allow_nonfinite=allow_nonfinite, **kwargs)


@pytest.mark.parametrize("method", sorted(M.METHODS))
@settings(max_examples=20, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_runner_refuses_clearly_or_equals_the_in_memory_merge(method, data):
    _, models, globals_, per_model, out_dtype, allow_nonfinite = data.draw(merges(method))
    m = M.METHODS[method]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        refs = []
        for i, sd in enumerate(models):
            _write_model(root / f"m{i}", sd)
            refs.append(str(root / f"m{i}"))
        base, others = (refs[0], refs[1:]) if m.needs_base else (None, refs)
        cfg = {"merge_method": method, "models": [{"model": r, "parameters": pm} for r, pm in zip(others, per_model)]}
        if base is not None:
            cfg["base_model"] = base
        if globals_:
            cfg["parameters"] = globals_
        if out_dtype:
            cfg["dtype"] = out_dtype
        (root / "m.yml").write_text(yaml.safe_dump(cfg))
        inputs = _files(root)
        try:
            out = run_merge_config(root / "m.yml", root / "out", device="cpu", allow_nonfinite=allow_nonfinite,
                                   verbose=False)
        except ValueError as e:
            hypothesis.event("refused: " + re.sub(r"[0-9.e+-]+|'[^']*'", "#", str(e))[-60:])
            assert str(e) and "\n" not in str(e), str(e)
            assert _files(root) == inputs and sorted(p.name for p in root.iterdir()) == ["m.yml"] + [
                f"m{i}" for i in range(len(models))]
            return
        assert {k: v for k, v in _files(root).items() if not k.startswith("out/")} == inputs
        hypothesis.event(f"merged with {method}")
        got = {k: ModelDir(out).read(k) for k in ModelDir(out).specs}
        expected = _reference(method, [load_file(r + "/model.safetensors") for r in refs], globals_, per_model,
                              out_dtype, allow_nonfinite)
        assert set(got) == set(expected)
        for k in expected:
            assert got[k].dtype == expected[k].dtype, k
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, equal_nan=True, msg=k)
