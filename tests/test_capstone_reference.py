"""The capstone's reference solutions (labkit.capstone.reference): the frontier on a hand-worked example,
the greedy soup against its ingredients (recomputed here), the distilled student's cost, the router's
shapes and mixing rule, the cascade rule on hand-made logits, determinism."""
import math

import pytest
import torch

from labkit import zoo
from labkit.capstone import challenge, reference
from labkit.capstone.cost import flops_per_example
from labkit.evaluate import predict_logits
from labkit.models import DigitMLP


# ---------------------------------------------------------------- frontier


def test_frontier_on_a_hand_worked_example():
    # (cost, accuracy, name). Off the frontier: b (a is as cheap and better) and d (c is cheaper and as
    # good). On it: f (the cheapest, however bad), e, a, c and its equal twin, g (the most accurate).
    pts = [(1.0, 0.80, "a"), (1.0, 0.70, "b"), (2.0, 0.85, "c"), (3.0, 0.85, "d"), (0.5, 0.60, "e"),
           (2.0, 0.85, "c-twin"), (4.0, 0.90, "g"), (0.25, 0.10, "f")]
    front = reference.frontier(pts)
    assert [p[2] for p in front] == ["f", "e", "a", "c", "c-twin", "g"]
    # same answer from mappings, and the very objects come back
    dicts = [{"cost": c, "accuracy": a, "name": n} for c, a, n in pts]
    assert [d["name"] for d in reference.frontier(dicts)] == ["f", "e", "a", "c", "c-twin", "g"]
    assert reference.frontier(dicts)[0] is dicts[7]


def test_frontier_edge_cases_and_errors():
    assert reference.frontier([]) == []
    assert reference.frontier([(3, 0.5)]) == [(3, 0.5)]
    # one point dominating all others, cheaper ones first in the sort order
    assert reference.frontier([(2, 0.5), (1, 0.9), (1, 0.9)]) == [(1, 0.9), (1, 0.9)]
    with pytest.raises(ValueError, match="point 1"):
        reference.frontier([(1, 0.5), (2, math.nan)])
    with pytest.raises(ValueError, match="point 0"):
        reference.frontier([{"cost": "cheap", "accuracy": 0.5}])


# ---------------------------------------------------------------- helpers


def test_mean_prob_and_moe_mixing_against_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 10, generator=gen), torch.randn(6, 10, generator=gen)
    direct = ((a.softmax(-1) + b.softmax(-1)) / 2).log()
    assert torch.allclose(reference.mean_prob_logprobs([a, b]), direct, atol=1e-6)

    router = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, -1.0]])            # [N=2, E=3]
    experts = torch.randn(2, 3, 10, generator=gen)                        # [N, E, C] logits
    top1 = reference.moe_logits(router, experts, 1)
    assert torch.allclose(top1, experts[[0, 1], [0, 1]], atol=1e-6)      # the argmax expert's logits
    top2 = reference.moe_logits(router, experts, 2)
    g0 = torch.tensor([2.0, 1.0]).softmax(-1)                            # experts 0 and 2 for row 0
    assert torch.allclose(top2[0], g0[0] * experts[0, 0] + g0[1] * experts[0, 2], atol=1e-6)
    dense = reference.moe_logits(router, experts, 3)
    assert torch.allclose(dense, (router.softmax(-1).unsqueeze(-1) * experts).sum(1), atol=1e-6)
    assert dense.shape == (2, 10)


def test_cascade_rule_on_hand_made_logits():
    confident = torch.tensor([[5.0, 0.0], [0.2, 0.0], [0.0, 4.0]])   # max softmax 0.993, 0.55, 0.982
    second = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    out, at = reference.cascade_logits([confident, second], [0.9])
    assert at.tolist() == [0, 1, 0]
    assert torch.equal(out, torch.stack([confident[0], second[1], confident[2]]))
    with pytest.raises(ValueError, match="needs 1 thresholds"):
        reference.cascade_logits([confident, second], [0.9, 0.5])


# ---------------------------------------------------------------- the solutions


def test_mergeable_is_the_soup_family():
    family = reference.mergeable()
    assert "digits/soup-base" in family and "digits/task-rotate" in family
    assert all(n == "digits/soup-base" or zoo.RECIPES[n]["parent"] == "digits/soup-base" for n in family)
    assert not any(n.startswith(("digits/mlp-", "digits/cnn")) for n in family)


def test_greedy_soup_is_never_below_its_best_ingredient_on_val():
    sol = reference.greedy_soup()
    X, y, _ = challenge.load_public("val")
    ingredients = {n: reference.accuracy(predict_logits(zoo.load(n), X), y) for n in reference.mergeable()}
    assert sol.info["ingredients"] == pytest.approx(ingredients)
    # the soup recomputed here from the chosen ingredients' weights
    sds = [zoo.load(n).state_dict() for n in sol.info["chosen"]]
    soup = DigitMLP(hidden=(128, 128))
    soup.load_state_dict({k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]})
    acc = reference.accuracy(predict_logits(soup, X), y)
    assert acc == pytest.approx(sol.info["val_accuracy"]) and acc >= max(ingredients.values())
    assert sol.info["chosen"][0] == max(ingredients, key=ingredients.get)


def test_best_single_respects_the_budget_and_the_ensemble_does_not():
    best = reference.best_single()
    assert reference.relative_flops(zoo.load(best.info["chosen"])) <= challenge.BUDGET_MULTIPLIER
    # the CNN costs more than the budget, so it is never a candidate, even if it were the best
    assert "digits/cnn-s0" not in best.info["candidates"]
    assert reference.relative_flops(zoo.load("digits/cnn-s0")) > challenge.BUDGET_MULTIPLIER
    assert best.spec["kind"] == "checkpoint" and best.spec["model"] == f"zoo:{best.info['chosen']}"
    ens = reference.uniform_ensemble()
    assert ens.info["relative_flops"] == len(reference.mergeable()) > challenge.BUDGET_MULTIPLIER
    assert ens.spec["members"] == [f"zoo:{n}" for n in reference.mergeable()] and ens.spec["rule"] == "mean_prob"
    with pytest.raises(ValueError, match="members, but a submission lists 1 to"):
        reference.uniform_ensemble(list(challenge.POOL) * 2)


def test_distilled_student_is_within_budget_and_deterministic():
    a = reference.distilled(teacher=["digits/task-rotate", "digits/task-noise"], init="digits/soup-base",
                            steps=40, seed=3)
    b = reference.distilled(teacher=["digits/task-rotate", "digits/task-noise"], init="digits/soup-base",
                            steps=40, seed=3)
    student = a.models["student"]
    assert a.spec["model"] == "student"
    assert flops_per_example(student) == flops_per_example(zoo.load(challenge.REFERENCE_MODEL))
    assert reference.relative_flops(student) <= challenge.BUDGET_MULTIPLIER
    sa, sb = student.state_dict(), b.models["student"].state_dict()
    assert all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)
    # and it trained: the weights left their start
    start = zoo.load("digits/soup-base").state_dict()
    assert not torch.equal(sa["layers.0.weight"].cpu(), start["layers.0.weight"])


def test_moe_router_shapes_determinism_and_errors():
    experts = ["digits/soup-ft7", "digits/task-noise", "digits/task-rotate", "digits/task-thicken"]
    a = reference.moe(experts, top_k=2, steps=25)
    b = reference.moe(experts, top_k=2, steps=25)
    router = a.models["router"]
    assert isinstance(router, torch.nn.Linear) and (router.in_features, router.out_features) == (64, 4)
    X, _, _ = challenge.load_public("val")
    assert predict_logits(router, X[:7]).shape == (7, 4)
    assert a.spec["experts"] == [f"zoo:{n}" for n in experts] and a.spec["top_k"] == 2
    assert a.spec["router"] == "router"
    assert all(torch.equal(router.state_dict()[k], b.models["router"].state_dict()[k]) for k in router.state_dict())
    with pytest.raises(ValueError, match="top_k must be in 1..4"):
        reference.moe(experts, top_k=5, steps=1)


def test_each_kind_packs_loads_and_scores_as_the_reference_says(tmp_path):
    """What write_submission packs and load_submission rebuilds scores on val what info says (the
    scorer's rules and the reference's own computations agree, up to an example on a float tie)."""
    from labkit.capstone.spec import load_submission

    X, y, _ = challenge.load_public("val")
    soup = reference.greedy_soup()
    solutions = [*reference.references(steps=20).values(), reference.cascade(soup.info["model"])]
    assert {s.spec["kind"] for s in solutions} == {"checkpoint", "ensemble", "merge", "moe", "cascade"}
    for i, sol in enumerate(solutions):
        sub = load_submission(sol.write(tmp_path / f"s{i}"), device="cpu")
        assert (sub.team, sub.name, sub.kind) == ("reference", sol.spec["name"], sol.spec["kind"])
        acc = reference.accuracy(sub.logits(X), y)
        assert abs(acc - sol.info["val_accuracy"]) <= 2 / len(y), (sol.spec["name"], acc, sol.info["val_accuracy"])
