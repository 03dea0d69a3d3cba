"""What every stage notebook does first, in one call."""

from __future__ import annotations

from sedir_utils.core.params import ParamsError
from sedir_utils.core.paths import RunPaths
from sedir_utils.run.colab import pick_params_file
from sedir_utils.run.params import load_params


def setup(params_file: str, overrides: dict, run_dir: str, iteration: int, arm: str = "reward"):
    """Load the params (``"auto"``: chosen for the GPU found), point at the iteration's files (``arm``'s: see
    sedir_utils/core/declarations.py), say where they go; returns ``(params, paths)``."""
    import pandas as pd

    pd.set_option("display.max_colwidth", 300)

    params = load_params(pick_params_file(params_file), overrides)
    if arm not in params.arms.names:
        raise ParamsError(f"arm {arm!r}: not one of this run's arms.names {params.arms.names}")
    paths = RunPaths(run_dir, iteration, arm, params.arms.own_samples)
    print(f"run {params.run_name} | iteration {iteration} | arm {arm} | files in {paths.iter_dir}")
    return params, paths
