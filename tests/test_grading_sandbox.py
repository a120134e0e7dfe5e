"""The sandbox launcher on its own (no kernel): hidden folders, read-only requests, a private /proc, no
capabilities, limits, and no process left once it exits, in both the root ("uid") and the unprivileged
user-namespace ("userns") modes."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from labkit.grading import sandbox


@pytest.fixture
def tmp_path():
    # a folder every user can reach (pytest's own tmp_path sits under a 0700 folder)
    path = Path(tempfile.mkdtemp(prefix="labkit-sandbox-test-"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


LAUNCHER = Path(sandbox.__file__).resolve()
MARKER = "labkit-sandbox-test-marker"
SCRIPT = f"""
id -u; grep CapEff /proc/self/status
cat {{bank}}/secret.txt 2>/dev/null && echo BANK-READ
touch {{req}}/x 2>/dev/null && echo REQ-WRITTEN
ls {{base}} | tr '\\n' ' '; echo
echo procs $(ls /proc | grep -c '^[0-9]')
(setsid sh -c 'sleep 60; : {MARKER}' &)
umount {{bank}} 2>/dev/null && echo UNMOUNTED
ulimit -d
echo done
"""


def _layout(tmp_path, mode, uid=None):
    base = tmp_path / "base"
    job, other, bank = base / "job", base / "other-job", tmp_path / "bank"
    for d in (job / "work", job / "req", other, bank):
        d.mkdir(parents=True)
    (bank / "secret.txt").write_text("hidden case")
    (other / "answers.txt").write_text("someone else's")
    for p in [tmp_path, *tmp_path.rglob("*")]:
        os.chmod(p, 0o777 if p.is_dir() else 0o666)
    cfg = {"mode": mode, "uid": uid, "gid": uid, "job_dir": str(job), "work_dir": str(job / "work"),
           "base_dir": str(base), "hide": [str(bank)], "read_only": [str(job / "req")],
           "limits": {"data": 2**31}, "expose": []}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    os.chmod(tmp_path / "cfg.json", 0o644)
    return cfg, SCRIPT.format(bank=bank, req=job / "req", base=base)


def _run(tmp_path, cfg, script, python, user=None, launcher=LAUNCHER):
    out = subprocess.run([python, "-I", str(launcher), str(tmp_path / "cfg.json"), "--", "/bin/sh", "-c", script],
                         capture_output=True, text=True, timeout=60, user=user, cwd="/")
    time.sleep(0.5)
    alive = [p for p in os.listdir("/proc") if p.isdigit() and MARKER in _cmdline(p)]
    return out.stdout, alive


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _check(stdout, alive, uid):
    lines = stdout.splitlines()
    assert lines[0] == str(uid) and lines[1].split()[-1] == "0000000000000000", stdout  # no capabilities
    assert "BANK-READ" not in stdout and "REQ-WRITTEN" not in stdout and "UNMOUNTED" not in stdout, stdout
    assert "other-job" not in stdout and "job" in stdout  # only its own folder in the shared base
    procs = int(next(line for line in lines if line.startswith("procs")).split()[1])
    assert procs < 10, stdout  # a private /proc: the sandbox's own processes only
    assert str(2**31 // 1024) in stdout and lines[-1] == "done"
    assert alive == [], "a detached child outlived the sandbox"


@pytest.mark.skipif(os.geteuid() != 0 or sandbox.detect_mode() != "uid", reason="the uid mode needs root")
def test_uid_mode_as_root(tmp_path):
    cfg, script = _layout(tmp_path, "uid", uid=2_000_123_456)
    stdout, alive = _run(tmp_path, cfg, script, sys.executable)
    _check(stdout, alive, 2_000_123_456)


def test_userns_mode_for_an_unprivileged_instructor(tmp_path):
    if os.geteuid() == 0:  # as root, play the unprivileged instructor: nobody, with a Python nobody can run
        python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)
        if python is None or not shutil.which("sh"):
            pytest.skip("no system python3 that an unprivileged user can run")
        user, uid = 65534, 65534
    else:
        python, user, uid = sys.executable, None, os.geteuid()
    probe = subprocess.run(["unshare", "-Urpf", "true"], user=user, capture_output=True) if shutil.which("unshare") \
        else None
    if probe is None or probe.returncode != 0:
        pytest.skip("unprivileged user namespaces are not available here (labkit grade warns in that case)")
    cfg, script = _layout(tmp_path, "userns")
    launcher = LAUNCHER
    if user is not None:  # nobody may not enter the checkout (a `mktemp -d` clone is 0700): run a readable copy
        launcher = tmp_path / "launcher.py"
        shutil.copy(LAUNCHER, launcher)
        os.chmod(launcher, 0o644)
    stdout, alive = _run(tmp_path, cfg, script, python, user=user, launcher=launcher)
    _check(stdout, alive, uid)
