"""Kept so that ``from labkit.merge_io import ...`` keeps working: the YAML runner now lives in
``labkit.merge.yaml_runner`` and the safetensors reading/writing in ``labkit.merge.safetensors_io``."""
from .merge.safetensors_io import DTYPE_CODES, SAFETENSORS_DTYPES, ModelDir, SafetensorsFile, ShardWriter  # noqa: F401
from .merge.yaml_runner import (DEFAULT_SHARD_BYTES, DTYPE_NAMES, MARKER, REFUSED_KEYS, TOKENIZER_FILES,  # noqa: F401
                                TOP_LEVEL_KEYS, MergeInterrupted, MergePlan, evaluate_setting, layer_position,
                                load_plan, run_merge_config)
