"""The one build step pyproject.toml cannot express: ship the model zoo inside the wheel.

The zoo lives in ``data/zoo/`` at the repository root, where a checkout and an editable install read
it (``labkit.zoo.data_root()``). A wheel has no repository root, so ``build_py`` copies
``data/zoo/**`` into the wheel as ``labkit/_data/zoo/**``, where ``data_root()`` looks first. Everything
else about the package is in pyproject.toml.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ZOO = Path(__file__).resolve().parent / "data" / "zoo"


def _shipped(path: Path) -> bool:
    # half-written files (atomic writes go through *.tmp) and editor/OS leftovers stay out of the wheel
    return path.is_file() and not path.name.startswith(".") and not path.name.endswith(".tmp")


class BuildPyWithZoo(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads data/ in the checkout itself
            return
        if not (ZOO / "manifest.json").is_file():
            raise FileNotFoundError(f"{ZOO / 'manifest.json'} is missing: a wheel without the zoo cannot run the labs")
        target = Path(self.build_lib) / "labkit" / "_data" / "zoo"
        shutil.rmtree(target, ignore_errors=True)  # a stale build/ must not ship a removed entry
        for src in sorted(p for p in ZOO.rglob("*") if _shipped(p)):
            dst = target / src.relative_to(ZOO)
            self.mkpath(str(dst.parent))
            self.copy_file(str(src), str(dst))


setup(cmdclass={"build_py": BuildPyWithZoo})
