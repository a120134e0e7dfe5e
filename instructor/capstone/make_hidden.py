"""Build the capstone's hidden split, instructor/capstone/hidden.safetensors (never released).

    .venv/bin/python instructor/capstone/make_hidden.py          # writes it and prints its SHA-256
    .venv/bin/python instructor/capstone/make_hidden.py --check  # rebuilds in memory, compares

The digits *test* split (360 images) under every domain of ``labkit.capstone.challenge.DOMAINS``:
clean once, each shift twice with the secret seeds below (3240 examples). A seeded 30% of each
domain is public (``challenge.public_mask``), the rest private. Stored with it (safetensors
metadata, covered by the hash): how it was built and the reference frontier, the hidden-split
scores and FLOPs of a few reference solutions built from the pool.

After a rebuild, paste the printed SHA-256 into ``HIDDEN_SHA256`` in labkit/capstone/challenge.py:
the leaderboard refuses any hidden file with another hash (corrupted or tampered).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "hidden.safetensors"
COPIES = 2                  # shifted copies of each test image per shift domain
SECRET_SEED = 70_417        # the shift seeds of the hidden split: never published
MASK_SEED = 2026


def hidden_tensors() -> dict[str, torch.Tensor]:
    from labkit.capstone.challenge import DOMAINS, domain_mixture, public_mask
    from labkit.data import load_digits

    digits = load_digits()
    seeds = {name: [0] if name == "clean" else [SECRET_SEED + 1000 * i + c for c in range(COPIES)]
             for i, name in enumerate(DOMAINS)}
    X, y, domain = domain_mixture(digits.X_test, digits.y_test, seeds)
    return {"X": X.contiguous(), "y": y, "domain": domain, "public": public_mask(domain, seed=MASK_SEED)}


def reference_points(tensors: dict) -> list[dict]:
    """Hidden-split scores of reference solutions built from the pool (the leaderboard's frontier)."""
    from labkit import zoo
    from labkit.capstone import challenge, cost
    from labkit.capstone.kinds import Ensemble, Single
    from labkit.merge import uniform_soup
    from labkit.models import make_classifier

    X, y, public = tensors["X"], tensors["y"], tensors["public"]
    Xv, yv, _ = challenge.load_public("val")
    mlps = [n for n in challenge.POOL if zoo.info(n)["recipe"]["arch"]["kind"] == "mlp"]
    models = {n: zoo.load(n, device="cpu") for n in challenge.POOL}
    val = {n: float((models[n](Xv).argmax(-1) == yv).float().mean()) for n in mlps}
    best = sorted(mlps, key=lambda n: (-val[n], n))
    soup = make_classifier(models["digits/soup-ft0"].config)
    soup.load_state_dict(uniform_soup([models[f"digits/soup-ft{i}"] for i in range(8)]))
    candidates = {
        f"one pool model ({challenge.REFERENCE_MODEL})": Single(models[challenge.REFERENCE_MODEL]),
        f"best pool MLP on val ({best[0]})": Single(models[best[0]]),
        "uniform soup of soup-ft0..7": Single(soup.eval()),
        f"ensemble of the 2 best on val ({best[0]}, {best[1]})": Ensemble([models[best[0]], models[best[1]]],
                                                                          "mean_prob", [0.5, 0.5]),
        "digits/cnn-s0 (over budget)": Single(models["digits/cnn-s0"]),
        f"ensemble of all {len(mlps)} pool MLPs (over budget)": Ensemble([models[n] for n in mlps], "mean_prob",
                                                                         [1 / len(mlps)] * len(mlps)),
    }
    reference_flops = cost.flops_per_example(models[challenge.REFERENCE_MODEL])
    points = []
    with torch.no_grad():
        for name, model in candidates.items():
            with cost.FlopCounter(model) as counter:
                correct = (model(X).argmax(-1) == y).float()
            points.append({"name": name, "relative_flops": round(counter.total / len(X) / reference_flops, 6),
                           "public": round(float(correct[public].mean()), 6),
                           "private": round(float(correct[~public].mean()), 6)})
    return points


def build() -> tuple[dict, dict]:
    torch.set_num_threads(1)   # the same float rounding wherever it is rebuilt
    tensors = hidden_tensors()
    meta = {"built_by": "instructor/capstone/make_hidden.py", "examples": len(tensors["y"]),
            "public_examples": int(tensors["public"].sum()), "copies": COPIES,
            "frontier": reference_points(tensors)}
    return tensors, meta


def main(argv=None) -> int:
    from safetensors.torch import save_file

    from labkit.capstone.challenge import load_hidden, sha256_file

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="rebuild in memory and compare with the stored file")
    args = p.parse_args(argv)
    tensors, meta = build()
    if args.check:
        stored = load_hidden(OUT, sha256=sha256_file(OUT))
        same = all(torch.equal(a, tensors[k]) for a, k in zip(stored, ("X", "y", "domain", "public")))
        print(f"{OUT}: {'matches' if same else 'DIFFERS FROM'} a rebuild")
        return 0 if same else 1
    tmp = OUT.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, OUT)
    print(f"wrote {OUT}: {meta['examples']} examples, {meta['public_examples']} public")
    for point in meta["frontier"]:
        print(f"  reference {point['name']}: public {point['public']:.4f}, private {point['private']:.4f}, "
              f"{point['relative_flops']:.2f}x FLOPs")
    print(f"SHA-256 {sha256_file(OUT)}  (HIDDEN_SHA256 in labkit/capstone/challenge.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
