"""Where the package's own files are: its data, lm-eval tasks and accelerate configs (installed with it), and
the folder that holds it (a checkout, or site-packages)."""

from __future__ import annotations

from pathlib import Path

# Not resolved: these paths are written into params, fingerprints and task files exactly as they were.
PACKAGE_DIR = Path(__file__).parent.parent
DATA_DIR = PACKAGE_DIR / "data"
LM_EVAL_TASKS_DIR = PACKAGE_DIR / "lm_eval_tasks"
ACCELERATE_CONFIGS_DIR = PACKAGE_DIR / "accelerate_configs"
# Resolved: the checkout's notebooks and params, and the PYTHONPATH of child processes.
CHECKOUT_DIR = Path(__file__).resolve().parent.parent.parent
