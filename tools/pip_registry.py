"""Print the registry pip is configured with here as uv's options, one per line.

uv reads no pip configuration. ``make env`` installs with uv and the resolve test resolves with it, both
against the registry this machine's pip uses: its index, extra indexes, find-links and constraints, from pip's
files or ``PIP_*`` variables (``pip config list``). Like pip, uv then weighs every index's versions
(``unsafe-best-match``; uv's default takes a package from the first index that has it). Where pip has no
such setting, nothing but that strategy is printed and uv uses PyPI, as pip does.

    python tools/pip_registry.py [PYTHON]    # PYTHON: whose pip to ask (default: this one)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

FLAGS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def uv_options(config: str) -> list[str]:
    """``pip config list``'s lines (``global.find-links='/opt/wheels'``, ``:env:.constraint='...'``; a value may
    hold several, space-separated) as uv's options, each flag and value once, in pip's order. A local folder or
    ``file://`` index that does not exist is left out, as pip ignores it (uv would stop on it)."""
    pairs: list[tuple[str, str]] = []
    for line in config.splitlines():
        key, _, value = line.partition("=")
        flag = FLAGS.get(key.rsplit(".", 1)[-1])
        for item in value.strip("'\"").split() if flag else ():
            if (flag, item) not in pairs and _present(item):
                pairs.append((flag, item))
    return [part for pair in pairs for part in pair] + ["--index-strategy", "unsafe-best-match"]


def _present(location: str) -> bool:
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path) if parsed.scheme else location).exists()
    return True


def main() -> None:
    python = sys.argv[1] if len(sys.argv) > 1 else sys.executable
    config = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    print("\n".join(uv_options(config.stdout)))


if __name__ == "__main__":
    main()
