"""What the job entry points share: the run flags, the console and log file, and connecting to Ray."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from masters.config import ConfigError, MastersConfig, relative_paths

# Set by Ray's job supervisor in the environment of a driver started with `ray job submit`.
RAY_JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Our own loggers: their INFO lines are the console's story; everything else shows from WARNING up.
OWN_LOGGERS = ("masters", "cluster", "serve", "jobs", "__main__")


def add_set_argument(parser: argparse.ArgumentParser, applies_to: str) -> None:
    """--set SECTION.FIELD=VALUE, repeatable (`masters.config.load_config` takes the list)."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help=f"override one config field of {applies_to}, e.g. --set train.lr=1e-4 (repeatable; values are YAML)",
    )


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """--address and --verbose, for the jobs that run on a Ray cluster with `connect_ray`."""
    parser.add_argument("--address", default=None, help="Ray address (default: the cluster under `ray job submit`, else a local one)")
    parser.add_argument(
        "--verbose", action="store_true", help="show every Ray, Serve and Ray Data log line on the console (the log file always has them)"
    )


def check_paths_for_submitted_job(config: MastersConfig) -> None:
    """Under `ray job submit` every path must be absolute, on storage every node mounts.

    A submitted driver runs in a temporary copy of its working directory (or Ray's session directory)
    on the head node: a relative path would put the run and the zoo there, where no other node sees them
    and Ray deletes them after the job.
    """
    if RAY_JOB_ENV_VAR not in os.environ:
        return
    relative = relative_paths(config)
    if relative:
        listed = ", ".join(f"{field}={path!r}" for field, path in relative.items())
        raise ConfigError(
            f"under `ray job submit` these paths are relative: {listed}. The job runs in a temporary copy of its "
            "working directory that other nodes do not see and Ray deletes afterwards; give absolute paths on "
            "storage every node mounts, e.g. --set storage_path=/mnt/runs --set models.zoo_dir=/mnt/zoo "
            "(docs/cluster.md, 'Paths')"
        )


class _ConsoleFilter(logging.Filter):
    """Our INFO lines and everyone's warnings; library deprecation notices only in the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(OWN_LOGGERS):
            return record.levelno >= logging.INFO
        return record.levelno >= logging.WARNING and record.name != "py.warnings"


def configure_console(log_file: Path, verbose: bool) -> None:
    """Every log line of this process to `log_file`; to the console our INFO lines and warnings, or
    (`verbose`) everything. Ray's loggers are routed through the same two handlers."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_console = logging.StreamHandler()
    to_console.setFormatter(logging.Formatter("%(asctime)s %(message)s" if not verbose else "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    if not verbose:
        to_console.addFilter(_ConsoleFilter())
    root = logging.getLogger()
    root.handlers[:] = [to_file, to_console]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    # Ray, Serve and Ray Data log to the terminal through handlers of their own; send them through ours.
    for name in ("ray", "ray.data", "ray.serve", "ray.train"):
        library = logging.getLogger(name)
        library.handlers[:] = [h for h in library.handlers if not isinstance(h, logging.StreamHandler) or isinstance(h, logging.FileHandler)]
        library.propagate = True
    if not verbose:
        os.environ.setdefault("WANDB_SILENT", "true")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def connect_ray(address: str | None, verbose: bool, logs_link: Path | None = None) -> None:
    """The running cluster under `ray job submit` (RAY_ADDRESS is set), a new local instance otherwise.

    Ray workers' output (replicas, tasks, trainer workers) reaches the console only when `verbose`;
    it is always in the session's log directory, which `logs_link` points at."""
    import ray
    from ray.data import DataContext

    options = {"configure_logging": False, "log_to_driver": verbose}
    if address is None and "RAY_ADDRESS" not in os.environ:
        # "local": a new instance even if a `ray start` cluster runs here (join one with --address auto).
        context = ray.init(address="local", include_dashboard=False, **options)
    else:
        context = ray.init(address=address or "auto", **options)
    # Its high-memory detector flags the sampling tasks (~0.4 GB: pyarrow and a block of images) for
    # requesting no memory, every 30 s, 14 lines each time; what they hold is bounded by
    # generation.questions_per_task.
    DataContext.get_current().issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    logs = Path(context.address_info["session_dir"]) / "logs"
    if logs_link is not None and logs.is_dir():
        logs_link.unlink(missing_ok=True)
        logs_link.symlink_to(logs, target_is_directory=True)
        logging.getLogger("jobs.cli").info("Ray logs: %s", logs_link)
