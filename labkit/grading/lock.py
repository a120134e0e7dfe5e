"""The answer-key lock: an exercise answered by calling the function that implements it scores 0.

Each question lists, in ``implemented_by``, the dotted names of the functions that answer it
(``labkit.ensemble.linear_interpolate``, a library's equivalent...). Two detectors:

- ``static_lock_check`` (authoritative; runs in the grader on the notebook's *source*, never its
  code): finds the cell that defines the answer, follows the notebook's own functions it uses, and
  resolves every name and attribute through the notebook's imports and aliases
  (``from labkit.ensemble import linear_interpolate as f``, ``import labkit.ensemble as E``,
  ``getattr(E, "linear_interpolate")``, ``importlib.import_module("labkit.ensemble")``...).
- ``runtime_lock_check`` (advisory; runs where the answer runs): records calls of the locked
  functions made directly from the student's code while the answer runs. In ``labkit grade`` it runs
  in the student's kernel, which the student controls, so its absence proves nothing; its presence
  still costs the points.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import re
import sys
import threading

_MAGIC = re.compile(r"^\s*[%!]")


def _parse(source: str):
    """The AST of a cell, IPython magics and shell lines blanked; None when it does not parse."""
    lines = ["" if _MAGIC.match(line) else line for line in source.splitlines()]
    try:
        return ast.parse("\n".join(lines))
    except (SyntaxError, ValueError):
        return None


def _toplevel(body):
    """Top-level statements, descending into if/try/with/for blocks but not into defs or classes."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.For, ast.While, ast.With, ast.Try)):
            for field in ("body", "orelse", "finalbody"):
                yield from _toplevel(getattr(node, field, []) or [])
            for h in getattr(node, "handlers", []) or []:
                yield from _toplevel(h.body)


def _import_names(node) -> list[tuple[str, str]]:
    """[(bound name, dotted target)] of an import statement."""
    out = []
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.asname:
                out.append((a.asname, a.name))
            else:
                top = a.name.split(".")[0]
                out.append((top, top))
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        for a in node.names:
            out.append((a.asname or a.name, f"{node.module}.{a.name}"))
    return out


class _Resolver:
    def __init__(self, bindings: dict, stars: list[str]):
        self.bindings, self.stars = bindings, stars

    def resolve(self, node, local: dict | None = None) -> str | None:
        local = local or {}
        if isinstance(node, ast.Name):
            if node.id in local:
                return local[node.id]
            if node.id in self.bindings:
                return self.bindings[node.id]
            if len(self.stars) == 1:  # a name from `from M import *` (checked against the locked list)
                return f"{self.stars[0]}.{node.id}"
            return None
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value, local)
            return f"{base}.{node.attr}" if base else None
        if isinstance(node, ast.Call):
            f = self.resolve(node.func, local)
            if f in ("importlib.import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                return node.args[0].value
            if (isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                base = self.resolve(node.args[0], local)
                return f"{base}.{node.args[1].value}" if base else None
        return None


_CANONICAL: dict = {}


def _canonical(dotted: str) -> str | None:
    """``module.qualname`` of the object a kit or library name refers to (re-exports resolved), else None.

    Only names under the top-level packages of the locked names are resolved (importing the kit and
    its libraries in the grader is trusted; a submission's own modules are never imported).
    """
    if dotted not in _CANONICAL:
        obj = _resolve_object(dotted)
        obj = getattr(obj, "__wrapped__", obj)
        mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        _CANONICAL[dotted] = f"{mod}.{qual}" if isinstance(mod, str) and isinstance(qual, str) else None
    return _CANONICAL[dotted]


def _matches(dotted: str | None, locked: list[str]) -> str | None:
    """The locked name that ``dotted`` names (itself, an attribute of it, or the same object re-exported)."""
    if not dotted:
        return None
    for name in locked:
        if dotted == name or dotted.startswith(name + "."):
            return name
    roots = {name.split(".")[0] for name in locked}
    if dotted.split(".")[0] in roots and "." in dotted:
        # `from labkit.ensemble.combination import linear_interpolate` names the same function as
        # `labkit.ensemble.linear_interpolate`: compare what they resolve to
        parts = dotted.split(".")
        for cut in range(len(parts), 1, -1):
            target = _canonical(".".join(parts[:cut]))
            if target is None:
                continue
            for name in locked:
                if _canonical(name) == target:
                    return name
            break
    return None


def _base_name(node) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _local_names(node) -> set[str]:
    """Parameters and assigned names inside the functions of ``node`` (their own scope, not the notebook's)."""
    names: set[str] = set()
    for fn in ast.walk(node):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = fn.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                if arg is not None:
                    names.add(arg.arg)
            body = fn.body if isinstance(fn.body, list) else [fn.body]
            declared_global = {n for stmt in body for g in ast.walk(stmt) if isinstance(g, (ast.Global, ast.Nonlocal))
                               for n in g.names}
            for stmt in body:
                for sub in ast.walk(stmt):
                    if isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
                        names.add(sub.id)
            names -= declared_global
    return names


def static_lock_check(sources: list[str], function: str, locked: list[str]) -> list[str]:
    """The locked names that the notebook's definition of ``function`` uses (sorted; [] when none).

    ``sources``: the code cells in order. The definition is the last top-level binding of
    ``function``; functions and values of the notebook that it references are followed.
    """
    if not locked:
        return []
    trees = [t for t in (_parse(s) for s in sources) if t is not None]
    bindings: dict[str, str | None] = {}
    stars: list[str] = []
    defs: dict[str, list] = {}  # name -> nodes that define it (the last one wins, earlier ones kept too)
    for tree in trees:
        for node in _toplevel(tree.body):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names) and node.module:
                    stars.append(node.module)
                    continue
                for name, target in _import_names(node):
                    bindings[name] = target
                    defs[name] = [node]
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bindings[node.name] = None
                defs[node.name] = [node]
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            value = node.value if node.value is not None else None
                            resolved = _Resolver(bindings, stars).resolve(value) if value is not None else None
                            bindings[n.id] = resolved
                            defs.setdefault(n.id, [])
                            defs[n.id] = [node]
    resolver = _Resolver(bindings, stars)
    hits: set[str] = set()
    seen_names: set[str] = set()
    todo = [function]
    while todo:
        name = todo.pop()
        if name in seen_names:
            continue
        seen_names.add(name)
        hit = _matches(bindings.get(name), locked)
        if hit:
            hits.add(hit)
        for node in defs.get(name, []):
            local: dict[str, str] = {}
            own = _local_names(node)
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)) and sub is not node:
                    for n, target in _import_names(sub):
                        local[n] = target
                        hit = _matches(target, locked)
                        if hit:
                            hits.add(hit)
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and sub.id in own:
                    continue  # a parameter or a variable of the function, not the notebook's name
                if isinstance(sub, ast.Attribute) and _base_name(sub) in own:
                    continue
                if isinstance(sub, (ast.Name, ast.Attribute, ast.Call)):
                    hit = _matches(resolver.resolve(sub, local), locked)
                    if hit:
                        hits.add(hit)
                if isinstance(sub, ast.Name) and sub.id not in local and sub.id not in bindings:
                    for m in stars:
                        hit = _matches(f"{m}.{sub.id}", locked)
                        if hit:
                            hits.add(hit)
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    hit = _matches(sub.value, locked)
                    if hit:
                        hits.add(hit)
                if isinstance(sub, ast.Name) and sub.id in defs and sub.id not in seen_names:
                    todo.append(sub.id)
    return sorted(hits)


# ----------------------------------------------------------------------------------------------
# Run time


def _resolve_object(dotted: str, imports: bool = True):
    """The object a dotted name names, importing only its module (None when it does not exist).

    ``imports=False``: only modules imported already (in a kernel, importing transformers to watch for
    a call of one of its functions would cost the answer's time limit seconds).
    """
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        if module_name not in sys.modules:
            if not imports:
                continue
            try:
                importlib.import_module(module_name)
            except Exception:  # noqa: BLE001 - not a module: try a shorter prefix
                continue
        obj = sys.modules[module_name]
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _code_objects(dotted: str, imports: bool = True) -> list:
    obj = _resolve_object(dotted, imports)
    if obj is None:
        return []
    if isinstance(obj, type):  # a class: its own methods
        return [f.__code__ for f in vars(obj).values() if hasattr(f, "__code__")]
    fn = getattr(obj, "__wrapped__", obj)
    code = getattr(fn, "__code__", None)
    return [code] if code is not None else []


@contextlib.contextmanager
def runtime_lock_check(locked):
    """Within the block, record (into the yielded set) each locked function called from student code."""
    seen: set = set()
    codes = {}
    by_name: dict[str, list[tuple[str, str]]] = {}  # function name -> [(module prefix, locked name)]
    for name in locked or []:
        for code in _code_objects(name, imports=False):
            codes[code] = name
        module, _, last = name.rpartition(".")
        by_name.setdefault(last, []).append((module, name))  # for modules imported later, during the call
    if not locked:
        yield seen
        return
    from .questions import _is_student_frame

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            name = codes.get(code)
            if name is None and code.co_name in by_name:
                module = frame.f_globals.get("__name__", "")
                name = next((n for prefix, n in by_name[code.co_name]
                             if module == prefix or module.startswith(prefix + ".")), None)
            if name is not None and frame.f_back is not None and _is_student_frame(frame.f_back.f_code.co_filename):
                seen.add(name)

    old = sys.getprofile()
    sys.setprofile(profile)
    threading.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(old)
        threading.setprofile(None)
