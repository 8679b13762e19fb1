"""`python -m training --config run.toml`: one training run as a process, reporting as JSON lines.

The studio runs training out of process (as kohya_ss does) so a crash, an out-of-memory kill or a
stop never takes the server with it. stdout carries only the protocol, one JSON object per line
(start / step / saved / sample / done / error); everything human-readable goes to stderr. Exit codes:
0 done, 2 bad input (config, run file, dataset, base model, state), 1 any other failure, 3 stopped by
SIGTERM/SIGINT at a step boundary (the last saved epoch stays intact; a rerun resumes from it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

EXIT_DONE, EXIT_FAILED, EXIT_INVALID, EXIT_STOPPED = 0, 1, 2, 3
log = logging.getLogger("training")


class Protocol:
    """Writes protocol events, one JSON object per line, to the real stdout."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, ensure_ascii=False, allow_nan=False, default=str)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def main(argv: list[str] | None = None, *, stdout: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description="Train a LoRA from a run file.")
    parser.add_argument("--config", required=True, type=Path, help="run file (TOML, or JSON when it ends .json)")
    args = parser.parse_args(argv)
    protocol = Protocol(stdout or sys.stdout)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: stopping at the next step", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    threading.Thread(target=_watch_parent, args=(os.getppid(), stop), name="parent-watch", daemon=True).start()
    try:
        # Only the protocol may reach stdout: libraries that print are pointed at stderr.
        with contextlib.redirect_stdout(sys.stderr):
            return _run(args.config, protocol, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _watch_parent(parent: int, stop: threading.Event, every: float = 2.0) -> None:
    """Stop when the process that started us is gone (the studio killed with SIGKILL cannot send SIGTERM): an
    orphaned trainer would hold the GPU for nobody. The last saved epoch stays; the requeued job resumes from it."""
    while not stop.wait(every):
        if os.getppid() != parent:
            log.warning("the parent process %s is gone: stopping at the next step", parent)
            stop.set()


def _run(path: Path, protocol: Protocol, stop: threading.Event) -> int:
    from training.config import ConfigError
    from training.runfile import read_run_file

    try:
        run, config = read_run_file(path)
    except ConfigError as exc:
        protocol.emit({"event": "error", "message": exc.message, "field": exc.field})
        return EXIT_INVALID
    for warning in config.warnings:
        log.warning("config: %s", warning)

    import torch

    from training.trainer import Stopped, Trainer, TrainingInputError

    if run.cpu_threads:
        torch.set_num_threads(run.cpu_threads)
    try:
        Trainer(run, config, on_event=protocol.emit, should_stop=stop.is_set).run()
    except TrainingInputError as exc:
        protocol.emit({"event": "error", "message": exc.message, "field": exc.field})
        return EXIT_INVALID
    except Stopped as exc:
        log.info("%s; the last saved epoch is kept", exc)
        return EXIT_STOPPED
    except Exception as exc:  # report any failure on the protocol; the traceback goes to stderr
        log.exception("training failed")
        protocol.emit({"event": "error", "message": f"{type(exc).__name__}: {exc}", "field": None})
        return EXIT_FAILED
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
