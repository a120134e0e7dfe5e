# The source of notebooks/03_moe.ipynb: a jupytext percent script (cell kinds and tags are described
# in labkit/course/build.py). Edit this file, never the notebook, then build and execute it:
#   labkit build-notebooks 03_moe
#   LABKIT_MODE=smoke OMP_NUM_THREADS=1 \
#     jupyter nbconvert --to notebook --execute --inplace notebooks/03_moe.ipynb

# %% [markdown]
# # 03 · Sparse mixture of experts
#
# An ensemble runs every member on every input. A **sparse mixture of experts** (MoE) puts the members
# *inside* one network and runs only a few of them per token: a small **router** scores the experts,
# the top $k$ run, and their outputs are mixed with the router's weights. The layer holds $E$ experts'
# parameters but spends the compute of $k$.
#
# This is the idea that the lecture summarises as "multiplying by zero need not be computed": sparsity
# at the level of whole blocks. Which models does it need? An MoE layer is **trained as part of one
# model**; *sparse upcycling* needs one **trained dense model** to copy; the mergekit-style "MoE" of
# section 8 needs dense models with the **same architecture**, and in practice fine-tunes of one base.
#
# In this lab you will
#
# 1. build the gate and a top-$k$ MoE layer step by step, and count its FLOPs;
# 2. train a dense model and an MoE with the **same active parameters** on the kit's tasks;
# 3. see what the **load-balancing loss** does (and what happens without it), and what capacity limits drop;
# 4. look at **what the experts specialise in**;
# 5. write **sort-based dispatch**, the trick that makes MoE fast on a GPU with many tokens per expert,
#    and time the dispatch strategies (on a tiny CPU case it loses, and we see why);
# 6. **upcycle** the zoo's dense model into an MoE and keep training it;
# 7. build a mergekit-style "MoE" from two fine-tunes and compare it with a trained MoE.
#
# Graded exercises: `top_k_gating` (2 points), `load_balancing_loss` (2), `sort_by_expert` (1),
# `sort_dispatch` (3).

# %%
import copy
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from labkit import moe, zoo
from labkit import moe_dispatch as md
from labkit.course.report import claim, record
from labkit.data import encode_for_training, exact_match, get_tokenizer, make_task_dataset
from labkit.device import by_mode, get_device, seed_everything
from labkit.grading import check
from labkit.models import count_parameters, make_llama
from labkit.train import train_lm

device = get_device()
seed_everything(0)
print("ready")


# %% [markdown]
# ## 1. The gate
#
# Shazeer et al. (2017, *Outrageously large neural networks*) gate each token $x$ with a linear
# router $W_g \in \mathbb{R}^{E \times D}$: keep the $k$ largest scores, softmax over them, and send
# the token to those $k$ experts only,
#
# $$G(x) = \mathrm{softmax}\big(\mathrm{KeepTopK}(W_g x, k)\big), \qquad
#   y = \sum_{e \in \mathrm{TopK}(x)} G(x)_e \, E_e(x).$$
#
# Mixtral writes the same gate as *softmax over all experts, keep the top $k$, renormalise them to
# sum to one*; the two give identical weights. Routers compute in **float32** even in a bf16 model:
# near-ties between experts flip under low precision, and a flipped choice is a different expert.
#
# ### Exercise 1: top-k gating (2 points)
#
# Return the renormalised top-$k$ probabilities and the chosen experts, both `[T, k]` (the order of the
# $k$ experts of a token is free). Compute in float32, so bf16 or fp16 logits give float32 weights
# (keep float64 inputs in float64); use `torch.softmax`, which stays finite for logits near ±1000; raise
# `ValueError` unless $1 \le k \le E$.

# %% tags=["solution"]
def top_k_gating(logits, k):
    """Mixtral's gate: softmax over experts, keep the top k, renormalise them to sum to 1.

    logits: [T, E] router logits -> (weights [T, k] float32, experts [T, k] int64).
    """
    ### BEGIN SOLUTION
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, {logits.shape[-1]}], got {k}")
    probs = torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    weights, experts = torch.topk(probs, k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts
    ### END SOLUTION


# %% tags=["tests"]
check("moe.top_k_gating", top_k_gating)


# %% [markdown]
# ### A top-$k$ MoE layer in a dozen lines
#
# Each expert is a SwiGLU feed-forward block, $E_e(x) = W^{down}_e\,(\mathrm{silu}(W^{gate}_e x)
# \odot W^{up}_e x)$, stored the way transformers stores Mixtral's experts: one tensor
# `gate_up_proj` `[E, 2F, D]` (gate rows, then up rows) and one `down_proj` `[E, D, F]`. The simplest
# correct layer loops over experts and gathers the tokens that chose each one:

# %%
def tiny_moe(x, router_weight, gate_up_proj, down_proj, k):
    """x [T, D] -> [T, D]: route with top_k_gating, run each expert on its tokens, mix."""
    weights, experts = top_k_gating(x @ router_weight.T, k)  # [T, k], [T, k]
    y = torch.zeros_like(x)
    for e in range(router_weight.shape[0]):
        token, slot = torch.where(experts == e)  # the tokens that chose expert e, and in which slot
        if len(token) == 0:
            continue
        gate, up = (x[token] @ gate_up_proj[e].T).chunk(2, dim=-1)
        out = (F.silu(gate) * up) @ down_proj[e].T
        y.index_add_(0, token, weights[token, slot, None] * out)
    return y


torch.manual_seed(0)
layer = moe.MoELayer(hidden_size=16, intermediate_size=32, num_experts=8, top_k=2, init_std=0.2)
x = torch.randn(10, 16)
with torch.no_grad():
    mine = tiny_moe(x, layer.router.weight, layer.experts.gate_up_proj, layer.experts.down_proj, k=2)
    print("tiny_moe == labkit.moe.MoELayer:", torch.allclose(mine, layer(x), atol=1e-6))
    print("experts chosen by the first 3 tokens:", layer.last_experts[:3].tolist())

# %% [markdown]
# `labkit.moe.MoELayer` uses the same weight layout as transformers, so a Mixtral block converts with
# its weights and gives the same outputs (and Qwen2-MoE / Qwen3-MoE blocks too):

# %%
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

config = MixtralConfig(hidden_size=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
config._experts_implementation = "eager"  # what a full model would pick on this device; a bare block needs it set
block = MixtralSparseMoeBlock(config)
with torch.no_grad():
    for p in block.parameters():
        p.normal_(0, 0.2)
    ours = moe.MoELayer.from_transformers(block)
    h = torch.randn(2, 5, 16)
    print("same outputs as transformers' MixtralSparseMoeBlock:", torch.allclose(ours(h), block(h), atol=1e-6))

# %% [markdown]
# ## 2. What sparsity saves: FLOPs
#
# A SwiGLU expert costs $3 \cdot 2DF$ FLOPs per token (three $D \times F$ matmuls). Running $k$ of $E$
# experts costs $k/E$ of running them all: **top-2 of 8 does a quarter of the expert work**, while
# the layer keeps all eight experts' parameters. We count the matmul FLOPs PyTorch actually executes
# (`FlopCounterMode`) for a Mixtral-shaped layer, with every expert vs with the top 2.

# %%
D, Fw, E, k, T = 64, 224, 8, 2, 32  # Mixtral's shape ratios (D : F = 4096 : 14336), scaled down
torch.manual_seed(0)
gate_up, down = torch.randn(E, 2 * Fw, D) * 0.02, torch.randn(E, D, Fw) * 0.02
x = torch.randn(T, D)
weights, experts = top_k_gating(torch.randn(T, E), k)


def counted_flops(experts, weights):
    with FlopCounterMode(display=False) as counter:
        md.dispatch(x, experts, weights, gate_up, down, backend="loop")
    return counter.get_total_flops()


all_experts = torch.arange(E).expand(T, E)
flops_all = counted_flops(all_experts, torch.full((T, E), 1 / E))
flops_topk = counted_flops(experts, weights)
print(f"matmul FLOPs, all {E} experts: {flops_all:,}   top-{k}: {flops_topk:,}")
print(f"ratio {flops_all / flops_topk:.2f}, E/k = {E / k:.2f}; formula 2*T*k*3*D*F = {md.expert_flops(T, k, D, Fw):,}")
mixtral = moe.moe_flops(1, 4096, 14336, 8, 2)
print(f"Mixtral-8x7B, one token, one layer: {mixtral['all_experts'] / 1e9:.2f} GFLOP for all experts, "
      f"{mixtral['routed'] / 1e9:.2f} GFLOP routed")
record("expert FLOPs ratio all/top-k", flops_all / flops_topk)
claim(11, "top-k routing cuts the expert FLOPs by E/k (top-2 of 8: 4x)", abs(flops_all / flops_topk - E / k) < 1e-9,
      detail=f"{flops_all} vs {flops_topk} FLOPs")

# %% [markdown]
# Fewer FLOPs is not automatically less time. A small model is **memory-bound**: reading the weights
# costs more than multiplying by them, and an MoE layer has *more* weights to read. The gain shows at
# large sizes, and only if the implementation batches the tokens well (section 5).
#
# ## 3. Dense vs MoE at equal active parameters
#
# The fair comparison: an MoE whose *active* parameters per token equal the dense model's. The dense
# model (`make_llama("tiny")`) has MLPs of width 128; the MoE has 8 experts of width 64 and routes
# each token to 2, so each token sees 2 x 64 = 128 units: the same FLOPs per token, 4x the MLP
# parameters. Both train on the kit's task mix (copy, reverse, sort, add, count) with the same data,
# seed, steps and learning rate; the MoE adds 0.01 x the load-balancing loss (next section).

# %%
TASKS = ["copy", "rev", "sort", "add", "count"]
STEPS = by_mode(smoke=300, full=3000)
train_data = make_task_dataset(TASKS, by_mode(smoke=6000, full=40000), seed=0)
test_data = make_task_dataset(TASKS, by_mode(smoke=250, full=1000), seed=0, split="test")
test_batch = {k_: v.to(device) for k_, v in encode_for_training(list(test_data["prompt"]),
                                                               list(test_data["answer"])).items()}


@torch.no_grad()
def answer_loss(model):
    """Mean cross-entropy of the answer tokens of the held-out prompts."""
    model.eval()
    return model(**test_batch).loss.item()


def moe_llama(aux_loss_coef=0.01, **kw):
    model = make_llama("tiny", seed=0)
    return moe.moefy(model, num_experts=8, top_k=2, upcycle=False, intermediate_size=64,
                     aux_loss_coef=aux_loss_coef, **kw)


def train(model, steps=STEPS, data=train_data, lr=3e-3):
    aux = (lambda out: moe.moe_aux_loss(model)) if moe.moe_layers(model) else None
    return train_lm(model, data, steps=steps, batch_size=64, lr=lr, device=device, extra_loss=aux)


def forward_flops(model):
    for layer in moe.moe_layers(model):
        layer.backend = "loop"  # count the useful FLOPs, not a padded backend's
    with FlopCounterMode(display=False) as counter:
        answer_loss(model)
    for layer in moe.moe_layers(model):
        layer.backend = "auto"
    return counter.get_total_flops()


dense, sparse = make_llama("tiny", seed=0).to(device), moe_llama().to(device)
flops_dense, flops_sparse = forward_flops(dense), forward_flops(sparse)
print(f"parameters: dense {count_parameters(dense):,}, MoE {count_parameters(sparse):,}")
print("forward FLOPs on the test batch equal within 2%:", abs(flops_sparse / flops_dense - 1) < 0.02)

# %%
# NBVAL_IGNORE_OUTPUT
t0 = time.perf_counter()
hist_dense = train(dense)
hist_sparse = train(sparse)
results = {"dense": (answer_loss(dense), exact_match(dense, test_data)),
           "MoE 8x64 top-2": (answer_loss(sparse), exact_match(sparse, test_data))}
for name, (loss, em) in results.items():
    print(f"{name:15s} held-out answer loss {loss:.3f}   exact match {em:.3f}")
print(f"(trained both in {time.perf_counter() - t0:.0f} s)")

smooth = lambda h: torch.tensor(h["loss"]).unfold(0, 20, 1).mean(1)  # noqa: E731
steps_axis = torch.arange(20, STEPS + 1)
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(steps_axis * flops_dense * 3 / 1e9, smooth(hist_dense), "-", label="dense (MLP 128)")
ax.plot(steps_axis * flops_sparse * 3 / 1e9, smooth(hist_sparse), "--", label="MoE (8 x 64, top-2)")
ax.set_xlabel("training compute (GFLOP, ~3x forward)")
ax.set_ylabel("training loss (smoothed)")
ax.set_title("Equal active parameters: quality against FLOPs")
ax.legend()
plt.tight_layout()
plt.show()
record("dense vs MoE held-out loss", {k_: v[0] for k_, v in results.items()})
record("dense vs MoE exact match", {k_: v[1] for k_, v in results.items()})
claim(11, "an MoE with the dense model's active parameters reaches a lower held-out loss at the same FLOPs",
      results["MoE 8x64 top-2"][0] < results["dense"][0],
      detail=f"{results['MoE 8x64 top-2'][0]:.3f} vs {results['dense'][0]:.3f}")


# %% [markdown]
# ## 4. Load balancing
#
# Nothing in the task loss stops a router from sending most tokens to a few experts: those experts
# train more, get better, get chosen more (a rich-get-richer loop), and the others waste their
# parameters. Switch Transformer (Fedus et al., 2021) adds an auxiliary loss, which Mixtral uses too:
#
# $$\mathcal{L}_{aux} = E \sum_{e=1}^{E} f_e \, P_e, \qquad
#   f_e = \frac{1}{T} \#\{(t, j): e_{tj} = e\}, \qquad P_e = \frac{1}{T}\sum_t p_{te},$$
#
# with $p = \mathrm{softmax}(\text{logits})$. $f$ (the share of routed slots) is a count with no
# gradient; $P$ (the mean router probability) carries it. Both are spread evenly when the loss is at
# its minimum, $k$. Related tools: the router **z-loss** (ST-MoE, Zoph et al. 2022,
# `moe.router_z_loss`) keeps logits small; DeepSeek-V3 balances mainly with a per-expert bias on the
# *selection* scores that it nudges after each step against the observed load
# (`MoELayer(..., router="sigmoid")`), and keeps only a small sequence-wise auxiliary loss alongside.
#
# ### Exercise 2: the load-balancing loss (2 points)
#
# For one layer's router logits `[T, E]`, equal to transformers' `load_balancing_loss_func` (a scalar
# tensor; float32 or the logits' dtype). $f$ counts the routed slots (no gradient), so the gradient
# with respect to the logits flows through $P$ only. Calling transformers' function (or the kit's)
# does not count as an answer.

# %% tags=["solution"]
def load_balancing_loss(router_logits, top_k):
    """Switch / Mixtral load-balancing loss E * sum_e f_e P_e. router_logits: [T, E] -> scalar."""
    ### BEGIN SOLUTION
    T, E = router_logits.shape
    probs = torch.softmax(router_logits, dim=-1)  # [T, E]
    chosen = torch.topk(probs, top_k, dim=-1).indices  # [T, k]
    f = F.one_hot(chosen, E).sum(dim=1).to(probs.dtype).mean(0)  # [E] share of slots (no gradient)
    P = probs.mean(0)  # [E] mean router probability
    return E * (f * P).sum()
    ### END SOLUTION


# %% tags=["tests"]
check("moe.load_balancing_loss", load_balancing_loss)

# %% [markdown]
# Now the experiment: the MoE of section 3 again, from the same initialisation and data, trained
# **without** the auxiliary loss. We compare how evenly the held-out tokens spread over the experts:
# the coefficient of variation (std / mean) of the tokens per expert, 0 for a perfect balance, and
# what a **capacity limit** would do. With capacity factor $c$, each expert takes at most
# $\lceil c \cdot T k / E \rceil$ token slots per batch (the buffer size of a static-shape
# implementation); the rest are **dropped** and pass through the residual connection unchanged.

# %%
# NBVAL_IGNORE_OUTPUT
no_aux = moe_llama(aux_loss_coef=0.0).to(device)
hist_no_aux = train(no_aux)


def load_report(model, capacity_factor=1.0):
    """Per layer: tokens per expert and CV on the held-out batch (dropless), and the drop rate at a capacity."""
    answer_loss(model)
    stats = [layer.stats() for layer in moe.moe_layers(model)]
    for layer in moe.moe_layers(model):
        layer.capacity_factor = capacity_factor
    capped = answer_loss(model)
    drops = [layer.stats()["drop_rate"] for layer in moe.moe_layers(model)]
    for layer in moe.moe_layers(model):
        layer.capacity_factor = None
    return stats, drops, capped


reports = {"with aux loss": load_report(sparse), "without aux loss": load_report(no_aux)}
fig, axes = plt.subplots(1, 2, figsize=(9, 3), sharey=True)
for ax, (name, (stats, drops, capped)) in zip(axes, reports.items()):
    for i, s in enumerate(stats):
        share = torch.tensor(s["tokens_per_expert"], dtype=torch.float) / sum(s["tokens_per_expert"])
        ax.bar(torch.arange(8) + 0.4 * i - 0.2, share, width=0.4, label=f"layer {i} (CV {s['cv']:.2f})")
    ax.axhline(1 / 8, color="gray", ls="--", lw=1)
    ax.set_title(name)
    ax.set_xlabel("expert")
    ax.legend(fontsize=8)
axes[0].set_ylabel("share of routed slots")
plt.tight_layout()
plt.show()
for name, (stats, drops, capped) in reports.items():
    print(f"{name:17s} CV per layer {[round(s['cv'], 2) for s in stats]}   max share "
          f"{max(max(s['tokens_per_expert']) / sum(s['tokens_per_expert']) for s in stats):.2f}   "
          f"drop rate at capacity 1.0: {[round(d, 3) for d in drops]}   held-out loss "
          f"{answer_loss(sparse if name == 'with aux loss' else no_aux):.3f} (dropless), {capped:.3f} (capacity 1.0)")
cv = {name: max(s["cv"] for s in r[0]) for name, r in reports.items()}
drop = {name: max(r[1]) for name, r in reports.items()}
record("max expert-load CV", cv)
record("max drop rate at capacity 1.0", drop)
# load balancing and capacity are not syllabus claims (the lecture leaves them out), so plain checks
print("the load-balancing loss keeps the experts balanced; without it the load is more uneven:",
      cv["with aux loss"] < cv["without aux loss"])
print("a capacity limit drops fewer tokens when the load is balanced:",
      drop["with aux loss"] < drop["without aux loss"])


# %% [markdown]
# **Top-k and capacity, interactively.** The router scores of both trained MoEs on the held-out batch
# are kept below; the sliders re-select the top $k$ from the *same* scores and apply a capacity
# factor $c$ (the models were trained with $k = 2$; other values show what a different $k$ would send
# where). Left: the share of tokens each expert receives, kept (blue) and dropped over capacity (red),
# with the capacity $\lceil c\,Tk/E \rceil$ as a dashed line. Right: the drop rate against $c$ for both
# models. A larger $k$ or an uneven load needs a larger $c$ (a bigger buffer, more padded FLOPs) to drop
# nothing; balancing is what lets a static-shape implementation use a small one.


# %%
E_EXPERTS = 8
real_tokens = test_batch["attention_mask"].cpu().bool().flatten()
router_scores = {}  # model -> per layer [T_real, E] router probabilities on the held-out batch
for name, model in {"with aux loss": sparse, "without aux loss": no_aux}.items():
    answer_loss(model)
    router_scores[name] = [layer.router_logits.detach().float().cpu()[real_tokens].softmax(-1)
                           for layer in moe.moe_layers(model)]
capacity_factors = [round(0.25 * i, 2) for i in range(2, 17)]  # 0.5 .. 4.0


def slot_load(probs, top_k):
    """Slots per expert [E] when every token sends its top_k experts."""
    return torch.bincount(probs.topk(top_k, dim=-1).indices.flatten(), minlength=E_EXPERTS)


def drop_rate(load, top_k, capacity_factor):
    cap = moe.expert_capacity(int(load.sum()) // top_k, top_k, E_EXPERTS, capacity_factor)
    return (load - load.clamp(max=cap)).sum().item() / load.sum().item(), cap


def draw_capacity(model="without aux loss", layer=0, top_k=2, capacity_factor=1.0):
    fig, (ax_load, ax_drop) = plt.subplots(1, 2, figsize=(10, 3.2))
    probs = router_scores[model][layer]
    T = probs.shape[0]
    load = slot_load(probs, top_k)
    rate, cap = drop_rate(load, top_k, capacity_factor)
    kept = load.clamp(max=cap)
    ax_load.bar(range(E_EXPERTS), kept / T, color="tab:blue", label="kept")
    ax_load.bar(range(E_EXPERTS), (load - kept) / T, bottom=kept / T, color="tab:red", label="dropped")
    ax_load.axhline(cap / T, color="k", ls="--", lw=1, label=f"capacity ({cap} slots)")
    ax_load.set_ylim(0, 1.05)  # the share of tokens that pick an expert is at most 1
    ax_load.set_xlabel("expert"), ax_load.set_ylabel("share of tokens")
    ax_load.set_title(f"{model}, layer {layer}: top-{top_k}, c = {capacity_factor:.2f}, "
                      f"{rate:.0%} of slots dropped", fontsize=9)
    ax_load.legend(fontsize=7, loc="upper right")
    for (name, scores), style in zip(router_scores.items(), ("o-", "s--")):
        load_k = slot_load(scores[layer], top_k)
        ax_drop.plot(capacity_factors, [drop_rate(load_k, top_k, c)[0] for c in capacity_factors], style,
                     ms=3, label=name)
    ax_drop.axvline(capacity_factor, color="k", lw=1)
    ax_drop.set_ylim(-0.02, 1.0)
    ax_drop.set_xlabel("capacity factor c"), ax_drop.set_ylabel("dropped slots")
    ax_drop.set_title(f"layer {layer}, top-{top_k}: drop rate against c", fontsize=9)
    ax_drop.legend(fontsize=8)
    plt.tight_layout()
    plt.show()


# %%
# NBVAL_IGNORE_OUTPUT
import ipywidgets as widgets

from labkit.course.interactive import interact  # a slider here; one static figure in headless runs
interact(draw_capacity, model=widgets.Dropdown(options=list(router_scores), value="without aux loss"),
         layer=widgets.IntSlider(value=0, min=0, max=len(router_scores["with aux loss"]) - 1),
         top_k=widgets.IntSlider(value=2, min=1, max=E_EXPERTS),
         capacity_factor=widgets.FloatSlider(value=1.0, min=0.5, max=4.0, step=0.25))

# %% [markdown]
# ## 5. What do the experts specialise in?
#
# Mixtral's authors found little specialisation by *topic*, and more by *syntax and position*. Here
# the "topics" are our tasks, which also differ in the characters they use (letters, digits, `+`, `|`).
# Below: which experts each task's tokens go to (first-choice expert, each layer), and the same by
# position in the sequence. As a yardstick for "specialised", we compare the mutual information
# between task and expert with the same quantity after shuffling the task labels.

# %%
@torch.no_grad()
def routing_by(model, layer_index):
    """First-choice expert of every real token of the held-out batch, with its task and position."""
    answer_loss(model)
    chosen = moe.moe_layers(model)[layer_index].last_experts[..., 0].cpu()  # [B, S]
    mask = test_batch["attention_mask"].cpu().bool()
    task_id = torch.tensor([TASKS.index(t) for t in test_data["task"]])[:, None].expand_as(chosen)
    position = torch.arange(chosen.shape[1]).expand_as(chosen)
    return chosen[mask], task_id[mask], position[mask]


def mutual_information(a, b):
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1)
    joint.index_put_((a, b), torch.ones(len(a)), accumulate=True)
    joint /= joint.sum()
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    nz = joint > 0
    return (joint[nz] * (joint[nz] / outer[nz]).log()).sum().item()


def heatmap(ax, rows, cols, n_rows, n_cols, title, ylabels=None):
    counts = torch.zeros(n_rows, n_cols)
    counts.index_put_((rows, cols), torch.ones(len(rows)), accumulate=True)
    im = ax.imshow(counts / counts.sum(1, keepdim=True).clamp_min(1), cmap="viridis", aspect="auto", vmin=0, vmax=1)
    ax.figure.colorbar(im, ax=ax, label="share of the row's tokens")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("expert")
    if ylabels is not None:
        ax.set_yticks(range(n_rows), ylabels)


# %%
# NBVAL_IGNORE_OUTPUT
fig, axes = plt.subplots(1, 4, figsize=(16, 3))
gen = torch.Generator().manual_seed(0)
specialisation = {}
for layer_index in range(2):
    expert, task, position = routing_by(sparse, layer_index)
    heatmap(axes[layer_index], task, expert, len(TASKS), 8, f"layer {layer_index}: task x expert", TASKS)
    heatmap(axes[2 + layer_index], position.clamp(max=19), expert, 20, 8, f"layer {layer_index}: position x expert")
    axes[2 + layer_index].set_ylabel("position (19 = 19+)")
    mi = mutual_information(task, expert)
    shuffled = [mutual_information(task[torch.randperm(len(task), generator=gen)], expert) for _ in range(20)]
    specialisation[layer_index] = (mi, max(shuffled))
    print(f"layer {layer_index}: I(task; expert) = {mi:.3f} nats, shuffled tasks: at most {max(shuffled):.3f}")
plt.tight_layout()
plt.show()
record("I(task; expert) vs shuffled", specialisation)
claim(11, "experts specialise: the first-choice expert depends on the task far more than chance",
      all(mi > 5 * shuffled for mi, shuffled in specialisation.values()), detail=str(specialisation))


# %% [markdown]
# ## 6. Why batching is hard, and sort-based dispatch
#
# In a batch, every token wants different experts. The loop of section 1 launches one small matmul
# per expert (and on a GPU asks the device, once per expert, how many tokens it got: a host
# synchronisation). The standard fix: flatten the $T \cdot k$ (token, expert) pairs, **sort them by
# expert**, so that each expert's tokens are one contiguous segment; then one grouped matrix multiply
# (`torch.nn.functional.grouped_mm`, one kernel for all segments) or one matmul per segment; then
# scatter the results back to their tokens. For a handful of tokens (decoding), gpt-fast's Mixtral
# simply **gathers each token's expert weights** and does batched matrix-vector products.
#
# ### Exercise 3: group the pairs by expert (1 point)
#
# For `experts` `[T, k]`, return `order` `[T*k]`, the indices of the flattened pairs sorted by expert
# (stable: pairs of one expert keep their order), and `counts` `[E]`, tokens per expert (length E, with
# 0 for experts that receive no token).

# %% tags=["solution"]
def sort_by_expert(experts, num_experts):
    """experts [T, k] -> (order [T*k] stable sort of the flattened pairs by expert, counts [E])."""
    ### BEGIN SOLUTION
    flat = experts.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts
    ### END SOLUTION


# %% tags=["tests"]
check("moe.sort_by_expert", sort_by_expert)


# %% [markdown]
# ### Exercise 4: sort-based dispatch (3 points)
#
# Compute the MoE output $y_t = \sum_j w_{tj} E_{e_{tj}}(x_t)$ with your `sort_by_expert`: gather
# the tokens in expert order (pair $i$ belongs to token $i // k$), run each expert once on its
# segment (an expert may get no token), weight the rows, and add them back to their tokens. With
# $k > 1$ a token appears $k$ times, so add with `index_add` (`y[token] += rows` keeps only one write
# per token). Keep it differentiable: the gradient must reach `x`, `weights` and both projections.

# %% tags=["solution"]
def sort_dispatch(x, experts, weights, gate_up_proj, down_proj):
    """x [T, D], experts / weights [T, k], gate_up_proj [E, 2F, D], down_proj [E, D, F] -> y [T, D]."""
    ### BEGIN SOLUTION
    T, k = experts.shape
    order, counts = sort_by_expert(experts, gate_up_proj.shape[0])
    token = order // k  # [T*k] token of each sorted pair
    xs = x[token]  # [T*k, D] tokens in expert order
    outputs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        gate, up = (xs[start:start + n] @ gate_up_proj[e].T).chunk(2, dim=-1)
        outputs.append((F.silu(gate) * up) @ down_proj[e].T)
        start += n
    ys = torch.cat(outputs) * weights.reshape(-1)[order, None]  # [T*k, D] weighted
    return torch.zeros_like(x).index_add(0, token, ys)
    ### END SOLUTION


# %% tags=["tests"]
check("moe.sort_dispatch", sort_dispatch)

# %% [markdown]
# labkit's backends do the same four ways, with identical outputs and gradients (tested against the
# loop): `loop`, `sort` (a padded, static-shape buffer: no host synchronisation, but padded FLOPs),
# `grouped` (sort + grouped GEMM) and `gather` (gpt-fast). `auto` picks one from the device, the
# dtype and the number of tokens. Timings on *your* device, for a decode step (a few tokens) and a
# prefill (many tokens), forward only; `labkit bench moe` runs the full sweep, backward included.

# %%
# NBVAL_IGNORE_OUTPUT
D, Fw, E, k = by_mode(smoke=(128, 256, 8, 2), full=(1024, 2816, 8, 2))
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
torch.manual_seed(0)
gate_up = (torch.randn(E, 2 * Fw, D) / D**0.5).to(device, dtype)
down = (torch.randn(E, D, Fw) / Fw**0.5).to(device, dtype)
router = torch.randn(E, D, device=device) / D**0.5
from labkit.benchmarks import time_fn

rows = []
for T in (1, 8, by_mode(smoke=512, full=8192)):
    xt = torch.randn(T, D, device=device, dtype=dtype)
    w, e = top_k_gating(xt.float() @ router.T, k)
    times = {}
    with torch.no_grad():
        for backend in md.BACKENDS + ("auto",):
            if backend == "gather" and T > 64:
                continue  # gather copies every pair's expert weights: a decoding trick only
            times[backend] = time_fn(lambda: md.dispatch(xt, e, w, gate_up, down, backend=backend),
                                     warmup=2, repeat=5, device=device)["min_s"] * 1e3
    auto = md.choose_backend(xt, k, gate_up, down)
    print(f"T={T:5d}  " + "  ".join(f"{b} {t:7.3f} ms" for b, t in times.items()) + f"   (auto -> {auto})")

# %% [markdown]
# **Read the timings with the hardware in mind.** On a small CPU case the plain loop often wins, and
# `sort` can be several times slower: a CPU runs one matmul per expert at full speed anyway, there is
# no kernel launch or host synchronisation to save, and the sort, the gathers and scatters and the
# padded buffer are pure overhead next to matmuls of a few dozen rows. Sort-based dispatch pays off
# where those costs dominate: on a GPU, where each of the loop's small matmuls is a kernel launch plus
# a host synchronisation, and with many tokens per expert (prefill, training batches), where one
# contiguous segment per expert feeds a single grouped GEMM that keeps the GPU busy. That is why `auto`
# never picks `sort` on a CPU, and why the claims of MoE speed come from GPU kernels such as
# `grouped_mm`; `labkit bench moe` on a GPU shows the other side.

# %% [markdown]
# ## 7. Sparse upcycling
#
# Training an MoE from scratch is expensive; Komatsuzaki et al. (2022) start from a **trained dense
# model** instead: every expert begins as a copy of the dense MLP, the router starts random. With
# top-$k$ weights that sum to one, the upcycled model computes *exactly* the dense function at step
# 0, and continued training lets the copies diverge. Below we upcycle the zoo's `lm/base` (4 experts,
# top-2, in every layer), check the step-0 identity, and continue training it and a dense copy for the
# same steps on the full task mix, which includes two tasks `lm/base` never saw (sort, add).

# %%
base = zoo.load("lm/base", device=device)
upcycled = moe.moefy(copy.deepcopy(base), num_experts=4, top_k=2, upcycle=True)
ids = test_batch["input_ids"][:16]
with torch.no_grad():
    same = torch.allclose(upcycled(ids).logits, base(ids).logits, atol=1e-4)
print(f"parameters: dense {count_parameters(base):,}, upcycled {count_parameters(upcycled):,}")
print("upcycled model == dense model at step 0:", same)
assert same, "the upcycled model does not compute the dense model's function at step 0"

# %%
# NBVAL_IGNORE_OUTPUT
UP_STEPS = by_mode(smoke=80, full=1500)
dense_continued = copy.deepcopy(base)
before = {"lm/base": (answer_loss(base), exact_match(base, test_data))}
train(dense_continued, steps=UP_STEPS, lr=1e-3)
train(upcycled, steps=UP_STEPS, lr=1e-3)
after = {"dense, continued": (answer_loss(dense_continued), exact_match(dense_continued, test_data)),
         "upcycled MoE, continued": (answer_loss(upcycled), exact_match(upcycled, test_data))}
for name, (loss, em) in {**before, **after}.items():
    print(f"{name:24s} held-out answer loss {loss:.3f}   exact match {em:.3f}")
record("upcycling: held-out loss", {k_: v[0] for k_, v in {**before, **after}.items()})
record("upcycled MoE ends below the dense model continued the same way",
       after["upcycled MoE, continued"][0] < after["dense, continued"][0])

# %% [markdown]
# ## 8. A mergekit-style "MoE" from dense fine-tunes
#
# Leaderboards are full of "MoE" models that were never trained as MoEs. `mergekit-moe` takes
# attention, norms and embeddings from a base model and one MLP per expert from dense fine-tunes of
# that base, and sets each layer's router from **prompts**: expert $i$'s router row is the base
# model's hidden state on prompts typical of expert $i$, normalised. Nothing is trained.
#
# We build one from `lm/ft-add` and `lm/ft-sort` (fine-tunes of `lm/base` on addition and on
# sorting) with top-1 routing, and compare it on both tasks with the fine-tunes themselves, the base,
# and the upcycled MoE that was actually trained (section 7, briefly) on all tasks. Exact match is
# all-or-nothing, so we also report the held-out loss of the answer tokens.

# %%
ft_add, ft_sort = zoo.load("lm/ft-add", device=device), zoo.load("lm/ft-sort", device=device)
tok = get_tokenizer()
prompts = [make_task_dataset([t], 32, seed=1)["prompt"] for t in ("add", "sort")]
router_rows = moe.prompt_router_weights(base, tok, prompts)  # [L, 2, D]
clown_car = moe.moe_from_dense(base, [ft_add, ft_sort], router_rows.to(device), top_k=1)
print("router weights per layer:", list(router_rows.shape), "  experts per layer:",
      moe.moe_layers(clown_car)[0].num_experts)

# %%
# NBVAL_IGNORE_OUTPUT
eval_sets = {t: make_task_dataset([t], by_mode(smoke=100, full=500), seed=0, split="test") for t in ("add", "sort")}
eval_batches = {t: {k_: v.to(device) for k_, v in encode_for_training(list(ds["prompt"]), list(ds["answer"])).items()}
                for t, ds in eval_sets.items()}


@torch.no_grad()
def task_loss(model, task):
    model.eval()
    return model(**eval_batches[task]).loss.item()


models = {"lm/base": base, "lm/ft-add": ft_add, "lm/ft-sort": ft_sort, "mergekit-style MoE": clown_car,
          "upcycled MoE (trained, s.7)": upcycled}
scores = {name: {t: (task_loss(m, t), exact_match(m, ds)) for t, ds in eval_sets.items()} for name, m in models.items()}
print(f"{'model':28s} {'add: loss':>9s} {'exact':>6s}   {'sort: loss':>10s} {'exact':>6s}")
for name, s in scores.items():
    print(f"{name:28s} {s['add'][0]:9.3f} {s['add'][1]:6.3f}   {s['sort'][0]:10.3f} {s['sort'][1]:6.3f}")
print("share of each task's prompt tokens that the prompt-derived router sends to that task's expert, per layer:")
for expert, (t, ds) in enumerate(eval_sets.items()):
    enc = tok(list(ds["prompt"]), return_tensors="pt", padding=True).to(device)
    with torch.no_grad():
        clown_car(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    real = enc["attention_mask"].bool()
    shares = [layer.last_experts[..., 0][real].eq(expert).float().mean().item() for layer in moe.moe_layers(clown_car)]
    print(f"  {t:4s}: {[round(x, 2) for x in shares]}")
record("add / sort (answer loss, exact match)", scores)
# the syllabus states this difference (section 4) but numbers no claim for it: plain checks
print("a mergekit-style MoE of fine-tunes does not inherit their skills: it trails each fine-tune on its own task:",
      scores["mergekit-style MoE"]["add"][1] < scores["lm/ft-add"]["add"][1]
      and scores["mergekit-style MoE"]["sort"][1] < scores["lm/ft-sort"]["sort"][1])
print("a briefly trained MoE models the new tasks better than the prompt-routed one (lower answer loss on both):",
      all(scores["upcycled MoE (trained, s.7)"][t][0] < scores["mergekit-style MoE"][t][0] for t in eval_sets))

# %% [markdown]
# Why does the "clown car" fail here? Two reasons, both worth remembering before trusting such a merge.
# First, **routing is per token**: within one prompt, tokens go to different experts, so no expert sees
# the whole computation it was fine-tuned for; at layer 0 the router even sees the same token (`=`)
# at the end of every prompt, so both router rows are equal and everything goes to one expert (the
# degenerate gates that mergekit warns about). Second, our fine-tunes changed **attention** as much as
# the MLPs, and the merge keeps only the base model's attention. A mergekit-style MoE is best read as
# an ensemble of MLPs with a hand-set router; a trained MoE learns its routing together with its experts.

# %% [markdown]
# ## Summary
#
# * A sparse MoE layer is a router plus $E$ experts; top-$k$ routing spends $k/E$ of the expert FLOPs
#   while keeping all $E$ experts' parameters (section 2). At equal *active* parameters an MoE has more
#   capacity than the dense model (section 3); whether that shows after a short CPU run is printed above.
# * Without a balancing mechanism the router concentrates load; the Switch/Mixtral auxiliary loss (or
#   DeepSeek-V3's selection bias, with a small sequence-wise balance loss) spreads it, and a capacity
#   limit then drops fewer tokens (section 4).
# * Experts specialise, here strongly by task and by position (section 5).
# * Speed is a dispatch problem: sorting the (token, expert) pairs by expert turns many small
#   matmuls into one grouped GEMM, which pays off on a GPU with many tokens per expert; on a tiny CPU
#   case the sort's overhead loses to the loop (section 6; `labkit bench moe` for the full sweep).
# * Upcycling starts an MoE from a dense model's function (section 7); a mergekit-style MoE of
#   fine-tunes is an ensemble with a hand-set router, not a trained sparse model (section 8).
#
# Where to go next: `labkit.moe.ExpertParallelMoE` splits the experts over GPUs with all-to-all
# exchanges (expert parallelism); `MoELayer(router="expert_choice")` lets experts pick their tokens
# (Zhou et al., 2022), perfectly balanced but not causal.
