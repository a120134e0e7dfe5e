# The source of notebooks/02_merging.ipynb: a jupytext percent script (cell kinds and tags are described
# in labkit/course/build.py). Edit this file, never the notebook, then build and execute it:
#   labkit build-notebooks 02_merging
#   LABKIT_MODE=smoke OMP_NUM_THREADS=1 \
#     jupyter nbconvert --to notebook --execute --inplace notebooks/02_merging.ipynb

# %% [markdown]
# # 02 · Merging models in weight space
#
# Ensembling (lab 01) combines models' *outputs* and pays for every member at inference. **Merging**
# combines their *parameters* into one model that costs exactly one model to run. That only works when
# the models' parameters mean the same thing, which depends on where they came from:
#
# | method | needs |
# |---|---|
# | averaging, soups, task vectors, TIES, DARE, SLERP | the **same architecture** and the **same initialisation** |
# | permutation alignment, then averaging | the same architecture; repairs independent initialisations of simple MLPs |
# | ensembling, distillation (labs 01 and 04) | any models |
#
# The same initialisation means fine-tunes of one base, or checkpoints of one run.
#
# In this lab you will
#
# 1. see why averaging two independently trained networks fails (permutation symmetry), why averaging
#    fine-tunes of one base works, and how **aligning** hidden units repairs the first case;
# 2. average checkpoints of one training run;
# 3. cook **model soups** (uniform and greedy) and compare averaging with ensembling;
# 4. do **task arithmetic** on small language models and on digit classifiers: add skills, remove one, scale them;
# 5. implement **TIES** and compare it with task arithmetic and linear merging, look at **DARE** and **SLERP**;
# 6. run the same merge from a **mergekit YAML file** with `labkit merge`.
#
# Graded exercises: `weighted_average` (2 points), `greedy_soup` (2), `task_arithmetic` (2),
# `ties_trim`, `ties_elect`, `ties_disjoint_mean` (1 each).

# %%
import copy
import itertools
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
import transformers
import yaml

from labkit import merge, zoo
from labkit.course.report import claim, record
from labkit.data import encode_for_training, exact_match, load_digits, make_task_dataset
from labkit.device import by_mode, get_device, seed_everything
from labkit.grading import check
from labkit.train import predict_logits

transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars in the outputs
device = get_device()
seed_everything(0)
print("ready")


# %% [markdown]
# ## 1. Averaging parameters, and why it needs a shared start
#
# The simplest merge is a weighted average of every tensor,
# $\theta = \sum_i w_i \theta_i / \sum_i w_i$. It is what checkpoint averaging, model soups and
# mergekit's `linear` method compute.
#
# ### Exercise 1: weighted average of state dicts (2 points)
#
# Average every tensor of a list of state dicts with the given weights, dividing by the weights'
# sum. Compute in float32 whatever the storage dtype and return each tensor in its input dtype (the
# usual practice: bf16 checkpoints, float32 arithmetic). Raise `ValueError` when the numbers of state
# dicts and weights differ, when the weights sum to 0, or when the state dicts hold different tensors.

# %% tags=["solution"]
def weighted_average(state_dicts, weights):
    """theta = sum_i w_i theta_i / sum_i w_i for every tensor (float32 arithmetic, inputs' dtype)."""
    ### BEGIN SOLUTION
    if len(state_dicts) != len(weights):
        raise ValueError(f"{len(state_dicts)} state dicts but {len(weights)} weights")
    total = float(sum(weights))
    if abs(total) < 1e-12:
        raise ValueError("the weights sum to 0")
    keys = set(state_dicts[0])
    if any(set(sd) != keys for sd in state_dicts):
        raise ValueError("the state dicts hold different tensors")
    return {k: (sum(float(w) * sd[k].float() for w, sd in zip(weights, state_dicts)) / total).to(v.dtype)
            for k, v in state_dicts[0].items()}
    ### END SOLUTION


# %% tags=["tests"]
check("merge.weighted_average", weighted_average)

# %% [markdown]
# ### Permutation symmetry
#
# Swap two hidden units of an MLP, that is two rows of the first layer's weight (and bias) and the
# same two columns of the next layer's weight: the network computes **exactly the same function**
# with different parameters. A hidden layer of width $h$ has $h!$ such orderings, and two networks
# trained from different random initialisations settle on unrelated ones. Averaging them averages
# unit $i$ of one with an unrelated unit $i$ of the other.
#
# The zoo's `digits/mlp-s0` and `digits/mlp-s1` are the same MLP (64-128-128-10) trained from two
# seeds. First, a permutation changes the parameters but not the function:

# %%
digits = load_digits()
X_val, y_val, X_test, y_test = digits.X_val, digits.y_val, digits.X_test, digits.y_test
mlp_a, mlp_b = zoo.load("digits/mlp-s0", device="cpu"), zoo.load("digits/mlp-s1", device="cpu")

names = merge.linear_layer_names(mlp_a)
g = torch.Generator().manual_seed(0)
perms = [torch.randperm(128, generator=g), torch.randperm(128, generator=g)]
shuffled = merge.load_merged(mlp_a, merge.permute_linear_chain(mlp_a.state_dict(), names, perms))
print("Linear layers:", names)
print("same outputs after permuting hidden units:",
      torch.allclose(predict_logits(mlp_a, X_test), predict_logits(shuffled, X_test), atol=1e-5))
print("same parameters:", torch.equal(mlp_a.layers[0].weight, shuffled.layers[0].weight))


# %% [markdown]
# Now walk the straight line $\theta(\alpha) = (1-\alpha)\theta_A + \alpha\theta_B$ between two models
# and measure loss and accuracy on the validation set. For two independently trained MLPs the middle
# is worse than both ends (a **loss barrier**). For two fine-tunes of one base (`digits/soup-ft0`,
# `digits/soup-ft1`: same start, different hyperparameters) the path stays flat.
#
# **Weight matching** (Ainsworth et al. 2023, *Git Re-Basin*) repairs the first case: for each hidden
# layer find the permutation of B's units that maximises $\sum_l \langle W^A_l, P_l W^B_l P_{l-1}^\top\rangle$,
# a linear assignment problem solved layer by layer with the Hungarian algorithm
# (`labkit.merge.weight_matching`). The aligned B computes the same function as B, but now sits in
# A's basin.

# %%
def digits_eval(model_or_state, X=None, y=None):
    """Validation (or given X, y) loss and accuracy of a digits classifier or a state dict."""
    X, y = (X_val, y_val) if X is None else (X, y)
    model = merge.load_merged(mlp_a, model_or_state) if isinstance(model_or_state, dict) else model_or_state
    logits = predict_logits(model, X)
    return {"loss": F.cross_entropy(logits, y).item(), "acc": (logits.argmax(-1) == y).float().mean().item()}

soup_models = [zoo.load(f"digits/soup-ft{i}", device="cpu") for i in range(8)]
mlp_b_aligned = merge.align_mlp(mlp_a, mlp_b)
print("aligned B computes the same function as B:",
      torch.allclose(predict_logits(mlp_b, X_test), predict_logits(mlp_b_aligned, X_test), atol=1e-5))

alphas = [i / 10 for i in range(11)]
curves = {
    "independent seeds (mlp-s0 -> mlp-s1)": merge.interpolation_curve(mlp_a, mlp_b, digits_eval, alphas),
    "same seeds after alignment": merge.interpolation_curve(mlp_a, mlp_b_aligned, digits_eval, alphas),
    "fine-tunes of one base (soup-ft0 -> soup-ft1)": merge.interpolation_curve(soup_models[0], soup_models[1],
                                                                                digits_eval, alphas),
}

# %%
# NBVAL_IGNORE_OUTPUT
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
# different markers and line styles: the aligned and the fine-tune curves lie close together
for (label, rows), style in zip(curves.items(), ("o-", "s--", "^:")):
    axes[0].plot(alphas, [r["loss"] for r in rows], style, label=label)
    axes[1].plot(alphas, [r["acc"] for r in rows], style, label=label)
axes[0].set_ylabel("validation loss"), axes[1].set_ylabel("validation accuracy")
axes[0].set_ylim(bottom=0)
axes[1].set_ylim(0, 1.02)
for ax in axes:
    ax.set_xlabel(r"$\alpha$ in $(1-\alpha)\theta_A + \alpha\theta_B$")
axes[1].legend(fontsize=8)
fig.suptitle("Linear interpolation between two models")
plt.tight_layout()
plt.show()
for label, rows in curves.items():
    ends = min(rows[0]["loss"], rows[-1]["loss"])
    print(f"{label:48s} loss at the ends {rows[0]['loss']:.3f} / {rows[-1]['loss']:.3f}, "
          f"at the midpoint {rows[5]['loss']:.3f} (acc {rows[5]['acc']:.3f})")

# %%
# NBVAL_IGNORE_OUTPUT
barrier = {label: rows[5]["loss"] - (rows[0]["loss"] + rows[-1]["loss"]) / 2 for label, rows in curves.items()}
indep, aligned, finetunes = barrier.values()
rows_indep = curves["independent seeds (mlp-s0 -> mlp-s1)"]
rows_ft = curves["fine-tunes of one base (soup-ft0 -> soup-ft1)"]
record("loss barrier at the midpoint", barrier)
record("midpoint accuracy", {label: rows[5]["acc"] for label, rows in curves.items()})
claim(5, "averaging two independently initialised models fails: the midpoint's loss is over twice the ends'",
      rows_indep[5]["loss"] > 2 * (rows_indep[0]["loss"] + rows_indep[-1]["loss"]) / 2,
      detail=f"midpoint {rows_indep[5]['loss']:.3f}, ends {rows_indep[0]['loss']:.3f} / {rows_indep[-1]['loss']:.3f}")
claim(5, "averaging fine-tunes of one base works: the midpoint is no worse than the worse end",
      rows_ft[5]["loss"] <= max(rows_ft[0]["loss"], rows_ft[-1]["loss"]),
      detail=f"midpoint {rows_ft[5]['loss']:.4f}, ends {rows_ft[0]['loss']:.4f} / {rows_ft[-1]['loss']:.4f}")
print("aligning hidden units (weight matching) removes most of the barrier:", aligned < 0.25 * indep)

# %% [markdown]
# The independent MLPs are trained on an easy task with dropout, so their average does not fall to
# chance: the midpoint loses a few points of accuracy and its loss is several times higher. On
# larger networks and harder tasks the midpoint of two independent models is often no better than
# guessing. Alignment works here because an MLP's symmetries are exactly the unit permutations;
# transformers have more (attention heads, residual stream rotations), which is why practical
# merging sticks to fine-tunes of one base.
#
# ## 2. Checkpoint averaging
#
# Along one training run, consecutive checkpoints share their initialisation and their trajectory,
# so they can be averaged. Averaging the last few checkpoints (as in the Transformer paper for
# machine translation) cancels part of the noise of SGD's final steps. The zoo holds checkpoints of
# one run of `digits/ckpt-*` at steps 100, 200, 400, 800 and 1500.

# %%
# NBVAL_IGNORE_OUTPUT
steps = [100, 200, 400, 800, 1500]
checkpoints = [zoo.load(f"digits/ckpt-{s}", device="cpu") for s in steps]
rows = []
for last in (1, 2, 3):
    averaged = merge.average_checkpoints(checkpoints, last=last)
    val, test = digits_eval(averaged), digits_eval(averaged, X_test, y_test)
    rows.append((last, val, test))
    print(f"average of the last {last} checkpoint(s) (steps {steps[-last:]}): "
          f"val loss {val['loss']:.3f} acc {val['acc']:.3f} | test loss {test['loss']:.3f} acc {test['acc']:.3f}")
record("checkpoint averaging (last k): val and test loss/acc", {r[0]: {"val": r[1], "test": r[2]} for r in rows})


# %% [markdown]
# Averaging with the late checkpoints lowers the validation loss; accuracy moves by a few of the 360
# test examples in either direction, within noise on a test set this small. These checkpoints are
# far apart (the last ones are 700 steps apart with a decaying learning rate), which is where
# averaging helps least; averaging many checkpoints of the final phase is the usual recipe.
#
# ## 3. Model soups
#
# Wortsman et al. (2022) fine-tune one pre-trained model many times with different hyperparameters
# and **average the fine-tunes**: a *soup*. The **uniform soup** averages all of them; the **greedy
# soup** sorts them by held-out accuracy and adds each to the pot only if the held-out accuracy of
# the average does not drop. The zoo's `digits/soup-ft0..7` are fine-tunes of `digits/soup-base`
# with different learning rates, weight decay, label smoothing and noise augmentation.
#
# ### Exercise 2: the greedy soup (2 points)
#
# `models` is a list of state dicts, `evaluate(state_dict) -> float` a held-out score (higher is
# better). Sort the models by their own score (best first; keep the original order among equal
# scores), start the soup with the best one, and try the others in that order: keep a model if the
# **uniform average** of the soup with it scores at least as well as the soup without it. Return
# `(soup_state_dict, chosen)` where `chosen` lists the indices of the kept models in the order they
# were added. Use your `weighted_average`.

# %% tags=["solution"]
def greedy_soup(models, evaluate):
    """Greedy soup (Wortsman et al. 2022, recipe 1) -> (soup state dict, chosen indices)."""
    ### BEGIN SOLUTION
    scores = [evaluate(m) for m in models]
    order = sorted(range(len(models)), key=lambda i: -scores[i])
    chosen, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        candidate = weighted_average([models[j] for j in chosen + [i]], [1.0] * (len(chosen) + 1))
        score = evaluate(candidate)
        if score >= best:
            chosen, best = chosen + [i], score
    return weighted_average([models[j] for j in chosen], [1.0] * len(chosen)), chosen
    ### END SOLUTION


# %% tags=["tests"]
check("merge.greedy_soup", greedy_soup)

# %% [markdown]
# Cook both soups. Selection uses the **validation** set only; the clean test set and seven shifted
# versions of it (pixel noise, translation, rotation, thicker strokes, blur, a cut-out square and
# zoom; `labkit.data.SHIFT_KINDS`) judge the result.
#
# One set of eight fine-tunes is one draw of luck: which examples the soup gets right depends on the
# fine-tunes' random seeds. The zoo holds **three ingredient sets**, the same eight recipes fine-tuned
# with other seeds (`digits/soup-ft*`, `digits/soup-s1-ft*`, `digits/soup-s2-ft*`). Every comparison
# below is a difference between two models on the same test digits, given with a 95% **bootstrap
# interval** (resample the 360 test digits with replacement, recompute, keep the middle 95%) and its
# spread over the three sets. A difference whose interval contains 0 is within noise. The digit
# models are tiny, so they are scored on the CPU, which also gives the same numbers on every machine.

# %%
from labkit.data import SHIFT_KINDS
from labkit.merge import digits_study
from labkit.zoo import DIGIT_TASK_DOMAINS, SOUP_SETS

study_device = "cpu"
soup_names = [[f"digits/soup-ft{i}" for i in range(8)]] + [[f"digits/soup-s{s}-ft{i}" for i in range(8)]
                                                          for s in range(1, SOUP_SETS)]
ingredients = [[zoo.load(n, device="cpu").state_dict() for n in names] for names in soup_names]
soup_base = zoo.load("digits/soup-base", device="cpu")
study_sets = digits_study.domain_sets(digits, SHIFT_KINDS)  # val/test x clean + seven shifts
soup_states = ingredients[0]
val_acc = lambda sd: digits_eval(sd)["acc"]  # noqa: E731
greedy_state, chosen = greedy_soup(soup_states, val_acc)
print("your greedy soup picks the same fine-tunes as labkit.merge.greedy_soup:",
      chosen == merge.greedy_soup(soup_states, val_acc).chosen)
soups = digits_study.soup_study(soup_base, ingredients, study_sets, study_device)
shifts = list(SHIFT_KINDS)


def acc_of(correct, on):
    """Accuracy on one test set, or the mean over the shifted ones (on="shift")."""
    return float(np.mean([correct[k].float().mean() for k in (shifts if on == "shift" else [on])]))


def paired_difference(a, b, on):
    """(estimate, low, high) of accuracy(a) - accuracy(b) averaged over ingredient sets (and shifts),
    bootstrapping the test digits (the same digits for every set and shift: a paired comparison)."""
    kinds = shifts if on == "shift" else [on]
    rows = np.stack([(s["correct"][a][k].float() - s["correct"][b][k].float()).numpy() for s in soups for k in kinds])
    return digits_study.bootstrap_ci(rows)


def verdict(ci):
    return "better" if ci[1] > 0 else "worse" if ci[2] < 0 else "within noise"

# %%
# NBVAL_IGNORE_OUTPUT
print(f"{'':16s}{'set':>4s}{'val':>8s}{'test':>8s}{'shifted (mean of 7)':>21s}   greedy soup ingredients")
for i, s in enumerate(soups):
    for name in ("best single", "uniform soup", "greedy soup"):
        print(f"{name:16s}{i:4d}{s['val'][name]:8.4f}{acc_of(s['correct'][name], 'clean'):8.4f}"
              f"{acc_of(s['correct'][name], 'shift'):21.4f}   " + (str(s["chosen"]) if name == "greedy soup" else ""))
comparisons = {"greedy - best single, test": ("greedy soup", "best single", "clean"),
               "uniform - best single, test": ("uniform soup", "best single", "clean"),
               "uniform - best single, shifted": ("uniform soup", "best single", "shift"),
               "greedy - best single, shifted": ("greedy soup", "best single", "shift")}
soup_diffs = {"greedy - best single, val": digits_study.spread([s["val"]["greedy soup"] - s["val"]["best single"]
                                                                for s in soups])}
for name, (a, b, on) in comparisons.items():
    soup_diffs[name] = d = paired_difference(a, b, on)
    per_set = [round(acc_of(s["correct"][a], on) - acc_of(s["correct"][b], on), 4) for s in soups]
    print(f"{name:32s} {d[0]:+.4f}  95% CI [{d[1]:+.4f}, {d[2]:+.4f}]  per set {per_set}")
record("soups over ingredient sets: accuracy", [{name: {"val": s["val"][name], "test": acc_of(s["correct"][name], "clean"),
                                                       "shifted": acc_of(s["correct"][name], "shift")}
                                                for name in s["correct"]} for s in soups])
record("soups: differences (estimate, CI low, CI high)", soup_diffs)

# %%
print("greedy soup vs best single on the validation digits it was chosen on:",
      "at least as good in every set" if soup_diffs["greedy - best single, val"]["min"] >= 0 else "worse in a set")
for name in ("greedy - best single, test", "uniform - best single, test", "uniform - best single, shifted"):
    print(f"{name}: {verdict(soup_diffs[name])}")
claim(6, "the greedy soup is at least as good as the best single model on the data used for selection (every set)",
      soup_diffs["greedy - best single, val"]["min"] >= 0, detail=str(soup_diffs["greedy - best single, val"]))
claim(6, "the greedy soup is at least as good as the best single model in distribution (test, mean over sets)",
      soup_diffs["greedy - best single, test"][0] >= 0, detail=str(soup_diffs["greedy - best single, test"]))
claim(6, "the uniform soup is more robust under shift than the best single model (95% CI above 0)",
      soup_diffs["uniform - best single, shifted"][1] > 0, detail=str(soup_diffs["uniform - best single, shifted"]))

# %% [markdown]
# **Why the uniform soup is not more robust here.** Wortsman et al. souped fine-tunes of CLIP that
# all stay in one low-loss basin around the pre-trained model. Look at our ingredients: how far each
# moved from `digits/soup-base`, how far they are from each other, and which of them are robust.

# %%
# NBVAL_IGNORE_OUTPUT
spreads = [digits_study.ingredient_spread(soup_base.state_dict(), s, soup_base, study_sets["test"], study_device)
           for s in ingredients]
for i, sp in enumerate(spreads):
    lo, hi = sp["accuracy_range"]["clean"]
    shifted_lo = np.mean([sp["accuracy_range"][k][0] for k in shifts])
    shifted_hi = np.mean([sp["accuracy_range"][k][1] for k in shifts])
    print(f"set {i}: test accuracy {lo:.3f}-{hi:.3f}, shifted (mean of 7) {shifted_lo:.3f}-{shifted_hi:.3f}; "
          f"pairwise distance / distance from the base {sp['pairwise_distance_relative']:.2f}, "
          f"cosine of their deltas {sp['mean_cosine']:.2f}; they disagree on "
          f"{sp['disagreement']['clean']:.1%} of test digits, {np.mean([sp['disagreement'][k] for k in shifts]):.1%} of shifted")
from labkit.zoo import RECIPES  # noqa: E402

soup_base_sd = soup_base.state_dict()
single = digits_study.correctness(soup_base, soup_states, study_sets["test"], study_device)
print(f"\nset 0, one line per fine-tune: {'lr':>6s}{'noise aug':>10s}{'||theta - base||':>17s}{'test':>7s}{'shifted':>9s}")
for i, name in enumerate(soup_names[0]):
    r = RECIPES[name]
    print(f"{name:34s}{r['lr']:6.0e}{r['noise']:10.1f}{merge.TaskVector.between(soup_base_sd, soup_states[i]).norm():17.2f}"
          f"{single['clean'][i].float().mean():7.3f}{np.mean([single[k][i].float().mean() for k in shifts]):9.3f}")
uniform_vs_mean = float(np.mean([acc_of(s["correct"]["uniform soup"], "shift") for s in soups]))
mean_ingredient_shift = float(np.mean([single[k].float().mean() for k in shifts]))
print(f"\nset 0 under shift: uniform soup {acc_of(soups[0]['correct']['uniform soup'], 'shift'):.3f}, "
      f"mean ingredient {mean_ingredient_shift:.3f}, best single {acc_of(soups[0]['correct']['best single'], 'shift'):.3f}")
record("soup ingredient spread", spreads)

# %% [markdown]
# The ingredients are **not close to each other**: two fine-tunes are about as far apart as each is
# from the base, and the cosine between their updates is about 0.5; the lr 1e-2 fine-tunes moved up
# to four times as far as the lr 1e-3 ones. Their robustness differs far more than their clean
# accuracy: all score 0.97-0.99 on clean test digits but about 0.65-0.77 under shift, and the most
# robust were trained with noise augmentation. The uniform soup averages robust and fragile
# fine-tunes alike and lands just above the *mean ingredient* under shift, below the best single
# model, which validation picked among the noise-augmented ones (the same recipe in every set). The
# greedy soup keeps only fine-tunes that help on validation and avoids most of this loss, but in
# distribution it is within a few test digits of the best single model: its guarantee holds on the
# data it was chosen on. Wortsman et al.'s robustness gain needs ingredients that all share the
# pre-trained model's robust features and stay in its basin; eight small MLPs fine-tuned over a wide
# grid of learning rates and augmentations are not that setting.
#
# ### Averaging vs ensembling
#
# For every pair of fine-tunes in each ingredient set (and all eight together), compare the
# **averaged model** (one model's cost) with the **ensemble** of the same members (mean of their
# probabilities, $k$ models' cost), on the clean and on the seven shifted test sets. Add pairs of the
# independently trained `digits/mlp-s*`, where averaging is not expected to work.

# %%
member_subsets = list(itertools.combinations(range(8), 2)) + [tuple(range(8))]
av_ens = [digits_study.average_vs_ensemble(soup_base, s, member_subsets, study_sets["test"], study_device)
          for s in ingredients]
independent = [zoo.load(f"digits/mlp-s{i}", device="cpu") for i in range(5)]
indep_pairs = list(itertools.combinations(range(5), 2))
indep = digits_study.average_vs_ensemble(independent[0], independent, indep_pairs,
                                         {"clean": study_sets["test"]["clean"]}, study_device)["clean"]
test_names = list(study_sets["test"])
points = {k: np.concatenate([np.stack([r[k]["average"].float().mean(-1), r[k]["ensemble"].float().mean(-1)], 1)
                             for r in av_ens]) for k in test_names}
gap = {k: digits_study.bootstrap_ci(np.concatenate([(r[k]["ensemble"].float() - r[k]["average"].float()).numpy()
                                                    for r in av_ens])) for k in test_names}
indep_gap = digits_study.bootstrap_ci((indep["ensemble"].float() - indep["average"].float()).numpy())
every = np.concatenate(list(points.values()))
corr_all = float(np.corrcoef(every[:, 0], every[:, 1])[0, 1])
corr_clean = float(np.corrcoef(points["clean"][:, 0], points["clean"][:, 1])[0, 1])
wins = {k: float(np.mean(p[:, 0] > p[:, 1])) for k, p in points.items()}
wins_all = float(np.mean(every[:, 0] > every[:, 1]))
wins_by_set = [float(np.mean([(r[k]["average"].float().mean(-1) > r[k]["ensemble"].float().mean(-1)).float().mean()
                              for k in test_names])) for r in av_ens]

# %%
# NBVAL_IGNORE_OUTPUT
fig, ax = plt.subplots(figsize=(5.4, 4.6))
for k, pts in points.items():
    ax.scatter(pts[:, 1], pts[:, 0], s=10, alpha=0.6, label=f"soup fine-tunes, {k}")
ind_acc = np.stack([indep["average"].float().mean(-1), indep["ensemble"].float().mean(-1)], 1)
ax.scatter(ind_acc[:, 1], ind_acc[:, 0], s=30, marker="x", color="k", label="independent seeds, clean")
lo = float(every.min())
ax.plot([lo, 1], [lo, 1], "k--", lw=0.8)
ax.set_xlabel("ensemble accuracy"), ax.set_ylabel("averaged-model accuracy")
ax.legend(fontsize=6, ncol=2)
ax.set_title("Averaging vs ensembling the same members")
plt.tight_layout()
plt.show()
print(f"{len(every)} (subset, test set) points over {len(ingredients)} ingredient sets; "
      f"correlation {corr_all:.3f} over all, {corr_clean:.3f} within the clean test set")
print(f"{'':10s}{'averaging wins':>16s}{'ensemble - average':>20s}   95% CI")
for k in test_names:
    print(f"{k:10s}{wins[k]:16.3f}{gap[k][0]:+20.4f}   [{gap[k][1]:+.4f}, {gap[k][2]:+.4f}]")
print("fraction where averaging wins, per ingredient set:", np.round(wins_by_set, 3).tolist())
print(f"independent seeds (clean): ensemble - average {indep_gap[0]:+.4f} [{indep_gap[1]:+.4f}, {indep_gap[2]:+.4f}]")
record("avg vs ens: correlation (all points, clean only)", [corr_all, corr_clean])
record("avg vs ens: fraction where averaging wins", {**wins, "all": wins_all, "per ingredient set": wins_by_set})
record("avg vs ens: ensemble minus average (estimate, CI)", gap)
record("independent pairs: ensemble minus average accuracy (estimate, CI)", indep_gap)

# %%
print("ensemble vs averaged model, by test set:",
      {k: {"better": "ensemble better", "worse": "averaging better"}.get(verdict(g), "within noise") for k, g in gap.items()})
claim(7, "averaged-model accuracy is strongly correlated with ensemble accuracy", corr_all > 0.9,
      detail=f"r = {corr_all:.3f} over all test sets, {corr_clean:.3f} within the clean test set")
claim(7, "the averaged model rarely beats the ensemble of the same members (in under 25% of cases)", wins_all < 0.25,
      detail=f"all {wins_all:.3f}; " + str({k: round(v, 3) for k, v in wins.items()}))
claim(7, "averaging hurts where ensembling does not (independent initialisations)", indep_gap[0] > 0.01,
      detail=f"ensemble - average {indep_gap}")

# %% [markdown]
# The strong correlation over all points mostly reflects how hard each test set is; within the clean
# test set it is weaker, because all these models score within a few digits of each other. **In
# distribution** the ensemble and the averaged model are within noise of each other, as the soup
# paper found for fine-tunes of one base: the ingredients disagree on very few clean digits, so
# there is little for an ensemble to gain. **Under shift** the averaged model often beats the
# ensemble of the same members, so "averaging rarely beats ensembling" does not hold on these small
# models: the claim is recorded as failed, with the intervals above as the evidence. (Weight
# averaging of fine-tunes of one base is known to match or beat ensembling out of distribution when
# the members share a basin, e.g. Rame et al. 2022, *Diverse Weight Averaging*.) Independently
# initialised models show the other side: ensembling them helps while averaging them hurts.

# %% [markdown]
# ## 4. Task vectors on language models
#
# Ilharco et al. (2023) define a **task vector** as the difference between a fine-tuned model and
# its base, $\tau = \theta_{ft} - \theta_{base}$, and treat task vectors as values: **add** them to
# get several skills at once, **negate** one to remove a behaviour, **scale** them with
# $\lambda$: $\theta = \theta_{base} + \sum_i \lambda_i \tau_i$.
#
# The papers start from large models pre-trained on broad data and fine-tune them gently. The zoo
# rebuilds those conditions in miniature:
#
# * `lm/merge-base-tiny` (85k parameters), `lm/merge-base` (0.5M) and `lm/merge-base-medium` (1.5M) were
#   pre-trained the same way on copy, reverse, count and chat **and on six merging tasks at low rates**
#   (add, sort, reverse-sort, max, dedupe, increment): every task format has been seen and each skill
#   is weak but not absent;
# * `lm/merge-tiny-ft-TASK` (`lm/merge-ft-TASK`, `lm/merge-medium-ft-TASK` on the wider bases) fine-tune
#   one skill each for 200 steps at a small learning rate, on their task mixed 50/50 with the base's own
#   pre-training data (**replay**), so that $\tau$ says "learn this task" and not also "forget the rest";
# * `lm/merge-tiny-far-TASK` / `lm/merge-far-TASK`: the same tasks, no replay, a 4x larger learning
#   rate for half the steps: **large** task vectors; `lm/merge-tiny-lora-TASK`: rank-4 LoRA adapters
#   merged into the weights, so every $\tau$ is **low rank**.
#
# Every merge's $\lambda$ (and TIES's density) is chosen on a **validation** split and reported on a
# disjoint **test** split, as the papers do. `python -m labkit.merge.sweep` runs the full measured
# sweep behind this section; its results for every condition are in `bench/results/lm-merge-sweep-*.json`.
#
# ### Exercise 3: task arithmetic (2 points)
#
# Return $\theta_{base} + \sum_i s_i(\theta_i - \theta_{base})$ for every tensor (float32 arithmetic,
# the base's dtype). Raise `ValueError` when the numbers of fine-tunes and scales differ or a
# fine-tune holds other tensors than the base.

# %% tags=["solution"]
def task_arithmetic(base, finetuned, scales):
    """theta_base + sum_i s_i (theta_i - theta_base) on state dicts."""
    ### BEGIN SOLUTION
    if len(finetuned) != len(scales):
        raise ValueError(f"{len(finetuned)} fine-tunes but {len(scales)} scales")
    if any(set(ft) != set(base) for ft in finetuned):
        raise ValueError("a fine-tune holds other tensors than the base")
    out = {}
    for k, b in base.items():
        tau = sum(float(s) * (ft[k].float() - b.float()) for s, ft in zip(scales, finetuned))
        out[k] = (b.float() + tau).to(b.dtype)
    return out
    ### END SOLUTION


# %% tags=["tests"]
check("merge.task_arithmetic", task_arithmetic)

# %% [markdown]
# To score many merged models quickly we measure exact match by **teacher forcing**: one forward
# pass over prompt + reference answer, and an example counts as correct when every answer token
# (and the end-of-sequence token) is the model's top prediction. That is exactly when greedy
# decoding would produce the reference, which the next cell checks against `exact_match`.

# %%
from labkit.merge.sweep import gain_captured, random_direction_like, val_test_split

MERGE_TASKS, CONTROLS = zoo.LM_MERGE_TASKS, zoo.LM_MERGE_CONTROLS
ALL_TASKS = MERGE_TASKS + CONTROLS
N = by_mode(smoke=60, full=300)
splits = {t: val_test_split(t, N) for t in ALL_TASKS}  # disjoint validation and test prompts, never trained on
state = lambda m: {k: v.detach() for k, v in m.state_dict().items()}  # noqa: E731
# the fine-tunes of each condition, {name: (base, zoo prefix)}
CONDITIONS = {"tiny, replay": ("lm/merge-base-tiny", "lm/merge-tiny-ft-"),
              "tiny, LoRA": ("lm/merge-base-tiny", "lm/merge-tiny-lora-"),
              "tiny, far": ("lm/merge-base-tiny", "lm/merge-tiny-far-"),
              "small, replay": ("lm/merge-base", "lm/merge-ft-"),
              "small, far": ("lm/merge-base", "lm/merge-far-"),
              "medium, replay": ("lm/merge-base-medium", "lm/merge-medium-ft-")}
bases = {name: zoo.load(name, device=device) for name in {b for b, _ in CONDITIONS.values()}}
base_states = {name: state(m) for name, m in bases.items()}
fine_tuned = {c: {t: state(zoo.load(prefix + t, device=device)) for t in MERGE_TASKS}
              for c, (_, prefix) in CONDITIONS.items()}
taus = {c: {t: merge.TaskVector.between(base_states[CONDITIONS[c][0]], sd) for t, sd in fts.items()}
        for c, fts in fine_tuned.items()}
probes = {name: copy.deepcopy(m) for name, m in bases.items()}  # one model per width to load merges into


@torch.no_grad()
def skill(model, data):
    """Exact match under teacher forcing (= greedy decoding's exact match), one forward pass."""
    batch = {k: v.to(device) for k, v in encode_for_training(data["prompt"], data["answer"]).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pred, labels = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    correct = ((pred == labels) | (labels == -100)).all(-1)
    return correct.sum().item() / correct.numel()


def skills(sd, split="test", tasks=ALL_TASKS, base="lm/merge-base-tiny"):
    """Exact match of a state dict of ``base``'s architecture on each task's validation or test split."""
    probes[base].load_state_dict(sd)
    return {t: skill(probes[base], splits[t][split]) for t in tasks}


small = make_task_dataset(["add", "sort", "copy"], 40, seed=5, split="test")
ft_sort = zoo.load("lm/merge-tiny-ft-sort", device=device)
# equal on the CPU; on a GPU the two code paths may round differently, so allow one example
print("teacher-forced skill equals greedy exact match:",
      abs(skill(ft_sort, small) - exact_match(ft_sort, small)) <= 1 / len(small))

# %% [markdown]
# First the ingredients on the tiny base: what each replay fine-tune scores on every task (test split),
# and how far it moved, $\|\tau\| / \|\theta_{base}\|$.

# %%
# NBVAL_IGNORE_OUTPUT
base_sd = base_states["lm/merge-base-tiny"]
theta_norm = {name: sum(float(v.float().pow(2).sum()) for v in sd.values()) ** 0.5 for name, sd in base_states.items()}
rel_norm = {c: {t: tv.norm() / theta_norm[CONDITIONS[c][0]] for t, tv in tvs.items()} for c, tvs in taus.items()}
base_test = {name: skills(sd, base=name) for name, sd in base_states.items()}
ft_test = {c: {t: skills(sd, base=CONDITIONS[c][0]) for t, sd in fts.items()} for c, fts in fine_tuned.items()}
ft_val = {c: {t: skills(sd, "val", [t], CONDITIONS[c][0])[t] for t, sd in fts.items()} for c, fts in fine_tuned.items()}
print(f"{'tiny base and replay fine-tunes':34s}" + "".join(f"{t:>7s}" for t in ALL_TASKS) + "  ||tau||/||theta||")
print(f"{'lm/merge-base-tiny':34s}" + "".join(f"{base_test['lm/merge-base-tiny'][t]:7.2f}" for t in ALL_TASKS))
for t in MERGE_TASKS:
    row = ft_test["tiny, replay"][t]
    print(f"{'lm/merge-tiny-ft-' + t:34s}" + "".join(f"{row[u]:7.2f}" for u in ALL_TASKS)
          + f"  {rel_norm['tiny, replay'][t]:.3f}")
print("\nmean ||tau||/||theta|| by condition:", {c: round(float(np.mean(list(r.values()))), 3) for c, r in rel_norm.items()})
record("LM task vectors: relative norms", rel_norm)
record("LM fine-tunes: test exact match", ft_test)

# %% [markdown]
# The diagonal is each fine-tune's own skill: every one improves on the base (the base has all six
# skills weakly), while the controls copy/rev/count stay where the base had them, because the fine-tunes
# replayed the base's data. The other *weak* skills are not protected as well: a tiny model that
# sharpens one digit task often loses some of another (look at the inc and max columns).
#
# ### Adding task vectors (claim 8)
#
# Add two task vectors, $\theta_{base} + \lambda(\tau_a + \tau_b)$, for every pair of the six skills,
# with $\lambda$ chosen on validation. A merge is measured by the share of each fine-tune's gain over
# the base that it keeps, $(\text{merged} - \text{base}) / (\text{fine-tuned} - \text{base})$ (1: all
# of it; normalised accuracy, merged / fine-tuned, flatters merges when the base already has part of
# the skill). Then add all six at once.

# %%
LAMBDAS = [0.1, 0.2, 0.3, 0.5, 0.75, 1.0]


def gains(scores, tasks, cond="tiny, replay"):
    """Share of each fine-tune's gain kept; nan where the fine-tune gains less than 0.1 over the base
    (a ratio of two small differences says nothing: 'small' learned add to 0.93 before fine-tuning)."""
    base = base_test[CONDITIONS[cond][0]]
    return [gain_captured(scores[t], base[t], ft_test[cond][t][t]) if ft_test[cond][t][t] >= base[t] + 0.1
            else np.nan for t in tasks]


def tuned_merge(candidates, tasks, cond="tiny, replay"):
    """Choose among {hyperparameters: state dict} by mean normalised validation accuracy on ``tasks``;
    return (chosen, test scores of the chosen merge)."""
    base_name = CONDITIONS[cond][0]
    val = {k: np.mean([s / max(ft_val[cond][t], 1e-9) for t, s in skills(sd, "val", tasks, base_name).items()])
           for k, sd in candidates.items()}
    best = max(val, key=val.get)
    return best, skills(candidates[best], base=base_name)


tv = taus["tiny, replay"]
multi_sd = task_arithmetic(base_sd, [fine_tuned["tiny, replay"]["sort"], fine_tuned["tiny, replay"]["max"]], [1.0, 1.0])
same = all(torch.allclose(multi_sd[k], v, atol=1e-6) for k, v in (tv["sort"] + tv["max"]).apply_to(base_sd).items())
print("task_arithmetic agrees with labkit's TaskVector:", same)
pairs = {}
for a, b in itertools.combinations(MERGE_TASKS, 2):
    lam, test = tuned_merge({lam: (tv[a] + tv[b]).apply_to(base_sd, scale=lam) for lam in LAMBDAS}, [a, b])
    pairs[(a, b)] = {"lambda": lam, "test": test, "gain": gains(test, [a, b]),
                     "controls": float(np.mean([test[c] for c in CONTROLS]))}
lam6, test6 = tuned_merge({lam: sum(tv.values()).apply_to(base_sd, scale=lam) for lam in LAMBDAS}, MERGE_TASKS)
all_six = {"lambda": lam6, "test": test6, "gain": gains(test6, MERGE_TASKS),
           "controls": float(np.mean([test6[c] for c in CONTROLS]))}

# %%
# NBVAL_IGNORE_OUTPUT
base_ctrl = float(np.mean([base_test["lm/merge-base-tiny"][c] for c in CONTROLS]))
print(f"gain kept by base + lambda (tau_a + tau_b), lambda on validation (base controls {base_ctrl:.2f}):")
for (a, b), r in pairs.items():
    print(f"  {a:>6s} + {b:<6s} lambda {r['lambda']:<4}  gain kept {a} {r['gain'][0]:5.2f}, {b} {r['gain'][1]:5.2f}"
          f"   controls {r['controls']:.2f}")
print(f"all six: lambda {lam6}, gain kept " + ", ".join(f"{t} {g:.2f}" for t, g in zip(MERGE_TASKS, all_six["gain"]))
      + f", controls {all_six['controls']:.2f}")
pair_gain = float(np.nanmean([g for r in pairs.values() for g in r["gain"]]))
both_better = [p for p, r in pairs.items() if np.nanmin(r["gain"]) > 0]
pair_ctrl = float(np.mean([r["controls"] for r in pairs.values()]))
print(f"mean gain kept over the {len(pairs)} pairs: {pair_gain:.2f}; merge better than the base on both skills in "
      f"{len(both_better)} pairs; controls {pair_ctrl:.2f} (base {base_ctrl:.2f})")
record("LM task addition: pairs (lambda on val; test gain kept)", {f"{a}+{b}": r for (a, b), r in pairs.items()})
record("LM task addition: all six", all_six)
claim(8, "adding two task vectors gives both skills: over all pairs of the six, the merge keeps on average at "
      "least half of each fine-tune's gain, with the controls kept (lambda on validation)",
      pair_gain >= 0.5 and pair_ctrl >= base_ctrl - 0.05,
      detail=f"mean gain kept {pair_gain:.2f}, better than the base on both in {len(both_better)} of {len(pairs)} "
      f"pairs, controls {pair_ctrl:.2f} vs base {base_ctrl:.2f}; all six at lambda {lam6}: mean gain kept "
      f"{np.nanmean(all_six['gain']):.2f}")

# %% [markdown]
# Two skills add up; six at once interfere: no single $\lambda$ keeps much of all six gains. Section 5
# looks at that interference and at the methods built against it. First the other half of claim 8.
#
# ### Negating a task vector (claim 8)
#
# Subtract the task vector of a skill the base **already has** (inc, add 1 to every digit: the base
# gets about 40% right) and watch that skill and all the others. We follow Ilharco et al.'s protocol:
# the skills to keep are the base's well-learned ones, copy/rev/count (their "control task"), and
# $\lambda$ is the one that lowers the target skill most on validation while the controls keep at
# least 95% of the base's score. The second control is a random direction with the same norm in
# every tensor: if subtracting *any* update of that size did the same, negation would teach nothing.

# %%
target = "inc"
others = [t for t in MERGE_TASKS if t != target]  # the other weak skills
rand = random_direction_like(tv[target], seed=0)
ctrl = lambda row: float(np.mean([row[t] for t in CONTROLS]))  # noqa: E731
val_base = skills(base_sd, "val")
neg_val = {lam: skills(tv[target].apply_to(base_sd, scale=-lam), "val") for lam in [0.25, 0.5, 0.75, 1.0, 1.5]}
allowed = [lam for lam, s in neg_val.items() if ctrl(s) >= 0.95 * ctrl(val_base)] or [0.25]
neg_lam = min(allowed, key=lambda lam: neg_val[lam][target])
negation = {"base": base_test["lm/merge-base-tiny"],
            f"base - {neg_lam} tau_{target}": skills(tv[target].apply_to(base_sd, scale=-neg_lam)),
            f"base - {neg_lam} x random (same norm)": skills(rand.apply_to(base_sd, scale=-neg_lam))}

# %%
# NBVAL_IGNORE_OUTPUT
print(f"{'':34s}" + "".join(f"{t:>7s}" for t in ALL_TASKS) + "   controls, other weak skills (means)")
for name, row in negation.items():
    print(f"{name:34s}" + "".join(f"{row[t]:7.2f}" for t in ALL_TASKS)
          + f"   {ctrl(row):.2f}, {np.mean([row[t] for t in others]):.2f}")
record("LM negation (test)", negation)
b, neg, rnd = negation.values()
claim(8, f"negating a task vector removes that skill ({target}: at most half left) while the controls keep 95% of "
      "the base's score, and a random direction of the same norm keeps two thirds of the skill",
      neg[target] <= b[target] / 2 and ctrl(neg) >= 0.95 * ctrl(b) and rnd[target] >= 2 / 3 * b[target],
      detail=f"lambda {neg_lam} (validation): {target} {b[target]:.2f} -> {neg[target]:.2f} (random "
      f"{rnd[target]:.2f}); controls {ctrl(b):.2f} -> {ctrl(neg):.2f}; other weak skills "
      f"{np.mean([b[t] for t in others]):.2f} -> {np.mean([neg[t] for t in others]):.2f}")

# %% [markdown]
# Negation removes the skill far more than an equally large random step does, and copy/rev/count
# survive. The other weak digit skills lose some too (the last column): in a model this small, the
# directions that carry one digit skill also carry part of the others.

# %% [markdown]
# ### How far to go: $\lambda$
#
# Scale the sum of two skill vectors (the pair that merged best on validation) and of all six,
# $\theta_{base} + \lambda\sum\tau$. $\lambda = 0$ is the base, $\lambda = 1$ the plain sum; beyond 1 we
# *extrapolate*. Two vectors tolerate the full sum; six only a fraction of it.

# %%
best_pair = max(pairs, key=lambda p: np.mean([skills((tv[p[0]] + tv[p[1]]).apply_to(base_sd, scale=pairs[p]["lambda"]),
                                                       "val", list(p))[t] for t in p]))
lambdas = by_mode(smoke=[0.0, 0.5, 1.0, 1.5], full=[0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
pair_sweep = [skills((tv[best_pair[0]] + tv[best_pair[1]]).apply_to(base_sd, scale=lam)) for lam in lambdas]
six_sweep = [skills(sum(tv.values()).apply_to(base_sd, scale=lam)) for lam in lambdas]

# %%
# NBVAL_IGNORE_OUTPUT
fig, (ax_pair, ax_six) = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
for t, style in zip(best_pair, ("o-", "s--")):
    ax_pair.plot(lambdas, [r[t] for r in pair_sweep], style, label=t)
ax_pair.plot(lambdas, [ctrl(r) for r in pair_sweep], "^:", label="copy/rev/count (mean)")
ax_pair.set_title(rf"$\theta_{{base}} + \lambda(\tau_{{{best_pair[0]}}} + \tau_{{{best_pair[1]}}})$")
ax_six.plot(lambdas, [np.mean([r[t] for t in MERGE_TASKS]) for r in six_sweep], "o-", label="six tasks (mean)")
ax_six.plot(lambdas, [ctrl(r) for r in six_sweep], "^:", label="copy/rev/count (mean)")
ax_six.set_title(r"$\theta_{base} + \lambda \sum_{6\ tasks} \tau$")
for ax in (ax_pair, ax_six):
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_ylim(-0.02, 1.02), ax.set_xlabel(r"$\lambda$"), ax.legend(fontsize=8)
ax_pair.set_ylabel("exact match (test)")
plt.tight_layout()
plt.show()
record("lambda sweep: best pair and all six", {"pair": list(best_pair), "lambdas": lambdas,
                                                "pair_sweep": pair_sweep, "six_sweep": six_sweep})

# %% [markdown]
# ### Diagnostics: how much do task vectors interfere?
#
# Two task vectors interfere when they push the same parameters in different directions. The
# cosine similarity between whole task vectors is usually close to 0 (high-dimensional vectors are
# nearly orthogonal); the **sign-conflict rate** per tensor (the fraction of entries where one pushes
# up and the other down) is what TIES acts on. Compare the replay, LoRA and far fine-tunes.

# %%
# NBVAL_IGNORE_OUTPUT
for c in ("tiny, replay", "tiny, LoRA", "tiny, far"):
    cos = merge.cosine_matrix([taus[c][t] for t in MERGE_TASKS])
    off = cos[~torch.eye(len(MERGE_TASKS), dtype=torch.bool)]
    conflicts = merge.sign_conflict_rate([taus[c]["sort"], taus[c]["rsort"]])
    conflicts_trimmed = merge.sign_conflict_rate([taus[c]["sort"], taus[c]["rsort"]], density=0.2)
    print(f"{c:13s}: cosines between the six task vectors {off.min():.2f} to {off.max():.2f} (mean {off.mean():.2f}); "
          f"sign conflicts sort vs rsort {np.mean(list(conflicts.values())):.2f} of all entries, "
          f"{np.mean(list(conflicts_trimmed.values())):.2f} of the top 20%")
print(f"L1 mass removed by trimming tau_sort (replay) to 20% of its entries: {merge.trimmed_mass(tv['sort'], 0.2):.3f}")


# %% [markdown]
# ### Task vectors on digit classifiers: seven domains
#
# Task arithmetic assumes that a fine-tune stays in its base's neighbourhood, where the effects of
# parameter changes add up roughly linearly. The digit classifiers are such a case: `digits/task-K`
# is the soup's base (`digits/soup-base`) fine-tuned for 400 small steps (lr 1e-3) on training digits
# distorted one way only, for seven kinds K: rotated, thick-stroked, noisy, translated (`shift`),
# blurred, with a square cut out (`erase`) and zoomed. Each domain plays the part of a task. Every
# hyperparameter ($\lambda$, TIES's density) is chosen on *validation* digits distorted the same way
# (other images, other random distortions) and every table reports *test* digits.

# %%
domains = list(DIGIT_TASK_DOMAINS)
task_sets = digits_study.domain_sets(digits, domains)
d_base = zoo.load("digits/soup-base", device="cpu")
base_state = d_base.state_dict()
ft_states = {k: zoo.load(f"digits/task-{k}", device="cpu").state_dict() for k in domains}
d_tau = {k: merge.TaskVector.between(base_state, ft_states[k]) for k in domains}


def digit_scores(states, split="test"):
    """{set: accuracy [len(states)]} on clean digits and on each domain."""
    return {k: c.float().mean(-1) for k, c in digits_study.correctness(d_base, states, task_sets[split],
                                                                        study_device).items()}


d_base_test, d_base_val = digit_scores([base_state]), digit_scores([base_state], "val")
ft_correct = digits_study.correctness(d_base, [ft_states[k] for k in domains], task_sets["test"], study_device)
d_ft_test = {k: ft_correct[k][i] for i, k in enumerate(domains)}  # each fine-tune on its own domain
d_ft_val = digit_scores([ft_states[k] for k in domains], "val")
# a fine-tune "adds a skill" when it beats the base on its own domain by 0.05 on validation
skills_added = [k for i, k in enumerate(domains) if d_ft_val[k][i] > d_base_val[k][0] + 0.05]
d_theta_norm = merge.TaskVector(base_state).norm()
print("fine-tunes that add a skill on validation:", skills_added)

# %%
# NBVAL_IGNORE_OUTPUT
print(f"{'model':24s}" + "".join(f"{c:>8s}" for c in ["clean", *domains]) + "   ||tau||/||theta||")
print(f"{'base':24s}" + "".join(f"{d_base_test[c][0]:8.3f}" for c in ["clean", *domains]))
ft_all = digit_scores([ft_states[k] for k in domains])
for i, k in enumerate(domains):
    print(f"{'fine-tuned on ' + k:24s}" + "".join(f"{ft_all[c][i]:8.3f}" for c in ["clean", *domains])
          + f"   {d_tau[k].norm() / d_theta_norm:.3f}")
digit_cos = merge.cosine_matrix([d_tau[k] for k in domains])
digit_conflicts = np.mean(list(merge.sign_conflict_rate([d_tau[k] for k in domains]).values()))
off_diagonal = digit_cos[~torch.eye(len(domains), dtype=torch.bool)]
print(f"cosine between task vectors: {off_diagonal.min():.2f} to {off_diagonal.max():.2f}; "
      f"sign conflicts among the seven: {digit_conflicts:.3f} of entries")
record("digits task vectors: base and fine-tunes (test accuracy)",
       {"base": {c: d_base_test[c][0] for c in ["clean", *domains]},
        **{f"task-{k}": {c: ft_all[c][i] for c in ["clean", *domains]} for i, k in enumerate(domains)}})
record("digits task vectors: relative norm and cosines",
       {"relative_norm": {k: d_tau[k].norm() / d_theta_norm for k in domains}, "cosine": digit_cos})

# %% [markdown]
# **Adding** the task vectors of the domains where fine-tuning helped, with $\lambda$ chosen on
# validation: does one model get all those skills? **Negating** one: $\theta_{base} - \lambda\tau_k$
# with $\lambda$ chosen on validation as Ilharco et al. do (the largest drop on domain $k$ that keeps
# the clean and the other domains' validation accuracy within 0.05 of the base's), next to a random
# direction of the same size as the control. The claims test `rotate`, fixed in advance.

# %%
digit_added = digits_study.tuned_merges(d_base, base_state, ft_states, skills_added, task_sets, d_ft_test,
                                  study_device)["task arithmetic"]
base_correct = digits_study.correctness(d_base, [base_state], task_sets["test"], study_device)
add_gain = {k: digits_study.bootstrap_ci((digit_added["correct"][k].float() - base_correct[k][0].float()).numpy())
            for k in skills_added}
neg_lambdas = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0]


def random_like(tau, seed=0):
    """A random direction with the norm of tau in every tensor: the control for negation."""
    g = torch.Generator().manual_seed(seed)
    noise = {n: torch.randn(v.shape, generator=g) for n, v in tau.deltas.items()}
    return merge.TaskVector({n: r * tau.deltas[n].norm() / r.norm() for n, r in noise.items()})


def others_mean(acc, k, i=0):
    return float(np.mean([acc[c][i] for c in ["clean", *domains] if c != k]))


digit_negation = {}
for k in domains:
    val = digit_scores([d_tau[k].apply_to(base_state, scale=-lam) for lam in neg_lambdas], "val")
    allowed = {lam: -float(val[k][i]) for i, lam in enumerate(neg_lambdas)
               if others_mean(val, k, i) >= others_mean(d_base_val, k) - 0.05}
    lam = digits_study.best_on_validation(allowed) if allowed else 0.0
    test = digit_scores([d_tau[k].apply_to(base_state, scale=-lam)])
    rand = digit_scores([random_like(d_tau[k]).apply_to(base_state, scale=-lam)])
    digit_negation[k] = {"lambda": lam, "domain": float(test[k][0]), "others": others_mean(test, k),
                   "random: domain": float(rand[k][0]), "random: others": others_mean(rand, k)}

# %%
# NBVAL_IGNORE_OUTPUT
print(f"base + {digit_added['hyper'][0]} x sum of tau ({', '.join(skills_added)}), lambda chosen on validation:")
for k in skills_added:
    g = add_gain[k]
    print(f"  {k:8s} base {d_base_test[k][0]:.3f} -> {digit_added['test'][k]:.3f} (fine-tune {d_ft_test[k].float().mean():.3f}); "
          f"gain {g[0]:+.3f} [{g[1]:+.3f}, {g[2]:+.3f}]")
print(f"  clean    base {d_base_test['clean'][0]:.3f} -> {digit_added['test']['clean']:.3f}")
print(f"\n{'negate':8s}{'lambda':>7s}{'domain: base -> negated':>26s}{'others: base -> negated':>26s}"
      f"{'random dir.: domain, others':>30s}")
for k, r in digit_negation.items():
    print(f"{k:8s}{r['lambda']:7.2f}{d_base_test[k][0]:16.3f} -> {r['domain']:.3f}{others_mean(d_base_test, k):16.3f} -> "
          f"{r['others']:.3f}{r['random: domain']:18.3f}, {r['random: others']:.3f}")
record("digits task addition (test)", {"skills": skills_added, "lambda": digit_added["hyper"], "test": digit_added["test"],
                                       "gain CI": add_gain})
record("digits negation (test)", digit_negation)

# %%
digit_neg = digit_negation["rotate"]
claim(8, "task vectors on digits: adding them gives a model better than the base on every added skill (95% CI)",
      len(skills_added) >= 2 and all(g[1] > 0 for g in add_gain.values()),
      detail=f"skills {skills_added}, lambda {digit_added['hyper']}: " + str({k: tuple(round(x, 4) for x in g)
                                                                         for k, g in add_gain.items()}))
claim(8, "task vectors on digits: negating tau_rotate removes that skill and keeps the others",
      digit_neg["domain"] < d_base_test["rotate"][0] - 0.1 and digit_neg["others"] >= others_mean(d_base_test, "rotate") - 0.05,
      detail=str(digit_neg))
print("negating tau_rotate hurts rotated digits more than a random direction of the same size:",
      digit_neg["domain"] < digit_neg["random: domain"])

# %% [markdown]
# **Adding** works only in part. With all six skills merged at one $\lambda$ (validation picks about
# 0.3), rotated, translated, blurred and zoomed digits gain clearly over the base, but thick strokes
# and cut-out squares gain within noise: six task vectors that point in different directions share
# one scale, and a scale small enough to keep the other domains is too small for those two. That is
# why the addition claim is recorded as failed; the next subsection measures how merging degrades as
# domains are added. **Negation** behaves as Ilharco et al. describe: removing $\tau_{rotate}$ costs
# rotated digits about 15 points while the clean and other domains move by about 2-3, and a random
# direction of the same size barely changes rotated digits at all.

# %% [markdown]
# ### TIES vs task arithmetic vs averaging as the number of domains grows
#
# Merge $k$ of the seven domain fine-tunes, for $k = 2, \dots, 7$ (for each $k$, the seven windows of
# $k$ consecutive domains in the list above, so every domain is merged equally often; one merge of all
# seven). Three methods, each tuned on validation for every merge:
#
# * **averaging**: $\theta_{base} + \frac1k\sum_i\tau_i$, no hyperparameter;
# * **task arithmetic**: $\theta_{base} + \lambda\sum_i\tau_i$, $\lambda$ from 0.1 to 1.5;
# * **TIES**: trim each $\tau_i$ to a density of 0.1 to 0.7, elect signs, disjoint mean, scale by $\lambda$
#   from 0.5 to 3.
#
# The score is the **normalised accuracy** the TIES paper reports: the merged model's test accuracy
# on domain $i$ divided by fine-tune $i$'s, averaged over the merged domains (1 = as good as every
# specialist).

# %%
digit_subsets = {size: digits_study.cyclic_subsets(domains, size) for size in range(2, len(domains) + 1)}
digit_tuned = {size: [digits_study.tuned_merges(d_base, base_state, ft_states, s, task_sets, d_ft_test, study_device)
                      for s in subs] for size, subs in digit_subsets.items()}
digit_methods = ["averaging", "task arithmetic", "TIES"]
digit_normalised = {m: {size: [float(np.mean(list(r[m]["normalised"].values()))) for r in rs] for size, rs in digit_tuned.items()}
              for m in digit_methods}


def normalised_difference(a, b, sizes):
    """Bootstrap CI of (method a - method b) in normalised accuracy over all merges of the given sizes."""
    rows, n_pairs = [], 0
    for size in sizes:
        for r in digit_tuned[size]:
            for k in r[a]["normalised"]:
                rows += [r[a]["correct"][k], r[b]["correct"][k], d_ft_test[k]]
                n_pairs += 1
    rows = torch.stack(rows).float().numpy()
    return digits_study.bootstrap_ci(rows, lambda m: ((m[..., 0::3] - m[..., 1::3]) / m[..., 2::3]).mean(-1))


by_size = {size: {"TIES - averaging": normalised_difference("TIES", "averaging", [size]),
                  "TIES - task arithmetic": normalised_difference("TIES", "task arithmetic", [size])}
           for size in digit_subsets}
digit_many = [size for size in digit_subsets if size >= 6]
ties_vs_avg = normalised_difference("TIES", "averaging", digit_many)
ties_vs_ta = normalised_difference("TIES", "task arithmetic", digit_many)
ta_vs_avg = normalised_difference("task arithmetic", "averaging", digit_many)

# %%
# NBVAL_IGNORE_OUTPUT
fig, ax = plt.subplots(figsize=(6, 3.4))
digit_sizes = list(digit_subsets)
for m, style in zip(digit_methods, ("o-", "s--", "^:")):
    mean = [np.mean(digit_normalised[m][size]) for size in digit_sizes]
    ax.plot(digit_sizes, mean, style, label=m)
ax.set_xlabel("number of merged domains k"), ax.set_ylabel("normalised accuracy (merged / fine-tune)")
ax.set_title("Merging k digit domains, each method tuned on validation")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
print(f"{'k':>3s}" + "".join(f"{m:>18s}" for m in digit_methods) + "   chosen TIES (density, lambda), task arithmetic lambda")
for size in digit_sizes:
    print(f"{size:3d}" + "".join(f"{np.mean(digit_normalised[m][size]):18.4f}" for m in digit_methods)
          + f"   {[r['TIES']['hyper'] for r in digit_tuned[size]][:3]}, "
          f"{[r['task arithmetic']['hyper'][0] for r in digit_tuned[size]][:3]}")
print(f"{'k':>3s}{'TIES - averaging':>32s}{'TIES - task arithmetic':>34s}   (95% CI)")
for size, d in by_size.items():
    print(f"{size:3d}" + "".join(f"{v[0]:+14.4f} [{v[1]:+.4f}, {v[2]:+.4f}]" for v in d.values()))
print("per domain at k = 7 (normalised):", {m: {k: round(v, 3) for k, v in digit_tuned[7][0][m]["normalised"].items()}
                                            for m in digit_methods})
for name, d in (("TIES - averaging", ties_vs_avg), ("TIES - task arithmetic", ties_vs_ta),
                ("task arithmetic - averaging", ta_vs_avg)):
    print(f"k >= 6, {name:28s} {d[0]:+.4f}  95% CI [{d[1]:+.4f}, {d[2]:+.4f}]")
record("digits: normalised accuracy by number of domains (mean over merges)",
       {m: {size: float(np.mean(v)) for size, v in digit_normalised[m].items()} for m in digit_methods})
record("digits: normalised accuracy per domain, mean over the merges that include it",
       {m: {size: {k: float(np.mean([r[m]["normalised"][k] for r in rs if k in r[m]["normalised"]])) for k in domains}
            for size, rs in digit_tuned.items()} for m in digit_methods})
record("digits: chosen hyperparameters", {size: [{m: r[m]["hyper"] for m in digit_methods} for r in rs]
                                          for size, rs in digit_tuned.items()})
record("digits: differences in normalised accuracy by k (estimate, CI)", by_size)
record("digits: k >= 6 differences in normalised accuracy (estimate, CI)",
       {"TIES - averaging": ties_vs_avg, "TIES - task arithmetic": ties_vs_ta, "task arithmetic - averaging": ta_vs_avg})

# %%
print("merging 6-7 digit domains, TIES vs averaging:", verdict(ties_vs_avg))
print("merging 6-7 digit domains, TIES vs task arithmetic with a validation-tuned lambda:", verdict(ties_vs_ta))
claim(9, "TIES (tuned on validation) beats plain averaging when 6-7 digit domains are merged (95% CI above 0)",
      ties_vs_avg[1] > 0, detail=f"TIES - averaging {ties_vs_avg}; TIES - task arithmetic {ties_vs_ta}")

# %% [markdown]
# Read the intervals, not only the curve. These task vectors are *large*, a fifth to a third of the
# base's norm (the soup's base was trained for only 300 steps), their signs disagree on most entries
# and their cosines are 0.1-0.4: there is interference to resolve. Merging two domains keeps about
# 92% of the specialists' accuracy with any method, merging all seven about 85-87%. Plain averaging
# falls behind as $k$ grows because it is task arithmetic with $\lambda = 1/k$, a scale that shrinks
# with every added domain, while validation picks $\lambda \approx 0.3$ for the sum. At $k = 6$-$7$
# TIES is ahead of averaging by about one point of normalised accuracy, but the 95% interval reaches
# just below 0, so on 360 test digits per domain the claim is not established; TIES is **within noise
# of task arithmetic with a tuned $\lambda$**, and validation chose the least trimming on offer
# (density 0.7). Most of what TIES gains over averaging here comes from the size of the update,
# which tuned task arithmetic gets too. The TIES paper's margins over tuned task arithmetic are also
# small next to its margins over averaging, on models with millions of parameters and more tasks.
#
# **Move $\lambda$ yourself.** The slider scales the sum of all seven digit task vectors,
# $\theta_{base} + \lambda\sum_k\tau_k$, from forgetting ($\lambda < 0$) through the base ($\lambda = 0$)
# to extrapolation ($\lambda > 1$), and shows the merged model's test accuracy per domain. Each domain
# has its own best $\lambda$, and no single $\lambda$ is best for all of them: that is interference.
# The grid is computed once below; the slider only redraws.

# %%
digit_lambda_grid = [round(x, 2) for x in np.arange(-1.0, 2.01, 0.1)]
tau_all = sum(d_tau.values())
digit_lambda_scores = digit_scores([tau_all.apply_to(base_state, scale=lam) for lam in digit_lambda_grid])
digit_shown_sets = ["clean", *domains]
digit_lambda_acc = {lam: {k: float(digit_lambda_scores[k][i]) for k in digit_shown_sets} for i, lam in enumerate(digit_lambda_grid)}
digit_styles = dict(zip(digit_shown_sets, ("o-", "s--", "^-.", "d:", "v-", "<--", ">-.", "x:")))


def draw_digit_lambda(lam=1.0):
    fig, (ax_line, ax_bar) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [2, 1]})
    for k in digit_shown_sets:
        ax_line.plot(digit_lambda_grid, [digit_lambda_acc[x][k] for x in digit_lambda_grid], digit_styles[k], ms=3, label=k)
    ax_line.axvline(lam, color="k", lw=1)
    ax_line.set_xlabel(r"$\lambda$"), ax_line.set_ylabel("test accuracy")
    ax_line.set_ylim(0, 1.02)
    ax_line.legend(fontsize=7, loc="lower center", ncol=4)
    ax_line.set_title(r"$\theta_{base} + \lambda \sum_k \tau_k$ (seven digit domains)", fontsize=10)
    at = digit_lambda_acc[min(digit_lambda_grid, key=lambda x: abs(x - lam))]
    ax_bar.bar(digit_shown_sets, [at[k] for k in digit_shown_sets], color=[f"C{i}" for i in range(len(digit_shown_sets))])
    ax_bar.set_ylim(0, 1.02)
    ax_bar.tick_params(axis="x", labelrotation=60, labelsize=8)
    ax_bar.set_title(f"at lambda = {lam:.1f}", fontsize=10)
    plt.tight_layout()
    plt.show()


# %%
# NBVAL_IGNORE_OUTPUT
import ipywidgets as widgets

from labkit.course.interactive import interact  # a slider here; one static figure in headless runs
interact(draw_digit_lambda, lam=widgets.FloatSlider(value=1.0, min=-1.0, max=2.0, step=0.1, description="lambda"))


# %% [markdown]
# ## 5. TIES, DARE and SLERP
#
# **TIES-merging** (Yadav et al. 2023) resolves interference in three steps, per parameter:
#
# 1. **trim**: keep each task vector's largest-magnitude fraction `density` (e.g. 20%), zero the rest;
# 2. **elect** a sign: $\gamma = \mathrm{sign}(\sum_i \hat\tau_i)$, the direction with more total mass;
# 3. **disjoint mean**: average only the trimmed deltas that agree with $\gamma$ (zeros do not count),
#    then $\theta = \theta_{base} + \lambda\,\tau_{merged}$.
#
# mergekit trims each tensor separately; the paper's code trims over the whole model.
# `labkit.merge.merge("ties", ..., trim_scope="model")` offers both (per tensor by default).
#
# ### Exercise 4: trim, elect, disjoint mean (1 point each)
#
# `ties_trim(delta, density)`: keep the `max(1, int(density * numel))` largest-magnitude entries
# (`ValueError` unless 0 < density <= 1). `ties_elect(deltas)`: `deltas` is `[M, ...]`; return the
# sign of the sum over models, +1 where the sum is 0, in `deltas`' dtype. `ties_disjoint_mean(deltas,
# sign)`: per entry, the mean of the deltas whose sign equals `sign`, 0 where none does.

# %% tags=["solution"]
def ties_trim(delta, density):
    """Keep the max(1, int(density * numel)) largest-magnitude entries of delta, zero the rest."""
    ### BEGIN SOLUTION
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = flat.abs().topk(k).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(delta)
    ### END SOLUTION


# %% tags=["tests"]
check("merge.ties_trim", ties_trim)


# %% tags=["solution"]
def ties_elect(deltas):
    """deltas [M, ...] -> the sign of sum_i deltas_i, +1 where the sum is 0."""
    ### BEGIN SOLUTION
    return torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    ### END SOLUTION


# %% tags=["tests"]
check("merge.ties_elect", ties_elect)


# %% tags=["solution"]
def ties_disjoint_mean(deltas, sign):
    """deltas [M, ...], sign [...] -> mean of the deltas agreeing with sign (0 where none)."""
    ### BEGIN SOLUTION
    agree = (deltas.sign() == sign).to(deltas.dtype)
    return (deltas * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    ### END SOLUTION


# %% tags=["tests"]
check("merge.ties_disjoint_mean", ties_disjoint_mean)


# %% [markdown]
# Put the three steps together and check them against `labkit.merge.ties`, which follows mergekit's
# `ties` method tensor for tensor (weights 1, `normalize: true`):

# %%
def ties_merge(base, tensors, density, lam=1.0):
    deltas = torch.stack([ties_trim(t - base, density) for t in tensors])
    return base + lam * ties_disjoint_mean(deltas, ties_elect(deltas))

g = torch.Generator().manual_seed(0)
base_t = torch.randn(64, 32, generator=g)
tuned = [base_t + torch.randn(64, 32, generator=g) for _ in range(3)]
print("your TIES equals labkit.merge.ties:",
      torch.allclose(ties_merge(base_t, tuned, 0.2, 0.8),
                     merge.ties(base_t, tuned, [1, 1, 1], density=0.2, lambda_=0.8), atol=1e-6))

# %% [markdown]
# ### TIES vs task arithmetic vs averaging, as tasks and task vectors grow (claim 9)
#
# Merge the first 2, 4 and all 6 fine-tunes three ways, each with its own hyperparameters chosen on
# validation: **averaging** the fine-tunes ($\theta_{base} + \frac1k\sum\tau_i$, nothing to tune), **task
# arithmetic** ($\theta_{base} + \lambda\sum\tau_i$, $\lambda$ tuned) and **TIES** (density and
# $\lambda$ tuned). Do it for the replay fine-tunes (small task vectors) and the far ones (large, the
# interference TIES was designed against). The score is the mean normalised accuracy on the merged
# tasks, merged / fine-tuned exact match, on the test split (as the TIES paper reports it).

# %%
# (density, lambda); large task vectors need a small lambda, whatever the method
TIES_GRID = by_mode(smoke=[(0.2, 0.1), (0.5, 0.1), (0.5, 0.3), (0.5, 0.5), (0.5, 1.0)],
                    full=[(d, lam) for d in (0.1, 0.2, 0.5) for lam in (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)])
methods = {}
for cond in ("tiny, replay", "tiny, far"):
    for k in (2, 4, 6):
        on = MERGE_TASKS[:k]
        states, tvs_k = [fine_tuned[cond][t] for t in on], [taus[cond][t] for t in on]
        candidates = {
            "averaging": {1.0: merge.merge("linear", states, weight=1.0)},
            "task arithmetic": {lam: sum(tvs_k).apply_to(base_sd, scale=lam) for lam in LAMBDAS},
            "TIES": {(d, lam): merge.merge("ties", states, base_sd, weight=1.0, density=d, **{"lambda": lam})
                     for d, lam in TIES_GRID}}
        for method, cands in candidates.items():
            chosen, test = tuned_merge(cands, on, cond)
            norm = float(np.mean([test[t] / max(ft_test[cond][t][t], 1e-9) for t in on]))
            methods[(cond, k, method)] = {"chosen": chosen, "normalised": norm,
                                          "controls": float(np.mean([test[c] for c in CONTROLS]))}

# %%
# NBVAL_IGNORE_OUTPUT
for cond in ("tiny, replay", "tiny, far"):
    print(f"{cond} (mean ||tau||/||theta|| {np.mean(list(rel_norm[cond].values())):.3f}): test normalised accuracy")
    for k in (2, 4, 6):
        print(f"  {k} tasks: " + ", ".join(f"{m} {methods[(cond, k, m)]['normalised']:.3f} "
                                           f"({methods[(cond, k, m)]['chosen']})"
                                           for m in ("averaging", "task arithmetic", "TIES")))
record("LM merges by method, task count and condition", {f"{c} | {k} tasks | {m}": v for (c, k, m), v in methods.items()})
far = {m: [methods[("tiny, far", k, m)]["normalised"] for k in (2, 4, 6)] for m in ("averaging", "task arithmetic",
                                                                                    "TIES")}
claim(9, "TIES beats plain averaging on merges of large task vectors (far fine-tunes, 2, 4 and 6 tasks on average; "
      "each method tuned on validation)", np.mean(far["TIES"]) > np.mean(far["averaging"]),
      detail=f"far, 2/4/6 tasks: {far}; TIES minus tuned task arithmetic: "
      + ", ".join(f"{c} {k} tasks {methods[(c, k, 'TIES')]['normalised'] - methods[(c, k, 'task arithmetic')]['normalised']:+.3f}"
                  for c in ("tiny, replay", "tiny, far") for k in (2, 4, 6)))
ties_vs_ta = [methods[(c, k, "TIES")]["normalised"] - methods[(c, k, "task arithmetic")]["normalised"]
              for c in ("tiny, replay", "tiny, far") for k in (2, 4, 6)]
print(f"TIES vs task arithmetic with a tuned lambda: ahead in {sum(d > 0.01 for d in ties_vs_ta)} of 6 settings, "
      f"behind in {sum(d < -0.01 for d in ties_vs_ta)}, within 0.01 in the rest")

# %% [markdown]
# Read the table along both axes. Averaging is task arithmetic with $\lambda = 1/k$ fixed; with small
# task vectors the tuned $\lambda$ lands close to it, and the three methods are within a few points of
# each other. With large task vectors every method needs a small $\lambda$ (the far fine-tunes moved
# far outside the region where their effects add up), averaging falls behind, and TIES's trimming and
# sign election help: this is the interference TIES was designed against. Against task arithmetic
# **with a tuned $\lambda$** its advantage is small and not consistent: much of what TIES gains over
# the plain sum comes from shrinking the update, which a tuned $\lambda$ also does. The TIES paper's
# comparisons merge up to eleven fine-tunes of far larger models.
#
# ### DARE: drop and rescale
#
# DARE (Yu et al. 2023) drops each entry of a task vector with probability $p$ and rescales the rest
# so the update keeps its size: by $1/(1-p)$ in the paper, by matching the L1 norm in mergekit
# (labkit offers both; mergekit's is the default). The claim is that fine-tuning deltas are so
# redundant that most of them can be dropped. We apply it to the best pair's merge at its $\lambda$.

# %%
drop_rates = by_mode(smoke=[0.0, 0.5, 0.9, 0.99], full=[0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
pair_fts = [fine_tuned["tiny, replay"][t] for t in best_pair]
pair_lam = pairs[best_pair]["lambda"]
dare = {mode: [skills(merge.merge("dare_linear", pair_fts, base_sd, weight=1.0, density=1 - p, seed=0,
                                  rescale_norm=mode, **{"lambda": pair_lam})) for p in drop_rates]
        for mode in ("l1", "density")}
no_rescale = [skills(merge.merge("dare_linear", pair_fts, base_sd, weight=1.0, density=1 - p, seed=0, rescale=False,
                                 **{"lambda": pair_lam})) for p in drop_rates]

# %%
# NBVAL_IGNORE_OUTPUT
fig, ax = plt.subplots(figsize=(6, 3.4))
mean_new = lambda r: np.mean([r[t] for t in best_pair])  # noqa: E731
# all three start at the same point (p = 0 drops nothing): markers and line styles keep them apart
ax.plot(drop_rates, [mean_new(r) for r in dare["l1"]], "o-", label="rescale: match L1 norm (mergekit)")
ax.plot(drop_rates, [mean_new(r) for r in dare["density"]], "s--", label="rescale: 1/(1-p) (paper)")
ax.plot(drop_rates, [mean_new(r) for r in no_rescale], "^:", label="no rescaling")
ax.axhline(np.mean([base_test["lm/merge-base-tiny"][t] for t in best_pair]), color="grey", lw=0.8, ls=":",
           label="the base")
ax.set_ylim(-0.02, 1.02)
ax.set_xlabel("drop rate p"), ax.set_ylabel(f"exact match, {' and '.join(best_pair)} (mean)")
ax.set_title(f"DARE on the merge of {' + '.join(best_pair)} (lambda {pair_lam})")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
record("DARE: mean exact match of the pair by drop rate", {m: [mean_new(r) for r in rows] for m, rows in
                                                           {**dare, "none": no_rescale}.items()})

# %% [markdown]
# ### SLERP
#
# SLERP interpolates along the arc between two parameter vectors instead of the chord, which keeps
# the norm from shrinking in the middle when the two are far apart: with $\cos\Omega$ the cosine of
# the two tensors, $\theta(t) = \frac{\sin((1-t)\Omega)}{\sin\Omega}\theta_0 +
# \frac{\sin(t\Omega)}{\sin\Omega}\theta_1$, per tensor, falling back to linear interpolation when the
# two are nearly colinear. mergekit's `slerp` takes exactly two models; $t = 0$ is the base model.
# SLERP departs from linear interpolation only where the two tensors point in different
# directions; the printed difference says how far apart the two paths are here (fine-tunes of one
# base are nearly colinear, so it is small).

# %%
ts = by_mode(smoke=[0.0, 0.5, 1.0], full=[0.0, 0.25, 0.5, 0.75, 1.0])
ft_a_sd, ft_b_sd = pair_fts
slerp_path = [skills(merge.merge("slerp", [ft_b_sd], ft_a_sd, t=t)) for t in ts]
lerp_path = [skills(merge.interpolate(ft_a_sd, ft_b_sd, t)) for t in ts]
slerp_mid = merge.merge("slerp", [ft_b_sd], ft_a_sd, t=0.5)
lerp_mid = merge.interpolate(ft_a_sd, ft_b_sd, 0.5)
max_gap = max((slerp_mid[k] - lerp_mid[k]).abs().max().item() for k in ft_a_sd)

# %%
# NBVAL_IGNORE_OUTPUT
fig, ax = plt.subplots(figsize=(6, 3.4))
for t_name, ls in zip(best_pair, ("-", "--")):
    ax.plot(ts, [r[t_name] for r in slerp_path], ls=ls, marker="o", color="C0", label=f"SLERP, {t_name}")
    ax.plot(ts, [r[t_name] for r in lerp_path], ls=ls, marker="x", color="C1", label=f"linear, {t_name}")
ax.set_xlabel(f"t (0 = lm/merge-tiny-ft-{best_pair[0]}, 1 = lm/merge-tiny-ft-{best_pair[1]})")
ax.set_ylabel("exact match")
ax.set_ylim(-0.02, 1.02)
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
print(f"largest parameter difference between SLERP and linear at t = 0.5: {max_gap:.2e}")
record("SLERP vs linear path", {"slerp": slerp_path, "linear": lerp_path})

# %% [markdown]
# ### What makes merging work: distance and width
#
# One figure for the whole section: the quality of the six-task merge (task arithmetic and TIES, each
# tuned on validation; test normalised accuracy) against how far the fine-tunes moved,
# $\|\tau\|/\|\theta\|$, for the two widths and the three kinds of fine-tune. Yadav et al. (2024), "What
# matters for model merging at scale?", find that merging gets easier with model size and harder as
# the experts move away from the base.

# %%
quality = {}
for cond, (base_name, _) in CONDITIONS.items():
    states, tvs_c = list(fine_tuned[cond].values()), list(taus[cond].values())
    base_c = base_states[base_name]
    for method, cands in (("task arithmetic", {lam: sum(tvs_c).apply_to(base_c, scale=lam) for lam in LAMBDAS}),
                          ("TIES", {(d, lam): merge.merge("ties", states, base_c, weight=1.0, density=d,
                                                          **{"lambda": lam}) for d, lam in TIES_GRID})):
        chosen, test = tuned_merge(cands, MERGE_TASKS, cond)
        quality[(cond, method)] = {"distance": float(np.mean(list(rel_norm[cond].values()))), "chosen": chosen,
                                   "normalised": float(np.mean([test[t] / max(ft_test[cond][t][t], 1e-9)
                                                                for t in MERGE_TASKS])),
                                   "gain": float(np.nanmean(gains(test, MERGE_TASKS, cond)))}

# %%
# NBVAL_IGNORE_OUTPUT
WIDTH_MARKERS = {"tiny": "o", "small": "s", "medium": "^"}  # 85k, 0.5M and 1.5M parameters
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for ax, metric, label in ((axes[0], "normalised", "normalised accuracy (merged / fine-tuned)"),
                          (axes[1], "gain", "share of the fine-tunes' gain kept (mean)")):
    for (cond, method), q in quality.items():
        width = cond.split(",")[0]
        ax.scatter(q["distance"], q[metric], marker=WIDTH_MARKERS[width], s=60,
                   color="C0" if method == "task arithmetic" else "C3", alpha=0.8)
        ax.annotate(cond.split(", ")[1], (q["distance"], q[metric]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xlabel(r"mean $\|\tau\| / \|\theta_{base}\|$ of the six fine-tunes"), ax.set_ylabel(label)
    ax.axhline(0, color="grey", lw=0.6)
handles = [plt.Line2D([], [], marker=m, ls="", color="grey", label=f"{w} base") for w, m in WIDTH_MARKERS.items()]
handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=m) for c, m in (("C0", "task arithmetic"), ("C3", "TIES"))]
axes[0].legend(handles=handles, fontsize=8)
fig.suptitle("six-task merges, hyperparameters tuned on validation (test split)", fontsize=10)
plt.tight_layout()
plt.show()
for (cond, method), q in quality.items():
    print(f"{cond:14s} {method:16s} ||tau||/||theta|| {q['distance']:.3f}  normalised {q['normalised']:.3f}  "
          f"gain kept {q['gain']:+.3f}  ({q['chosen']})")
record("merge quality vs distance and width", {f"{c} | {m}": q for (c, m), q in quality.items()})

# %% [markdown]
# Read the figure by distance at equal width, then by width at equal distance. The far fine-tunes
# (right) keep little or none of their gains, whatever the method; TIES loses least there. At the same
# distance the wider base merges better: the small model's six-task merge keeps most of the fine-tunes'
# gains where the tiny one keeps about a third (the measured sweeps, 150 test examples per task:
# normalised 0.55 tiny vs 0.80 small, gain kept 0.31 vs 0.58, in `bench/results/`). Distance is not
# the whole story: the LoRA task vectors are as long as the far ones, yet they are low rank and nearly
# orthogonal to each other (cosines around 0.1) and merge about as well as the replay ones. The medium base learned
# add, max and inc to 0.97 from the same pre-training mixture, so its fine-tunes have gains to keep only
# on sort, rsort and dedupe (its gain is the mean over those), and its normalised accuracy starts high.


# %% [markdown]
# ## 6. The same merge from a mergekit YAML file
#
# Practitioners describe merges in mergekit's YAML format and run them on checkpoints on disk.
# `labkit merge CONFIG.yml OUT_DIR` reads the same format (for the methods above), streams the
# checkpoints tensor by tensor, and gives the same tensors as mergekit for the same config. Write a
# TIES merge of two replay fine-tunes (max and inc) as a config, run the command, and load the result
# with transformers:

# %%
yaml_pair = ("max", "inc")
config = {
    "merge_method": "ties",
    "base_model": str(zoo.path("lm/merge-base-tiny")),
    "models": [{"model": str(zoo.path(f"lm/merge-tiny-ft-{t}")), "parameters": {"weight": 1.0, "density": 0.5}}
               for t in yaml_pair],
    "parameters": {"normalize": True, "lambda": 1.0},
    "dtype": "float32",
}
workdir = Path(tempfile.mkdtemp(prefix="labkit-merge-"))
(workdir / "ties.yml").write_text(yaml.safe_dump(config, sort_keys=False))
print((workdir / "ties.yml").read_text().replace(str(zoo.zoo_root()), "<zoo>"))
result = subprocess.run([sys.executable, "-m", "labkit.cli", "merge", str(workdir / "ties.yml"), str(workdir / "out")],
                        capture_output=True, text=True)
print("labkit merge exit code:", result.returncode)

# %%
from transformers import AutoModelForCausalLM

from_yaml = AutoModelForCausalLM.from_pretrained(workdir / "out", dtype=torch.float32).to(device).eval()
in_memory = merge.merge("ties", [fine_tuned["tiny, replay"][t] for t in yaml_pair], base_sd, weight=1.0, density=0.5,
                        **{"lambda": 1.0})
identical = all(torch.equal(v.cpu(), in_memory[k].cpu()) for k, v in from_yaml.state_dict().items())
print("the YAML merge equals labkit.merge.merge('ties', ...):", identical)
print("files written:", sorted(p.name for p in (workdir / "out").iterdir()))
assert identical, "labkit merge gave different tensors from the in-memory TIES merge of the same config"


# %% [markdown]
# ## Summary
#
# * Averaging parameters needs models that share an initialisation; independent networks differ by
#   a permutation of their hidden units, and weight matching can undo it for MLPs.
# * Averaging checkpoints of one run and souping fine-tunes of one base are cheap ways to get one
#   model. On three ingredient sets the greedy soup never lost on the data it was chosen on, but on
#   test it was within noise of the best single model; the uniform soup was *less* robust under shift
#   than the best single model, because our fine-tunes sit far apart and differ in robustness.
# * Averaging tracks ensembling closely at one model's cost: in distribution the two were within
#   noise, and under shift the averaged fine-tunes often beat their ensemble. Outside a shared
#   initialisation averaging breaks where ensembling does not.
# * Task vectors turn fine-tunes into values: add skills, subtract behaviours, scale them. They need
#   what large pre-trained models give for free: a base that has seen every task (weak skills, not
#   absent ones) and fine-tunes that stay near it (replay of the base's data, small steps). On the zoo's
#   language models built that way, two task vectors add up to both skills, and negating one removes
#   that skill while the base's well-learned skills stay (a random direction of the same size does
#   not remove it). Six at once interfere: the further the fine-tunes moved, the less of their gain any
#   merge keeps, and the wider base keeps more of it than the tiny one. On seven digit domains,
#   negating a task vector removed that domain's skill and kept the others; adding them helped most
#   domains, not all at once.
# * TIES, DARE and SLERP are refinements of the same idea. TIES helps where large task vectors
#   conflict, but against task arithmetic with a validation-tuned $\lambda$ its edge is small and
#   not consistent; tune every method's hyperparameters on validation data before comparing them
#   (and before trusting a leaderboard recipe). mergekit's YAML is how practitioners run them, and
#   `labkit merge` reads it. This run's numbers are in the claims above and in `labkit labs`' report.
