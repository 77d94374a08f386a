"""The entry of a benchmark run: its options, the signals that interrupt it, its first line, :func:`run_main`."""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from bench.results import RESULTS, emit, note, table


@dataclass(frozen=True)
class Options:
    """How a benchmark runs: ``quick`` shortens every run and shrinks the big store."""

    quick: bool = False
    keep: bool = False
    install_tools: bool = True


def add_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every benchmark (and ``python -m bench``) accepts."""
    parser.add_argument("--quick", action="store_true", help="shorter runs and a smaller big store")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, databases)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not install missing tools (ab, DynamoDB Local); use the fallbacks")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    """Options out of parsed arguments (see :func:`add_options`)."""
    return Options(quick=args.quick, keep=args.keep, install_tools=not args.no_install)


def parse_options(description: str, argv: Sequence[str] | None = None) -> Options:
    """The command line of one benchmark run alone."""
    return options_from(add_options(argparse.ArgumentParser(description=description)).parse_args(argv))


class Interrupted(Exception):
    """SIGTERM or SIGHUP reached the benchmark: unwind and stop every child."""


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into an exception, so ``finally`` blocks stop the children (Ctrl-C already is one)."""
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)


def crossbar_version() -> str:
    """The Crossbar version of the venv (from its package metadata, as ``crossbar version`` prints it)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("crossbar")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line(opts: Options, benches: Sequence[str]) -> dict[str, Any]:
    """The first result line: what ran, where."""
    return {"bench": "machine", "cores": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
            "implementation": platform.python_implementation(), "crossbar": crossbar_version(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "load_avg_1m": os.getloadavg()[0],
            "quick": opts.quick, "benches": list(benches), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_main(name: str, description: str, body: Callable[[Options], object], columns: Mapping[str, Sequence[str]],
             argv: Sequence[str] | None = None) -> int:
    """Entry point of one benchmark run alone: options, machine line, the body, then the table on stderr."""
    opts = parse_options(description, argv)
    install_signal_handlers()
    emit(machine_line(opts, [name]))
    started = time.monotonic()
    try:
        body(opts)
    except (KeyboardInterrupt, Interrupted) as err:
        note(f"interrupted ({err or 'Ctrl-C'}); every process it started has been stopped")
        return 130
    finally:
        print("\n" + table(RESULTS, columns), file=sys.stderr, flush=True)
        note(f"{name}: {time.monotonic() - started:.0f}s")
    return 0
