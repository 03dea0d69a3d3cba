#!/usr/bin/env bash
# The GPU smoke suite (tests/test_gpu_smoke.py) on a CUDA machine, with the python3 that holds its CUDA torch.
# On a machine that reaches no package registry: first `make gpu-bundle` where pip works, carry gpu_bundle/
# over, and this script installs its wheels into a private folder (nothing else on the machine changes). The tiny
# models' tokenizer is the repository's own (tests/fixtures/tokenizer). Extra arguments go to pytest (-k unsloth).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUNDLE=${SEDIR_GPU_BUNDLE:-gpu_bundle}
if compgen -G "$BUNDLE/wheels/*.whl" >/dev/null; then
  SITE=${SEDIR_GPU_SITE:-/tmp/sedir-gpu-site}
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$BUNDLE"/wheels/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1
$PY - <<'PY'
import importlib.metadata as md, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
for name in ("transformers", "trl", "peft", "accelerate", "datasets", "lm_eval", "unsloth", "unsloth_zoo",
             "bitsandbytes", "vllm"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
PY
exec $PY -m pytest -m gpu -p no:cacheprovider -v -rA tests/test_gpu_smoke.py "$@"
