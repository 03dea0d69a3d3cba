"""Stage 5: evaluate the iteration's model with lm-eval (GPQA, or the packaged sample)."""
