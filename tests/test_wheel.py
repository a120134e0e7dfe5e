"""The wheel a user installs: it ships the zoo, and labkit.zoo finds it once installed.

Builds the wheel from a copy of the checkout (so no ``build/`` is left in the checkout), with the
project environment's setuptools and no build isolation (offline, seconds). Then installs it with
``--no-deps`` into a fresh virtual environment that borrows the project environment's third-party
packages through a ``.pth`` file (torch etc. are not installed again) but not its editable labkit, and
loads a zoo entry there from a folder outside the checkout.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what a checkout may hold that is not part of the project's source (environments, outputs, builds)
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "reports", "release", "grades", "work", "build",
                                     "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ipynb_checkpoints")


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="setuptools is not installed (make install)")
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    out = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index",
          "-q", "-w", str(out)], cwd=tmp)
    (built,) = out.glob("labkit-*.whl")
    return built


@pytest.mark.slow
def test_wheel_ships_the_zoo_and_nothing_for_instructors_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    manifest = json.loads((REPO / "data" / "zoo" / "manifest.json").read_text())
    expected = {"labkit/_data/zoo/manifest.json"} | {
        f"labkit/_data/zoo/{entry}/{file}" for entry, info in manifest["entries"].items() for file in info["files"]}
    missing = sorted(expected - set(names))
    assert not missing, f"the wheel lacks {len(missing)} zoo file(s), e.g. {missing[:3]}"
    with zipfile.ZipFile(wheel) as z:
        shipped = z.read("labkit/_data/zoo/digits/mlp-s0/model.safetensors")
    assert hashlib.sha256(shipped).hexdigest() == manifest["entries"]["digits/mlp-s0"]["files"]["model.safetensors"]

    # solutions, hidden tests and the instructor's bank stay out of what students install
    parts = [Path(n).parts for n in names]
    assert not [n for n, p in zip(names, parts) if "instructor" in p], "the wheel contains instructor/ files"
    assert not [n for n, p in zip(names, parts) if p[0] in ("tests", "notebooks")], "the wheel has tests/ or notebooks/"
    assert not [n for n in names if n.endswith(".ipynb")], "the wheel contains notebooks (solutions, hidden tests)"
    assert not [n for n in names if Path(n).name.startswith("test_")], "the wheel contains test files"
    instructor = REPO / "instructor"
    if instructor.is_dir():  # the instructor's files must not ship under another name either
        digests = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in instructor.rglob("*") if p.is_file()}
        with zipfile.ZipFile(wheel) as z:
            leaked = [n for n in names if hashlib.sha256(z.read(n)).hexdigest() in digests]
        assert not leaked, f"the wheel contains copies of instructor/ files: {leaked[:3]}"


def _borrowed_paths() -> list[str]:
    """The project environment's import paths, except anything that would import labkit from the checkout."""
    paths = []
    for entry in sys.path:
        p = Path(entry or ".").resolve()
        if not p.is_dir() or p == REPO or REPO in p.parents or (p / "labkit").exists():
            continue
        paths.append(str(p))
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths()[key]
        if p not in paths:
            paths.append(p)
    return paths


@pytest.mark.slow
def test_installed_wheel_loads_from_its_own_zoo(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "_labkit_test_borrowed.pth").write_text("\n".join(_borrowed_paths()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)])

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABKIT_DATA", "PYTHON"))}
    script = (
        "import json, labkit, torch\n"
        "from labkit import zoo\n"
        "model = zoo.load('digits/mlp-s0', device='cpu')\n"
        "logits = model(torch.zeros(3, 64))\n"
        "print(json.dumps({'labkit': labkit.__file__, 'data_root': str(zoo.data_root()),"
        " 'logits': list(logits.shape)}))\n")
    # -I: no current directory or PYTHONPATH on sys.path, so only the installed wheel provides labkit
    result = json.loads(_run([str(python), "-I", "-c", script], cwd=tmp_path, env=env).stdout.strip().splitlines()[-1])
    assert Path(result["labkit"]).resolve().is_relative_to(site.resolve()), result
    assert Path(result["data_root"]).resolve() == (site / "labkit" / "_data").resolve(), result
    assert result["logits"] == [3, 10]
    # every shipped file matches the manifest's SHA-256 in the installed copy too
    _run([str(venv / "bin" / "labkit"), "zoo", "verify"], cwd=tmp_path, env=env)


def test_environment_yml_pins_the_torch_that_make_installs():
    """conda users get the torch the kit is tested with: environment.yml and the Makefile agree."""
    import re

    import yaml

    makefile = (REPO / "Makefile").read_text()
    tested = re.search(r"^TORCH_VERSION \?= (\S+)$", makefile, re.MULTILINE).group(1)
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_lines = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    torch_pins = [line for line in pip_lines if re.match(r"torch\b", line)]
    assert torch_pins == [f"torch=={tested}"], f"environment.yml pins {torch_pins}, the Makefile installs {tested}"
    assert "--constraint constraints.txt" in pip_lines, "environment.yml does not apply constraints.txt"
