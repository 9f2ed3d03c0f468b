"""Serve the teachers (every mask level) and the initial student over an OpenAI-compatible HTTP API.

    .venv/bin/python jobs/serve_teachers.py                          # the zoo models on 127.0.0.1:8000
    .venv/bin/python jobs/serve_teachers.py --set serve.port=9000 --set serve.replicas=2
    .venv/bin/python jobs/serve_teachers.py --config configs/X.yaml  # the models and limits of a run config
    ray job submit --working-dir . -- python jobs/serve_teachers.py --address auto

Model ids are `<teacher>@<ratio>` for every ratio of the mask schedule (e.g. `teacher-l@0.15`) and
`student`. Ctrl-C or SIGTERM shuts the service and the Ray instance down and exits 0. See
docs/serving.md for the API.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jobs.cli import add_set_argument  # noqa: E402
from masters.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Start the Masters teacher service: one Ray Serve deployment per teacher and for the student, "
        "every mask level addressable as `<teacher>@<ratio>`, behind an OpenAI-compatible API "
        "(/v1/models, /v1/chat/completions, /v1/score, /health).",
        epilog="Models come from models.teachers / models.student of the config (default: the zoo, "
        "`zoo:<role>` built by jobs/build_zoo.py into models.zoo_dir). Bind address, port, replicas, "
        "batching, limits and auth are the serve.* fields.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="Run config YAML; default: the built-in defaults.")
    add_set_argument(parser, "the service")
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (`auto` under `ray job submit`); default: a local instance.",
    )
    return parser.parse_args(argv)


def stop_on_sigterm() -> None:
    """Make SIGTERM (`kill`, `docker stop`, systemd, Kubernetes, `ray job stop`) take the Ctrl-C path below.

    Called after `ray.init`, which installs SIGTERM handlers of its own that skip `serve.shutdown()`
    and the orderly `ray.shutdown()`: measured, the job died of SIGABRT (exit -6) and Ray's dashboard and
    runtime-env agents were still running 30 s later.
    """

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)
    # Python leaves SIGINT ignored when it starts ignored, as for a job started in the background
    # (`cmd &` in a script): `kill -INT` must still stop the service cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.set)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from masters.zoo import resolve_model_paths
    from serve.app import start
    from serve.levels import Catalog

    try:
        model_paths = resolve_model_paths(config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"cannot serve: {exc}", file=sys.stderr)
        print(
            "Build the zoo first (`.venv/bin/python jobs/build_zoo.py`), or point models.teachers / models.student "
            "at Hugging Face model directories with --config or --set.",
            file=sys.stderr,
        )
        return 2

    ray.init(address=args.address, include_dashboard=False)
    stop_on_sigterm()
    try:
        base_url = start(config, model_paths)
        print(f"teacher service at {base_url} (OpenAI base URL)")
        print(f"  GET  {base_url}/models\n  POST {base_url}/chat/completions\n  POST {base_url}/score")
        print(f"  GET  {base_url.removesuffix('/v1')}/health")
        for name, path in model_paths.items():
            print(f"  {name}: {path}")
        print("model ids: " + ", ".join(Catalog.from_config(config).model_ids))
        if config.serve.api_key_env:
            print(f"clients must send `Authorization: Bearer ${config.serve.api_key_env}`")
        print("Ctrl-C (or SIGTERM) to stop.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as stop:
        print(f"\n{str(stop) or 'Ctrl-C'}: shutting down", file=sys.stderr, flush=True)
    finally:
        # A repeated SIGTERM (supervisors may send more than one) must not abort the cleanup half way.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        serve.shutdown()
        # Returns once the processes this driver started (a local instance) have exited, so nothing
        # outlives the job; with --address it only disconnects.
        ray.shutdown(wait_for_processes=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
