"""What every stage notebook does first, in one call."""

from __future__ import annotations


def setup(params_file: str, overrides: dict, run_dir: str, iteration: int):
    """Load the params (``"auto"``: chosen for the GPU found), point at the iteration's files, say where they
    go; returns ``(params, paths)``."""
    import pandas as pd

    from .colab import pick_params_file
    from .config import load_params
    from .io import RunPaths

    pd.set_option("display.max_colwidth", 300)
    params = load_params(pick_params_file(params_file), overrides)
    paths = RunPaths(run_dir, iteration)
    print(f"run {params.run_name} | iteration {iteration} | files in {paths.iter_dir}")
    return params, paths
