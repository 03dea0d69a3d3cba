"""Colab: where the suite lives, the badge each notebook carries, and params chosen by the hardware.

The first code cell of every notebook installs the suite only inside Colab (``COLAB_INSTALL``, tested to
do nothing elsewhere); ``params_file = "auto"`` picks the Colab T4 params with CUDA, the embedded ones
without. The repository address is declared once in ``pyproject.toml`` (``[project.urls]``); the tests
check that the notebooks and the README use it.
"""

from __future__ import annotations

from pathlib import Path

REPOSITORY = "https://github.com/sedir-suite/sedir"
PARAMS_DIR = Path(__file__).resolve().parent.parent / "params"


def badge(notebook: str, repository: str = REPOSITORY) -> str:
    """Markdown for an "Open in Colab" badge that opens ``notebooks/<notebook>`` from the main branch."""
    slug = repository.removeprefix("https://github.com/")
    url = f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{notebook}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def pick_params_file(value: str, *, cuda: bool | None = None) -> str:
    """``"auto"``: ``colab-t4.yaml`` with a CUDA device, ``embedded.yaml`` without; anything else as given."""
    if value != "auto":
        return value
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "a CUDA device"
        chosen, why = PARAMS_DIR / "colab-t4.yaml", f"{name} found"
    else:
        chosen, why = PARAMS_DIR / "embedded.yaml", "no CUDA device: the embedded 135M model on the CPU"
    print(f"params: {chosen.name} ({why})")
    return str(chosen)


# The notebooks' first code cell. Outside Colab it does nothing; inside, it clones the suite, installs it
# with the GPU extra (Unsloth) beside Colab's own CUDA torch, and moves to its notebooks folder.
COLAB_INSTALL = f'''# Colab only: install the suite and its GPU extra. Anywhere else this cell does nothing.
import os, subprocess, sys
if "google.colab" in sys.modules:
    if not os.path.isdir("/content/sedir"):
        subprocess.run(["git", "clone", "--depth", "1", "{REPOSITORY}", "/content/sedir"], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "/content/sedir[gpu]"], check=True)
    sys.path.insert(0, "/content/sedir")
    os.chdir("/content/sedir/notebooks")'''
