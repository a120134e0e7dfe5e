# The source of notebooks/04_distillation.ipynb: a jupytext percent script (cell kinds and tags are described
# in labkit/course/build.py). Edit this file, never the notebook, then build and execute it:
#   labkit build-notebooks 04_distillation
#   LABKIT_MODE=smoke OMP_NUM_THREADS=1 \
#     jupyter nbconvert --to notebook --execute --inplace notebooks/04_distillation.ipynb

# %% [markdown]
# # 04 · Distillation: one small model that behaves like a big one (or like an ensemble)
#
# An ensemble is accurate and expensive: $M$ models at inference. Merging is cheap but needs models
# that share an initialisation. **Knowledge distillation** gets one cheap model from *any* teacher:
# train a small **student** to match the teacher's **output distribution** instead of (or as well as)
# the hard labels. Hinton, Vinyals & Dean (2015) proposed it to compress an **ensemble** into one
# network; today it is how small language models are made from large ones.
#
# Which models does it need? None of the weight-space conditions: the teacher and the student may have
# different architectures, sizes and initialisations. They only need to share the **output space**
# (the classes, or for language models the tokenizer).
#
# In this lab you will
#
# 1. see what a temperature does to a real teacher's distribution, and why the loss is scaled by $T^2$;
# 2. write the generalised Jensen-Shannon divergence and watch **forward KL cover modes** and **reverse
#    KL seek one** on a toy target;
# 3. write a **top-$k$ cache** of a teacher's outputs and one **distillation training step**;
# 4. distil the digits **ensemble** into one network: how much of its gain survives, and does the
#    student copy the ensemble's **mistakes** too?
# 5. distil a CNN into an MLP, where weight averaging is impossible;
# 6. distil `lm/teacher` into `lm/student` with forward KL, reverse KL and JSD; off-policy, on-policy
#    and sequence-level; from full logits and from a top-$k$ cache;
# 7. put the course's models side by side: accuracy, inference cost, memory, and int8 on top.
#
# Graded exercises: `kd_loss` (2 points), `generalized_jsd` (2), `topk_cache` (2), `distillation_step` (3).

# %%
# NBVAL_IGNORE_OUTPUT
import copy
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from labkit import distill, merge, zoo
from labkit.course.report import claim, record
from labkit.data import get_tokenizer, load_digits, load_digits_shifted, make_task_dataset
from labkit.device import by_mode, device_name, get_device, run_mode, seed_everything
from labkit.ensemble import combine
from labkit.evaluate import exact_match, generate_answers, predict_logits
from labkit.grading import check
from labkit.models import DigitMLP
from labkit.train import train_classifier

device = get_device()
seed_everything(0)
print(f"device: {device_name(device)}, mode: {run_mode()}")

# %% [markdown]
# ## 1. Soft targets and the temperature
#
# A trained classifier says more than its top answer: *which* wrong answers it finds plausible ("this 7
# looks a bit like a 1, not at all like a 0"). Hinton et al. call this the **dark knowledge** in the soft
# targets. A confident teacher hides it in tiny probabilities, so both teacher and student are read at a
# **temperature** $T$:
# $$p_T = \operatorname{softmax}(z_{\text{teacher}} / T), \qquad p_S = \operatorname{softmax}(z_{\text{student}} / T).$$
# $T > 1$ flattens the distribution and brings the small probabilities up; $T \to 0$ keeps only the argmax.
#
# Here is `lm/teacher`'s distribution over the first answer character of an addition prompt. Move the slider.

# %%
tok = get_tokenizer()
teacher_lm = zoo.load("lm/teacher", device=device)
student_lm0 = zoo.load("lm/student", device=device)
prompt = "a:47+38="
with torch.no_grad():
    enc = tok([prompt], return_tensors="pt").to(device)
    next_logits = teacher_lm(**enc).logits[0, -1].float().cpu()
vocab_labels = [tok.convert_ids_to_tokens(i) for i in range(next_logits.numel())]
top_ids = next_logits.topk(10).indices.tolist()


def draw_temperature(T=1.0, ax=None):
    # the teacher's next-character probabilities at temperature T (its 10 most likely characters)
    show = ax is None
    if show:
        _, ax = plt.subplots(figsize=(6, 2.4))
    p = torch.softmax(next_logits / T, dim=-1)
    ax.bar([vocab_labels[i] for i in top_ids], p[top_ids].numpy(), color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_title(f"lm/teacher after '{prompt}', T = {T:g}", fontsize=10)
    ax.set_ylabel("probability")
    if show:
        plt.tight_layout()
        plt.show()


fig, axes = plt.subplots(1, 3, figsize=(12, 2.6), sharey=True)
for ax, T in zip(axes, (0.5, 1.0, 4.0)):
    draw_temperature(T, ax)
plt.tight_layout()
plt.show()

# %% [markdown]
# At $T = 1$ the teacher puts almost all its mass on one character; at $T = 4$ the runners-up appear, and
# they are not random: for this prompt they are the neighbouring digits. A student trained on the tempered
# distribution learns that too, from every example.

# %%
# NBVAL_IGNORE_OUTPUT
import ipywidgets as widgets

from labkit.course.interactive import interact  # a slider here; one static figure in headless runs
interact(draw_temperature, T=widgets.FloatSlider(value=1.0, min=0.25, max=8.0, step=0.25),
         ax=widgets.fixed(None))

# %% [markdown]
# ### Exercise: the soft-target loss
#
# The distillation loss is the **forward** KL divergence from the teacher to the student, at temperature $T$:
# $$\mathcal L = T^2 \cdot \mathrm{KL}(p_T \,\|\, p_S) = T^2 \sum_v p_T(v)\,\big(\log p_T(v) - \log p_S(v)\big).$$
# Write `kd_loss(student_logits, teacher_logits, temperature)` for logits `[..., V]`: sum over the last
# dimension, **average over every other position** (rows of a batch, or all positions of `[B, L, V]`), and
# return a 0-d tensor in the logits' dtype. Requirements the tests check:
#
# * the direction: KL($p_T \| p_S$), not KL($p_S \| p_T$) (careful with `F.kl_div(input, target)`, which
#   computes KL(target ‖ input));
# * the factor $T^2$;
# * finite values for logits near ±1000 (use `log_softmax`, never `softmax(...).log()`);
# * gradients flow to `student_logits` (no `.detach()`, no `.item()`);
# * `ValueError` for $T \le 0$ and for student and teacher logits of different shapes.

# %% tags=["solution"]
def kd_loss(student_logits, teacher_logits, temperature):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over V, averaged over positions."""
    ### BEGIN SOLUTION
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have one shape")
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    per_position = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return temperature ** 2 * per_position.mean()
    ### END SOLUTION


# %% tags=["tests"]
check("distill.kd_loss", kd_loss)

# %% [markdown]
# ### Why $T^2$?
#
# The gradient of KL($p_T \| p_S$) with respect to the student's logits is $(p_S - p_T)/T$ per position.
# For large $T$ both distributions approach uniform and $p_S - p_T \approx (z_S - z_T)/(TV)$ up to a
# shift, so the gradient shrinks like $1/T^2$. Multiplying the loss by $T^2$ undoes that: the soft-target
# gradient keeps the same size whatever $T$, and it can be mixed with the hard-label loss by one weight
# $\alpha$ (Hinton et al. 2015, section 2). Numerically, on the digits ensemble's logits and a fresh student:

# %%
digits = load_digits().to(device)
members = [zoo.load(f"digits/mlp-s{s}", device=device) for s in range(5)]
with torch.no_grad():
    ens_val_logp = combine([predict_logits(m, digits.X_val) for m in members], None, "linear").float()
torch.manual_seed(0)
fresh = DigitMLP(hidden=(128, 128)).to(device)
fresh_logits = predict_logits(fresh, digits.X_val).float()
temperatures = [1.0, 2.0, 4.0, 8.0]
grad_norm = {"with T^2": [], "without T^2": []}
for T in temperatures:
    z = fresh_logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kd_loss(z, ens_val_logp, T), z)
    grad_norm["with T^2"].append(g.norm().item())
    grad_norm["without T^2"].append(g.norm().item() / T ** 2)

# %%
# NBVAL_IGNORE_OUTPUT
print("gradient norm wrt the student's logits")
print("T:            " + "".join(f"{T:>10g}" for T in temperatures))
for name, values in grad_norm.items():
    print(f"{name:13s} " + "".join(f"{v:10.4f}" for v in values))
record("T^2: gradient norms (T = 1, 2, 4, 8)", grad_norm)

# %%
shrink_plain = grad_norm["without T^2"][2] / grad_norm["without T^2"][3]
shrink_scaled = grad_norm["with T^2"][2] / grad_norm["with T^2"][3]
print("without T^2, going from T=4 to T=8 shrinks the gradient about 4x:", 3.0 < shrink_plain < 5.0)
print("with T^2, it stays within a factor 1.5:", 1 / 1.5 < shrink_scaled < 1.5)

# %% [markdown]
# ## 2. Forward KL, reverse KL and the generalised JSD
#
# Forward KL, KL($p_T \| p_S$), is large wherever the teacher has mass that the student lacks: the
# student must **cover every mode** of the teacher, even at the price of mass in between. Reverse KL,
# KL($p_S \| p_T$), is large wherever the *student* puts mass that the teacher lacks: a student too small
# to cover everything **picks one mode** and fits it well (MiniLLM, Gu et al. 2024). GKD (Agarwal et al.
# 2024) interpolates with the **generalised Jensen-Shannon divergence**
# $$m = (1-\beta)\,p_S + \beta\,p_T, \qquad \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(p_T \,\|\, m) + (1-\beta)\,\mathrm{KL}(p_S \,\|\, m),$$
# a mixture of **probabilities**, not of logits. Near the ends $\mathrm{JSD}_\beta \to 0$ (both
# distributions are close to $m$), so GKD and TRL's `generalized_jsd_loss` define the ends as the two KLs:
# $\beta = 0$ is KL($p_T \| p_S$) and $\beta = 1$ is KL($p_S \| p_T$).
#
# ### Exercise: `generalized_jsd(student_logits, teacher_logits, beta)`
#
# At temperature 1 (no $T$ here); logits `[..., V]`, sum over the last dimension, average over the other
# positions, a 0-d tensor in the logits' dtype. Requirements the tests check: $\beta$ weights the teacher
# in $m$ (as above); $\beta = 0$ and $\beta = 1$ return exactly the two KLs; finite results for logits near
# ±1000, including where one distribution's probability underflows to 0 (compute $\log m$ with
# `torch.logsumexp` over the two log-probabilities plus $\log \beta$, $\log(1-\beta)$, and let terms with
# $p = 0$ count 0); `ValueError` for $\beta$ outside $[0, 1]$.

# %% tags=["solution"]
def generalized_jsd(student_logits, teacher_logits, beta):
    """GKD's generalised JSD with m = (1 - beta) p_S + beta p_T; beta = 0 / 1: forward / reverse KL."""
    ### BEGIN SOLUTION
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    log_p_s = F.log_softmax(student_logits, dim=-1)
    log_p_t = F.log_softmax(teacher_logits, dim=-1)

    def kl(log_p, log_q):  # sum_v p (log p - log q), with 0 log 0 = 0
        p = log_p.exp()
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)

    if beta == 0.0:
        return kl(log_p_t, log_p_s).mean()
    if beta == 1.0:
        return kl(log_p_s, log_p_t).mean()
    log_m = torch.logsumexp(torch.stack([log_p_s + math.log(1 - beta), log_p_t + math.log(beta)]), dim=0)
    return (beta * kl(log_p_t, log_m) + (1 - beta) * kl(log_p_s, log_m)).mean()
    ### END SOLUTION


# %% tags=["tests"]
check("distill.generalized_jsd", generalized_jsd)

# %% [markdown]
# ### Mode covering and mode seeking on a toy target
#
# The teacher is a mixture of two bumps on a grid of 241 points; the student can only be **one** bump
# (a discretised Gaussian with a learnable mean and width), started narrow and a little right of the
# middle. We fit it with your `generalized_jsd` at $\beta = 0$ (forward KL), $0.5$ and $1$ (reverse KL).

# %%
grid = torch.linspace(-6, 6, 241, dtype=torch.float64)
bimodal = torch.logsumexp(torch.stack([-(grid + 2.5) ** 2 / (2 * 0.6 ** 2), -(grid - 2.5) ** 2 / (2 * 0.6 ** 2)]), 0)


def fit_one_bump(beta, steps=400):
    mean = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)  # starts narrow, right of the middle
    log_width = torch.tensor(math.log(0.5), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([mean, log_width], lr=0.05)
    for _ in range(steps):
        student = -(grid - mean) ** 2 / (2 * log_width.exp() ** 2)
        loss = generalized_jsd(student[None], bimodal[None], beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mean.item(), log_width.exp().item(), torch.softmax(student.detach(), -1)


fits = {beta: fit_one_bump(beta) for beta in (0.0, 0.5, 1.0)}
plt.figure(figsize=(8, 3))
plt.fill_between(grid.numpy(), torch.softmax(bimodal, -1).numpy(), color="0.85", label="teacher (two modes)")
styles = {0.0: ("tab:blue", "-", "forward KL (beta=0)"), 0.5: ("tab:green", "--", "JSD (beta=0.5)"),
          1.0: ("tab:red", ":", "reverse KL (beta=1)")}
for beta, (mean, width, p) in fits.items():
    color, ls, label = styles[beta]
    plt.plot(grid.numpy(), p.numpy(), color=color, linestyle=ls, linewidth=2, label=label)
plt.xlabel("x")
plt.ylabel("probability")
plt.legend(fontsize=8)
plt.title("one bump fitted to two: forward KL covers, reverse KL seeks", fontsize=10)
plt.tight_layout()
plt.show()

# %%
# NBVAL_IGNORE_OUTPUT
for beta, (mean, width, _) in fits.items():
    print(f"{styles[beta][2]:22s} mean {mean:+.2f}, width {width:.2f}")
record("toy bimodal fits (beta: mean, width)", {str(b): fits[b][:2] for b in fits})

# %%
fwd_mean, fwd_width, _ = fits[0.0]
rev_mean, rev_width, _ = fits[1.0]
print("forward KL: one wide bump centred between the modes:", abs(fwd_mean) < 0.5 and fwd_width > 2.0)
print("reverse KL: a narrow bump on one mode:", abs(abs(rev_mean) - 2.5) < 0.3 and rev_width < 1.0)

# %% [markdown]
# Forward KL spreads one wide bump over both modes and puts most of its mass where the teacher has
# almost none; reverse KL sits on the mode nearest its start and ignores the other (started left of the
# middle, it would pick the left one: reverse KL has a local optimum per mode). JSD at $\beta = 0.5$
# behaves like reverse KL here: it is bounded, so the uncovered mode costs it little.

# %% [markdown]
# ## 3. Caching the teacher: top-$k$ log-probabilities
#
# A live teacher costs a forward pass per training batch, every epoch, for every student. Offline
# distillation (DistillKit) runs the teacher **once** over the dataset and stores what it said. Full
# logits are $V$ numbers per token ($V = 128\,256$ for Llama 3: 256 kB per token in fp16); keeping only
# the **top $k$** token ids and their log-probs costs $k$ ids + $k$ values (about 300 bytes per token at
# $k = 128$). The rest of the distribution is lost, and there are two ways to treat its mass:
#
# * **renormalise**: the target is $p_T$ restricted to the $k$ tokens, divided by their total (the tail
#   is dropped, so the kept tokens look more likely than they are);
# * keep an **"other"** bucket: the $k$ probabilities as they are, plus one entry $1 - \sum_j p_T(i_j)$
#   for everything else (the student's "other" is $1 - \sum_j p_S(i_j)$ over the same ids).
#
# Either way the student's log-probs still come from its **full** vocabulary (its own softmax over all
# $V$); only the teacher is sparse. Top-$k$ targets are biased (the tail is cut); sampling $K$ tokens from
# the teacher instead (`labkit.distill.sampled_cache`) is unbiased at a similar cost.
#
# ### Exercise: `topk_cache(teacher_logits, k, missing)`
#
# From teacher logits `[..., V]` return `(indices, probs, other)`: `indices` `[..., k]` (int64) of the $k$
# most likely tokens in decreasing probability, `probs` `[..., k]` their probabilities, `other` `[...]` the
# missing mass. `missing="other"`: `probs` are the teacher's softmax probabilities and `other` = 1 − their
# sum; `missing="renormalize"`: `probs` are divided by their sum and `other` is 0. `probs` and `other` in
# the logits' dtype; finite for logits near ±1000; $k = V$ keeps everything (`other` = 0). `ValueError` for
# $k$ outside $1..V$ or any other `missing`.

# %% tags=["solution"]
def topk_cache(teacher_logits, k, missing="other"):
    """(indices [..., k], probs [..., k], other [...]) of the teacher's top-k tokens; see the text."""
    ### BEGIN SOLUTION
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in 1..{vocab}, got {k}")
    if missing not in ("other", "renormalize"):
        raise ValueError(f"missing must be 'other' or 'renormalize', got {missing!r}")
    probs, indices = torch.softmax(teacher_logits, dim=-1).topk(k, dim=-1)
    if missing == "renormalize":
        return indices, probs / probs.sum(-1, keepdim=True), torch.zeros_like(probs[..., 0])
    return indices, probs, (1 - probs.sum(-1)).clamp_min(0)
    ### END SOLUTION


# %% tags=["tests"]
check("distill.topk_cache", topk_cache)

# %% [markdown]
# How much of `lm/teacher`'s next-character distribution do the top $k$ keep, on the answer positions of
# some addition and counting prompts? (The kit's vocabulary has only 46 characters, so the storage
# saving is small here; section 6 measures it.)

# %%
lm_tasks = ["add", "count"]
lm_test = make_task_dataset(lm_tasks, by_mode(smoke=200, full=500), seed=41, split="test")
test_batch = distill.offpolicy_batch(lm_test["prompt"], lm_test["answer"], max_len=32, device=device)
answer_mask = distill.shift_labels(test_batch["labels"]) != -100
with torch.no_grad():
    teacher_test_logits = distill.teacher_logits(teacher_lm, test_batch).float()
kept_mass = {}
for k in (1, 2, 4, 8):
    _, _, other = topk_cache(teacher_test_logits[answer_mask], k, "other")
    kept_mass[k] = 1 - other.mean().item()

# %%
# NBVAL_IGNORE_OUTPUT
print("teacher mass kept by the top k on answer tokens:", {k: round(v, 4) for k, v in kept_mass.items()})
record("LM teacher: mass kept by top-k", kept_mass)

# %% [markdown]
# ### Exercise: one distillation training step
#
# Put the pieces together for a **linear** student, `logits = x @ weight.T + bias`. Write
# `distillation_step(weight, bias, x, teacher_logits, labels, temperature, alpha, lr)` that takes **one
# plain SGD step** (new = old − lr · gradient) on Hinton's mixed loss
# $$\mathcal L = \alpha\, T^2\,\mathrm{KL}(p_T \,\|\, p_S) + (1-\alpha)\, \mathrm{CE}(\text{logits at } T = 1, \text{labels}),$$
# both terms averaged over the rows, and returns `(new_weight, new_bias, loss)` with the loss **before**
# the step as a Python float. Requirements the tests check: new tensors, detached (`requires_grad`
# False), the inputs left unchanged; `alpha = 1` works with `labels=None` (soft targets only); `alpha = 0`
# is plain training on the labels; `ValueError` for `alpha` outside $[0, 1]$ or $T \le 0$. Your `kd_loss`
# does the first term; `torch.autograd.grad` gives the gradients.

# %% tags=["solution"]
def distillation_step(weight, bias, x, teacher_logits, labels, temperature, alpha, lr):
    """One SGD step of a linear student on alpha * T^2 KL(p_T || p_S) + (1 - alpha) * CE; see the text."""
    ### BEGIN SOLUTION
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    logits = x @ w.T + b
    loss = alpha * kd_loss(logits, teacher_logits, temperature)
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(logits, labels)
    grad_w, grad_b = torch.autograd.grad(loss, [w, b])
    return (w - lr * grad_w).detach(), (b - lr * grad_b).detach(), loss.item()
    ### END SOLUTION


# %% tags=["tests"]
check("distill.kd_step", distillation_step)

# %% [markdown]
# A few hundred of your steps distil the digits ensemble into a softmax regression (64 pixels → 10 classes):

# %%
with torch.no_grad():
    ens_train_logp = combine([predict_logits(m, digits.X_train) for m in members], None, "linear").float()
w_lin, b_lin = torch.zeros(10, 64, device=device), torch.zeros(10, device=device)
gen = torch.Generator().manual_seed(0)
for step in range(300):
    idx = torch.randint(0, len(digits.X_train), (64,), generator=gen).to(device)
    w_lin, b_lin, _ = distillation_step(w_lin, b_lin, digits.X_train[idx], ens_train_logp[idx],
                                        digits.y_train[idx], 4.0, 0.9, 0.5)
linear_acc = ((digits.X_test @ w_lin.T + b_lin).argmax(-1) == digits.y_test).float().mean().item()

# %%
# NBVAL_IGNORE_OUTPUT
print(f"distilled softmax regression: test accuracy {linear_acc:.3f}")
record("digits: softmax regression distilled with distillation_step, accuracy", linear_acc)

# %%
print("300 distillation steps give a linear student above 85% test accuracy:", linear_acc > 0.85)

# %% [markdown]
# ## 4. Distilling the digits ensemble into one network
#
# The teacher is the ensemble of the five MLP seeds from lab 01 (`digits/mlp-s0..4`, averaged
# probabilities). The student has the members' architecture (64-128-128-10) and is trained two ways from
# the same initialisation and the same batches:
#
# * on the **labels** only (cross-entropy), the single model you would otherwise train;
# * on the ensemble's **soft targets** at $T = 4$ mixed with the labels ($\alpha = 0.9$): `labkit.distill.distill_classifier`.
#
# **The metric.** On the clean test set every model here is at 97-98% accuracy: 360 test digits, so one
# digit is 0.3 points and the ensemble's accuracy gain over a member is one or two digits, noise. The
# **negative log-likelihood** (log-loss) of the true class sees every example and how confident each answer
# is; the ensemble's gain is clear there, so it is the main metric, and accuracy is reported beside it.
# The **fraction of the gain recovered** is
# $$\frac{\mathrm{NLL}(\text{labels}) - \mathrm{NLL}(\text{distilled})}{\mathrm{NLL}(\text{labels}) - \mathrm{NLL}(\text{ensemble})}:$$
# 1 means the distilled student is as good as the ensemble, 0 that distillation did not help.
# (The zoo's members were trained with dropout, which the students do not use: the label-trained student
# is the plain recipe a single small model would get.)

# %%
eval_sets = {"clean": (digits.X_test, digits.y_test)}
for kind in ("noise", "rotate"):
    X_shift, y_shift = load_digits_shifted(kind)
    eval_sets[kind] = (X_shift.to(device), y_shift.to(device))


def scores(logp_fn):
    # {set: (NLL, accuracy)} of a function X -> log-probs
    out = {}
    for name, (X, y) in eval_sets.items():
        logp = logp_fn(X).float()
        out[name] = (F.nll_loss(logp, y).item(), (logp.argmax(-1) == y).float().mean().item())
    return out


def model_logp(model):
    return lambda X: F.log_softmax(predict_logits(model, X).float(), -1)


def ensemble_logp(X):
    return combine([predict_logits(m, X) for m in members], None, "linear")


val_nll = [F.cross_entropy(predict_logits(m, digits.X_val), digits.y_val).item() for m in members]
best_member = members[int(np.argmin(val_nll))]  # chosen on validation data, not on the test set
results = {"best member": scores(model_logp(best_member)), "ensemble (5 MLPs)": scores(ensemble_logp)}

student_seeds = by_mode(smoke=[0, 1], full=[0, 1, 2, 3, 4])
digit_steps = by_mode(smoke=1500, full=2000)
label_students, distilled_students = [], []
for seed in student_seeds:
    torch.manual_seed(seed)
    plain = DigitMLP(hidden=(128, 128)).to(device)
    init = copy.deepcopy(plain)
    train_classifier(plain, digits.X_train, digits.y_train, steps=digit_steps, seed=seed, device=device)
    kd = init
    distill.distill_classifier(kd, members, digits.X_train, digits.y_train, steps=digit_steps, temperature=4.0,
                               alpha=0.9, seed=seed, device=device)
    label_students.append(plain)
    distilled_students.append(kd)


def mean_scores(models):
    per = [scores(model_logp(m)) for m in models]
    return {s: tuple(float(np.mean([p[s][i] for p in per])) for i in range(2)) for s in eval_sets}


results["label-trained student"] = mean_scores(label_students)
results["distilled student"] = mean_scores(distilled_students)
recovered = {s: (results["label-trained student"][s][0] - results["distilled student"][s][0])
             / (results["label-trained student"][s][0] - results["ensemble (5 MLPs)"][s][0]) for s in eval_sets}

# %%
# NBVAL_IGNORE_OUTPUT
print(f"{'':24s}" + "".join(f"{s + ' NLL':>13s}{s + ' acc':>12s}" for s in eval_sets))
for name, row in results.items():
    print(f"{name:24s}" + "".join(f"{row[s][0]:13.4f}{row[s][1]:12.3f}" for s in eval_sets))
print(f"fraction of the ensemble's NLL gain recovered (mean of {len(student_seeds)} student seeds):",
      {s: round(v, 2) for s, v in recovered.items()})
record("digits distillation: (NLL, accuracy) per set", results)
record("digits distillation: fraction of the ensemble's NLL gain recovered", recovered)

# %%
fig, ax = plt.subplots(1, 3, figsize=(12, 3))
for a, s in zip(ax, eval_sets):
    names = list(results)
    a.bar(range(len(names)), [results[n][s][0] for n in names],
          color=["tab:gray", "tab:purple", "tab:orange", "tab:green"])
    a.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=7)
    a.set_title(f"{s} test digits", fontsize=10)
    a.set_ylim(0, 1.15 * max(results[n][s][0] for n in names))
ax[0].set_ylabel("NLL (lower is better)")
plt.tight_layout()
plt.show()

# %%
claim(10, "distilling the digits ensemble recovers most (>50%) of its NLL gain in a single network",
      recovered["clean"] > 0.5, detail=f"recovered {recovered}")
print("the distilled student also beats the label-trained one under both shifts (NLL):",
      all(results["distilled student"][s][0] < results["label-trained student"][s][0] for s in ("noise", "rotate")))

# %% [markdown]
# ### Does the student copy the ensemble's mistakes?
#
# Soft targets carry the teacher's opinion on every example, including the ones where the teacher is
# **wrong**. On the examples the ensemble gets wrong (clean and shifted test digits together, where there
# are enough of them), how often does each student predict the ensemble's very wrong label?
# (`labkit.distill.mistake_agreement`.)

# %%
X_all = torch.cat([X for X, _ in eval_sets.values()])
y_all = torch.cat([y for _, y in eval_sets.values()])
ens_pred = ensemble_logp(X_all).argmax(-1)
copy_rates = {"label-trained": [], "distilled": []}
for name, models in (("label-trained", label_students), ("distilled", distilled_students)):
    for m in models:
        copy_rates[name].append(distill.mistake_agreement(predict_logits(m, X_all).argmax(-1), ens_pred, y_all))
same_mistake = {n: float(np.mean([r["same_mistake"] for r in rs])) for n, rs in copy_rates.items()}
agreement = {n: float(np.mean([r["agreement"] for r in rs])) for n, rs in copy_rates.items()}

# %%
# NBVAL_IGNORE_OUTPUT
print(f"ensemble errors: {copy_rates['distilled'][0]['teacher_errors']} of {len(y_all)} digits")
for n in copy_rates:
    print(f"{n:14s} makes the ensemble's exact mistake on {same_mistake[n]:.1%} of its errors; "
          f"agrees with it on {agreement[n]:.1%} of all digits")
record("digits: same mistake as the ensemble on its errors", same_mistake)
record("digits: agreement with the ensemble", agreement)

# %%
claim(14, "the distilled student copies the ensemble's mistakes more than a label-trained student does",
      same_mistake["distilled"] > same_mistake["label-trained"], detail=f"same mistake {same_mistake}")

# %% [markdown]
# ## 5. Across architectures: a CNN teacher, an MLP student
#
# Weight averaging needs two models whose parameters line up one to one. A CNN and an MLP do not even
# have the same tensors, so there is nothing to average:

# %%
cnn = zoo.load("digits/cnn-s0", device=device)
try:
    merge.uniform_soup([cnn, label_students[0]])
except ValueError as e:
    print("weight averaging refused:", e)

# %% [markdown]
# Distillation only needs the outputs: the CNN (the zoo's best digit model) teaches the same MLP
# architecture as above. `distill_classifier(..., hidden_pairs=[("layers.1", "conv2")])` would also match
# hidden features through a learned projection (FitNets); the outputs are enough here.

# %%
cnn_students = []
for seed in student_seeds:
    torch.manual_seed(seed)
    s = DigitMLP(hidden=(128, 128)).to(device)
    distill.distill_classifier(s, cnn, digits.X_train, digits.y_train, steps=digit_steps, temperature=4.0,
                               alpha=0.9, seed=seed, device=device)
    cnn_students.append(s)
cross = {"CNN teacher": scores(model_logp(cnn)), "MLP, labels": results["label-trained student"],
         "MLP distilled from the CNN": mean_scores(cnn_students)}
cnn_pred = predict_logits(cnn, digits.X_test).argmax(-1)
agree_cnn = {n: float(np.mean([(predict_logits(m, digits.X_test).argmax(-1) == cnn_pred).float().mean().item()
                               for m in ms])) for n, ms in (("labels", label_students), ("distilled", cnn_students))}

# %%
# NBVAL_IGNORE_OUTPUT
for name, row in cross.items():
    print(f"{name:28s}" + "".join(f"  {s}: NLL {row[s][0]:.4f} acc {row[s][1]:.3f}" for s in eval_sets))
print("agreement with the CNN on clean test digits:", {n: round(v, 3) for n, v in agree_cnn.items()})
record("digits: CNN -> MLP distillation (NLL, accuracy)", cross)

# %%
claim(18, "distillation works across architectures (CNN teacher -> MLP student), where weight averaging cannot",
      cross["MLP distilled from the CNN"]["clean"][0] < cross["MLP, labels"]["clean"][0]
      and agree_cnn["distilled"] >= agree_cnn["labels"],
      detail=f"clean NLL {cross['MLP distilled from the CNN']['clean'][0]:.4f} vs {cross['MLP, labels']['clean'][0]:.4f}")

# %% [markdown]
# ## 6. Distilling a language model
#
# `lm/teacher` (0.5M parameters) does addition and counting well; `lm/student` (85k parameters, 6x
# smaller) was trained on the same data **without** a teacher and is weak at both. We continue training
# the student for the same number of steps in several ways and compare
#
# * **exact match** of its greedy answers,
# * the **NLL of the reference answer tokens**, and the forward KL to the teacher on them (how close the
#   student's distribution came to the teacher's),
# * **diversity**: distinct answers among 8 samples per prompt at temperature 1.
#
# The teacher forward passes are counted by `labkit.distill.ForwardCounter` inside `distill_lm`.

# %%
lm_train = make_task_dataset(lm_tasks, by_mode(smoke=2000, full=8000), seed=40)
lm_steps = by_mode(smoke=150, full=800)
lm_batch = 32
div_prompts = list(lm_test["prompt"][: by_mode(smoke=30, full=100)])


def lm_scores(model):
    # exact match, answer-token NLL, forward KL(teacher || model) on answer tokens, distinct samples per prompt
    model.eval()
    with torch.no_grad():
        logits = distill.teacher_logits(model, test_batch).float()
        labels = distill.shift_labels(test_batch["labels"])
        nll = distill.cross_entropy(logits, labels).item()
        kl = distill.forward_kl(logits, teacher_test_logits, labels).item()
    samples = generate_answers(model, [p for p in div_prompts for _ in range(8)], max_new_tokens=8,
                               do_sample=True, seed=0)
    distinct = np.mean([len(set(samples[i * 8:(i + 1) * 8])) for i in range(len(div_prompts))])
    return {"exact_match": exact_match(model, lm_test), "answer_nll": nll, "kl_to_teacher": kl,
            "distinct_of_8": float(distinct), "teacher_calls": 0}


def continue_student(mode, **kwargs):
    student = zoo.load("lm/student", device=device)
    hist = distill.distill_lm(student, None if mode in ("labels", "cached") else teacher_lm, lm_train, lm_steps,
                              mode=mode, batch_size=lm_batch, lr=3e-4, max_new_tokens=8, device=device, **kwargs)
    row = lm_scores(student)
    row["teacher_calls"] = hist["teacher_calls"]
    return row


lm_results = {"teacher": lm_scores(teacher_lm), "student (zoo)": lm_scores(student_lm0),
              "labels": continue_student("labels"),
              "forward KL": continue_student("off_policy", divergence="forward_kl"),
              "reverse KL": continue_student("off_policy", divergence="reverse_kl"),
              "JSD beta=0.5": continue_student("off_policy", divergence="jsd", beta=0.5)}

# %%
# NBVAL_IGNORE_OUTPUT
def show_lm(rows):
    print(f"{'':22s}{'exact match':>12s}{'answer NLL':>12s}{'KL to T':>10s}{'distinct/8':>11s}{'teacher calls':>15s}")
    for name, r in rows.items():
        print(f"{name:22s}{r['exact_match']:12.3f}{r['answer_nll']:12.4f}{r['kl_to_teacher']:10.4f}"
              f"{r['distinct_of_8']:11.2f}{r['teacher_calls']:15d}")


show_lm(lm_results)
record("LM distillation by divergence", lm_results)

# %% [markdown]
# What to expect from the toy: forward KL keeps the student's distribution **wide** (more distinct
# samples), reverse KL makes it **sharp** (fewer distinct samples, the teacher's top answer more often,
# and a worse NLL of the reference answers where the student is unsure, since it puts little mass
# outside its chosen answer). Compare the `distinct/8` and `answer NLL` columns of the two KL rows.
# On these tasks each prompt has **one** right answer and the teacher is nearly deterministic, so the
# teacher's distribution has one dominant mode per prompt and the two divergences can only differ in
# how much of the teacher's small leftover mass they copy. The claim cell is excluded from the output
# comparison: whether it holds at this size can differ between smoke and full mode.

# %%
# NBVAL_IGNORE_OUTPUT
claim(15, "forward KL gives a more diverse student than reverse KL (mode covering vs mode seeking)",
      lm_results["forward KL"]["distinct_of_8"] > lm_results["reverse KL"]["distinct_of_8"],
      detail=f"distinct of 8: forward {lm_results['forward KL']['distinct_of_8']:.2f}, "
             f"reverse {lm_results['reverse KL']['distinct_of_8']:.2f}, "
             f"JSD {lm_results['JSD beta=0.5']['distinct_of_8']:.2f}; exact match "
             f"{lm_results['forward KL']['exact_match']:.3f} / {lm_results['reverse KL']['exact_match']:.3f}")

# %% [markdown]
# ### Whose sequences? Off-policy, on-policy and sequence-level KD
#
# * **off-policy** (word-level KD): the teacher scores the dataset's answers, the student matches it at
#   every answer position (the forward-KL row above);
# * **on-policy** (GKD, Agarwal et al. 2024): the student **samples** its own answers and the teacher
#   scores those, so the student learns on the states it will actually visit at inference (exposure
#   bias: off-policy it never sees its own mistakes);
# * **sequence-level KD** (Kim & Rush 2016): the teacher **writes** the answers once (greedy), and the
#   student trains on them with plain cross-entropy ("distil the narrow task you need").
#
# Off- and on-policy use one teacher forward pass per training step (the same count); sequence-level KD
# pays for generation once, up front.

# %%
lm_results["on-policy (forward KL)"] = continue_student("on_policy", divergence="forward_kl", lmbda=1.0)
lm_results["sequence-level KD"] = continue_student("seq_kd", alpha=0.0)

# %%
# NBVAL_IGNORE_OUTPUT
show_lm({k: lm_results[k] for k in ("student (zoo)", "labels", "forward KL", "on-policy (forward KL)",
                                    "sequence-level KD")})
record("LM distillation by data source", {k: lm_results[k] for k in ("labels", "forward KL",
                                                                     "on-policy (forward KL)", "sequence-level KD")})
on_em, off_em = lm_results["on-policy (forward KL)"]["exact_match"], lm_results["forward KL"]["exact_match"]
print(f"on-policy minus off-policy exact match: {on_em - off_em:+.3f} at "
      f"{lm_results['on-policy (forward KL)']['teacher_calls']} vs {lm_results['forward KL']['teacher_calls']} "
      "teacher calls")

# %%
print("off- and on-policy used the same number of teacher forward passes:",
      lm_results["on-policy (forward KL)"]["teacher_calls"] == lm_results["forward KL"]["teacher_calls"])

# %%
# NBVAL_IGNORE_OUTPUT
claim(16, "on-policy distillation beats off-policy at the same number of teacher forward passes",
      on_em > off_em + 0.02, detail=f"exact match on-policy {on_em:.3f}, off-policy {off_em:.3f}, "
                                   f"labels {lm_results['labels']['exact_match']:.3f}")

# %% [markdown]
# **Reading the numbers honestly.** At this size the methods land within a few points of each other
# (and of training on labels) after the same number of steps; when the gap is under about 0.03 exact
# match (6 of 200 prompts) it is noise, and the claim is reported as not reproduced. Two conditions of
# the published result are missing here:
#
# * **exposure bias needs long generations.** On-policy data matters when a student's early mistake
#   sends it into states the dataset never shows, and that compounds over hundreds of tokens. Our answers
#   are 1-4 characters long: there is almost no "own trajectory" to learn from;
# * **a student with headroom and a long run.** GKD's gains come from thousands of steps on students
#   that are far from their teacher on open-ended tasks; here a few dozen to a few hundred steps continue
#   a student that was already trained, on the very data both models learned from.
#
# The KL-to-teacher column is the more sensitive measure, and it shows the same thing: training on the
# labels moves the student toward the teacher almost as much as distilling does, because the labels
# are the teacher's own training data and the teacher is nearly always right on them (exact match
# 0.96): its soft targets add little beyond the label at this size.

# %% [markdown]
# ### Distilling from a top-$k$ cache
#
# Now the teacher runs **once** over the training set and only its top $k$ log-probs per position are
# kept (`lm_teacher_cache`, with the "other" bucket); training reads the cache instead of calling the
# teacher. The measure is how much of full-logit distillation's move toward the teacher (the drop of
# the KL to the teacher, relative to training on labels) each $k$ keeps, and the bytes per token.

# %%
cache_rows = {}
for k in (1, 4):
    batch_k, cache_k = distill.lm_teacher_cache(teacher_lm, lm_train, kind="topk", k=k, missing="other",
                                                device=device)
    row = continue_student("cached", cache=(batch_k, cache_k))
    store = distill.cache_storage(cache_k, mask=distill.shift_labels(batch_k["labels"]) != -100)
    row.update(bytes_per_token=store["bytes_per_token"], full_bytes_per_token=store["full_bytes_per_token"])
    cache_rows[f"top-{k} cache"] = row
kl_labels, kl_full = lm_results["labels"]["kl_to_teacher"], lm_results["forward KL"]["kl_to_teacher"]
kept_gain = {name: (kl_labels - r["kl_to_teacher"]) / (kl_labels - kl_full) for name, r in cache_rows.items()}

# %%
# NBVAL_IGNORE_OUTPUT
show_lm({"labels": lm_results["labels"], "full logits": lm_results["forward KL"], **cache_rows})
for name, r in cache_rows.items():
    print(f"{name}: {r['bytes_per_token']} bytes per token vs {r['full_bytes_per_token']} for full fp16 logits "
          f"({r['full_bytes_per_token'] / r['bytes_per_token']:.1f}x less); keeps {kept_gain[name]:.0%} of the "
          "KL-to-teacher gain")
record("LM top-k cache", {n: {**r, "kept_gain": kept_gain[n]} for n, r in cache_rows.items()})

# %%
# NBVAL_IGNORE_OUTPUT
claim(17, "a top-4 teacher cache keeps >= 80% of full-logit distillation's gain at a fraction of the storage",
      kl_labels > kl_full and kept_gain["top-4 cache"] >= 0.8,
      detail=f"kept {kept_gain}, KL labels {kl_labels:.4f}, full {kl_full:.4f}")

# %% [markdown]
# The fraction is taken of a small difference (full-logit distillation moves the KL to the teacher only
# a little further than training on labels, see above), so it is noisy; the robust part of the argument
# is the mass the top $k$ keep (section 3: over 99.9% at $k = 4$), which is what bounds what a cache loses.
#
# With 46 characters a full fp16 logit row is only 92 bytes, so the saving here is a few times; with a
# 128k vocabulary a top-128 cache is about 300-800 bytes against 256 kB per token, several hundred
# times less. The cache pays off most where it is needed most.

# %% [markdown]
# ## 7. The course so far, side by side
#
# One table for the digits: the best single model, the ensemble (lab 01), the merged model (the uniform
# soup of lab 02's eight fine-tunes of one base), the distilled student, and the distilled student with
# **int8** weights (`torch.ao.quantization.quantize_dynamic`: Linear weights stored as int8, activations
# quantised on the fly). Inference cost is the number of multiply-adds per digit (every member of an
# ensemble runs), memory the bytes of the weights. Distillation and quantisation **stack**.

# %%
soup_fts = [zoo.load(f"digits/soup-ft{i}", device=device) for i in range(8)]
soup = copy.deepcopy(soup_fts[0])
soup.load_state_dict(merge.uniform_soup(soup_fts))
student = distilled_students[0]
quant = distill.quantization_report(student, digits.X_test, digits.y_test, repeat=by_mode(smoke=5, full=20))
int8_model = distill.quantize_dynamic_int8(student)


def macs(model):  # multiply-adds of the Linear layers per example (the MLPs' whole cost)
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def nbytes(model):  # what the checkpoint costs (torch.save of the state dict)
    return distill.model_size_bytes(model)


closing = {
    "best single model": (results["best member"]["clean"][1], macs(best_member), nbytes(best_member)),
    "ensemble of 5": (results["ensemble (5 MLPs)"]["clean"][1], sum(macs(m) for m in members),
                      sum(nbytes(m) for m in members)),
    "merged (uniform soup)": (scores(model_logp(soup))["clean"][1], macs(soup), nbytes(soup)),
    "distilled student": (quant[0]["accuracy"], macs(student), nbytes(student)),
    "distilled + int8": (quant[1]["accuracy"], macs(student), quant[1]["size_bytes"]),
}

# %%
# NBVAL_IGNORE_OUTPUT
print(f"{'':24s}{'accuracy':>10s}{'MACs/digit':>12s}{'weights (kB)':>14s}")
for name, (acc, cost, mem) in closing.items():
    print(f"{name:24s}{acc:10.3f}{cost:12,d}{mem / 1024:14.1f}")
print("int8 report (CPU, whole test set per call):", [{k: (round(v, 4) if isinstance(v, float) else v)
                                                       for k, v in r.items()} for r in quant])
record("closing table: accuracy, MACs per digit, bytes", closing)

# %%
print("the ensemble costs 5x one member; the merged and distilled models cost one:",
      closing["ensemble of 5"][1] == 5 * closing["best single model"][1]
      and closing["distilled student"][1] == closing["best single model"][1])
print("int8 stores the distilled student in less than a third of its float32 bytes:",
      closing["distilled + int8"][2] < closing["distilled student"][2] / 3)
print("int8 costs at most one point of accuracy:", closing["distilled + int8"][0] >= closing["distilled student"][0] - 0.01)

# %% [markdown]
# ## Summary
#
# * Distillation trains a student on a teacher's soft targets, $T^2\,\mathrm{KL}(p_T \| p_S)$ at a temperature
#   that reveals the teacher's "dark knowledge"; the $T^2$ keeps the gradient's scale independent of $T$.
# * Distilling the digits ensemble into one network recovers most of the ensemble's log-likelihood gain,
#   also under shift (claim 10), and the student inherits the ensemble's mistakes along with its
#   successes (claim 14).
# * Forward KL covers modes, reverse KL seeks one (the toy); on near-deterministic tasks the difference
#   in the students' generations is small (claim 15).
# * On-policy vs off-policy vs sequence-level: at this size and with answers of a few characters, no
#   method wins by more than noise (claim 16); the published gains need long generations and students
#   with headroom.
# * A top-$k$ cache keeps most of full-logit distillation at a fraction of the storage (claim 17).
# * Distillation needs only a shared output space: a CNN teaches an MLP, which no weight average can do
#   (claim 18). Distilled, then int8: one small model at a fraction of the ensemble's cost.
