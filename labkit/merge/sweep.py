"""Measured sweep of merging on the zoo's language models (issue 13; syllabus claims 8 and 9).

Tooling around ``labkit.merge``'s methods (imports point from here to the methods, never back):
teacher-forced exact match for scoring many merged models quickly, disjoint validation/test splits,
hyperparameters chosen on validation, and the sweep itself::

    python -m labkit.merge.sweep --base lm/merge-base --prefix lm/merge-ft- --out sweep.json

Every number in the JSON is computed from zoo checkpoints: per-task skill of the base and of each
fine-tune, task-vector sizes and cosines, task addition and negation (claim 8, with a random
direction of the same norm as the control), averaging vs task arithmetic vs TIES as the number of
tasks grows (claim 9; run it on gentle and on far fine-tunes to see the task vectors grow), and DARE's
drop rate. Methods' lambda and density are chosen on the validation split and reported on the test split.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import time

import torch

from .. import merge, zoo
from ..data import encode_for_training, make_examples
from ..device import device_name

# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def teacher_forced_exact_match(model, rows) -> float:
    """Fraction of rows (dicts or columns with prompt and answer) whose answer and <eos> are all the
    model's top prediction given the reference prefix: exactly when greedy decoding gives the answer,
    at the cost of one forward pass."""
    prompts, answers = list(rows["prompt"]), list(rows["answer"])
    if not prompts:
        raise ValueError("teacher_forced_exact_match needs at least one example")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in encode_for_training(prompts, answers).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pred, labels = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    correct = ((pred == labels) | (labels == -100)).all(-1)
    return correct.sum().item() / correct.numel()


def val_test_split(task: str, n: int, seed: int = 99) -> dict[str, dict]:
    """``n`` validation and ``n`` test examples of ``task`` with disjoint prompts, both drawn from the
    kit's held-out inputs (never trained on), separated by a hash of the prompt."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    want = {"val": [], "test": []}
    seen = set()
    for row in make_examples(task, 20 * n, seed=seed, split="test"):
        if row["prompt"] in seen:
            continue
        seen.add(row["prompt"])
        side = "val" if hashlib.sha256(row["prompt"].encode()).digest()[0] % 2 == 0 else "test"
        if len(want[side]) < n:
            want[side].append(row)
    if min(len(v) for v in want.values()) < n:
        raise ValueError(f"task {task!r} has too few distinct held-out inputs for {n} + {n} examples")
    return {side: {"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]}
            for side, rows in want.items()}


def normalized_accuracy(merged: float, finetuned: float) -> float:
    """merged / fine-tuned exact match, as the TIES paper reports per task (nan if the fine-tune
    scores 0)."""
    return merged / finetuned if finetuned > 0 else math.nan


def gain_captured(merged: float, base: float, finetuned: float) -> float:
    """(merged - base) / (fine-tuned - base): the share of the fine-tune's improvement over the base
    that the merged model keeps (1: all of it, 0: none, < 0: worse than the base; nan if no gain).
    Normalised accuracy flatters a merge when the base already has part of the skill."""
    return (merged - base) / (finetuned - base) if finetuned > base else math.nan


def random_direction_like(task_vector: merge.TaskVector, seed: int = 0) -> merge.TaskVector:
    """A Gaussian random task vector with the same norm as ``task_vector`` in every tensor: the
    control for negation (does removing *any* update of this size do the same?)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, d in task_vector.deltas.items():
        r = torch.randn(d.shape, generator=gen, dtype=torch.float32)
        out[name] = r * (d.norm() / r.norm().clamp(min=1e-12))
    return merge.TaskVector(out)


def pick_on_validation(scores: dict) -> object:
    """The key with the highest validation score (the first one on ties, keys in insertion order)."""
    if not scores:
        raise ValueError("pick_on_validation needs at least one candidate")
    best = max(scores.values())
    return next(k for k, v in scores.items() if v == best)


# ----------------------------------------------------------------------------- the sweep


class _Scorer:
    """Scores state dicts on each task's validation or test examples with one reusable model."""

    def __init__(self, base_name: str, tasks, controls, n: int, device):
        self.model = zoo.load(base_name, device=device)
        self.tasks, self.controls = list(tasks), list(controls)
        self.splits = {t: val_test_split(t, n) for t in [*self.tasks, *self.controls]}
        self.evaluations = 0

    def __call__(self, state: dict, split: str, tasks=None) -> dict[str, float]:
        self.model.load_state_dict(state)
        self.evaluations += 1
        tasks = [*self.tasks, *self.controls] if tasks is None else tasks
        return {t: teacher_forced_exact_match(self.model, self.splits[t][split]) for t in tasks}


def _round(x):
    if isinstance(x, dict):
        return {str(k): _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    return round(x, 4) if isinstance(x, float) else x


def run_sweep(base_name: str, ft_names: dict[str, str], controls=("copy", "rev", "count"), n: int = 150,
              lambdas=(0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5), densities=(0.1, 0.2, 0.5),
              task_counts=(2, 3, 4, 6), drop_rates=(0.0, 0.3, 0.5, 0.7, 0.9, 0.95),
              negation_lambdas=(1.0, 2.0, 4.0), device="cpu", log=print) -> dict:
    """The measured sweep for one base and its single-task fine-tunes ``{task: zoo name}``.

    Per merge, the score is the mean normalised accuracy (merged / fine-tuned exact match) over the
    merged tasks; lambda (and TIES's density) maximise it on validation, the test split reports it.
    """
    tasks = list(ft_names)
    score = _Scorer(base_name, tasks, controls, n, device)
    base = {k: v.detach().clone() for k, v in score.model.state_dict().items()}
    fts = {t: zoo.load(name, device="cpu").state_dict() for t, name in ft_names.items()}
    taus = {t: merge.TaskVector.between(base, sd) for t, sd in fts.items()}
    theta_norm = math.sqrt(sum(float(v.float().pow(2).sum()) for v in base.values() if v.is_floating_point()))
    out = {"base": base_name, "fine_tunes": ft_names, "n_per_split": n, "tasks": tasks, "controls": list(controls)}

    out["base_skill"] = {s: score(base, s) for s in ("val", "test")}
    out["finetuned_skill"] = {t: {s: score(sd, s) for s in ("val", "test")} for t, sd in fts.items()}
    out["tau_relative_norm"] = {t: tv.norm() / theta_norm for t, tv in taus.items()}
    cos = merge.cosine_matrix([taus[t] for t in tasks])
    out["cosines"] = {f"{a}/{b}": float(cos[i, j]) for i, a in enumerate(tasks) for j, b in enumerate(tasks) if i < j}
    log(f"  base and fine-tunes scored ({score.evaluations} evaluations)")

    def normalized(scores: dict, on, split: str) -> dict:
        return {t: normalized_accuracy(scores[t], out["finetuned_skill"][t][split][t]) for t in on}

    def mean(xs):
        xs = [x for x in xs if not math.isnan(x)]
        return sum(xs) / len(xs) if xs else math.nan

    def tuned(candidates: dict, on) -> dict:
        """Choose among {hyperparameters: state} on validation, report the chosen one on test."""
        val = {k: mean(normalized(score(sd, "val", on), on, "val").values()) for k, sd in candidates.items()}
        best = pick_on_validation(val)
        test = score(candidates[best], "test")
        norm_test = normalized(test, on, "test")
        base_test, ft_test = out["base_skill"]["test"], out["finetuned_skill"]
        gain = {t: gain_captured(test[t], base_test[t], ft_test[t]["test"][t]) for t in on}
        return {"chosen": best, "val_normalized": val[best], "test": test, "test_normalized": norm_test,
                "test_normalized_mean": mean(norm_test.values()), "test_gain_captured": gain,
                "test_gain_captured_mean": mean(gain.values()),
                "test_controls_mean": mean([test[c] for c in controls])}

    # claim 8: task addition over all tasks, lambda on validation
    all_sum = sum(taus.values())
    addition = tuned({lam: all_sum.apply_to(base, scale=lam) for lam in lambdas}, tasks)
    addition["chosen"] = {"lambda": addition["chosen"]}
    out["addition"] = addition
    log(f"  addition: lambda {addition['chosen']}, normalised {addition['test_normalized_mean']:.3f}")

    # claim 8 on two skills at a time: every pair of task vectors added, lambda on validation
    pairs = {}
    for a, b in itertools.combinations(tasks, 2):
        row = tuned({lam: (taus[a] + taus[b]).apply_to(base, scale=lam) for lam in lambdas}, [a, b])
        row["chosen"] = {"lambda": row["chosen"]}
        pairs[f"{a}+{b}"] = row
    out["pair_addition"] = pairs
    log(f"  pairs: mean gain kept {mean([r['test_gain_captured_mean'] for r in pairs.values()]):.3f}")

    # claim 8: negation of each task vector vs a random direction of the same norm (test split)
    negation = {}
    for i, t in enumerate(tasks):
        rand = random_direction_like(taus[t], seed=i)
        others = [u for u in tasks if u != t]
        rows = {}
        for lam in negation_lambdas:
            for kind, tv in (("task", taus[t]), ("random", rand)):
                s = score(tv.apply_to(base, scale=-lam), "test")
                rows[f"{kind} x{lam}"] = {"target": s[t], "other_tasks_mean": mean([s[u] for u in others]),
                                          "controls_mean": mean([s[c] for c in controls])}
        negation[t] = rows
    out["negation"] = negation
    log("  negation done")

    # claim 9: methods as the number of tasks grows (how they change as the task vectors grow is the
    # comparison of sweeps over gentle and far fine-tunes; scaling tau by hand would not show it, since
    # tuned task arithmetic and TIES are homogeneous in tau and absorb the scale into lambda)
    methods = {}
    for k in task_counts:
        on = tasks[:k]
        tvs = [taus[t] for t in on]
        states = [fts[t] for t in on]
        row = {"tasks": on}
        row["averaging"] = tuned({1.0: merge.merge("linear", states, weight=1.0, normalize=True,
                                                   device="cpu")}, on)
        row["task_arithmetic"] = tuned({lam: sum(tvs).apply_to(base, scale=lam) for lam in lambdas}, on)
        row["ties"] = tuned({(d, lam): merge.merge("ties", states, base, weight=1.0, density=d,
                                                   device="cpu", **{"lambda": lam})
                             for d in densities for lam in lambdas}, on)
        row["ties"]["chosen"] = dict(zip(("density", "lambda"), row["ties"]["chosen"]))
        row["task_arithmetic"]["chosen"] = {"lambda": row["task_arithmetic"]["chosen"]}
        methods[f"{k} tasks"] = row
        log(f"  {k} tasks: " + ", ".join(
            f"{m} {row[m]['test_normalized_mean']:.3f}" for m in ("averaging", "task_arithmetic", "ties")))
    out["methods"] = methods

    # DARE: drop rate at task arithmetic's tuned lambda, all tasks, both rescalings
    lam = out["addition"]["chosen"]["lambda"]
    states = [tv.apply_to(base) for tv in taus.values()]
    dare = {}
    for rescale in ("l1", "density"):
        dare[rescale] = []
        for p in drop_rates:
            sd = merge.merge("dare_linear", states, base, weight=1.0, density=1 - p, seed=0, rescale_norm=rescale,
                             device="cpu", **{"lambda": lam})
            s = score(sd, "test")
            dare[rescale].append({"drop_rate": p, "normalized_mean": mean(normalized(s, tasks, "test").values()),
                                  "controls_mean": mean([s[c] for c in controls])})
    out["dare"] = {"lambda": lam, **dare}
    out["evaluations"] = score.evaluations
    return _round(out)


def figure_row(result: dict) -> dict:
    """One point of the "merge quality vs fine-tune distance and width" figure: the mean relative size
    of the task vectors, and the test scores of task arithmetic (lambda on validation) over all tasks and
    over pairs, and of the best of averaging / task arithmetic / TIES at the largest task count."""
    rel = list(result["tau_relative_norm"].values())
    pairs = [r["test_gain_captured_mean"] for r in result.get("pair_addition", {}).values()]
    pairs = [g for g in pairs if not math.isnan(g)]
    last = list(result["methods"].values())[-1]
    return {"base": result["base"], "tau_relative_norm_mean": sum(rel) / len(rel),
            "addition_normalized": result["addition"]["test_normalized_mean"],
            "addition_gain_captured": result["addition"]["test_gain_captured_mean"],
            "pair_gain_captured": sum(pairs) / len(pairs) if pairs else math.nan,
            **{f"{m}_normalized": last[m]["test_normalized_mean"] for m in ("averaging", "task_arithmetic", "ties")}}


def summary(result: dict) -> list[str]:
    """Readable lines of one sweep's results (what the report quotes)."""
    tasks, lines = result["tasks"], []
    lines.append(f"{result['base']} + {', '.join(result['fine_tunes'].values())}")
    lines.append("  skill (test)   " + " ".join(f"{t:>7s}" for t in [*tasks, *result["controls"]]))
    lines.append("  base           " + " ".join(f"{v:7.3f}" for v in result["base_skill"]["test"].values()))
    for t in tasks:
        row = result["finetuned_skill"][t]["test"]
        lines.append(f"  ft-{t:11s} " + " ".join(f"{v:7.3f}" for v in row.values())
                     + f"   ||tau||/||theta|| {result['tau_relative_norm'][t]:.4f}")
    cos = list(result["cosines"].values())
    lines.append(f"  cosines between task vectors: min {min(cos):.3f}, mean {sum(cos) / len(cos):.3f}, "
                 f"max {max(cos):.3f}")
    a = result["addition"]
    lines.append(f"  addition of all {len(tasks)} (lambda {a['chosen']['lambda']} on val): normalised "
                 f"{a['test_normalized_mean']:.3f}, gain kept {a['test_gain_captured_mean']:.3f}, controls "
                 f"{a['test_controls_mean']:.3f}; per task " + ", ".join(
                     f"{t} {a['test'][t]:.2f}" for t in tasks))
    for t, rows in result["negation"].items():
        lines.append(f"  negate {t:7s} (base {result['base_skill']['test'][t]:.2f}): " + "; ".join(
            f"{k}: target {v['target']:.2f} others {v['other_tasks_mean']:.2f} controls {v['controls_mean']:.2f}"
            for k, v in rows.items()))
    if "pair_addition" in result:
        lines.append("  pairs (lambda on val; gain kept per task): " + ", ".join(
            f"{k} {r['chosen']['lambda']}: " + "/".join(f"{g:.2f}" for g in r["test_gain_captured"].values())
            for k, r in result["pair_addition"].items()))
    for k, row in result["methods"].items():
        lines.append(f"  {k}: " + ", ".join(
            f"{m} {row[m]['test_normalized_mean']:.3f} (gain {row[m]['test_gain_captured_mean']:.3f}, "
            f"{row[m]['chosen']})" for m in ("averaging", "task_arithmetic", "ties")))
    for rescale in ("l1", "density"):
        lines.append(f"  DARE ({rescale}, lambda {result['dare']['lambda']}): " + ", ".join(
            f"p={r['drop_rate']} {r['normalized_mean']:.3f}" for r in result["dare"][rescale]))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summarize", nargs="+", metavar="JSON", help="print the summary of sweep files")
    parser.add_argument("--base", help="zoo name of the base, e.g. lm/merge-base")
    parser.add_argument("--prefix", help="zoo prefix of the fine-tunes, e.g. lm/merge-ft-")
    parser.add_argument("--tasks", default=",".join(zoo.LM_MERGE_TASKS))
    parser.add_argument("--n", type=int, default=150, help="examples per task and split")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)
    if args.summarize:
        for path in args.summarize:
            with open(path) as f:
                print("\n".join(summary(json.load(f))))
        return 0
    if not (args.base and args.prefix and args.out):
        parser.error("--base, --prefix and --out are required to run a sweep")
    torch.manual_seed(0)
    start = time.time()
    result = run_sweep(args.base, {t: args.prefix + t for t in args.tasks.split(",")}, n=args.n)
    result["seconds"] = round(time.time() - start, 1)
    result["device"] = device_name(torch.device("cpu"))
    result["torch"] = torch.__version__
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    import os

    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out} ({result['evaluations']} evaluations, {result['seconds']}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
