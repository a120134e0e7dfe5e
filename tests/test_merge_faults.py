"""Fault injection for ``labkit merge``: merges killed by each signal at random points (in a
subprocess, through the real CLI), a disk that fills up (a tiny tmpfs when this machine lets us
mount one, else a writer patched to fail with ENOSPC) and a file size limit (RLIMIT_FSIZE). After
each, OUT_DIR (a previous merge output being replaced with --force) and the input models must be
byte-identical to before and no temporary folder may remain; after SIGKILL at most one clearly
named partial folder without config.json may remain, and the next run removes it."""
import errno
import os
import random
import resource
import signal
import subprocess
import sys
import uuid

import pytest

from labkit.cli import main
from labkit.merge import safetensors_io
from labkit.merge.yaml_runner import run_merge_config
from test_merge_hardening import leftovers, snapshot
from test_merge_io import _ties, tiny_llamas, write_config

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tiny_llamas(tmp_path_factory.mktemp("tiny_llamas"))

CHILD = r"""
import sys, time
from labkit.merge import yaml_runner
from labkit.cli import main

pause_at = int(sys.argv[1])

def pause(count, name):  # wait at the chosen tensor until the parent's signal arrives
    if count == pause_at:
        print(f"paused at tensor {count}", flush=True)
        time.sleep(120)

yaml_runner._after_tensor = pause
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture
def previous_output(zoo, tmp_path):
    """A config and an OUT_DIR that already holds a previous merge output (to be replaced with --force)."""
    path = write_config(tmp_path / "m.yml", zoo, **_ties())
    other = write_config(tmp_path / "other.yml", zoo, merge_method="linear",
                         models=[{"model": "ft0", "parameters": {"weight": 1}},
                                 {"model": "ft1", "parameters": {"weight": 2}}])
    out = run_merge_config(other, tmp_path / "out", verbose=False)
    n_tensors = len(safetensors_io.ModelDir(zoo / "base").specs)
    return path, out, n_tensors


def _kill_at(config, out, sig, at_tensor):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("LABKIT_DEBUG", None)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(at_tensor), "merge", str(config), str(out), "--force"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in child.stdout:
            if line.strip() == f"paused at tensor {at_tensor}":
                child.send_signal(sig)
                break
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, err


SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_at_a_random_point_leaves_everything_as_it_was(zoo, previous_output, sig):
    config, out, n = previous_output
    at = random.Random(f"{sig}").randrange(n - 1)  # a reproducible "random" point per signal
    before, inputs = snapshot(out), snapshot(zoo)
    code, err = _kill_at(config, out, sig, at)
    assert code == 128 + sig, err
    assert err.strip().splitlines() == [f"labkit merge: interrupted by {signal.Signals(sig).name}; "
                                        "OUT_DIR was left as it was"]
    assert snapshot(out) == before and snapshot(zoo) == inputs
    assert leftovers(out.parent) == []


def test_sigkill_leaves_only_a_partial_folder_that_the_next_run_removes(zoo, previous_output):
    config, out, n = previous_output
    at = random.Random("kill").randrange(n - 1)
    before, inputs = snapshot(out), snapshot(zoo)
    code, _ = _kill_at(config, out, signal.SIGKILL, at)
    assert code == -signal.SIGKILL
    assert snapshot(out) == before and snapshot(zoo) == inputs
    left = leftovers(out.parent)
    assert len(left) <= 1 and all(name.startswith(".out.labkit-merge-partial.") for name in left)
    assert not any((out.parent / name / "config.json").exists() for name in left)  # never mistaken for a model
    assert main(["merge", str(config), str(out), "--force"]) == 0
    assert leftovers(out.parent) == [] and (out / "config.json").exists()


# ------------------------------------------------------------------------------------ write errors


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """Mount a small tmpfs (needs root and CAP_SYS_ADMIN); None where that is not allowed."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()

    mounted = []

    def mount(size_bytes):
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mnt)],
                               capture_output=True)
        except OSError:  # no mount command
            return None
        if r.returncode != 0:
            return None
        mounted.append(mnt)
        return mnt

    yield mount
    if mounted:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _merge_pages(config, tmp_path) -> int:
    """Bytes a merge output takes on a tmpfs (each file rounded up to 4 KiB pages)."""
    ref = run_merge_config(config, tmp_path / "reference", verbose=False)
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in ref.iterdir())


@pytest.mark.parametrize("with_previous_output", [False, True])
def test_disk_full_leaves_out_dir_as_it_was(zoo, tmp_path, tiny_tmpfs, monkeypatch, capsys, with_previous_output):
    config = write_config(tmp_path / "m.yml", zoo, **_ties())
    size = _merge_pages(config, tmp_path)
    mnt = tiny_tmpfs(int(size * 1.25) if with_previous_output else size // 2)
    patched = mnt is None
    if patched:  # no tmpfs here: the writer fails instead, as a full disk would make it
        mnt = tmp_path / "disk"
        mnt.mkdir()
    out = mnt / "out"
    if with_previous_output:
        run_merge_config(config, out, verbose=False)
    if patched:
        real_write = safetensors_io.ShardWriter.write

        def write_until_full(self, name, tensor):
            if len(self.written) >= 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.out_dir / self.files[0]))
            real_write(self, name, tensor)

        monkeypatch.setattr(safetensors_io.ShardWriter, "write", write_until_full)
    before, inputs = snapshot(mnt), snapshot(zoo)
    assert main(["merge", str(config), str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("labkit merge: error: no space left on the device"), err
    assert snapshot(mnt) == before and snapshot(zoo) == inputs


def test_file_size_limit_is_one_line_and_leaves_nothing(zoo, tmp_path, previous_output):
    config, out, _ = previous_output
    before, inputs = snapshot(out.parent), snapshot(zoo)
    limit = (out / "model.safetensors").stat().st_size // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "labkit.cli", "merge", str(config), str(out), "--force"],
                       capture_output=True, text=True, preexec_fn=limit_file_size,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("labkit merge: error: file too large"), r.stderr
    assert snapshot(out.parent) == before and snapshot(zoo) == inputs
