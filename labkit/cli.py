"""The ``labkit`` command. Each subcommand is a thin wrapper over a function in the package."""
from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys


def _zoo(args) -> int:
    from . import zoo

    if args.zoo_cmd == "list":
        zoo.print_listing()
    elif args.zoo_cmd == "verify":
        bad = zoo.verify_all()
        if bad:
            raise zoo.ZooError(f"{len(bad)} entr{'y' if len(bad) == 1 else 'ies'} failed verification: "
                               f"{', '.join(bad)} (see the FAIL lines above)")
    elif args.zoo_cmd == "build":
        names = zoo.resolve_names(args.names)
        for name in names:
            zoo.build(name, device=args.device, force=args.force)
    return 0


def _release(args) -> int:
    from .grading.release import release_cli

    return release_cli(args)


def _positive(value, option: str, kind=float):
    """``value`` if it is a positive finite number (a whole one for ``kind=int``), else ValueError naming ``option``."""
    if value is None:
        return None
    if not (math.isfinite(value) and value > 0 and kind(value) == value):
        what = "a positive whole number" if kind is int else "a positive number of seconds"
        raise ValueError(f"{option} must be {what}, got {value:g}")
    return kind(value)


def _grade(args) -> int:
    from .grading.grade import grade_cli

    args.cell_timeout = _positive(args.cell_timeout, "--cell-timeout")
    args.timeout = _positive(args.timeout, "--timeout")
    args.jobs = _positive(args.jobs, "--jobs", int)
    return grade_cli(args)


def _labs(args) -> int:
    from .course.labs import labs_cli

    return labs_cli(args)


def _build_notebooks(args) -> int:
    from .course.build import build_cli

    return build_cli(args)


def _doctor(args) -> int:
    from .doctor import doctor

    return doctor()


def _bench(args) -> int:
    from .benchmarks import BENCHMARKS, run_benchmark

    names = BENCHMARKS if args.name == "all" else [args.name]
    out = os.path.abspath(args.out)
    while not os.path.exists(out):  # check --out now, not after minutes of benchmarking
        out = os.path.dirname(out)
    if not os.path.isdir(out) or not os.access(out, os.W_OK):
        raise ValueError(f"--out {args.out!r}: {out} is not a writable folder")
    for name in names:
        run_benchmark(name, smoke=args.smoke, out_dir=args.out)
    return 0


def _merge(args) -> int:
    from .merge import run_merge_config

    run_merge_config(args.config, args.out_dir, device=args.device, force=args.force,
                     allow_pickle=args.allow_pickle, allow_nonfinite=args.allow_nonfinite,
                     allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    return 0


def _leaderboard(args) -> int:
    from .capstone.leaderboard import leaderboard_cli

    args.jobs = _positive(args.jobs, "--jobs", int)
    args.daily_cap = _positive(args.daily_cap, "--daily-cap", int)
    if args.latency_repeats < 0:
        raise ValueError(f"--latency-repeats must be 0 (no timing) or more, got {args.latency_repeats}")
    return leaderboard_cli(args)


def _capstone(args) -> int:
    from .capstone.make_class import make_class_cli

    return make_class_cli(args)


def _device_arg(value: str) -> str:
    """--device: refused at parse time when this machine does not have it (no traceback later)."""
    from .merge.yaml_runner import parse_device

    try:
        parse_device(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace(f"--device {value!r}: ", "")) from None
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, exit 2 (argparse prints the whole usage block otherwise)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _describe(e: BaseException) -> str:
    """One line saying what went wrong, without a traceback."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large (a file size limit, see ulimit -f)"}[e.errno]
        return f"{what}{f' writing {e.filename}' if e.filename else ''}; nothing was left half-written"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}{f': {e.filename}' if e.filename else ''}"
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (ValueError, RuntimeError, LookupError)) and type(e).__module__.startswith(("labkit", "builtins")):
        return text
    return f"{type(e).__name__}: {text} (unexpected; LABKIT_DEBUG=1 shows the traceback)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="labkit", description="labkit: a lab kit on combining models")
    sub = p.add_subparsers(dest="cmd", required=True)

    z = sub.add_parser("zoo", help="list, verify or rebuild the model zoo")
    zsub = z.add_subparsers(dest="zoo_cmd", required=True)
    zsub.add_parser("list", help="list the zoo's entries with their metrics")
    zsub.add_parser("verify", help="check every shipped file against the manifest's SHA-256")
    zb = zsub.add_parser("build", help="rebuild entries from their recipes (fast on a GPU)")
    zb.add_argument("names", nargs="+", help="entry names, a prefix such as 'digits/', or 'all'")
    zb.add_argument("--device", default=None, type=_device_arg, help="cuda, mps or cpu (default: best available)")
    zb.add_argument("--force", action="store_true", help="rebuild entries that already exist")
    z.set_defaults(func=_zoo)

    r = sub.add_parser("release", help="write student versions of the solution notebooks")
    r.add_argument("notebooks", nargs="*", help="solution notebooks (default: the kit's notebooks/*.ipynb)")
    r.add_argument("--out", default=None, help="output folder (default: release/ of the kit's checkout)")
    r.add_argument("--url", default=None,
                   help="GitHub folder the release is published to, https://github.com/OWNER/REPO/tree/BRANCH/FOLDER "
                        "(Colab badges and the install cell point there; default: [tool.labkit] release-url, "
                        "else the repository's release/ folder)")
    r.add_argument("--force", action="store_true", help="overwrite existing files in --out")
    r.set_defaults(func=_release)

    g = sub.add_parser("grade", help="grade student submissions")
    g.add_argument("submissions", nargs="+",
                   help="submitted notebooks, or folders of them (STUDENT/LAB.ipynb or STUDENT_LAB.ipynb)")
    g.add_argument("--out", required=True, help="folder for gradebook.csv, grades.csv, report.md and feedback/")
    g.add_argument("--roster", default=None,
                   help="CSV with the class: id, name, aliases (file-name aliases; default: names from the files)")
    g.add_argument("--cell-timeout", type=float, default=120.0, help="seconds per cell (default 120)")
    g.add_argument("--timeout", type=float, default=900.0, help="seconds per notebook (default 900)")
    g.add_argument("--jobs", type=int, default=None, help="parallel graders (default: CPU cores)")
    g.add_argument("--bank", default=None, help="instructor bank folder with the hidden cases "
                   "(default: $LABKIT_BANK, else the repository's instructor/bank)")
    g.add_argument("--memory-gb", type=float, default=6.0, help="memory limit of each kernel (default 6)")
    g.set_defaults(func=_grade)

    lb = sub.add_parser("labs", help="run every solution notebook headless and write a report")
    lb.add_argument("notebooks", nargs="*", help="notebooks to run (default: notebooks/*.ipynb)")
    lb.add_argument("--mode", choices=["smoke", "full"], default=None, help="run mode (default: by device)")
    lb.add_argument("--out", default="reports", help="folder for executed notebooks and the report")
    lb.add_argument("--timeout", type=float, default=1800.0, help="seconds per notebook")
    lb.set_defaults(func=_labs)

    nb = sub.add_parser("build-notebooks", help="build notebooks/NN_name.ipynb from notebooks/src/NN_name.py")
    nb.add_argument("names", nargs="*", help="notebooks to build, e.g. 00_welcome or 00 (default: every source)")
    nb.add_argument("--check", action="store_true", help="write nothing; fail if a notebook differs from its source")
    nb.set_defaults(func=_build_notebooks)

    d = sub.add_parser("doctor", help="print versions, device and mode; warn about untested versions")
    d.set_defaults(func=_doctor)

    from .benchmarks import BENCHMARKS

    b = sub.add_parser("bench", help=f"run a benchmark: {', '.join(BENCHMARKS)} or all")
    b.add_argument("name", choices=[*BENCHMARKS, "all"])
    b.add_argument("--smoke", action="store_true", help="tiny sizes, to check that it runs")
    b.add_argument("--out", default="bench/results", help="folder for the JSON results")
    b.set_defaults(func=_bench)

    m = sub.add_parser("merge", help="merge checkpoints from a mergekit-style YAML config")
    m.add_argument("config", help="mergekit-style YAML file")
    m.add_argument("out_dir", help="output model directory")
    m.add_argument("--device", default=None, type=_device_arg,
                   help="device for the arithmetic (default: best available)")
    m.add_argument("--force", action="store_true",
                   help="replace OUT_DIR if it is a previous merge output (never any other folder)")
    m.add_argument("--allow-pickle", action="store_true",
                   help="allow reading pytorch_model*.bin files (unpickling runs code: trust the source)")
    m.add_argument("--allow-nonfinite", action="store_true",
                   help="merge even if a tensor holds NaN or inf (refused by default, naming the tensor)")
    m.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="merge models whose tokenizers map tokens to different ids (refused by default)")
    m.set_defaults(func=_merge)

    lb = sub.add_parser("leaderboard", help="score capstone submissions on the hidden split; write CSV and HTML")
    lb.add_argument("submissions", nargs="+",
                    help="class folders (<team>/<submission>/spec.yml, <team>/final.yml) or submission folders")
    lb.add_argument("--out", required=True, help="folder for leaderboard.csv and leaderboard.html")
    lb.add_argument("--hidden", default=None, help="the hidden split (default: $LABKIT_CAPSTONE_HIDDEN, else "
                    "instructor/capstone/hidden.safetensors of the checkout); refused unless its SHA-256 is the recorded one")
    lb.add_argument("--hidden-sha256", default=None, metavar="HEX",
                    help="the SHA-256 a hidden split of your own must have (default: the one recorded in "
                         "labkit/capstone/challenge.py for the kit's hidden split)")
    lb.add_argument("--reveal-private", action="store_true", help="rank by and show the private scores (the end)")
    lb.add_argument("--jobs", type=int, default=1, help="parallel scoring processes (default 1; same results for any)")
    lb.add_argument("--daily-cap", type=int, default=None,
                    help="count at most N submissions per team and UTC day (by submitted_at)")
    lb.add_argument("--reference", nargs="+", default=None, metavar="SUBMISSION",
                    help="reference solutions (submission folders) scored and drawn on the frontier, not ranked")
    lb.add_argument("--latency-repeats", type=int, default=5, help="timed runs per submission (0: no latency)")
    lb.add_argument("--latency-tolerance", type=float, default=1.0,
                    help="latency gate: at most budget x (1 + T) x the reference's latency (default 1.0; "
                         "a negative value turns the latency gate off)")
    lb.add_argument("--device", default=None, type=_device_arg, help="device to score on (default: cpu)")
    lb.add_argument("--force", action="store_true", help="write into --out even if it holds other files")
    lb.set_defaults(func=_leaderboard)

    cap = sub.add_parser("capstone", help="capstone tooling")
    capsub = cap.add_subparsers(dest="capstone_cmd", required=True)
    mc = capsub.add_parser("make-class", help="generate a class folder of submissions covering every leaderboard case")
    mc.add_argument("directory", help="new folder for the class")
    mc.add_argument("--force", action="store_true", help="replace a class folder make-class wrote before")
    cap.set_defaults(func=_capstone)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = os.environ.get("LABKIT_DEBUG") == "1"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:  # also labkit.merge's MergeInterrupted (SIGTERM, SIGHUP)
        if debug:
            raise
        signum = getattr(e, "signum", signal.SIGINT)
        kept = "; OUT_DIR was left as it was" if args.cmd == "merge" else ""
        print(f"labkit {args.cmd}: interrupted by {signal.Signals(signum).name}{kept}", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        # bad input (a config, a path, a zoo entry) or a full disk is the user's to fix: say what, in
        # one line; LABKIT_DEBUG=1 keeps the traceback for bugs
        if debug:
            raise
        print(f"labkit {args.cmd}: error: {_describe(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
