"""Lean torch-only re-implementations of the model parts that zimage runs (no diffusers/transformers import)."""
