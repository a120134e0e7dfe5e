"""Weight-space merging: averaging, task vectors, TIES, DARE, SLERP, model stock, soups, alignment.

Read in this order:
  methods.py      the per-tensor maths, one function per method, with equation, paper and shapes
  registry.py     the named methods (mergekit's names, parameters with types and ranges, defaults)
                  and the rules every merge path shares (model count, parameter resolution)
  state_dict.py   whole models: ``merge``, soups, ``TaskVector``, the compatibility check
  align.py        permutation alignment of MLPs (weight matching)
  diagnostics.py  cosines, sign conflicts, trimmed mass, interpolation curves
Tooling, which imports the files above and never the reverse:
  safetensors_io.py  lazy safetensors reading, streaming shard writing
  output_dir.py      which OUT_DIR is safe to write, atomic replacement, signals, leftovers of crashes
  yaml_runner.py     ``labkit merge CONFIG.yml OUT_DIR`` (mergekit YAML)
  digits_study.py    the merging lab's measured digits comparisons (soups, ensembles, tuned TIES/task arithmetic)

Every public name is importable from ``labkit.merge`` itself, e.g. ``from labkit.merge import ties``.
"""
from .align import align_mlp, linear_layer_names, permute_linear_chain, weight_matching
from .diagnostics import cosine_matrix, interpolation_curve, sign_conflict_rate, trimmed_mass
from .methods import (breadcrumbs, breadcrumbs_trim, dare, elect_sign, generalized_task_arithmetic, linear,
                      magnitude_trim, model_stock, random_drop, rescale_to_norm, slerp, task_arithmetic, ties)
from .registry import (METHODS, REQUIRED, MergeMethod, Param, check_model_count, check_param_names, get_method,
                       merge_tensor, resolve, resolve_params, tensor_seed)
from .state_dict import (SoupResult, TaskVector, as_state_dict, average_checkpoints, check_compatible, check_finite,
                         greedy_soup, interpolate, load_merged, merge, tensor_layout, uniform_soup)
from .yaml_runner import MergeInterrupted, run_merge_config  # the CLI's runner, for scripts

__all__ = [
    "linear", "slerp", "rescale_to_norm", "magnitude_trim", "random_drop", "breadcrumbs_trim", "elect_sign",
    "generalized_task_arithmetic", "task_arithmetic", "ties", "dare", "breadcrumbs", "model_stock",
    "REQUIRED", "Param", "MergeMethod", "METHODS", "get_method", "tensor_seed", "merge_tensor", "resolve",
    "resolve_params", "check_model_count", "check_param_names",
    "as_state_dict", "tensor_layout", "check_compatible", "check_finite", "merge", "load_merged", "interpolate",
    "average_checkpoints", "uniform_soup", "SoupResult", "greedy_soup", "TaskVector",
    "linear_layer_names", "weight_matching", "permute_linear_chain", "align_mlp",
    "cosine_matrix", "sign_conflict_rate", "trimmed_mass", "interpolation_curve", "run_merge_config", "MergeInterrupted",
]
