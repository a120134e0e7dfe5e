"""Refinement lab: pipelines (cascade, stacking), masked iterative refinement (Mask-Predict, masked
diffusion), self-refinement with feedback, and adaptive computation (per-example stopping).

Methods live in ``pipelines``, ``masked``, ``self_refine`` and ``adaptive``; ``training`` is the tooling
that builds the lab's zoo entries from them.
"""
from .masked import (ANSWER_WIDTH, MASK_ID, MASKED_VOCAB_SIZE, decode_answers, encode_answers, encode_prompts,
                     fill, left_to_right, lowest_confidence, make_masked_lm, mask_predict, mask_predict_step,
                     masked_diffusion, masked_lm_config, predict_tokens, remask_count, slot_logits)
from .self_refine import (Feedback, Round, accuracy_by_round, check_answer, critic_feedback, critic_prompt,
                          exact_verifier, final_outputs, lm_generator, lm_reviser, noisy_verifier, revision_prompt,
                          self_feedback, self_refine, sequence_probability, should_stop)
from .adaptive import AdaptiveResult, adaptive_mask_predict, confident, run_adaptive, verified
from .pipelines import (Cascade, Stacking, count_pipeline, count_task_tensors, digit_member, kfold_indices,
                        pipeline_accuracy, run_cascade, stack_classifiers, stacking_inputs, train_pipeline)
from .training import permutation_examples, task_examples

__all__ = [
    "ANSWER_WIDTH", "MASK_ID", "MASKED_VOCAB_SIZE", "decode_answers", "encode_answers", "encode_prompts",
    "fill", "left_to_right", "lowest_confidence", "make_masked_lm", "mask_predict", "mask_predict_step",
    "masked_diffusion", "masked_lm_config", "predict_tokens", "remask_count", "slot_logits", "Feedback",
    "Round", "accuracy_by_round", "check_answer", "critic_feedback", "critic_prompt", "exact_verifier",
    "final_outputs", "lm_generator", "lm_reviser", "noisy_verifier", "revision_prompt", "self_feedback",
    "self_refine", "sequence_probability", "should_stop", "AdaptiveResult", "adaptive_mask_predict",
    "confident", "run_adaptive", "verified", "Cascade", "Stacking", "count_pipeline", "count_task_tensors",
    "digit_member", "kfold_indices", "pipeline_accuracy", "run_cascade", "stack_classifiers", "stacking_inputs",
    "train_pipeline", "permutation_examples", "task_examples",
]
