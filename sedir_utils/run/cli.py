"""The command line: ``python -m sedir_utils`` (or ``sedir``) runs the loop; ``sedir export`` and ``sedir report``
read a finished run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sedir_utils.core.config import parse_override
from sedir_utils.core.declarations import STAGES
from sedir_utils.core.io import DataError, StageError
from sedir_utils.core.models import ModelError
from sedir_utils.core.params import ParamsError
from sedir_utils.run.preflight import PreflightError
from sedir_utils.run.runner import RunError, run
from sedir_utils.share import publish
from sedir_utils.share.report import write_report


def parse_start(text: str | None) -> tuple[int, int] | None:
    """``--from 2`` or ``--from 2:reward`` -> (iteration, stage index): run from there even if cached."""
    if text is None:
        return None
    iteration, _, stage = text.partition(":")
    names = [s.name for s in STAGES]
    try:
        k = int(iteration)
    except ValueError:
        raise ParamsError(f"--from: expected ITERATION or ITERATION:STAGE, e.g. 1:reward, got {text!r}") from None
    if stage and stage not in names:
        raise ParamsError(f"--from: unknown stage {stage!r} (stages: {', '.join(names)})")
    return k, names.index(stage) if stage else 0


def export_main(argv: list[str]) -> None:
    """``sedir export RUN_DIR [--to PATH | --push-to-hub REPO]``."""
    parser = argparse.ArgumentParser(
        prog="sedir export", description="Gather a run's datasets into one DatasetDict with a dataset card."
    )
    parser.add_argument("run_dir", help="a run folder (outputs/<run_name>)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--to", help="folder to save it in (default: RUN_DIR/export); load it with load_from_disk")
    where.add_argument("--push-to-hub", metavar="REPO", help="a hub dataset repo, e.g. you/sedir-run (private)")
    parser.add_argument("--public", action="store_true", help="with --push-to-hub: make the repo public")
    args = parser.parse_args(argv)
    if args.push_to_hub:
        print(f"pushed: {publish.push(args.run_dir, args.push_to_hub, private=not args.public)}")
        return
    folder, counts = publish.export(args.run_dir, args.to)
    print(f"exported {', '.join(f'{s} {n}' for s, n in counts.items())} rows to {folder} (datasets.load_from_disk)")


def report_main(argv: list[str]) -> None:
    """``sedir report RUN_DIR``."""
    parser = argparse.ArgumentParser(prog="sedir report", description="Write a run's one-page HTML report.")
    parser.add_argument("run_dir", help="a run folder (outputs/<run_name>)")
    args = parser.parse_args(argv)
    if not (Path(args.run_dir) / "manifest.json").is_file():
        raise DataError(f"{args.run_dir}: no manifest.json (not a run folder the runner wrote)")
    print(f"report: {write_report(args.run_dir)}")


COMMANDS = {"export": export_main, "report": report_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        try:
            COMMANDS[argv[0]](argv[1:])
        except (ParamsError, DataError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    parser = argparse.ArgumentParser(
        prog="sedir",
        description="Run the SeDiR self-improvement loop (also: sedir export RUN_DIR, sedir report RUN_DIR).",
    )
    parser.add_argument("--params", required=True, help="experiment YAML, e.g. params/embedded.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one param, e.g. --set questions.temperature=0.7 (repeatable)",
    )
    parser.add_argument("--iterations", type=int, help="fine-tuning iterations (default: params 'iterations')")
    parser.add_argument("--run-dir", help="output folder (default: outputs/<run_name>)")
    parser.add_argument(
        "--from",
        dest="start",
        metavar="ITER[:STAGE]",
        help="re-run from this iteration (and stage) on, even where cached, e.g. --from 1:reward",
    )
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
        run(args.params, overrides, iterations=args.iterations, run_dir=args.run_dir, start=parse_start(args.start))
    except (ParamsError, DataError, StageError, ModelError, RunError, PreflightError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ParamsError) else 1
    return 0
