"""``python -m deploy.container serve [flags]``: the worker's command line (also SageMaker's ``serve`` entry);
``python -m deploy.container train``: SageMaker's training entry (``deploy.container.train``).

Every flag has an environment twin ``STUDIO_WORKER_<NAME>`` (``--cache-gb`` → ``STUDIO_WORKER_CACHE_GB``);
a flag given on the command line wins. The shared secret comes only from ``STUDIO_WORKER_SECRET`` or
``--secret-file``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from deploy.container import VERSION

log = logging.getLogger("deploy.container")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.container",
                                     description="The studio's serving container (worker).")
    parser.add_argument("--version", action="version", version=f"studio worker {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve jobs over HTTP (SageMaker's entry: docker run image serve)",
                                argument_default=argparse.SUPPRESS,
                                description="Flags default to STUDIO_WORKER_<NAME> variables, then to the "
                                            "defaults shown.")
    serve.add_argument("--host", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (default 8080, SageMaker's)")
    serve.add_argument("--store", help="asset store models come from: a directory or s3://bucket/prefix")
    serve.add_argument("--cache-dir", type=Path, help="local model file cache (default ~/.cache/studio-worker/models)")
    serve.add_argument("--cache-gb", type=float, help="disk budget of the model file cache (default 50)")
    serve.add_argument("--devices", help="auto (every CUDA device, else the CPU) or cuda:0,cuda:1 ... (default auto)")
    serve.add_argument("--annotators-dir", type=Path, help="ControlNet preprocessor weights (never downloaded)")
    serve.add_argument("--skeleton-dirs", type=Path, nargs="+", help="extra config-skeleton folders")
    serve.add_argument("--pipeline-cache-gb", type=float, help="loaded models kept per device (default: by memory)")
    serve.add_argument("--preview-every", type=int, help="a live preview every N steps, 0: none (default 5)")
    serve.add_argument("--dtype", help="float16, bfloat16 or float32 (default: by device)")
    serve.add_argument("--secret-file", type=Path,
                       help="file holding the shared secret (or STUDIO_WORKER_SECRET); none: no auth")
    serve.add_argument("--max-waiting", type=int, help="/invocations that may wait for a slot (default 4)")
    serve.add_argument("--max-body-mb", type=float, help="largest job spec accepted, in MB (default 64)")
    serve.add_argument("--heartbeat-seconds", type=float, help="idle event streams send a heartbeat (default 2)")
    serve.add_argument("--buffer-ttl-seconds", type=float, help="finished jobs' events are kept (default 900)")
    serve.add_argument("--progress-interval-seconds", type=float,
                       help="async invocations' progress objects at most this often (default 1)")
    serve.add_argument("--stop-timeout-seconds", type=float, help="SIGTERM: time for jobs to end (default 20)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--backend", choices=("local", "fake"), help=argparse.SUPPRESS)
    serve.add_argument("--backend-options", help=argparse.SUPPRESS)  # JSON, e.g. the fake's {"step_delay": 0.1}
    train = commands.add_parser("train", help="run one LoRA training as a SageMaker training job "
                                              "(docker run image train)",
                                description="Reads the job from SageMaker's /opt/ml layout; see deploy/container/train.py.")
    train.add_argument("--ml-root", type=Path, default=Path("/opt/ml"), help="SageMaker's folder (default /opt/ml)")
    train.add_argument("--device", default="auto", help="auto (CUDA when present, else the CPU), cpu, cuda or cuda:<n>")
    train.add_argument("--skeleton-dirs", type=Path, nargs="+", default=[], help="extra config-skeleton folders")
    train.add_argument("--cpu-threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    if args.pop("command") == "train":
        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from deploy.container.train import run_train

        return run_train(**args)
    from deploy.container.config import WorkerSettings, WorkerSettingsError

    try:
        settings = WorkerSettings(**args)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first.get("loc", ()))
        print(f"error: --{name.replace('_', '-')}: {first.get('msg')}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from deploy.container.serve import serve

    try:
        serve(settings)
    except WorkerSettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
