"""Ensembling: combining the *outputs* of several models.

Works for any models whose outputs live in the same space (same label set, or same tokenizer for
language models): members may differ in architecture, initialisation and training data. Only the
batched "stacked members" forward needs members of one architecture.

Conventions: the member axis is always first. Member logits are a list of tensors or one tensor
``[M, ..., V]`` (M members, V classes or vocabulary entries); weights are ``[M]`` (one per member)
or ``[M, ...]`` (one per member and position, e.g. predicted by a gating network). All combination
rules return log-probabilities ``[..., V]``.

Read in this order:
  combination.py .. rules (linear, log-linear), learned weights (EM, log-linear, gate), DExperts, contrastive
  decode.py ....... token-level decoding of causal LMs: ensemble_next_token, EnsembleLM, member_logprobs
  members.py ...... getting members (bagging, MC dropout, snapshots), voting and stacking, one vmapped
                    forward for same-architecture members, diagnostics
"""
from .combination import (GatingNetwork, combine, contrastive_logprobs, dexperts, fit_log_linear_weights,
                          fit_mixture_weights, linear_interpolate, log_linear_interpolate, member_features,
                          target_logprobs, train_gate)
from .decode import EnsembleLM, align_to_vocab, ensemble_next_token, member_logprobs, position_ids_from_mask
from .members import (bagging, bootstrap_indices, ensemble_report, error_correlation, fit_stacker, hard_vote,
                      loop_forward, mc_dropout_logits, member_contribution, out_of_fold_predictions,
                      pairwise_disagreement, snapshot_lr, soft_vote, stack_members, stacked_forward, stacking_features,
                      train_snapshots)

__all__ = [
    "linear_interpolate", "log_linear_interpolate", "combine", "target_logprobs", "fit_mixture_weights",
    "fit_log_linear_weights", "member_features", "GatingNetwork", "train_gate", "dexperts", "contrastive_logprobs",
    "ensemble_next_token", "position_ids_from_mask", "member_logprobs", "align_to_vocab", "EnsembleLM",
    "bootstrap_indices", "bagging", "mc_dropout_logits", "snapshot_lr", "train_snapshots", "soft_vote", "hard_vote",
    "out_of_fold_predictions", "stacking_features", "fit_stacker", "stack_members", "stacked_forward",
    "loop_forward", "error_correlation", "pairwise_disagreement", "ensemble_report", "member_contribution",
]
