"""What identifies a model in a chunk's key (its weights, not its path), and ``Replicas``: how many worker
processes share a stage's chunks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sedir_utils.core.models import torch_dtype


def model_identity(model) -> list:
    """What identifies a loaded model's weights: its folder (or hub id), dtype, and its weight files' size and
    mtime. A transformers model names its folder in ``name_or_path``; a ``vllm.LLM`` in ``model_config.model``;
    a model loaded by worker processes (``replicas.Replicas``) says it itself."""
    if isinstance(model, Replicas):
        return model.identity()
    engine_config = getattr(model, "model_config", None)  # vllm.LLM (0.32: llm.model_config is llm_engine's)
    if engine_config is None:
        engine_config = getattr(getattr(model, "llm_engine", None), "model_config", None)
    if engine_config is not None and hasattr(engine_config, "model"):
        return weights_identity(str(engine_config.model), f"vllm {getattr(engine_config, 'dtype', '')}")
    name = str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", ""))
    return weights_identity(name, str(getattr(model, "dtype", "")))


def weights_identity(name: str, dtype: str) -> list:
    """``model_identity`` of the model ``name`` (a folder or hub id) loaded in ``dtype`` (as a string)."""
    folder = Path(name)
    files = sorted(folder.glob("*.safetensors")) if name and folder.is_dir() else []
    return [name, dtype, [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]]


@dataclass(frozen=True)
class Replicas:
    """A model this process does not load: ``size`` workers load it (``backend``'s way) and share the chunks.

    Passed where a loaded model goes (``generation.generate``, ``backends.load_generator``'s result); its
    ``identity`` is what ``model_identity`` gives for the model a worker loads, so chunk keys (and files)
    are the same with one process or many.
    """

    path: str
    dtype: str  # a params dtype name
    backend: str  # a registered sampling backend (sedir_utils/engine/backends.py)
    size: int
    tensor_parallel_size: int = 1
    device: str = "cpu"

    def identity(self) -> list:
        dtype = str(torch_dtype(self.dtype, self.device))
        return weights_identity(self.path, f"vllm {dtype}" if self.backend == "vllm" else dtype)
