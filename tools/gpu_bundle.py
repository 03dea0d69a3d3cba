"""Make ``gpu_bundle/``: what the GPU smoke suite needs on a bare CUDA machine that reaches no registry.

Run where pip reaches the registry (``make gpu-bundle``); copy the folder beside the repository on the GPU
machine; ``tools/gpu_smoke.sh`` installs it there. It holds:

- ``wheels/``: the packages the suite needs beyond what a CUDA image with torch, transformers, accelerate,
  triton, numpy, pandas, pyarrow and tokenizers already has (``WHEELS``: the pins of ``pyproject.toml``
  and the ``gpu`` extra, and their pure-Python dependencies), for CPython 3.12 on x86-64 Linux;
  bitsandbytes is cut down to the one CUDA runtime the target's torch was built for (``--cuda``; the
  whole wheel, 43 MB, carries seven).

The tiny models' tokenizer is the repository's own (``tests/fixtures/tokenizer``): the model's wheel stays behind.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

# name==version: the project's pins, the gpu extra, and what they need that a CUDA torch image lacks.
# Compiled (or, like multiprocess, per-Python) ones are fetched for the GPU machine's platform and Python;
# the rest are pure Python (sqlitedict, rouge_score and word2number exist only as source: built here).
COMPILED = ["bitsandbytes==0.50.2", "msgspec==0.22.0", "hf_transfer==0.1.9", "multiprocess==0.70.19"]
PURE = [
    # the suite's own pins (pyproject.toml) and the gpu extra
    "trl==1.14.2",
    "peft==0.21.2",
    "datasets==4.8.5",
    "lm-eval==0.4.13",
    "gguf==0.19.0",
    "unsloth==2026.10.7",
    "unsloth_zoo==2026.10.7",
    # unsloth / unsloth_zoo
    "cut_cross_entropy==25.1.1",
    "tyro==1.0.17",
    "docstring_parser==0.18.0",
    "typeguard==4.6.0",
    "nest_asyncio==1.6.0",
    "structlog==26.1.0",
    # datasets
    "dill==0.4.1",
    # lm-eval
    "evaluate==0.4.6",
    "sqlitedict==2.1.0",
    "pytablewriter==1.2.1",
    "dataproperty==1.1.1",
    "mbstrdecoder==1.1.5",
    "pathvalidate==3.3.1",
    "tabledata==1.3.5",
    "tcolorpy==0.1.7",
    "typepy==2.0.0",
    "chardet==6.0.0.post1",
    "rouge_score==0.0.4",
    "nltk==3.10.4",
    "word2number==1.1",
    "more_itertools==11.2.1",
    "defusedxml==0.7.1",
]
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def _pip(args: list[str]) -> None:
    """pip, with this machine's notes about absent local index folders left out of the output."""
    out = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    noise = "is ignored: it is neither a file nor a directory"
    print("".join(line + "\n" for line in (out.stdout + out.stderr).splitlines() if noise not in line), end="")
    if out.returncode:
        raise SystemExit(f"pip {args[0]} failed (exit {out.returncode})")


def download(wheels_dir: Path, python: str) -> None:
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    _pip(
        [
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python,
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(wheels_dir),
            *COMPILED,
        ]
    )
    _pip(["wheel", "-q", "--no-deps", "-w", str(wheels_dir), *PURE])
    impure = [
        w.name
        for w in wheels_dir.glob("*.whl")
        if w.name.split("-")[0].lower() not in {c.split("==")[0].lower().replace("-", "_") for c in COMPILED}
        and not w.name.endswith(("-py3-none-any.whl", "-py2.py3-none-any.whl"))
    ]
    if impure:
        raise SystemExit(f"expected pure-Python wheels, got {impure}: move them to COMPILED")


def trim_bitsandbytes(wheel: Path, cuda: str) -> Path:
    """Rewrite the bitsandbytes wheel keeping only ``libbitsandbytes_cuda<cuda>.so`` (and the CPU library),
    with its RECORD rewritten to match."""
    keep = re.compile(rf"libbitsandbytes_(cuda{cuda}|cpu)\.so$")
    drop = lambda name: "libbitsandbytes_" in name and not keep.search(name)  # noqa: E731
    out = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        if not any(keep.search(n) and "cuda" in n for n in src.namelist()):
            raise SystemExit(f"{wheel.name} has no libbitsandbytes_cuda{cuda}.so: pick --cuda from its contents")
        for info in src.infolist():
            if drop(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [line for line in data.decode().splitlines() if not drop(line.split(",")[0])]
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, data)
    out.replace(wheel)
    return wheel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_bundle", help="folder to write (default: gpu_bundle)")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (default: 3.12)")
    parser.add_argument("--cuda", default="130", help="CUDA runtime of its torch, torch.version.cuda without the dot")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    download(out / "wheels", args.python)
    for wheel in (out / "wheels").glob("bitsandbytes-*.whl"):
        trim_bitsandbytes(wheel, args.cuda)
    total = 0
    for path in sorted(out.rglob("*")):
        if path.is_file():
            total += path.stat().st_size
            print(f"{path.stat().st_size / 2**20:8.2f} MB  {path.relative_to(out)}")
    print(f"{total / 2**20:8.2f} MB  in all ({out})")


if __name__ == "__main__":
    main()
