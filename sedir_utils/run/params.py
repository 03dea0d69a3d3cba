"""Load a params file with every check: core's own, then the backend and scorer registries' (a backend or a
scorer registered by the user's code counts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sedir_utils.core import config
from sedir_utils.core.params import Params
from sedir_utils.engine import backends, scorers


def load_params(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> Params:
    """Load and validate a params YAML (sedir_utils/core/config.py says how); one line names the first problem."""
    return config.load_params(path, overrides, checks=(backends.params_problems, scorers.params_problems))
