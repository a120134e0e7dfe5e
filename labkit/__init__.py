"""labkit: a lab kit on combining models (ensembling, merging, MoE, distillation, refinement)."""
__version__ = "0.1.0"
