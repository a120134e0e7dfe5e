"""Benchmark: Mask-Predict refinement with per-example early exit, batched, vs one example at a time and
vs a batch that always runs the full budget of steps.

Model: the zoo's refine/masked (a small bidirectional refiner) on sort, add and perm test prompts. Early exit
stops an example once every answer position has confidence >= 0.9 (at most 8 iterations); finished
examples leave the batch. Reported: wall time, examples per second, rows pushed through the model (the
compute count), accuracy (the task's checker), and whether the batched answers equal the one-at-a-time ones.
"""
from __future__ import annotations

from labkit import zoo
from labkit.bench import time_fn
from labkit.device import get_device
from labkit.refine.adaptive import adaptive_mask_predict
from labkit.refine.self_refine import check_answer
from labkit.refine.training import task_examples

THRESHOLD, MAX_STEPS = 0.9, 8


def run(smoke: bool = False) -> dict:
    device = get_device()
    model = zoo.load("refine/masked", device=device)
    n = 64 if smoke else 512
    prompts = [r["prompt"] for r in task_examples(["sort", "add", "perm"], n, seed=99, split="test")]
    repeat = 1 if smoke else 3
    modes = {
        "one_at_a_time": dict(threshold=THRESHOLD, one_at_a_time=True),
        "batched_fixed_steps": dict(threshold=None),
        "batched_early_exit": dict(threshold=THRESHOLD),
    }
    results, rows_out = {}, []
    for name, kw in modes.items():
        results[name] = adaptive_mask_predict(model, prompts, MAX_STEPS, **kw)
        seconds = time_fn(lambda: adaptive_mask_predict(model, prompts, MAX_STEPS, **kw), warmup=1, repeat=repeat,
                          device=device)["min_s"]
        res = results[name]
        rows_out.append({"mode": name, "seconds": seconds, "examples_per_s": n / seconds,
                         "forward_passes": res["forward_passes"], "row_passes": res["row_passes"],
                         "mean_steps": float(res["steps_used"].float().mean()),
                         "accuracy": sum(map(check_answer, prompts, res["answers"])) / n})
    base = rows_out[0]["seconds"]
    for r in rows_out:
        r["speedup_vs_one_at_a_time"] = base / r["seconds"]
    same = results["batched_early_exit"]["answers"] == results["one_at_a_time"]["answers"]
    return {
        "title": f"Mask-Predict with per-example early exit (confidence >= {THRESHOLD}, <= {MAX_STEPS} steps), {n} prompts",
        "baseline": "one prompt at a time with early exit (speedup = its seconds / the mode's seconds)",
        "columns": ["mode", "seconds", "examples_per_s", "speedup_vs_one_at_a_time", "forward_passes", "row_passes",
                    "mean_steps", "accuracy"],
        "rows": rows_out,
        "notes": (f"batched early-exit answers identical to one-at-a-time: {same}. row_passes = rows pushed through "
                  f"the model (the compute count); the fixed budget pushes {n} x {MAX_STEPS}. Times are the best of "
                  f"{repeat} runs."),
    }
