"""Run metrics: every record goes to the run's `metrics.jsonl` (`RunLayout.metrics_file`) and, when enabled, to wandb."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from masters.config import LoggingConfig

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Appends one JSON line per record; mirrors scalar values to wandb.

    The JSONL file is the source of truth (reports and resume read it); wandb is for watching.
    """

    def __init__(self, path: Path, run_name: str, logging_config: LoggingConfig, config_dict: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wandb_run = None
        if logging_config.wandb_project is not None:
            self._wandb_run = self._start_wandb(self.path.parent, run_name, logging_config, config_dict)

    @staticmethod
    def _start_wandb(run_dir: Path, run_name: str, logging_config: LoggingConfig, config_dict: dict):
        # The environment wins (tests set WANDB_MODE=disabled); then the config; then offline
        # unless an API key says the user wants their runs online.
        mode = os.environ.get("WANDB_MODE") or logging_config.wandb_mode
        if mode is None:
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode == "disabled":
            return None
        import wandb

        run = wandb.init(
            project=logging_config.wandb_project,
            name=run_name,
            id=run_name,  # re-running the same name resumes the same wandb run
            resume="allow",
            config=config_dict,
            mode=mode,
            dir=str(run_dir),
        )
        logger.info("wandb %s run: %s", mode, getattr(run, "url", None) or run.dir)
        return run

    def log(self, kind: str, **values) -> dict:
        record = {"kind": kind, "time": time.time(), **values}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")
        if self._wandb_run is not None:
            scalars = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if scalars:
                self._wandb_run.log(scalars)
        return record

    def close(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def read_metrics(path: Path, kind: str | None = None) -> list[dict]:
    """The records of `path` (a metrics.jsonl), those of `kind` only when given."""
    path = Path(path)
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]
