"""Child processes a stage starts (sampling and scoring workers, training processes): they import this
package from where this process did, run in a process group of their own and are stopped with everything
they started (vLLM's engine cores, accelerate's trainers)."""

from __future__ import annotations

import os
import signal
import subprocess

from sedir_utils.core.package import CHECKOUT_DIR

ROOT = str(CHECKOUT_DIR)  # the folder that holds sedir_utils (a checkout or site-packages)
STOP_GRACE_SECONDS = 15


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child, with unbuffered output, this package importable whether it is
    installed or a checkout on ``sys.path``, and ``extra``."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(extra or {})}


def start(command: list[str], *, stdout, env: dict[str, str]) -> subprocess.Popen:
    """Start ``command`` in its own process group, stderr joined to ``stdout`` (a file or ``subprocess.PIPE``)."""
    return subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(*procs: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop children and whatever they started (their process groups, even where the child itself has ended):
    SIGTERM to every group at once, up to ``grace`` seconds for the children to exit, then SIGKILL to what is
    left of the groups."""
    import time

    def signal_groups(sig):
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):  # nothing of it is left
                pass

    signal_groups(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    signal_groups(signal.SIGKILL)
    for proc in procs:
        proc.wait()


def last_line(text: str) -> str:
    """The last non-empty line of a child's output (progress bars' carriage returns count as line ends), for a
    one-line error."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
