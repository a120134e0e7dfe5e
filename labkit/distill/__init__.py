"""Knowledge distillation: train a small student to match a teacher's (or an ensemble's) outputs.

Methods (read these): ``losses`` (forward/reverse KL, generalised JSD, total variation, the alpha mix),
``sampling`` (off-policy, sequence-level, on-policy data and the per-token reverse-KL signal),
``teachers`` (one model, an ensemble, top-k and sampled caches), ``hidden`` (hidden-state matching),
``fused`` (a chunked loss that never holds the full logits). Tooling: ``loop`` (training loops),
``cache_io`` (caches on disk), ``quantize`` (int8 after distillation). Imports point from tooling to methods.
"""
from .cache_io import load_cache, save_cache
from .fused import default_chunk_size, fused_linear_distill_loss, naive_linear_distill_loss
from .hidden import HiddenProjector, capture_features, hidden_state_loss, uniform_layer_map
from .loop import (LM_MODES, ForwardCounter, distill_classifier, distill_lm, distill_step, lm_teacher_cache,
                   make_optimizer)
from .losses import (DIVERGENCES, IGNORE_INDEX, REDUCTIONS, cross_entropy, distillation_loss, forward_kl,
                     generalized_jsd, reduce_per_token, reverse_kl, shift_labels, token_mask, total_variation)
from .quantize import (latency_ms, model_size_bytes, quantization_report, quantize_dynamic_int8,
                       weight_only_int8)
from .sampling import (completion_batch, generate_completions, offpolicy_batch, on_policy_batch,
                       on_policy_reverse_kl_loss, reverse_kl_token_signal, sequence_kd_batch, token_logprobs)
from .teachers import (SampledCache, TopKCache, cache_storage, cached_forward_kl, ensemble_teacher_logprobs,
                       mistake_agreement, sampled_cache, teacher_logits, topk_cache)

__all__ = [
    "load_cache", "save_cache",
    "default_chunk_size", "fused_linear_distill_loss", "naive_linear_distill_loss",
    "HiddenProjector", "capture_features", "hidden_state_loss", "uniform_layer_map",
    "LM_MODES", "ForwardCounter", "distill_classifier", "distill_lm", "distill_step", "lm_teacher_cache",
    "make_optimizer",
    "DIVERGENCES", "IGNORE_INDEX", "REDUCTIONS", "cross_entropy", "distillation_loss", "forward_kl",
    "generalized_jsd", "reduce_per_token", "reverse_kl", "shift_labels", "token_mask", "total_variation",
    "latency_ms", "model_size_bytes", "quantization_report", "quantize_dynamic_int8", "weight_only_int8",
    "completion_batch", "generate_completions", "offpolicy_batch", "on_policy_batch",
    "on_policy_reverse_kl_loss", "reverse_kl_token_signal", "sequence_kd_batch", "token_logprobs",
    "SampledCache", "TopKCache", "cache_storage", "cached_forward_kl", "ensemble_teacher_logprobs",
    "mistake_agreement", "sampled_cache", "teacher_logits", "topk_cache",
]
