# The source of notebooks/00_welcome.ipynb: a jupytext percent script (cell kinds and tags are described
# in labkit/course/build.py). Edit this file, never the notebook, then build and execute it:
#   labkit build-notebooks 00_welcome
#   LABKIT_MODE=smoke OMP_NUM_THREADS=1 \
#     jupyter nbconvert --to notebook --execute --inplace notebooks/00_welcome.ipynb

# %% [markdown]
# # 00 · Welcome to labkit
#
# This kit is about one question: **you have several models; how do you get one better system out of
# them?** The labs that follow combine models in four places:
#
# | where | methods | lab |
# |---|---|---|
# | outputs | ensembles: linear and log-linear mixtures, learned weights, anti-experts | 01 |
# | weights | merging: averaging, model soups, task vectors, TIES | 02 |
# | inside the network | sparse mixture of experts: a router picks a few experts per token | 03 |
# | training | distillation: a student learns from a teacher (or from an ensemble) | 04 (coming) |
# | time | pipelines and iterative refinement | 05 (coming) |
#
# Not every method works on every set of models. Ensembling and distillation work on *any* models;
# averaging weights needs models with the *same architecture* and, on top of that, the *same
# initialisation* (fine-tunes of one base). Each lab says which family its method needs and shows what
# goes wrong outside it.
#
# This notebook checks your setup, tours the data and the trained models every lab uses, and ends with
# a small graded warm-up so you see how `check(...)` and grading work before the real labs.

# %% [markdown]
# ## 1. Your environment
#
# The kit runs the same notebooks on a laptop CPU, on Colab and on a GPU. Two switches decide how:
#
# * the **device**: `labkit.device.get_device()` picks CUDA, then Apple MPS, then the CPU;
# * the **mode**: `smoke` (small sizes, a few steps: every notebook finishes in minutes on a 2-core CPU)
#   or `full` (the real sizes, the default on a GPU). Set it with the environment variable
#   `LABKIT_MODE=smoke|full` before starting Jupyter. Code picks sizes with
#   `by_mode(smoke=..., full=...)`.
#
# The printed results are the same in both modes: what changes is how long the models train and how
# many examples are evaluated, not the lesson.

# %%
# NBVAL_IGNORE_OUTPUT
import torch

from labkit.device import get_device, run_mode, seed_everything
from labkit.doctor import doctor

doctor()  # versions (and a warning if one is outside the tested range), device, mode, zoo
device = get_device()

# %%
import matplotlib.pyplot as plt
import transformers

transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars in the outputs

from labkit import zoo
from labkit.course.report import claim, record
from labkit.data import TASKS, get_tokenizer, load_digits, make_task_dataset, shift_digits
from labkit.grading import check

seed_everything(0)
print("device type is one of cuda/mps/cpu:", device.type in ("cuda", "mps", "cpu"))
print("mode is one of smoke/full:", run_mode() in ("smoke", "full"))

# %% [markdown]
# ## 2. The data
#
# ### Handwritten digits
#
# Most experiments on small models use scikit-learn's 1,797 handwritten digits: 8x8 grey images,
# flattened to 64 values in [0, 1], with a fixed train / validation / test split. They are real data,
# small enough to train a classifier in seconds on a CPU, and hard enough that models make different
# mistakes, which is what ensembles feed on.
#
# To test **robustness**, the kit also distorts the test images (`shift_digits`): pixel noise, small
# translations, rotations, thicker strokes. A model that is 97% accurate on clean digits may be much
# worse on rotated ones; some combination methods (model soups, for example) help most there.

# %%
digits = load_digits()
for split in ("train", "val", "test"):
    X, y = getattr(digits, f"X_{split}"), getattr(digits, f"y_{split}")
    print(f"{split:5s} X {list(X.shape)} {X.dtype}, y {list(y.shape)} {y.dtype}, classes {y.unique().numel()}")

# %%
kinds = ["clean", "noise", "shift", "rotate", "thicken"]
images = {k: digits.X_test[:10] if k == "clean" else shift_digits(digits.X_test[:10], k) for k in kinds}
fig, axes = plt.subplots(len(kinds), 10, figsize=(10, 5.4))
for r, kind in enumerate(kinds):
    for c in range(10):
        ax = axes[r, c]
        ax.imshow(images[kind][c].view(8, 8).cpu(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
        if c == 0:
            ax.set_ylabel(kind, rotation=0, ha="right", va="center")
        if r == 0:
            ax.set_title(f"label {digits.y_test[c].item()}", fontsize=8)
fig.suptitle("Ten test digits, clean and under the four distribution shifts")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### Small sequence tasks
#
# The language models of the kit are tiny Llama-style transformers trained on tasks whose answers can
# be checked exactly: copy, reverse or sort a string, add two numbers, count a letter, and a free-text
# "chat" task in which some training sentences contain an unwanted word ("darn", the kit's stand-in
# for toxic text). A prompt names its task by a one-letter prefix and ends with `=`; the model writes
# the answer. Because every task is generated from a seed, train and test sets are reproducible, and
# test inputs never appear in training.

# %%
for name, task in TASKS.items():
    ds = make_task_dataset([name], 2, seed=0, split="test" if name != "chat" else "train")
    shown = ",  ".join(f"{p!r} -> {a!r}" for p, a in zip(ds["prompt"], ds["answer"]))
    print(f"{name:5s} ({task.description}): {shown}")

# %%
tok = get_tokenizer()
ids = tok("r:abcd=")["input_ids"]
print("characters are tokens:", ids, "->", repr(tok.decode(ids)))
print("vocabulary size:", tok.vocab_size if hasattr(tok, "vocab_size") else len(tok))

# %% [markdown]
# ## 3. The model zoo
#
# Training is not what this course is about, so every lab starts from **trained checkpoints shipped
# with the kit** (`data/zoo/`, a few MB, each file checked against its SHA-256 when loaded). They are
# designed around the labs:
#
# * several **seeds** of one digit MLP, and **checkpoints along one run** (ensembles);
# * one **base LM** with **fine-tunes** on new tasks, and an **independently initialised twin**
#   (merging and task vectors: which pairs can be averaged?);
# * digit classifiers **fine-tuned from one shared base** with different hyperparameters (model soups);
# * an **expert** and an **anti-expert** chat model (steering generation away from "darn");
# * a larger **teacher** and a smaller **student** (distillation).
#
# `zoo.load(name)` returns the model in eval mode on your device; `zoo.info(name)` its recipe and the
# metrics measured when it was built; `labkit zoo build NAME` retrains an entry from its recipe.

# %%
# NBVAL_IGNORE_OUTPUT
import pandas as pd

def short_metrics(metrics):
    names = {"chat/unwanted_rate": "darn rate"}
    return "  ".join(f"{names.get(k, k.replace('exact_match/', '').replace('_accuracy', ''))} {v:.2f}"
                     for k, v in metrics.items() if isinstance(v, float))

manifest = zoo.read_manifest()["entries"]
table = pd.DataFrame([{"entry": n,
                       "metrics when built (exact match or accuracy)": short_metrics(manifest[n]["metrics"])
                       if n in manifest else "(not built yet)",
                       "description": zoo.RECIPES[n]["description"]} for n in zoo.names()])
pd.set_option("display.max_colwidth", 120)
table

# %%
families = {}
for name in zoo.names():
    families.setdefault(name.split("/")[0], []).append(name)
for family, members in families.items():
    print(f"{family}: {len(members)} entries, e.g. {', '.join(members[:3])}")

# %% [markdown]
# A glimpse of the base language model at work: greedy answers to a few test prompts it has never
# seen. It was trained on copy, reverse and count (plus chat), not on addition or sorting; the
# fine-tunes `lm/ft-add` and `lm/ft-sort` add those skills, and lab 02 merges them back into one model.

# %%
# NBVAL_IGNORE_OUTPUT
from labkit.data import generate_answers

base = zoo.load("lm/base", device=device)
prompts = [make_task_dataset([t], 1, seed=1, split="test")["prompt"][0]
           for t in ("copy", "rev", "count", "add", "sort")]
for prompt, answer in zip(prompts, generate_answers(base, prompts, max_new_tokens=8)):
    print(f"{prompt:16s} -> {answer}")


# %% [markdown]
# ## 4. A graded warm-up
#
# Exercises in the labs look like the ones below: a function with a docstring and a body to write
# between the markers, then a cell that calls `check("question-id", your_function)`. `check` runs the
# question's **visible** tests and prints one line per test case: for a wrong answer it says which
# case, what was expected and what you returned (shapes, dtypes, the largest error and where, and the
# tolerance it allowed); if your code crashes it names the exception and your line, without a
# traceback wall. It never stops the notebook.
#
# When your work is graded, `labkit grade` runs your notebook in a fresh kernel and then the visible
# **and hidden** tests of every question. Each question is scored on its own: a crash, a wrong answer or
# an endless loop in one function costs that question only. Within a question the tests come in groups:
# the **core** group (its idea, always among the visible tests) must pass before the others (edge cases,
# error handling, numerical stability) count. An answer that calls the kit's own implementation of the
# exercise scores 0 for it, with that reason in the feedback: write the computation yourself. (In the
# solution notebook you also see the hidden-test cells; the student version has them removed, and the
# hidden tests themselves stay with your instructor.)
#
# ### Exercise 1: softmax with a temperature (2 points)
#
# $$p_i = \frac{\exp(z_i / T)}{\sum_j \exp(z_j / T)}$$
#
# A temperature $T > 1$ flattens the distribution, $T < 1$ sharpens it. You will meet it again in
# distillation (Hinton et al., 2015, soften the teacher's outputs with $T$) and when sampling from
# language models. Compute it over the last dimension, keep the input's dtype, and raise `ValueError`
# for $T \le 0$. For large logits, `exp` overflows: subtract the row maximum first (it cancels out).

# %% tags=["solution"]
def softmax_with_temperature(logits, temperature=1.0):
    """softmax(logits / T) over the last dimension. logits: [..., C] -> probabilities [..., C]."""
    ### BEGIN SOLUTION
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits / temperature
    z = z - z.max(dim=-1, keepdim=True).values  # exp of a large logit overflows; the shift cancels out
    e = z.exp()
    return e / e.sum(dim=-1, keepdim=True)
    ### END SOLUTION


# %% tags=["tests"]
check("welcome.softmax", softmax_with_temperature)


# %% [markdown]
# Here is what a failing check looks like: this version forgets to divide by the temperature.

# %%
# NBVAL_IGNORE_OUTPUT
def softmax_forgetting_t(logits, temperature=1.0):
    return torch.softmax(logits, dim=-1)

check("welcome.softmax", softmax_forgetting_t)

# %% [markdown]
# With your function, let us look at one digit classifier from the zoo: its probabilities for one test
# digit at three temperatures. Higher temperatures spread the mass over the other classes; the
# *ranking* of the classes never changes.

# %%
from labkit.train import predict_logits

members = [zoo.load(f"digits/mlp-s{s}", device=device) for s in range(5)]
logits = torch.stack([predict_logits(m, digits.X_test.to(device)) for m in members]).cpu()  # [M=5, N, 10]
temps = [0.5, 1.0, 3.0]
probs_t = [softmax_with_temperature(logits[0, 3], t) for t in temps]
fig, axes = plt.subplots(1, 3, figsize=(10, 2.6), sharey=True)
for ax, t, p in zip(axes, temps, probs_t):
    ax.bar(range(10), p.numpy())
    ax.set_title(f"T = {t}")
    ax.set_xticks(range(10))
    ax.set_ylim(0, 1)  # a fixed scale: the flattening is the lesson, not the height of one bar
axes[0].set_ylabel("probability")
fig.suptitle(f"digits/mlp-s0 on test digit #3 (label {digits.y_test[3].item()})")
plt.tight_layout()
plt.show()
entropy = [-(p * p.clamp_min(1e-12).log()).sum().item() for p in probs_t]
print("entropy grows with the temperature:", entropy[0] < entropy[1] < entropy[2])
print("the most likely class is the same at every temperature:", len({int(p.argmax()) for p in probs_t}) == 1)

# %% [markdown]
# The same temperature on a **language model**: the base LM's distribution over its next character,
# for a prompt where it is sure (the reverse of `abcd` starts with `d`) and one where many characters
# fit (a chat sentence after "the cat "). Move the slider: at $T \to 0$ all the mass goes to the top
# character (greedy decoding); at large $T$ the distribution tends to uniform over the vocabulary
# (sampling at a high temperature writes noise). The logits are computed once; the slider only redraws.

# %%
lm_prompts = {"sure: r:abcd= (reverse)": "r:abcd=", "unsure: t:the cat (chat)": "t:the cat "}
with torch.no_grad():
    next_logits = {name: base(torch.tensor([tok(p)["input_ids"]], device=device)).logits[0, -1].float().cpu()
                   for name, p in lm_prompts.items()}  # [V] per prompt
# the 12 characters most likely at T = 1, in that order, so the bars stay put as T moves
shown_ids = {name: z.topk(12).indices for name, z in next_logits.items()}


def draw_next_token(temperature=1.0):
    fig, axes = plt.subplots(1, 2, figsize=(10, 2.8), sharey=True)
    for ax, (name, z) in zip(axes, next_logits.items()):
        p = softmax_with_temperature(z, temperature)
        ids = shown_ids[name]
        ax.bar([repr(tok.decode([int(i)])) for i in ids], p[ids].numpy())
        ent = -(p * p.clamp_min(1e-12).log()).sum().item()
        ax.set_title(f"{name}\nT = {temperature:.2f}, entropy {ent:.2f} nats", fontsize=9)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("P(next character)")
    plt.tight_layout()
    plt.show()


# %%
# NBVAL_IGNORE_OUTPUT
import ipywidgets as widgets

from labkit.course.interactive import interact  # a slider here; one static figure in headless runs
interact(draw_next_token, temperature=widgets.FloatLogSlider(
    value=1.0, base=10, min=-1, max=1, step=0.05, description="T"))


# %% [markdown]
# ### Exercise 2: accuracy (1 point)
#
# The fraction of examples whose highest logit is the true label, as a Python float. Raise `ValueError`
# if the number of rows and labels differ (silently broadcasting a mismatch is a classic bug).

# %% tags=["solution"]
def accuracy(logits, labels):
    """Fraction of rows of logits [N, C] whose argmax equals labels [N], as a float."""
    ### BEGIN SOLUTION
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    return (logits.argmax(dim=-1) == labels).float().mean().item()
    ### END SOLUTION


# %% tags=["tests"]
check("welcome.accuracy", accuracy)

# %%
# NBVAL_IGNORE_OUTPUT
member_acc = [accuracy(logits[m], digits.y_test) for m in range(5)]
for m, acc in enumerate(member_acc):
    print(f"digits/mlp-s{m}: test accuracy {acc:.3f}")
record("digit MLP seeds: test accuracy (mean)", sum(member_acc) / 5)
record("digit MLP seeds: test accuracy (best)", max(member_acc))

# %%
print("every seed is above 90% accurate:", min(member_acc) > 0.9)
print("the seeds do not all score the same:", len(set(member_acc)) > 1)


# %% [markdown]
# ### Exercise 3: averaging the members' probabilities (2 points)
#
# Five MLPs that differ only in their random seed make different mistakes. The simplest ensemble
# averages their predicted distributions, $P(y \mid x) = \sum_m w_m P_m(y \mid x)$ with weights
# $w_m \ge 0$ summing to 1 (uniform by default). Lab 01 is all about this formula and its relatives.
# `probs` has shape [M, N, C] (members, examples, classes); return [N, C]. Raise `ValueError` when the
# weights do not match the members or do not sum to 1.

# %% tags=["solution"]
def average_probs(probs, weights=None):
    """sum_m weights[m] * probs[m]: probs [M, N, C], weights [M] (default uniform) -> [N, C]."""
    M = probs.shape[0]
    ### BEGIN SOLUTION
    if weights is None:
        weights = torch.full((M,), 1.0 / M, dtype=probs.dtype, device=probs.device)
    weights = torch.as_tensor(weights, dtype=probs.dtype, device=probs.device)
    if weights.shape != (M,):
        raise ValueError(f"weights must have shape [{M}] (one per member), got {list(weights.shape)}")
    if (weights < 0).any() or abs(weights.sum().item() - 1.0) > 1e-4:
        raise ValueError(f"weights must be non-negative and sum to 1, got {weights.tolist()}")
    return torch.einsum("m,mnc->nc", weights, probs)
    ### END SOLUTION


# %% tags=["tests"]
check("welcome.average_probs", average_probs)


# %% [markdown]
# Now the ensemble of the five seeds, on the clean test digits and on a noisy copy of them. Besides
# accuracy we look at the **log-loss** (the mean of $-\log P(\text{true label})$), which also sees how
# confident a prediction is, not only whether its argmax is right.

# %%
# NBVAL_IGNORE_OUTPUT
def log_loss(probs, labels):
    """Mean -log P(true label) over examples: probs [N, C], labels [N]."""
    return -probs[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean().item()

X_noisy = shift_digits(digits.X_test, "noise")
noisy_logits = torch.stack([predict_logits(m, X_noisy.to(device)) for m in members]).cpu()  # [M, N, 10]
results = {}
for split, split_logits in [("clean", logits), ("noisy", noisy_logits)]:
    P = softmax_with_temperature(split_logits)  # [M, N, 10]
    ensemble = average_probs(P)                  # [N, 10]
    r = results[split] = {
        "member_acc": [accuracy(P[m], digits.y_test) for m in range(5)],
        "member_loss": [log_loss(P[m], digits.y_test) for m in range(5)],
        "ensemble_acc": accuracy(ensemble, digits.y_test),  # argmax of probabilities = argmax of logits
        "ensemble_loss": log_loss(ensemble, digits.y_test),
    }
    print(f"{split}: seeds accuracy {min(r['member_acc']):.3f}-{max(r['member_acc']):.3f}, "
          f"log-loss {min(r['member_loss']):.3f}-{max(r['member_loss']):.3f}  |  "
          f"ensemble accuracy {r['ensemble_acc']:.3f}, log-loss {r['ensemble_loss']:.3f}")
    record(f"digit MLP seeds, {split} test: best seed accuracy", max(r["member_acc"]))
    record(f"digit MLP seeds, {split} test: ensemble accuracy", r["ensemble_acc"])
    record(f"digit MLP seeds, {split} test: best seed log-loss", min(r["member_loss"]))
    record(f"digit MLP seeds, {split} test: ensemble log-loss", r["ensemble_loss"])

# %%
clean, noisy = results["clean"], results["noisy"]
print("clean digits: the ensemble is within one point of the best seed's accuracy:",
      abs(clean["ensemble_acc"] - max(clean["member_acc"])) < 0.01)
claim(1, "under pixel noise, averaging five seeds gives a lower log-loss than every single seed",
      noisy["ensemble_loss"] < min(noisy["member_loss"]),
      detail=f"ensemble {noisy['ensemble_loss']:.3f} vs best seed {min(noisy['member_loss']):.3f}")


# %% [markdown]
# On clean digits every seed is already about 97% right, so there is little left for the average to
# fix. Under noise the seeds are unsure, each in its own way, and their average puts more probability
# on the right answers than any one of them does. Lab 01 measures when and why that happens.

# %% [markdown]
# ### Exercise 4: how often do two classifiers agree? (1 point)
#
# An ensemble can only fix a mistake if some members get that example right: it gains where its
# members **disagree**. Write the fraction of examples on which two classifiers predict the same label
# (`ValueError` if the shapes differ), then look at all pairs of seeds.

# %% tags=["solution"]
def agreement(pred_a, pred_b):
    """Fraction of positions where two label tensors of the same shape are equal, as a float."""
    ### BEGIN SOLUTION
    if pred_a.shape != pred_b.shape:
        raise ValueError(f"predictions have different shapes: {list(pred_a.shape)} vs {list(pred_b.shape)}")
    return (pred_a == pred_b).float().mean().item()
    ### END SOLUTION


# %% tags=["tests"]
check("welcome.agreement", agreement)

# %%
preds = logits.argmax(dim=-1)  # [M, N]
agree = torch.tensor([[agreement(preds[a], preds[b]) for b in range(5)] for a in range(5)])
errors = preds != digits.y_test  # [M, N]
fixable = (errors.any(0) & ~errors.all(0)).sum().item()  # someone wrong, someone right
record("digit MLP seeds: mean pairwise agreement", ((agree.sum() - 5) / 20).item())
record("digit MLP seeds: test digits some but not all seeds get wrong", fixable)
fig, ax = plt.subplots(figsize=(3.6, 3))
im = ax.imshow(agree.numpy(), cmap="viridis")
ax.set_xticks(range(5)), ax.set_yticks(range(5))
ax.set_xlabel("seed"), ax.set_ylabel("seed")
ax.set_title("agreement on the test set")
fig.colorbar(im)
plt.tight_layout()
plt.show()
print("the seeds agree on most digits but not all:", 0.8 < agree[0, 1].item() < 1.0)
print("some test digits are missed by some seeds but not all:", fixable > 0)

# %% [markdown]
# ## 5. Grading, for instructors
#
# The solution notebooks in `notebooks/` are built from Python sources in `notebooks/src/` (the README
# says how). Solution code and hidden tests sit between nbgrader's markers, so nbgrader users can adopt
# the notebooks as they are: each hidden test cell carries its question's points and fails when a case
# fails, so nbgrader's autograder scores a wrong answer 0. The questions and their visible test cases
# live in the package (`labkit/grading/bank/`); the hidden cases and their reference implementations
# stay with the instructor, in `instructor/bank/` of the repository (`labkit grade --bank DIR` for a
# course's own), never in the package or the student release.
#
# ```bash
# labkit release                              # student versions in release/: stubs, no hidden tests, no outputs
# labkit grade submissions/ --out grades/     # submissions/STUDENT/LAB.ipynb or submissions/STUDENT_LAB.ipynb
# ```
#
# `labkit grade` runs each submission (a copy; the file itself is never modified) in a fresh, sandboxed
# kernel, in parallel across CPU cores; the tests run in the grader, which only asks the kernel to call
# the student's functions on given inputs. It writes `grades/gradebook.csv` (one row per student: points
# per question per lab, totals), `grades/report.md` (per-lab summaries, and every file or student that
# needs a look) and one feedback file per student and lab in `grades/feedback/` with every test case's
# verdict.
#
# **Next:** lab 01, ensembling, starts from the five seeds you just averaged.
