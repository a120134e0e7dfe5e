"""Reference solutions of the capstone: where the methods of labs 1-5 land on the accuracy-cost plane.

Each solution is one function returning a ``Solution``: the declarative ``spec`` and the ``models`` it
trained, which is what ``labkit.capstone.spec.write_submission(directory, spec, models)`` packs
(``solution.write(directory)`` does it), plus ``info``: what it chose and its public-val accuracy.
Every choice is made on the public val split and every training runs on the public train split
(``challenge.load_public``); nothing here reads the hidden split. Deterministic given ``seed``, on
whichever device ``labkit.device.get_device()`` picks.

  best_single          the most accurate pool model within the budget
  uniform_ensemble     the mean of members' probabilities (the soup's family of 12: over budget)
  ensemble_selection   greedy forward selection of ensemble members on val (over budget)
  greedy_soup          a weight average of the pool's fine-tunes of one base (one model's cost)
  distilled            an ensemble distilled into one pool-sized MLP
  moe                  the pool's domain experts behind a trained linear router (top-1 or top-2)
  cascade              a cheap model answers when confident, a bigger one the rest
  frontier             the accuracy-cost Pareto frontier of scored solutions
  references           all of them as the notebook builds them; write_references packs them
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .. import distill, merge, zoo
from ..device import get_device
from ..evaluate import predict_logits
from . import challenge
from .cost import flops_per_example

TEAM = "reference"


@dataclass
class Solution:
    """A reference submission: ``spec`` (the YAML fields), ``models`` (name -> module, saved as folders
    of the submission and named by those keys in ``spec``) and ``info`` (choices and val numbers)."""
    spec: dict
    models: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def write(self, directory, **kwargs):
        from .spec import write_submission

        return write_submission(directory, self.spec, self.models, **kwargs)


# ----------------------------------------------------------------------------- shared helpers


@lru_cache(maxsize=None)
def _pool_model(name: str, device: str) -> nn.Module:
    return zoo.load(name, device=torch.device(device)).eval()


def _load(name: str) -> nn.Module:
    """A zoo model on the current device (cached: never modify it, copy it)."""
    return _pool_model(name, str(get_device()))


@lru_cache(maxsize=None)
def _cached_logits(name: str, split: str, device: str) -> torch.Tensor:
    X, _, _ = challenge.load_public(split)
    return predict_logits(_pool_model(name, device), X).float().cpu()


def pool_logits(name: str, split: str) -> torch.Tensor:
    """Logits [N, 10] (on the CPU) of zoo model ``name`` on the public ``split``, computed once."""
    return _cached_logits(name, split, str(get_device()))


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(-1).cpu() == y.cpu()).float().mean().item()


def mean_prob_logprobs(logits: list[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the members' softmaxes [N, C] (an ensemble's ``mean_prob`` rule)."""
    return torch.logsumexp(torch.stack([F.log_softmax(z.float(), -1) for z in logits]), 0) - math.log(len(logits))


def relative_flops(model: nn.Module) -> float:
    """FLOPs per example of ``model`` in units of ``challenge.REFERENCE_MODEL`` (one pool model)."""
    return flops_per_example(model) / flops_per_example(_load(challenge.REFERENCE_MODEL))


def _spec(name: str, kind: str, description: str, **fields) -> dict:
    return {"team": TEAM, "name": name, "kind": kind, "description": description, **fields}


def _zoo_ref(name: str) -> str:
    return f"zoo:{name}"


def mergeable(candidates=challenge.POOL) -> list[str]:
    """The candidates that share one initialisation: the base that has fine-tunes among them, and those
    fine-tunes (weight averaging only works inside such a family; lab 2)."""
    parents = [zoo.RECIPES[n].get("parent") for n in candidates]
    bases = [b for b in dict.fromkeys(parents) if b in candidates]
    if not bases:
        raise ValueError(f"no fine-tunes of a common base among the candidates {list(candidates)}")
    base = max(bases, key=parents.count)
    return [n for n, p in zip(candidates, parents) if n == base or p == base]


# ----------------------------------------------------------------------------- the solutions


def best_single(candidates=challenge.POOL, budget: float | None = None) -> Solution:
    """The most accurate pool model on the public val split among those within the budget (ties: the
    first in ``candidates``). The baseline every combination must beat; model selection on held-out
    data (any ML textbook; Kaggle's first submission is a strong single model)."""
    budget = challenge.BUDGET_MULTIPLIER if budget is None else budget
    _, y, _ = challenge.load_public("val")
    scores = {n: accuracy(pool_logits(n, "val"), y) for n in candidates if relative_flops(_load(n)) <= budget}
    if not scores:
        raise ValueError(f"best_single: no candidate fits the budget of {budget} x {challenge.REFERENCE_MODEL}")
    chosen = max(scores, key=scores.get)
    return Solution(_spec("best-single", "checkpoint", "the most accurate pool model on val", model=_zoo_ref(chosen)),
                    info={"chosen": chosen, "val_accuracy": scores[chosen], "candidates": scores})


def uniform_ensemble(members=None, name: str = "family-ensemble") -> Solution:
    """Average the members' probabilities, P(y|x) = 1/M sum_m P_m(y|x) (linear interpolation with equal
    weights; Dietterich 2000, Lakshminarayanan et al. 2017). It costs the sum of its members: M pool
    models at inference, over any budget of fewer than M.

    members: zoo names (None: ``mergeable()``, the soup's base and its 11 fine-tunes, the very models
    ``greedy_soup`` averages), at most ``spec.MAX_MODELS`` of them (what a submission may list).
    """
    from .spec import MAX_MODELS

    members = mergeable() if members is None else list(members)
    if not 1 <= len(members) <= MAX_MODELS:
        raise ValueError(f"uniform_ensemble: {len(members)} members, but a submission lists 1 to {MAX_MODELS} "
                         "(labkit.capstone.spec.MAX_MODELS)")
    _, y, _ = challenge.load_public("val")
    val = accuracy(mean_prob_logprobs([pool_logits(n, "val") for n in members]), y)
    cost = sum(relative_flops(_load(n)) for n in members)
    spec = _spec(name, "ensemble", f"mean probability of {len(members)} pool models",
                 members=[_zoo_ref(n) for n in members], rule="mean_prob")
    return Solution(spec, info={"members": members, "val_accuracy": val, "relative_flops": cost})


def ensemble_selection(candidates=challenge.POOL, size: int = 5, name: str = "selected-ensemble") -> Solution:
    """Greedy forward ensemble selection (Caruana et al. 2004, "Ensemble selection from libraries of
    models"): start empty and add, ``size`` times, the candidate (without replacement) whose addition gives
    the mean-prob ensemble the lowest negative log-likelihood on the public val split. Picks diverse,
    complementary members (here the domain experts) rather than the individually best ones."""
    if not 1 <= size <= len(candidates):
        raise ValueError(f"ensemble_selection: size must be in 1..{len(candidates)}, got {size}")
    _, y, _ = challenge.load_public("val")
    logp = {n: F.log_softmax(pool_logits(n, "val"), -1) for n in candidates}
    chosen: list[str] = []
    for _ in range(size):
        def nll(n):
            mix = torch.logsumexp(torch.stack([logp[m] for m in chosen + [n]]), 0) - math.log(len(chosen) + 1)
            return F.nll_loss(mix, y).item()
        chosen.append(min((n for n in candidates if n not in chosen), key=nll))
    solution = uniform_ensemble(chosen, name=name)
    solution.info["selected_by"] = "val NLL, greedy forward"
    return solution


def greedy_soup(candidates=None) -> Solution:
    """Greedy soup (Wortsman et al. 2022): sort the fine-tunes of one base by val accuracy, start from
    the best and add each next one to the weight average only if val accuracy does not drop
    (``labkit.merge.greedy_soup``). One model's cost; never below its best ingredient on val."""
    candidates = mergeable() if candidates is None else list(candidates)
    merge.check_compatible([_load(n) for n in candidates], candidates)
    X, y, _ = challenge.load_public("val")
    skeleton = copy.deepcopy(_load(candidates[0]))

    def evaluate(state_dict):
        return accuracy(predict_logits(merge.load_merged(skeleton, state_dict), X), y)

    result = merge.greedy_soup([_load(n) for n in candidates], evaluate)
    chosen = [candidates[i] for i in result.chosen]
    info = {"chosen": chosen, "val_accuracy": result.score,
            "ingredients": dict(zip(candidates, result.individual))}
    if len(chosen) == 1:
        return Solution(_spec("greedy-soup", "checkpoint", "greedy soup: one ingredient", model=_zoo_ref(chosen[0])),
                        info=info)
    recipe = {"method": "linear", "models": [_zoo_ref(n) for n in chosen], "parameters": {"weight": 1.0, "normalize": True}}
    spec = _spec("greedy-soup", "merge", f"greedy soup of {len(chosen)} fine-tunes", merge=recipe)
    info["model"] = merge.load_merged(skeleton, result.state_dict).eval()
    return Solution(spec, info=info)


def distilled(teacher=None, init: str | None = None, steps: int = 1500, alpha: float = 0.5,
              temperature: float = 2.0, lr: float = 1e-3, seed: int = 0, name: str = "distilled") -> Solution:
    """Distil an ensemble into one pool-sized MLP (Hinton, Vinyals & Dean 2015): train the student on
    alpha * T^2 KL(p_teacher,T || p_student,T) + (1 - alpha) * CE(labels) (``labkit.distill``'s loss)
    over the public train split, the teacher being the members' mean probabilities (computed once).

    teacher: zoo names of the members (None: ``ensemble_selection()``'s); init: the zoo model the
    student starts from (None: the best single model; a warm start); alpha = 0 trains on the labels
    alone (the control without a teacher). Costs one pool model.
    """
    members = ensemble_selection().info["members"] if teacher is None else list(teacher)
    init = best_single().info["chosen"] if init is None else init
    X, y, _ = challenge.load_public("train")
    target = mean_prob_logprobs([pool_logits(n, "train") for n in members])
    torch.manual_seed(seed)
    student = copy.deepcopy(_load(init))
    history = distill.distill_classifier(student, target, X, y, steps=steps, batch_size=64, lr=lr,
                                         temperature=temperature, alpha=alpha, seed=seed, device=get_device())
    student.eval()
    X_val, y_val, _ = challenge.load_public("val")
    val = accuracy(predict_logits(student, X_val), y_val)
    return Solution(_spec(name, "checkpoint", f"one MLP trained on public train, alpha {alpha}", model="student"), {"student": student},
                    info={"teacher": members, "init": init, "alpha": alpha, "val_accuracy": val,
                          "final_loss": history["loss"][-1]})


def moe(experts=None, top_k: int = 1, steps: int = 300, lr: float = 0.05, seed: int = 0) -> Solution:
    """A mixture of the pool's experts behind a linear router (Jacobs et al. 1991, "Adaptive mixtures of
    local experts"; top-k gating as in Shazeer et al. 2017; experts trained apart and routed
    afterwards, like Branch-Train-MiX and mergekit-moe).

    experts: zoo names (None: the best single model among the soup's family and the seeds, as the
    generalist for clean and shifted digits, then the domain fine-tunes ``digits/task-{noise,rotate,
    thicken}``). The router r = W x + b (``nn.Linear(64, E)``) is trained on the public train split with
    the experts frozen, on the *competitive* loss of Jacobs et al., -log sum_e softmax(r)_e p_e(y|x): it
    rewards the gate for the one expert that is right, so each example goes to one expert. At inference
    the top_k experts by r run and their logits are mixed with the renormalised gates (``moe_logits``,
    the scorer's rule; for top_k = 1 it is the chosen expert's logits). Cost: k experts + the router.
    """
    if experts is None:
        generalist = best_single(mergeable() + [n for n in challenge.POOL if n.startswith("digits/mlp-")])
        tasks = ["digits/task-noise", "digits/task-rotate", "digits/task-thicken"]
        experts = [generalist.info["chosen"], *[e for e in tasks if e != generalist.info["chosen"]]]
    experts = list(experts)
    if not 1 <= top_k <= len(experts):
        raise ValueError(f"moe: top_k must be in 1..{len(experts)} (the number of experts), got {top_k}")
    X, y, _ = challenge.load_public("train")
    expert_logp = torch.stack([F.log_softmax(pool_logits(n, "train"), -1) for n in experts], 1)  # [N, E, C]
    target_logp = expert_logp.gather(2, y.view(-1, 1, 1).expand(-1, len(experts), 1)).squeeze(2)  # [N, E]
    device = get_device()
    torch.manual_seed(seed)
    router = nn.Linear(X.shape[1], len(experts)).to(device)
    X, target_logp = X.to(device), target_logp.to(device)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    for _ in range(steps):  # full batch (5k examples x E numbers): no sampling, deterministic
        loss = -torch.logsumexp(F.log_softmax(router(X), -1) + target_logp, -1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    router.eval()
    X_val, y_val, _ = challenge.load_public("val")
    with torch.no_grad():
        routed = moe_logits(router(X_val.to(device)).cpu(), torch.stack([pool_logits(n, "val") for n in experts], 1),
                            top_k)
    spec = _spec(f"moe-top{top_k}", "moe", f"{len(experts)} experts, a linear router, top-{top_k}",
                 experts=[_zoo_ref(n) for n in experts], router="router", top_k=top_k)
    return Solution(spec, {"router": router}, info={"experts": experts, "top_k": top_k,
                                                    "val_accuracy": accuracy(routed, y_val), "router_loss": loss.item()})


def moe_logits(router_logits: torch.Tensor, expert_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """sum_{e in top_k} g_e z_e(x), g = softmax(router logits) over the top_k experts, renormalised
    (Mixtral's gating; the scorer's rule). router_logits [N, E], expert_logits [N, E, C] -> [N, C]."""
    gates, idx = router_logits.softmax(-1).topk(top_k, -1)
    gates = gates / gates.sum(-1, keepdim=True)
    chosen = expert_logits.gather(1, idx.unsqueeze(-1).expand(-1, -1, expert_logits.shape[-1]))  # [N, k, C]
    return (gates.unsqueeze(-1) * chosen).sum(1)


def cascade_logits(stage_logits: list[torch.Tensor], thresholds: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A confidence cascade on precomputed logits: stage i answers an example when its max softmax is
    >= thresholds[i]; the last stage answers the rest. Returns (logits [N, C] of the answering stage,
    answered_at [N] stage index)."""
    if len(thresholds) != len(stage_logits) - 1:
        raise ValueError(f"a cascade of {len(stage_logits)} stages needs {len(stage_logits) - 1} thresholds, "
                         f"got {len(thresholds)}")
    out = stage_logits[-1].clone()
    answered = torch.full((out.shape[0],), len(stage_logits) - 1, dtype=torch.long)
    open_ = torch.ones(out.shape[0], dtype=torch.bool)
    for i, (z, t) in enumerate(zip(stage_logits[:-1], thresholds)):
        stop = open_ & (z.softmax(-1).max(-1).values >= t)
        out[stop], answered[stop] = z[stop], i
        open_ &= ~stop
    return out, answered


def cascade(first: str | nn.Module, second: str = "digits/cnn-s0", budget: float | None = None,
            thresholds=None) -> Solution:
    """A confidence cascade (Viola & Jones 2001; IDK cascades, Wang et al. 2018; FrugalGPT, Chen et al.
    2023): ``first`` (a zoo name or a trained model) answers when its max softmax reaches the threshold,
    ``second`` the rest. Mean cost = cost(first) + escalated fraction x cost(second), so a model over
    the budget on its own fits when it sees few examples. The threshold is the most accurate on the
    public val split among those whose mean cost there stays within the budget."""
    budget = challenge.BUDGET_MULTIPLIER if budget is None else budget
    X, y, _ = challenge.load_public("val")
    first_model = _load(first) if isinstance(first, str) else first.eval()
    logits = [predict_logits(first_model, X).float().cpu(), pool_logits(second, "val")]
    costs = [relative_flops(first_model), relative_flops(_load(second))]
    best = None
    for t in (thresholds if thresholds is not None else [i / 100 for i in range(50, 100)] + [0.995, 0.999]):
        out, answered = cascade_logits(logits, [t])
        cost = costs[0] + (answered == 1).float().mean().item() * costs[1]
        acc = accuracy(out, y)
        if cost <= budget and (best is None or acc > best["val_accuracy"]):
            best = {"threshold": t, "val_accuracy": acc, "relative_flops": cost,
                    "escalated": (answered == 1).float().mean().item()}
    if best is None:
        raise ValueError(f"cascade: no threshold keeps the mean cost within {budget} x {challenge.REFERENCE_MODEL}")
    stage1 = _zoo_ref(first) if isinstance(first, str) else "stage1"
    spec = _spec("cascade", "cascade", f"max softmax >= {best['threshold']:g} stops at stage 1",
                 stages=[{"model": stage1, "threshold": best["threshold"]}, {"model": _zoo_ref(second)}])
    models = {} if isinstance(first, str) else {"stage1": first_model}
    return Solution(spec, models, info={"first": first if isinstance(first, str) else "stage1",
                                        "second": second, **best})


# ----------------------------------------------------------------------------- the frontier


def frontier(points):
    """The accuracy-cost Pareto frontier: the points no other point dominates (cost <= and accuracy >=,
    one of them strictly), sorted by cost (ties: by accuracy, highest first).

    points: (cost, accuracy, ...) tuples or mappings with "cost" and "accuracy"; the frontier returns
    the same objects. Equal points are all kept.
    """
    points = list(points)

    def key(p, i):
        cost, acc = (p["cost"], p["accuracy"]) if isinstance(p, dict) else (p[0], p[1])
        if not (isinstance(cost, (int, float)) and isinstance(acc, (int, float))
                and math.isfinite(cost) and math.isfinite(acc)):
            raise ValueError(f"frontier: point {i} ({p!r}) needs a finite cost and accuracy")
        return float(cost), float(acc)

    keyed = [key(p, i) for i, p in enumerate(points)]
    keep = [i for i, (c, a) in enumerate(keyed)
            if not any(c2 <= c and a2 >= a and (c2, a2) != (c, a) for c2, a2 in keyed)]
    return [points[i] for i in sorted(keep, key=lambda i: (keyed[i][0], -keyed[i][1]))]


def references(steps: int = 1500, seed: int = 0) -> dict[str, Solution]:
    """Every reference solution of notebooks/06_capstone.ipynb, by name, built as the notebook builds them
    (for an instructor: ``write_references`` packs them for ``labkit leaderboard --reference``)."""
    best, selected = best_single(), ensemble_selection()
    out = [best, uniform_ensemble(), selected, greedy_soup(),
           distilled(selected.info["members"], steps=steps, seed=seed),
           distilled(selected.info["members"], steps=steps, alpha=0.0, seed=seed, name="fine-tuned"),
           moe(top_k=1, seed=seed), moe(top_k=2, seed=seed), cascade(best.info["chosen"])]
    return {s.spec["name"]: s for s in out}


def write_references(directory, overwrite: bool = False, **kwargs) -> list:
    """Pack every ``references()`` solution as ``directory/<name>``; returns the folders written."""
    from pathlib import Path

    return [s.write(Path(directory) / name, overwrite=overwrite) for name, s in references(**kwargs).items()]
