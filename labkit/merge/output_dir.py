"""The output folder of a merge: refused when it could hurt the inputs, replaced atomically.

``check_out_dir`` refuses an OUT_DIR that is, contains or is inside an input model, and a non-empty
one unless ``force`` and it looks like a previous merge output (it holds the ``MARKER`` file every
merge writes and only files a merge writes). ``written_atomically`` gives the merge a temporary
folder ``.<OUT_DIR name>.labkit-merge-partial.<pid>.<random>`` next to OUT_DIR, created with the
user's normal permissions, and renames it into place only when the merge finished:
  * any exception, and SIGINT/SIGTERM/SIGHUP (turned into ``MergeInterrupted``), remove the
    temporary folder, so OUT_DIR is as it was; a signal during the final renames lets them finish;
  * a SIGKILL leaves at most the partial folder (which never holds config.json: the merge writes it
    last), and the next run with the same OUT_DIR removes it (``remove_leftovers``), or puts back
    the old OUT_DIR if the kill came between moving it aside and renaming the new one into place.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
MARKER = "mergekit_config.yml"       # every merge output holds it (mergekit's too): what --force may replace
OUTPUT_FILES = {MARKER, "config.json", "generation_config.json", "model.safetensors.index.json", *TOKENIZER_FILES}
SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)


class MergeInterrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP stopped the merge; OUT_DIR was left as it was. A KeyboardInterrupt,
    so ``except Exception`` does not swallow it and code that handles Ctrl-C handles it too."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def resolve_out_dir(out_dir) -> Path:
    """OUT_DIR as an absolute path without '..' or symlinks, refusing a filesystem root."""
    out = Path(out_dir).expanduser().resolve()
    if out.parent == out:
        raise ValueError(f"OUT_DIR {str(out_dir)!r} is the filesystem root")
    return out


def check_out_dir(out: Path, inputs: dict[str, Path], force: bool, shown: str) -> None:
    """Refuse an OUT_DIR that is, contains or is inside an input model, and a non-empty one
    unless ``force`` and it is a previous labkit merge output holding nothing else."""
    for ref, p in inputs.items():
        q = p.expanduser().resolve()
        if q == out:
            raise ValueError(f"OUT_DIR {shown!r} is the input model {ref!r}")
        if q in out.parents:
            raise ValueError(f"OUT_DIR {shown!r} is inside the input model {ref!r}")
        if out in q.parents:
            raise ValueError(f"OUT_DIR {shown!r} contains the input model {ref!r}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT_DIR {shown!r} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise ValueError(f"OUT_DIR {shown!r} is not empty; pass --force to replace a previous labkit merge output")
    if not (out / MARKER).is_file():
        raise ValueError(f"OUT_DIR {shown!r} is not a merge output (it has no {MARKER}), so --force will not "
                         "replace it; choose another OUT_DIR")
    foreign = sorted(p.name for p in out.iterdir() if not (p.is_file() and _is_output_file(p.name)))
    if foreign:
        raise ValueError(f"OUT_DIR {shown!r} holds {foreign[0]!r}, which labkit merge does not write; --force "
                         "replaces only a previous merge output: move that away first")


def _is_output_file(name: str) -> bool:
    return name in OUTPUT_FILES or re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", name) is not None


class _SignalGuard:
    """While active, SIGINT/SIGTERM/SIGHUP raise MergeInterrupted, except inside ``deferred()``
    (cleanup and the final renames), where they are remembered and raised at its end."""

    def __init__(self):
        self.defer_depth, self.pending = 0, None

    def _handler(self, signum, frame):
        if self.defer_depth:
            self.pending = self.pending or signum
        else:
            raise MergeInterrupted(signum)

    @contextmanager
    def active(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        old = {s: signal.signal(s, self._handler) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @contextmanager
    def deferred(self, raise_after: bool = True):
        self.defer_depth += 1
        try:
            yield
        finally:
            self.defer_depth -= 1
        if raise_after and not self.defer_depth:
            self.raise_pending()

    def raise_pending(self):
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise MergeInterrupted(signum)


def _work_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.labkit-merge-{kind}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(out: Path) -> None:
    """Clean up after a killed run on this OUT_DIR: delete its partial folder; if it died between
    moving the old OUT_DIR aside and putting the new one in place, put the old one back."""
    if not out.parent.is_dir():
        return
    for kind in ("old", "partial"):
        prefix = _work_prefix(out, kind)
        for p in sorted(out.parent.glob(glob_escape(prefix) + "*")):
            pid = p.name[len(prefix):].split(".")[0]
            if not pid.isdigit() or _pid_alive(int(pid)) and int(pid) != os.getpid():
                continue
            if kind == "old" and not out.exists():
                os.replace(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _make_work_dir(out: Path, kind: str) -> Path:
    """A new folder next to OUT_DIR with the user's normal permissions (mkdtemp would give 0700)."""
    while True:
        p = out.parent / f"{_work_prefix(out, kind)}{os.getpid()}.{secrets.token_hex(4)}"
        try:
            os.mkdir(p)  # mode 0o777 minus the umask, like any folder the user creates
            return p
        except FileExistsError:
            continue


@contextmanager
def written_atomically(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary folder to write the merge into; on success it becomes ``out_dir``."""
    guard = _SignalGuard()
    with guard.active():
        with guard.deferred(raise_after=False):
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = _make_work_dir(out_dir, "partial")
        try:
            guard.raise_pending()
            yield tmp
            with guard.deferred(raise_after=False):  # a signal now lets the renames finish
                _move_into_place(tmp, out_dir)
        except BaseException:
            with guard.deferred(raise_after=False):
                shutil.rmtree(tmp, ignore_errors=True)
            raise


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder to OUT_DIR; an existing OUT_DIR is moved aside first and deleted
    only after the rename succeeded (a failure at any point leaves the old one in place, and after
    a crash in between, the next run puts it back)."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = _make_work_dir(out_dir, "old")
    old.rmdir()
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
