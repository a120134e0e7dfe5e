# The source of notebooks/01_ensembling.ipynb: a jupytext percent script (cell kinds and tags are described
# in labkit/course/build.py). Edit this file, never the notebook, then build and execute it:
#   labkit build-notebooks 01_ensembling
#   LABKIT_MODE=smoke OMP_NUM_THREADS=1 \
#     jupyter nbconvert --to notebook --execute --inplace notebooks/01_ensembling.ipynb

# %% [markdown]
# # 01 · Ensembling: combining the outputs of several models
#
# Several models make different mistakes. **Ensembling** runs all of them and combines what they
# *output*: class probabilities for a classifier, next-token distributions for a language model. It
# is the most reliable trick for a few extra points, and it works on **any** models whose outputs live
# in the same space: different architectures, initialisations or training data are all fine (for
# language models, "same space" means a shared tokenizer).
#
# What you will do:
#
# 1. write the two combination rules, **linear** ("OR") and **log-linear** ("AND"), and one ensemble
#    decoding step;
# 2. build digit-classifier ensembles from seeds, checkpoints, dropout masks and bootstrap resamples,
#    and measure when and why they beat their best member;
# 3. fit **mixture weights** on about 100 examples (EM) and a per-context **gate**, for language models
#    that specialise in different tasks;
# 4. use a **negative** weight: an anti-expert steers a language model away from an unwanted word;
# 5. generate text token by token with an ensemble of language models, and measure what K members cost.
#
# Graded exercises: `linear_interpolate`, `log_linear_interpolate`, `ensemble_next_token`,
# `bootstrap_indices`, `fit_mixture_weights`.

# %%
# NBVAL_IGNORE_OUTPUT
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from labkit import ensemble as ens
from labkit import zoo
from labkit.course.report import claim, record
from labkit.data import (get_tokenizer, load_digits, load_digits_shifted, make_task_dataset,
                         unwanted_rate)
from labkit.device import by_mode, device_name, get_device, run_mode, seed_everything
from labkit.grading import check

device = get_device()
seed_everything(0)
print(f"device: {device_name(device)}, mode: {run_mode()}")


# %% [markdown]
# ## 1. Two ways to combine distributions
#
# Each member $m$ gives a distribution $P_m(y \mid x)$ over the same outputs $y$ (classes, or the next
# token). Two rules combine them with weights $\lambda_m$:
#
# **Linear interpolation** (a mixture; Jelinek & Mercer, 1980):
# $$P(y \mid x) = \sum_m \lambda_m P_m(y \mid x), \qquad \lambda_m \ge 0,\ \sum_m \lambda_m = 1.$$
# A weighted average of probabilities is already normalised. It behaves like a logical **OR**: an
# output survives if *any* member with some weight likes it. That is also why it is the rule to use
# when a member can give probability 0 (e.g. a word missing from its vocabulary).
#
# **Log-linear interpolation** (a product of experts; Hinton, 2002):
# $$P(y \mid x) = \operatorname{softmax}_y\Big(\sum_m \lambda_m \log P_m(y \mid x)\Big).$$
# The weighted product is *not* normalised, hence the softmax. It behaves like **AND**: an output needs
# every member's approval, and a member that gives it (almost) zero probability **vetoes** it. The
# weights may be negative: a negative member pushes probability *away* from what it likes (section 5).
#
# Both rules take member logits `[M, ..., V]` (member axis first) and weights `[M]` (one per member) or
# `[M, ...]` (a different mix at every position, e.g. predicted by a gate). Return log-probabilities;
# compute in log space: `torch.log_softmax` and `torch.logsumexp` stay finite, while `softmax(...).log()`
# underflows: a probability that rounds to 0 becomes `-inf` (your answer is tested on logits near ±1000).
# Keep the logits' dtype. Both rules raise `ValueError` when the number of weights is not $M$; the
# linear rule also refuses negative weights or weights that do not sum to 1. In the log-linear rule a
# member with weight 0 drops out, even where its log-probability is $-\infty$ ($0 \cdot (-\infty)$ is
# NaN: skip zero-weight terms).

# %% tags=["solution"]
def linear_interpolate(logits, weights):
    """Linear interpolation ("OR"): log sum_m w_m softmax(logits_m).

    logits: [M, ..., V] (member axis first); weights: [M] or [M, ...], >= 0 and summing to 1 over members.
    Returns log-probabilities [..., V].
    """
    ### BEGIN SOLUTION
    weights = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device)
    if weights.ndim == 0 or weights.shape[0] != logits.shape[0]:
        raise ValueError(f"need one weight per member ({logits.shape[0]}), got shape {tuple(weights.shape)}")
    if (weights < 0).any():
        raise ValueError("linear interpolation weights must be non-negative")
    if not torch.allclose(weights.sum(0), torch.ones_like(weights.sum(0)), atol=1e-4):
        raise ValueError("linear interpolation weights must sum to 1 over members")
    w = weights.reshape(*weights.shape, *[1] * (logits.ndim - weights.ndim))  # [M, ..., 1]
    return torch.logsumexp(torch.log(w) + torch.log_softmax(logits, dim=-1), dim=0)
    ### END SOLUTION


# %% tags=["tests"]
check("ensemble.linear_interpolate", linear_interpolate)


# %% tags=["solution"]
def log_linear_interpolate(logits, weights):
    """Log-linear interpolation ("AND"): log_softmax(sum_m w_m log_softmax(logits_m)).

    logits: [M, ..., V]; weights: [M] or [M, ...], any real numbers (negative ones subtract evidence).
    Returns log-probabilities [..., V].
    """
    ### BEGIN SOLUTION
    weights = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device)
    if weights.ndim == 0 or weights.shape[0] != logits.shape[0]:
        raise ValueError(f"need one weight per member ({logits.shape[0]}), got shape {tuple(weights.shape)}")
    w = weights.reshape(*weights.shape, *[1] * (logits.ndim - weights.ndim))
    scaled = w * torch.log_softmax(logits, dim=-1)
    scaled = torch.where(w == 0, torch.zeros_like(scaled), scaled)  # 0 * -inf is NaN: drop zero-weight members
    return torch.log_softmax(scaled.sum(0), dim=-1)
    ### END SOLUTION


# %% tags=["tests"]
check("ensemble.log_linear_interpolate", log_linear_interpolate)

# %% [markdown]
# ### OR vs AND on a constructed example
#
# Two language models complete *"the cat sat on the ..."*. Model A has seen many cats on mats; model B
# many cats on logs. Both find "hat" acceptable. Which word does each rule pick?

# %%
words = ["mat", "hat", "log", "sun", "dog", "darn"]
p_a = torch.tensor([0.70, 0.25, 0.01, 0.02, 0.01, 0.01], dtype=torch.float64)
p_b = torch.tensor([0.01, 0.30, 0.60, 0.05, 0.02, 0.02], dtype=torch.float64)
toy_logits = torch.stack([p_a.log(), p_b.log()])  # [M=2, V=6]
half = torch.tensor([0.5, 0.5], dtype=torch.float64)
p_or = linear_interpolate(toy_logits, half).exp()
p_and = log_linear_interpolate(toy_logits, half).exp()
for name, p in [("A", p_a), ("B", p_b), ("linear (OR)", p_or), ("log-linear (AND)", p_and)]:
    print(f"{name:17s} " + "  ".join(f"{w} {v:.3f}" for w, v in zip(words, p.tolist())) + f"   -> {words[p.argmax()]}")


# %% [markdown]
# The linear mix keeps A's favourite "mat" on top: one enthusiastic member is enough (OR). The
# log-linear mix picks "hat", the only word *both* accept: B's 0.01 for "mat" is a near-veto (AND).
#
# The figure shows both mixes for three weights of model A; the slider below it redraws them for any
# weight (where widgets are not available, the static figure is all you get).

# %%
def draw_mixes(weight_a=0.5, axes=None):
    # bar charts of the linear and the log-linear mix of A and B, with weight_a on model A
    show = axes is None
    if show:
        _, axes = plt.subplots(1, 2, figsize=(9, 2.6), sharey=True)
    w = torch.tensor([weight_a, 1 - weight_a], dtype=torch.float64)
    mixes = {"linear (OR)": linear_interpolate(toy_logits, w).exp(),
             "log-linear (AND)": log_linear_interpolate(toy_logits, w).exp()}
    for ax, (title, p) in zip(axes, mixes.items()):
        colors = ["tab:red" if i == int(p.argmax()) else "tab:blue" for i in range(len(words))]
        ax.bar(words, p.numpy(), color=colors)
        ax.set_title(f"{title}, weight of A = {weight_a:.2f}", fontsize=10)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("P(next word)")
    if show:
        plt.tight_layout()
        plt.show()

fig, grid = plt.subplots(3, 2, figsize=(9, 7), sharey=True)
for row, w_a in zip(grid, (0.2, 0.5, 0.8)):
    draw_mixes(w_a, row)
plt.tight_layout()
plt.show()

# %%
# NBVAL_IGNORE_OUTPUT
import ipywidgets as widgets

from labkit.course.interactive import interact  # a slider here; one static figure in headless runs
interact(draw_mixes, weight_a=widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05),
         axes=widgets.fixed(None))

# %%
sweep = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
top_or = [words[linear_interpolate(toy_logits, torch.stack([w, 1 - w])).argmax()] for w in sweep]
top_and = [words[log_linear_interpolate(toy_logits, torch.stack([w, 1 - w])).argmax()] for w in sweep]
print("words the linear mix picks as A's weight goes 0.05 -> 0.95:", sorted(set(top_or), key=top_or.index))
print("words the log-linear mix picks:                            ", sorted(set(top_and), key=top_and.index))
claim(2, "linear interpolation behaves like OR, log-linear like AND (constructed example)",
      top_or[9] == "mat" and top_and[9] == "hat" and "hat" not in top_or,
      detail=f"weight 0.5: linear -> {top_or[9]}, log-linear -> {top_and[9]}")


# %% [markdown]
# The linear mix only ever picks one member's favourite ("log" or "mat") and jumps between them; the
# compromise "hat" is never on top. The log-linear mix prefers "hat" over a wide middle range of weights.
#
# ### One ensemble decoding step
#
# A language-model ensemble decodes **token by token**: at step $t$ every member scores the next token
# given the same prefix, the scores are combined by a rule, and one token is chosen for everyone
# (greedy: the argmax). Write that step. Member logits are `[M, B, V]` (members, batch, vocabulary);
# return the chosen tokens `[B]` and the combined log-probabilities `[B, V]`. `rule` is `"linear"` or
# `"log_linear"` (whose weights may be negative: an anti-expert); use your two functions.

# %% tags=["solution"]
def ensemble_next_token(member_logits, weights, rule="linear"):
    """One greedy ensemble step: member logits [M, B, V] -> (tokens [B], combined log-probs [B, V])."""
    ### BEGIN SOLUTION
    if rule == "linear":
        logprobs = linear_interpolate(member_logits, weights)
    elif rule == "log_linear":
        logprobs = log_linear_interpolate(member_logits, weights)
    else:
        raise ValueError(f"unknown rule {rule!r}")
    return logprobs.argmax(dim=-1), logprobs
    ### END SOLUTION


# %% tags=["tests"]
check("ensemble.ensemble_next_token", ensemble_next_token)


# %% [markdown]
# ## 2. Digit ensembles: where do members come from, and when do they help?
#
# Ensembling helps because members' **errors are less correlated than their correct answers**: where
# one member is wrong, the others are often right and outvote it. If all members made the same
# mistakes (error correlation 1), averaging them would change nothing. Ways to get members that differ:
#
# | members | how | cost to train |
# |---|---|---|
# | **seeds** | same recipe, different random initialisation and data order | K runs |
# | **checkpoints** | snapshots along one training run | 1 run |
# | **snapshot ensemble** | one run, cyclic learning rate, a snapshot at each low point (Huang et al., 2017) | 1 run |
# | **MC dropout** | dropout kept on at test time: K masks (Srivastava et al., 2014; Gal & Ghahramani, 2016) | 1 run |
# | **bagging** | the same recipe on K bootstrap resamples of the training set (Breiman, 1996) | K runs |
# | **different models** | another architecture (here a small CNN) | another run |
#
# The zoo has five MLP seeds (`digits/mlp-s0..4`, trained with dropout 0.2), five checkpoints of one
# run (`digits/ckpt-100..1500`) and a CNN (`digits/cnn-s0`). We build the others here.
#
# ### Exercise: the bagging resampler
#
# A bootstrap resample draws $n$ indices **with replacement** from $0..n-1$; each resample keeps about
# $1 - 1/e \approx 63\%$ of the distinct examples, so every member sees a different dataset. Every
# index is equally likely, and the $k$ rows differ from each other. Return a `LongTensor [k, n]` that
# is reproducible from `seed` (the same seed gives the same resamples, another seed others: use your own
# `torch.Generator`, not the global RNG) and raise `ValueError` for $n < 1$ or $k < 1$.

# %% tags=["solution"]
def bootstrap_indices(n, k, seed=0):
    """k bootstrap resamples of range(n), drawn with replacement: LongTensor [k, n]."""
    ### BEGIN SOLUTION
    if n < 1 or k < 1:
        raise ValueError(f"need n >= 1 and k >= 1, got n={n}, k={k}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (k, n), generator=generator)
    ### END SOLUTION


# %% tags=["tests"]
check("ensemble.bootstrap_indices", bootstrap_indices)

# %%
from labkit.models import DigitMLP
from labkit.train import predict_logits, train_classifier

digits = load_digits().to(device)
X_rot, y_rot = (t.to(device) for t in load_digits_shifted("rotate"))
K = 5
train_steps = by_mode(smoke=600, full=1500)

seeds = [zoo.load(f"digits/mlp-s{s}", device=device) for s in range(K)]
checkpoints = [zoo.load(f"digits/ckpt-{step}", device=device) for step in (100, 200, 400, 800, 1500)]
cnn = zoo.load("digits/cnn-s0", device=device)

bagged = []
for j, idx in enumerate(bootstrap_indices(len(digits.X_train), K, seed=0)):
    torch.manual_seed(100 + j)
    member = DigitMLP(hidden=(128, 128))
    train_classifier(member, digits.X_train, digits.y_train, steps=train_steps, sample_weight_idx=idx,
                     seed=100 + j, device=device)
    bagged.append(member.eval())

torch.manual_seed(0)
snapshots = ens.train_snapshots(DigitMLP(hidden=(128, 128)).to(device), digits.X_train, digits.y_train,
                                cycles=K, steps_per_cycle=train_steps // K, lr_max=0.05)
print(f"{len(seeds)} seeds, {len(checkpoints)} checkpoints, {len(bagged)} bagged members, "
      f"{len(snapshots)} snapshots, 1 CNN")


# %% [markdown]
# For each kind of ensemble we compare the soft-vote ensemble (a linear mix with uniform weights) with
# its **best member**. "Best" must be chosen the way you would choose it in practice, on the
# **validation** set: picking the member with the highest *test* accuracy is an optimistic,
# test-set-selected baseline. We report accuracy and negative log-likelihood (NLL, lower is better) on
# the clean test set (360 digits) and on rotated test digits (a distribution shift, where members make
# many more errors).

# %%
def member_logprobs_of(models, X):
    return torch.stack([predict_logits(m, X).log_softmax(-1) for m in models]).double()  # [M, N, C]

mc_samples = by_mode(smoke=8, full=32)
kinds = {
    "seeds": lambda X: member_logprobs_of(seeds, X),
    "checkpoints": lambda X: member_logprobs_of(checkpoints, X),
    "snapshots": lambda X: member_logprobs_of(snapshots, X),
    "bagging": lambda X: member_logprobs_of(bagged, X),
    "MC dropout": lambda X: ens.mc_dropout_logits(seeds[0], X, k=mc_samples, seed=0).log_softmax(-1).double(),
    "seeds + CNN": lambda X: member_logprobs_of(seeds + [cnn], X),
}
rows = []
for kind, member_lp in kinds.items():
    val_lp = member_lp(digits.X_val)
    best = int((val_lp.argmax(-1) == digits.y_val).double().mean(-1).argmax())  # chosen on validation
    row = {"ensemble": kind, "members": val_lp.shape[0]}
    for split, (X, y) in {"test": (digits.X_test, digits.y_test), "rotated": (X_rot, y_rot)}.items():
        lp = member_lp(X)
        mix = linear_interpolate(lp, torch.full((lp.shape[0],), 1 / lp.shape[0], dtype=lp.dtype))
        member_acc = (lp.argmax(-1) == y).double().mean(-1)
        row[f"{split} best member"] = member_acc[best].item()
        row[f"{split} mean member"] = member_acc.mean().item()
        row[f"{split} ensemble"] = (mix.argmax(-1) == y).double().mean().item()
        row[f"{split} NLL best"] = F.nll_loss(lp[best], y).item()
        row[f"{split} NLL ensemble"] = F.nll_loss(mix, y).item()
    rows.append(row)

# %%
# NBVAL_IGNORE_OUTPUT
import pandas as pd

table = pd.DataFrame(rows).set_index("ensemble")
record("digits ensembles", table.round(4).to_dict(orient="index"))
table.round(3)

# %%
# NBVAL_IGNORE_OUTPUT
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
x = np.arange(len(rows))
for ax, split in zip(axes, ("test", "rotated")):
    ax.bar(x - 0.27, table[f"{split} mean member"], 0.27, label="mean member")
    ax.bar(x, table[f"{split} best member"], 0.27, label="best member (by validation)")
    ax.bar(x + 0.27, table[f"{split} ensemble"], 0.27, label="ensemble")
    shown = table[[f"{split} mean member", f"{split} best member", f"{split} ensemble"]].values
    ax.set_ylim(max(0.0, shown.min() - 0.03), min(1.0, shown.max() + 0.03))
    ax.set_xticks(x, table.index, rotation=20)
    ax.set_title(f"{split} digits: accuracy")
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %%
acc_wins = [r["ensemble"] for r in rows if r["test ensemble"] > r["test best member"]]
acc_ties = [r["ensemble"] for r in rows if r["test ensemble"] == r["test best member"]]
nll_wins = [r["ensemble"] for r in rows if r["test NLL ensemble"] < r["test NLL best"]]
rot_wins = [r["ensemble"] for r in rows if r["rotated ensemble"] > r["rotated best member"]]
print(f"ensemble kinds: {len(rows)}")
print("ensemble accuracy > its best member's on clean test digits:", len(acc_wins) >= len(rows) / 2)
print("ensemble NLL < its best member's on clean test digits:", len(nll_wins) >= len(rows) / 2)
claim(1, "an ensemble beats its best member (accuracy, clean test, most ensemble kinds)",
      len(acc_wins) > len(rows) / 2,
      detail=f"wins {acc_wins}, ties {acc_ties} of {[r['ensemble'] for r in rows]}; rotated wins {rot_wins}")
claim(1, "an ensemble beats its best member (log-likelihood, clean test, most ensemble kinds)",
      len(nll_wins) > len(rows) / 2, detail=f"NLL wins {nll_wins}")

# %% [markdown]
# Read the table honestly. On 360 clean test digits one example is 0.28 points, so accuracy
# differences of one or two digits are noise; the NLL (which scores the *probabilities*, not just the
# argmax) is the more sensitive measure, and there the ensemble usually wins clearly. Two patterns to
# notice: an ensemble with a member much stronger than the rest (seeds + CNN) can be *worse* than that
# member, because uniform weights let four weaker MLPs outvote the CNN (learned weights, section 3, fix
# exactly this); and ensembles help more on the shifted digits, where members err more and differently.
#
# ### Error correlation and diversity
#
# For members $m, m'$ the **error correlation** is the Pearson correlation between the indicator vectors
# "member $m$ is wrong on example $n$". Below for all sixteen digit members, on rotated test digits
# (where there are enough errors to correlate).

# %%
pool = {**{f"seed{s}": m for s, m in enumerate(seeds)},
        **{f"ckpt{c}": m for c, m in zip((100, 200, 400, 800, 1500), checkpoints)},
        **{f"bag{j}": m for j, m in enumerate(bagged)}, "cnn": cnn}
pool_lp = member_logprobs_of(list(pool.values()), X_rot)  # [16, N, C]
pool_preds = pool_lp.argmax(-1)
corr = ens.error_correlation(pool_preds.cpu(), y_rot.cpu())
fig, ax = plt.subplots(figsize=(6.2, 5.2))
im = ax.imshow(corr.numpy(), cmap="viridis", vmin=0, vmax=1)
ax.set_xticks(range(len(pool)), list(pool), rotation=90)
ax.set_yticks(range(len(pool)), list(pool))
ax.set_title("error correlation on rotated test digits")
fig.colorbar(im)
plt.tight_layout()
plt.show()
off = ~torch.eye(len(pool), dtype=torch.bool)
print("all error correlations are below 1 (members do not fail together):", bool((corr[off] < 1).all()))
print("seeds of one recipe are more correlated than seeds vs the CNN:",
      corr[:5, :5][~torch.eye(5, dtype=torch.bool)].mean().item() > corr[:5, -1].mean().item())

# %% [markdown]
# **Gain against diversity.** Take every pair of members, ensemble the two, and compare the pair's
# accuracy with the mean accuracy of its two members (the *ensemble gain*). If diversity is what
# ensembles feed on, pairs with *lower* error correlation should gain more.

# %%
from itertools import combinations

from scipy.stats import spearmanr

names = list(pool)
pair_corr, pair_gain, pair_dis = [], [], []
member_acc = (pool_preds == y_rot).double().mean(-1)
for a, b in combinations(range(len(names)), 2):
    mix = linear_interpolate(pool_lp[[a, b]], torch.tensor([0.5, 0.5], dtype=torch.float64, device=pool_lp.device))
    pair_gain.append((mix.argmax(-1) == y_rot).double().mean().item() - (member_acc[a] + member_acc[b]).item() / 2)
    pair_corr.append(corr[a, b].item())
    pair_dis.append(ens.pairwise_disagreement(pool_preds[[a, b]].cpu())[0, 1].item())
rho, p_value = spearmanr(pair_corr, pair_gain)
record("pairs: spearman(error correlation, gain)", {"rho": rho, "p": p_value, "pairs": len(pair_gain)})
fig, ax = plt.subplots(figsize=(5.5, 3.6))
ax.scatter(pair_corr, np.array(pair_gain) * 100, s=14, alpha=0.7)
ax.axhline(0, color="gray", lw=0.8)
ax.set_xlabel("error correlation of the pair")
ax.set_ylabel("gain over mean member (points)")
ax.set_title("two-member ensembles on rotated digits")
plt.tight_layout()
plt.show()
print(f"{len(pair_gain)} pairs; most pairs gain:", np.mean(np.array(pair_gain) > 0) > 0.5)
claim(1, "the ensemble gain grows with member diversity (lower error correlation)", rho < 0 and p_value < 0.05,
      detail=f"Spearman rho {rho:.2f} (p={p_value:.1g}) over {len(pair_gain)} pairs")


# %% [markdown]
# ## 3. Learned mixture weights
#
# Uniform weights are a guess. With a few labelled examples we can fit $\lambda$ by **maximum
# likelihood**: maximise $\sum_n \log \sum_m \lambda_m P_m(y_n \mid x_n)$ over the simplex. Only $M-1$
# numbers are fitted, so 50-100 examples are enough, and all we need are the members' probabilities of
# the correct answers, **cached once**: the members need not be loaded while fitting.
#
# The classic algorithm is **expectation-maximisation** (Dempster et al., 1977). Treat "which member
# produced $y_n$" as a hidden variable:
#
# * E-step: the responsibility of member $m$ for example $n$,
#   $r_{mn} = \lambda_m P_m(y_n \mid x_n) / \sum_k \lambda_k P_k(y_n \mid x_n)$;
# * M-step: $\lambda_m = \frac{1}{N}\sum_n r_{mn}$.
#
# Each step stays on the simplex and never lowers the likelihood. Start from uniform weights; work in
# log space (`logsumexp`) because the probabilities of long sequences underflow.
#
# ### Exercise: fit mixture weights with EM
# `target_lp [M, N]` holds $\log P_m(y_n \mid x_n)$; starting from uniform weights, return $\lambda$ `[M]`
# (non-negative, summing to 1, in `target_lp`'s dtype) after `iters` EM steps.

# %% tags=["solution"]
def fit_mixture_weights(target_lp, iters=200):
    """EM for linear-interpolation weights. target_lp: [M, N] member log-probs of the correct outputs -> [M]."""
    ### BEGIN SOLUTION
    M, N = target_lp.shape
    log_w = torch.full((M,), -math.log(M), dtype=target_lp.dtype, device=target_lp.device)
    for _ in range(iters):
        joint = log_w[:, None] + target_lp                    # [M, N]: log w_m P_m(y_n)
        log_r = joint - torch.logsumexp(joint, dim=0)         # E-step: log responsibilities
        log_w = torch.logsumexp(log_r, dim=1) - math.log(N)   # M-step: log of their mean
    return log_w.exp()
    ### END SOLUTION


# %% tags=["tests"]
check("ensemble.fit_mixture_weights", fit_mixture_weights)

# %% [markdown]
# **Back to the seeds + CNN ensemble.** Fit its weights on the validation digits' cached log-probs:

# %%
val_lp = member_logprobs_of(seeds + [cnn], digits.X_val)  # [6, N_val, 10]
w_digits = fit_mixture_weights(ens.target_logprobs(val_lp, digits.y_val), iters=500)
test_lp = member_logprobs_of(seeds + [cnn], digits.X_test)
uniform6 = torch.full((6,), 1 / 6, dtype=torch.float64, device=test_lp.device)
nll_uniform = F.nll_loss(linear_interpolate(test_lp, uniform6), digits.y_test).item()
nll_learned = F.nll_loss(linear_interpolate(test_lp, w_digits), digits.y_test).item()
record("digits seeds+cnn weights", w_digits.tolist())
print("the CNN gets the largest weight:", int(w_digits.argmax()) == 5)
print("learned weights lower the test NLL of seeds + CNN:", nll_learned < nll_uniform)

# %% [markdown]
# ### Specialised language models
#
# The zoo has two fine-tunes of one base LM, `lm/ft-add` (addition) and `lm/ft-sort` (sorting). Each is
# good at its own task and has partly forgotten the other one. Suppose you need *addition*: you have
# about 100 labelled addition examples and both models. We cache each member's log-probability of every
# answer token (`ens.member_logprobs` runs each model once over prompt + answer), fit the weights, and
# compare with uniform weights on **held-out** addition problems: per-token NLL, and exact match when the
# ensemble generates the answers.

# %%
from labkit.data import encode_for_training

tok = get_tokenizer()
ft_add, ft_sort = zoo.load("lm/ft-add", device=device), zoo.load("lm/ft-sort", device=device)
specialists = [ft_add, ft_sort]

def answer_token_logprobs(models, dataset):
    """Cached member log-probs of the answer tokens: ([M, N_tokens, V], targets [N_tokens])."""
    enc = {k: v.to(device) for k, v in encode_for_training(dataset["prompt"], dataset["answer"]).items()}
    lp = ens.member_logprobs(models, enc["input_ids"], enc["attention_mask"]).double()  # [M, B, T, V]
    targets = enc["labels"][:, 1:]                     # position t predicts token t + 1
    keep = targets != -100                             # answer tokens (and <eos>) only
    return lp[:, :, :-1][:, keep], targets[keep]

def generate_with(members, weights, prompts, rule="linear", max_new_tokens=10):
    enc = tok(list(prompts), return_tensors="pt", padding=True).to(device)
    lm = ens.EnsembleLM(members, weights=weights, rule=rule)
    out = lm.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

def exact(answers, dataset):
    return sum(a == b for a, b in zip(answers, dataset["answer"])) / len(answers)

fit_add = make_task_dataset("add", 100, seed=11)                     # ~100 labelled examples
test_add = make_task_dataset("add", by_mode(smoke=150, full=500), seed=12, split="test")
lp_fit, y_fit = answer_token_logprobs(specialists, fit_add)
w_add = fit_mixture_weights(ens.target_logprobs(lp_fit, y_fit), iters=500)
lp_test, y_test_tok = answer_token_logprobs(specialists, test_add)
uniform2 = torch.tensor([0.5, 0.5], dtype=torch.float64, device=device)
nll = {name: F.nll_loss(linear_interpolate(lp_test, w), y_test_tok).item()
       for name, w in [("uniform", uniform2), ("learned", w_add)]}
em = {name: exact(generate_with(specialists, w, test_add["prompt"]), test_add)
      for name, w in [("uniform", uniform2.float()), ("learned", w_add.float())]}
em["ft-add alone"] = exact(generate_with([ft_add], [1.0], test_add["prompt"]), test_add)
record("LM addition: learned weights (ft-add, ft-sort)", w_add.tolist())
record("LM addition: test NLL per token", nll)
record("LM addition: exact match", em)

# %%
# NBVAL_IGNORE_OUTPUT
print("learned weights (ft-add, ft-sort):", [round(w, 3) for w in w_add.tolist()])
print("held-out NLL per answer token:", {k: round(v, 4) for k, v in nll.items()})
print("held-out exact match:", {k: round(v, 3) for k, v in em.items()})

# %%
print("EM puts most weight on the addition expert:", w_add[0].item() > 0.5)
claim(3, "learned mixture weights (~100 examples) beat uniform weights when members specialise",
      nll["learned"] < nll["uniform"] and em["learned"] >= em["uniform"],
      detail=f"NLL {nll['learned']:.4f} vs {nll['uniform']:.4f}; "
             f"exact match {em['learned']:.3f} vs {em['uniform']:.3f}")

# %% [markdown]
# **Per-context weights: a gate.** Fixed weights are right for a single task. On a *mix* of addition
# and sorting prompts, the best weight changes from one context to the next. A **gating network**
# (Jacobs et al., 1991) predicts the weights from features of the context: here, each member's
# entropy and top log-probability at that position (a confident specialist is probably on its own
# task). It is trained by maximum likelihood on the same cached log-probabilities, again without
# running the members (`ens.GatingNetwork`, `ens.train_gate`).

# %%
fit_mixed = make_task_dataset(["add", "sort"], 100, seed=13)
test_mixed = make_task_dataset(["add", "sort"], by_mode(smoke=150, full=500), seed=14, split="test")
lp_fit_m, y_fit_m = answer_token_logprobs(specialists, fit_mixed)
lp_test_m, y_test_m = answer_token_logprobs(specialists, test_mixed)
torch.manual_seed(0)
gate = ens.GatingNetwork(n_members=2, hidden=16).to(device).double()
ens.train_gate(gate, lp_fit_m, y_fit_m, steps=400, lr=1e-2, seed=0)
w_fixed = fit_mixture_weights(ens.target_logprobs(lp_fit_m, y_fit_m), iters=500)
with torch.no_grad():
    gate_w = gate(lp_test_m)                                          # [M, N_tokens]
nll_mixed = {"uniform": F.nll_loss(linear_interpolate(lp_test_m, uniform2), y_test_m).item(),
             "fixed (EM)": F.nll_loss(linear_interpolate(lp_test_m, w_fixed), y_test_m).item(),
             "gate": F.nll_loss(linear_interpolate(lp_test_m, gate_w), y_test_m).item()}
gate_lm = gate.float()
em_mixed = {"uniform": exact(generate_with(specialists, [0.5, 0.5], test_mixed["prompt"]), test_mixed),
            "gate": exact(generate_with(specialists, gate_lm, test_mixed["prompt"]), test_mixed)}
contribution = ens.member_contribution(ens.target_logprobs(lp_test_m, y_test_m), gate_w)
record("LM add+sort: test NLL per token", nll_mixed)
record("LM add+sort: exact match", em_mixed)
record("LM add+sort: member contribution under the gate (ft-add, ft-sort)", contribution.tolist())

# %%
# NBVAL_IGNORE_OUTPUT
print("held-out NLL per answer token:", {k: round(v, 4) for k, v in nll_mixed.items()})
print("held-out exact match:", {k: round(v, 3) for k, v in em_mixed.items()})
print("contribution of each member under the gate (ft-add, ft-sort):", [round(c, 3) for c in contribution.tolist()])

# %%
print("the gate beats uniform weights on mixed tasks (NLL):", nll_mixed["gate"] < nll_mixed["uniform"])
print("the gate beats the best fixed weights on mixed tasks (NLL):", nll_mixed["gate"] < nll_mixed["fixed (EM)"])

# %% [markdown]
# The contribution of a member (its mean responsibility for the correct tokens) answers "how much does
# each member matter?": here both specialists carry a large share, each on its own task. A
# member whose learned weight (or contribution) is near zero can be dropped from the ensemble for free.
#
# ### OR vs AND on real members
#
# What do the two rules do with these two specialists? On addition prompts `lm/ft-sort` has forgotten
# how to add; on sorting prompts `lm/ft-add` has forgotten how to sort. A linear mix lets the member
# that is confident carry the answer (OR). A log-linear mix needs both to agree (AND): a specialist that
# puts almost no probability on the right digit vetoes it.

# %%
by_task = {t: make_task_dataset(t, by_mode(smoke=100, full=400), seed=15, split="test") for t in ("add", "sort")}
or_and = {}
for task, ds in by_task.items():
    or_and[task] = {"ft-add": exact(generate_with([ft_add], [1.0], ds["prompt"]), ds),
                    "ft-sort": exact(generate_with([ft_sort], [1.0], ds["prompt"]), ds),
                    "linear": exact(generate_with(specialists, [0.5, 0.5], ds["prompt"]), ds),
                    "log-linear": exact(generate_with(specialists, [0.5, 0.5], ds["prompt"], rule="log_linear"), ds)}
token_nll = {"linear": F.nll_loss(linear_interpolate(lp_test_m, uniform2), y_test_m).item(),
             "log-linear": F.nll_loss(log_linear_interpolate(lp_test_m, uniform2), y_test_m).item()}
record("LM specialists: exact match by rule", or_and)
record("LM specialists: NLL per answer token on add + sort, by rule", token_nll)

# %%
# NBVAL_IGNORE_OUTPUT
import pandas as pd
print("NLL per answer token on mixed add + sort:", {k: round(v, 3) for k, v in token_nll.items()})
pd.DataFrame(or_and).T.round(3)

# %%
mean_or = sum(r["linear"] for r in or_and.values()) / 2
mean_and = sum(r["log-linear"] for r in or_and.values()) / 2
print("on add + sort, the linear mix keeps more of both skills than the log-linear mix:", mean_or > mean_and)
print("the log-linear mix gives the correct tokens less probability (vetoes):",
      token_nll["log-linear"] > token_nll["linear"])
print("with uniform weights both mixes fall far below the right specialist:",
      max(mean_or, mean_and) < min(or_and["add"]["ft-add"], or_and["sort"]["ft-sort"]))
claim(2, "linear vs log-linear: OR vs AND behaviour on real members",
      mean_or > mean_and and token_nll["log-linear"] > token_nll["linear"],
      detail=f"mean exact match over add and sort: linear {mean_or:.3f}, log-linear {mean_and:.3f}; "
             f"token NLL {token_nll}; {or_and}")

# %% [markdown]
# ## 4. Negative evidence: steering with an anti-expert
#
# Log-linear weights may be negative. **DExperts** (Liu et al., 2021) decodes from
# $$\operatorname{softmax}\big(z_\text{base} + \alpha\,(z_\text{expert} - z_\text{anti-expert})\big),$$
# a log-linear mix with weights $(1, \alpha, -\alpha)$: tokens the anti-expert likes more than the
# expert are pushed down. The experts can be small; only their *difference* matters. **Contrastive
# decoding** (Li et al., 2023; `ens.contrastive_logprobs`) is the same family: a strong model minus a
# weak "amateur", restricted to tokens the strong model finds plausible.
#
# The zoo's `lm/base` was trained on chat sentences of which a quarter contain the unwanted word
# "darn". `lm/chat-clean` (fine-tuned on clean sentences) is the expert, `lm/chat-darn` (fine-tuned on
# sentences that all contain it) the anti-expert. We sample chat sentences and count how many contain
# "darn", then check what the steering costs on the base model's other tasks.

# %%
base = zoo.load("lm/base", device=device)
expert, anti = zoo.load("lm/chat-clean", device=device), zoo.load("lm/chat-darn", device=device)
n_samples = by_mode(smoke=200, full=1000)
chat_prompt = tok(["t:"] * n_samples, return_tensors="pt").to(device)

def sample_chat(members, weights, seed=0):
    lm = ens.EnsembleLM(members, weights=weights, rule="log_linear")
    generator = torch.Generator(device=device).manual_seed(seed)
    out = lm.generate(chat_prompt["input_ids"], chat_prompt["attention_mask"], max_new_tokens=40,
                      do_sample=True, generator=generator, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, chat_prompt["input_ids"].shape[1]:], skip_special_tokens=True)

steer_tasks = make_task_dataset(["copy", "rev", "count"], by_mode(smoke=150, full=600), seed=16, split="test")
alphas = [0.0, 0.5, 1.0, 2.0]
steering = {}
for alpha in alphas:
    members, weights = ([base], [1.0]) if alpha == 0 else ([base, expert, anti], [1.0, alpha, -alpha])
    steering[alpha] = {"darn rate": unwanted_rate(sample_chat(members, weights)),
                       "task exact match": exact(generate_with(members, weights, steer_tasks["prompt"],
                                                               rule="log_linear", max_new_tokens=10), steer_tasks)}
record("DExperts steering by alpha", steering)

# %%
# NBVAL_IGNORE_OUTPUT
print("alpha   'darn' rate   exact match on copy/rev/count")
for alpha, r in steering.items():
    print(f"{alpha:5.1f}   {r['darn rate']:10.3f}   {r['task exact match']:.3f}")
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(alphas, [r["darn rate"] for r in steering.values()], "o-", color="tab:red",
        label="chat samples with 'darn'")
ax.plot(alphas, [r["task exact match"] for r in steering.values()], "s--", color="tab:blue",
        label="exact match, copy/rev/count")
ax.set_ylim(-0.02, 1.02)  # both are fractions: one fixed scale, so neither curve is blown up
ax.set_xlabel("alpha (anti-expert strength)")
ax.set_ylabel("fraction")
ax.legend(fontsize=8)
ax.set_title("DExperts: base + alpha (expert - anti-expert)")
plt.tight_layout()
plt.show()

# %%
before, after = steering[0.0]["darn rate"], steering[0.5]["darn rate"]
print("a mild anti-expert (alpha = 0.5) at least halves the rate of 'darn':", after <= before / 2)
print("strong steering (alpha = 2) costs exact match on copy/rev/count:",
      steering[2.0]["task exact match"] < steering[0.0]["task exact match"])
claim(4, "a negative (anti-expert) coefficient steers generation away from an unwanted behaviour", after < before,
      detail=f"'darn' rate {before:.3f} -> {after:.3f} at alpha=0.5; "
             + "; ".join(f"alpha {a}: rate {r['darn rate']:.3f}, task exact match {r['task exact match']:.3f}"
                         for a, r in steering.items()))


# %% [markdown]
# The anti-expert removes the unwanted word almost completely, but not for free: the chat experts were
# fine-tuned on chat only and have partly forgotten the other tasks, so a large $\alpha$ drags their
# forgetting into the mix. Pick the smallest $\alpha$ that does the job, and always measure the cost on
# what the model should still do.

# %% [markdown]
# ## 5. Token-level ensemble generation
#
# `ens.EnsembleLM` wraps any Hugging Face causal LMs that share a tokenizer. Each step, every member
# reads only the newest token, because each keeps its own **KV cache** (`past_key_values`); prompts of
# different lengths are **left-padded**, with attention masks and position ids that make padding
# invisible. Its outputs are exactly those of a brute-force reference that re-runs every member on the
# whole sequence at every step (the unit tests check this for greedy and sampled decoding, both rules,
# and padded batches); here is a quick check on a few prompts:

# %%
def brute_force_greedy(members, weights, input_ids, attention_mask, steps):
    ids, mask = input_ids, attention_mask
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = torch.stack([m(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
                              for m in members])
        token, _ = ensemble_next_token(logits, weights, "linear")
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids

few = tok(list(make_task_dataset(["copy", "add", "sort"], 6, seed=17, split="test")["prompt"]),
          return_tensors="pt", padding=True).to(device)
with torch.no_grad():
    cached = ens.EnsembleLM([base, ft_add], weights=[0.5, 0.5]).generate(
        few["input_ids"], few["attention_mask"], max_new_tokens=8, ignore_eos=True)
    brute = brute_force_greedy([base, ft_add], torch.tensor([0.5, 0.5], device=device),
                               few["input_ids"], few["attention_mask"], 8)
print("KV-cached ensemble == brute-force recomputation:", torch.equal(cached, brute))

# %% [markdown]
# **One system for five tasks.** `lm/base` does copy, reverse and count; `lm/ft-add` and `lm/ft-sort`
# add one skill each and have forgotten the others. Generate answers for all five tasks with each
# member alone, with uniform linear and log-linear mixes, and with a gate trained (as in section 3) on
# 100 cached examples of the five tasks:

# %%
five = ["copy", "rev", "count", "add", "sort"]
trio, trio_names = [base, ft_add, ft_sort], ["lm/base", "lm/ft-add", "lm/ft-sort"]
lp_fit5, y_fit5 = answer_token_logprobs(trio, make_task_dataset(five, 100, seed=18))
torch.manual_seed(0)
gate5 = ens.GatingNetwork(n_members=3, hidden=16).to(device).double()
ens.train_gate(gate5, lp_fit5, y_fit5, steps=400, lr=1e-2, seed=0)
gate5 = gate5.float()
third = [1 / 3] * 3
systems = {**{name: ([m], [1.0], "linear") for name, m in zip(trio_names, trio)},
           "uniform linear": (trio, third, "linear"), "uniform log-linear": (trio, third, "log_linear"),
           "gated linear": (trio, gate5, "linear")}
per_task = {}
for task in five:
    ds = make_task_dataset(task, by_mode(smoke=40, full=200), seed=19, split="test")
    per_task[task] = {name: exact(generate_with(m, w, ds["prompt"], rule=r), ds) for name, (m, w, r) in systems.items()}
five_em = {name: sum(per_task[t][name] for t in five) / len(five) for name in systems}
record("LM five tasks: exact match per task and system", per_task)
record("LM five tasks: mean exact match", five_em)

# %%
# NBVAL_IGNORE_OUTPUT
table5 = pd.DataFrame(per_task).T
table5.loc["mean"] = table5.mean()
table5.round(3)

# %%
best_member = max(five_em[n] for n in trio_names)
print("the gated ensemble beats every single member on the five tasks:", five_em["gated linear"] > best_member)
print("the gated ensemble beats uniform weights:", five_em["gated linear"] > five_em["uniform linear"])
print("uniform linear beats uniform log-linear (OR keeps each specialist's skill better):",
      five_em["uniform linear"] > five_em["uniform log-linear"])

# %% [markdown]
# ## 6. What K members cost
#
# An ensemble of K models needs K forward passes per token and K models in memory. Memory is often
# the worse of the two: K copies of the weights must sit on the accelerator. Below: the measured time
# to generate answers with K = 1, 2 and 4 members (four of the LMs above), and their parameter memory.

# %%
# NBVAL_IGNORE_OUTPUT
cost_members = [base, ft_add, ft_sort, expert]
prompts = tok(list(make_task_dataset(five, 64, seed=20, split="test")["prompt"]), return_tensors="pt",
              padding=True).to(device)
cost = {}
for k in (1, 2, 4):
    lm = ens.EnsembleLM(cost_members[:k], weights=[1 / k] * k)
    run = lambda: lm.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=10)  # noqa: E731
    run()
    t0 = time.perf_counter()
    for _ in range(3):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / 3
    params = sum(p.numel() * p.element_size() for m in cost_members[:k] for p in m.parameters())
    cost[k] = {"seconds per batch": seconds, "parameter MB": params / 1e6}
    print(f"K={k}: {seconds * 1e3:7.1f} ms per batch of 64 x 10 tokens, {params / 1e6:5.2f} MB of parameters")
record("LM ensemble cost by K", cost)

# %%
print("parameter memory grows linearly with K:",
      abs(cost[4]["parameter MB"] - 4 * cost[1]["parameter MB"]) < 1e-6 * cost[4]["parameter MB"] + 1e-9)


# %% [markdown]
# For members of **one architecture** the K forwards can at least share kernels: stack their weights
# and run all members as one batched call (`ens.stack_members` + `ens.stacked_forward`, built on
# `torch.func.functional_call` and `vmap`). `labkit bench ensemble` measures this for K = 2..16 small
# members; on a GPU small members are launch-bound and the batched path costs close to one member.

# %%
# NBVAL_IGNORE_OUTPUT
def best_time(fn, repeat=20):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)

params, buffers, skeleton = ens.stack_members(seeds)
with torch.no_grad():
    looped = ens.loop_forward(seeds, digits.X_test)
    batched = ens.stacked_forward(params, buffers, skeleton, digits.X_test)
    t_loop = best_time(lambda: ens.loop_forward(seeds, digits.X_test))
    t_batched = best_time(lambda: ens.stacked_forward(params, buffers, skeleton, digits.X_test))
print(f"5 digit MLPs on 360 digits: loop {t_loop * 1e3:.2f} ms, one batched call {t_batched * 1e3:.2f} ms")

# %%
print("the batched forward gives the same outputs as the loop:", torch.allclose(looped, batched, atol=1e-5))

# %% [markdown]
# Even batched, the ensemble still holds K sets of weights. That cost is the motivation for two later
# labs: **merging** (lab 02) averages weights into *one* model, which only works for members that
# share an initialisation, and **distillation** (lab 04) trains one model to imitate the ensemble, for
# any members.
#
# ## Summary
#
# * Linear interpolation is OR (any member can carry an output), log-linear is AND (any member can
#   veto); log-linear weights may be negative (anti-experts, contrastive decoding).
# * Members come from seeds, checkpoints, snapshots, dropout masks, bootstrap resamples, or different
#   models; the ensemble gains where their errors are not correlated.
# * Weights fitted on ~100 examples (EM, or a gate for per-context weights) beat uniform weights when
#   members specialise, using only cached member outputs.
# * Ensembles work on *any* models with a shared output space, at K times the inference cost.
