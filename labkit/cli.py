"""The ``labkit`` command. Each subcommand is a thin wrapper over a function in the package."""
from __future__ import annotations

import argparse
import os
import sys


def _zoo(args) -> int:
    from . import zoo

    if args.zoo_cmd == "list":
        zoo.print_listing()
    elif args.zoo_cmd == "verify":
        bad = zoo.verify_all()
        return 1 if bad else 0
    elif args.zoo_cmd == "build":
        names = zoo.resolve_names(args.names)
        for name in names:
            zoo.build(name, device=args.device, force=args.force)
    return 0


def _release(args) -> int:
    from .grading.release import release_cli

    return release_cli(args)


def _grade(args) -> int:
    from .grading.grade import grade_cli

    return grade_cli(args)


def _labs(args) -> int:
    from .labs import labs_cli

    return labs_cli(args)


def _doctor(args) -> int:
    from .doctor import doctor

    return doctor()


def _bench(args) -> int:
    from .bench import BENCHMARKS, run_benchmark

    names = BENCHMARKS if args.name == "all" else [args.name]
    for name in names:
        run_benchmark(name, smoke=args.smoke, out_dir=args.out)
    return 0


def _merge(args) -> int:
    from .merge import run_merge_config

    run_merge_config(args.config, args.out_dir, device=args.device, force=args.force,
                     allow_pickle=args.allow_pickle)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labkit", description="labkit: a lab kit on combining models")
    sub = p.add_subparsers(dest="cmd", required=True)

    z = sub.add_parser("zoo", help="list, verify or rebuild the model zoo")
    zsub = z.add_subparsers(dest="zoo_cmd", required=True)
    zsub.add_parser("list", help="list the zoo's entries with their metrics")
    zsub.add_parser("verify", help="check every shipped file against the manifest's SHA-256")
    zb = zsub.add_parser("build", help="rebuild entries from their recipes (fast on a GPU)")
    zb.add_argument("names", nargs="+", help="entry names, a prefix such as 'digits/', or 'all'")
    zb.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    zb.add_argument("--force", action="store_true", help="rebuild entries that already exist")
    z.set_defaults(func=_zoo)

    r = sub.add_parser("release", help="write student versions of the solution notebooks")
    r.add_argument("notebooks", nargs="*", help="solution notebooks (default: notebooks/*.ipynb)")
    r.add_argument("--out", default="release", help="output folder (default: release/)")
    r.add_argument("--force", action="store_true", help="overwrite existing files in --out")
    r.set_defaults(func=_release)

    g = sub.add_parser("grade", help="grade student submissions")
    g.add_argument("submissions", nargs="+", help="submitted notebooks")
    g.add_argument("--out", required=True, help="folder for grades.csv and feedback files")
    g.add_argument("--cell-timeout", type=float, default=120.0, help="seconds per cell (default 120)")
    g.add_argument("--timeout", type=float, default=900.0, help="seconds per notebook (default 900)")
    g.add_argument("--jobs", type=int, default=None, help="parallel graders (default: CPU cores)")
    g.set_defaults(func=_grade)

    lb = sub.add_parser("labs", help="run every solution notebook headless and write a report")
    lb.add_argument("notebooks", nargs="*", help="notebooks to run (default: notebooks/*.ipynb)")
    lb.add_argument("--mode", choices=["smoke", "full"], default=None, help="run mode (default: by device)")
    lb.add_argument("--out", default="reports", help="folder for executed notebooks and the report")
    lb.add_argument("--timeout", type=float, default=1800.0, help="seconds per notebook")
    lb.set_defaults(func=_labs)

    d = sub.add_parser("doctor", help="print versions, device and mode; warn about untested versions")
    d.set_defaults(func=_doctor)

    b = sub.add_parser("bench", help="run a benchmark: ensemble, merge, moe, refine or all")
    b.add_argument("name", choices=["ensemble", "merge", "moe", "refine", "all"])
    b.add_argument("--smoke", action="store_true", help="tiny sizes, to check that it runs")
    b.add_argument("--out", default="bench/results", help="folder for the JSON results")
    b.set_defaults(func=_bench)

    m = sub.add_parser("merge", help="merge checkpoints from a mergekit-style YAML config")
    m.add_argument("config", help="mergekit-style YAML file")
    m.add_argument("out_dir", help="output model directory")
    m.add_argument("--device", default=None, help="device for the arithmetic (default: best available)")
    m.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    m.add_argument("--allow-pickle", action="store_true",
                   help="allow reading pytorch_model*.bin files (unpickling runs code: trust the source)")
    m.set_defaults(func=_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, RuntimeError) as e:
        # bad input (a config, a path, a zoo entry) is the user's to fix: say what, without a traceback
        if os.environ.get("LABKIT_DEBUG") == "1":
            raise
        print(f"labkit {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
