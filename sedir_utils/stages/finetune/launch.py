"""Training in child processes: one Python process (Unsloth always trains in its own), or several started by
``accelerate launch`` (``finetune.num_processes``). Each runs ``python -m sedir_utils.stages.finetune.launch SPEC``,
which calls the trainer the spec names ("module:function") and writes its result."""

from __future__ import annotations

from pathlib import Path

from sedir_utils.core import children
from sedir_utils.core.config import build_section
from sedir_utils.core.io import StageError, read_json, write_json
from sedir_utils.core.params import ACCELERATE_CONFIGS, ACCELERATE_CONFIGS_DIR, FinetuneParams
from sedir_utils.stages.finetune.methods import train_bf16, training_dataset

# What the worker process runs for ``backend: unsloth`` ("module:function"; the tests point it at a stand-in).
UNSLOTH_TRAINER = "sedir_utils.stages.finetune.unsloth_backend:train_unsloth"
TRL_TRAINER = "sedir_utils.stages.finetune.trl_backend:train_trl"


def accelerate_config(section) -> Path:
    """The accelerate config file ``finetune.distributed`` names: one the suite ships, or the user's own."""
    if section.distributed in ACCELERATE_CONFIGS:
        return ACCELERATE_CONFIGS_DIR / f"{section.distributed}.yaml"
    return Path(section.distributed).expanduser()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(section, *, cuda: bool, port: int | None = None) -> list[str]:
    """How the stage starts ``finetune.num_processes`` trainers: ``accelerate launch`` with the config, the
    process count, the mixed precision the trainer uses (``train_bf16``: bf16, else fp16 on a GPU and none on a
    CPU) and, with a config the suite ships (one machine), a free rendezvous port, so that two runs on one
    machine do not collide.
    The spec file's path follows. Without a GPU the processes train on the CPU and talk through gloo."""
    import sys

    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config(section))]
    command += [
        "--num_processes",
        str(section.num_processes),
        "--mixed_precision",
        "bf16" if train_bf16(cuda) else ("fp16" if cuda else "no"),
    ]
    if section.distributed in ACCELERATE_CONFIGS:
        command += ["--main_process_port", str(port or _free_port())]
    if not cuda:  # the configs are for GPUs; accelerate would give each CPU process one thread
        import torch

        command += ["--num_cpu_threads_per_process", str(max(1, torch.get_num_threads() // section.num_processes))]
    return command + ["-m", "sedir_utils.stages.finetune.launch"]


def train_in_worker(
    base_path: str,
    rows: list[dict],
    section,
    work_dir: Path,
    seed: int,
    out_dir: Path,
    report=None,
    *,
    target: str | None = None,
    launcher: list[str] | None = None,
    rewards: dict | None = None,
):
    """Train in child processes, relaying their output; returns (log history, memory figures).

    ``launcher``: the command that starts them (default: one Python process; ``launch_command``: ``accelerate
    launch`` with ``finetune.num_processes``), which runs ``target`` ("module:function", default Unsloth's).
    ``rewards``: GRPO's reward (``grpo.reward_spec``), rebuilt in the child.

    Unsloth always trains in a child: importing Unsloth replaces the forward of transformers' Llama/Qwen2
    models process-wide, and its forward does not fill a cache passed to it: the cells after training (which
    load the saved model and sample from it with the suite's engine) and every later stage in the same kernel
    would break. In a child process the caller's interpreter never sees the patches, and the GPU memory of
    training is released when the child exits.
    """
    import codecs
    import dataclasses
    import subprocess
    import sys

    work_dir.mkdir(parents=True, exist_ok=True)
    spec, result = work_dir / "worker_spec.json", work_dir / "worker_result.json"
    result.unlink(missing_ok=True)
    write_json(
        spec,
        {
            "target": target or UNSLOTH_TRAINER,
            "base_path": base_path,
            "rows": rows,
            "seed": seed,
            "section": dataclasses.asdict(section),
            "work_dir": str(work_dir),
            "out_dir": str(out_dir),
            "result": str(result),
            "method": section.method,
            "report": report,
            "launched": launcher is not None,
            "rewards": rewards,
        },
    )
    command = (launcher or [sys.executable, "-m", "sedir_utils.stages.finetune.launch"]) + [str(spec)]
    if launcher:
        print("training processes: " + " ".join(command))
    proc = children.start(command, stdout=subprocess.PIPE, env=children.environment())
    decoder, tail = codecs.getincrementaldecoder("utf-8")("replace"), ""  # tail: for the error's one line
    try:
        for raw in iter(lambda: proc.stdout.read1(4096), b""):
            text = decoder.decode(raw)
            sys.stdout.write(text)
            sys.stdout.flush()
            tail = (tail + text)[-4000:]
        code = proc.wait()
    finally:
        children.stop(proc)  # interrupted: it stops, and its children (accelerate's trainers) with it
        spec.unlink(missing_ok=True)  # it holds every training row: no second copy stays behind
    try:
        if code != 0 or not result.is_file():
            what = "the training processes (accelerate launch)" if launcher else "the Unsloth training process"
            raise StageError(f"finetune: {what} failed (exit {code}): {children.last_line(tail)}")
        out = read_json(result)
    finally:
        result.unlink(missing_ok=True)
    return out["history"], out["memory"]


def worker_main(spec_path: str) -> None:
    """A child process of ``train_in_worker``: rebuild the inputs, train, write the result (the main process
    only, when ``accelerate launch`` started several)."""
    import importlib
    import os

    spec = read_json(spec_path)
    section = build_section(FinetuneParams, spec["section"], "finetune.", spec_path)
    module, _, name = spec["target"].partition(":")
    train = getattr(importlib.import_module(module), name)
    history, memory = train(
        spec["base_path"],
        training_dataset(spec["rows"], spec["method"]),
        section,
        Path(spec["work_dir"]),
        spec["seed"],
        Path(spec["out_dir"]),
        report=spec.get("report"),
        **({"rewards": spec["rewards"]} if spec.get("rewards") else {}),
    )
    if not spec.get("launched") or int(os.environ.get("RANK", "0")) == 0:  # launched: the main process writes
        write_json(spec["result"], {"history": history, "memory": memory})


if __name__ == "__main__":  # the Unsloth worker process (see ``train_in_worker``)
    import sys

    worker_main(sys.argv[1])
