"""The run directory: the one owner of every path and name in it. Code and tests ask here.

    <storage_path>/<name>/
        config.yaml  plan.json  state.json     the resolved config, the curriculum plan, where the run is
        metrics.jsonl  report.md  distill.log  metrics (the source of truth), the report, the full log
        ray_logs -> <Ray session>/logs         every Ray process's log (replicas, tasks, trainer workers)
        eval/baseline_test.json                the initial student's and the teachers' test accuracy
        eval/final_test.json                   the final student's
        checkpoints/<stage>/student/           each stage's student, as the trainer publishes it,
        checkpoints/<stage>/train.json           with its step metrics and its end checkpoint
        ray_train/<name>-student/              Ray Train's checkpoints (`<stage>-step_00004`, `<stage>-end`)
        stages/<teacher>/<k>-<hash>/           stage records (under `records_path` when that is set)
        student/                               the final student, a Hugging Face directory

`<stage>` is the stage id with `/` replaced (`teacher-l/2` -> `teacher-l-2`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from masters.io import atomic_write_json, atomic_write_text

# Under a records root: `stages/<teacher>/<k>-<hash>/`.
STAGES = "stages"
# Inside a stage's output directory (`RunLayout.stage_output`), written by the trainer.
STAGE_STUDENT = "student"
STAGE_RESULT = "train.json"


def stage_slug(stage_id: str) -> str:
    """A stage id as one path component: `teacher-l/2` -> `teacher-l-2`."""
    return stage_id.replace("/", "-")


def checkpoint_name(stage_id: str, step: int | None) -> str:
    """The name of a trainer checkpoint: after `step` updates of the stage, or at its end (`step=None`)."""
    return f"{stage_slug(stage_id)}-{'end' if step is None else f'step_{step:05d}'}"


def stage_records_dir(records_root: str | Path, teacher: str, stage_index: int, config_hash: str) -> Path:
    """`<root>/stages/<teacher>/<k>-<hash>/`: named by what produced the records (`stage_config_hash`), so
    runs sharing a root share a stage exactly when they would generate it alike."""
    return Path(records_root) / STAGES / teacher / f"{stage_index}-{config_hash}"


@dataclass(frozen=True)
class RunLayout:
    """Where each file of the run `name` lives under `storage_path`; `records_path` (when set) holds the
    stage records instead of the run directory, so several runs can share them."""

    storage_path: Path
    name: str
    records_path: Path | None = None

    @classmethod
    def of(cls, config) -> RunLayout:
        """The layout of `config`'s run (a `MastersConfig`)."""
        records = Path(config.records_path) if config.records_path is not None else None
        return cls(Path(config.storage_path), config.name, records)

    @property
    def root(self) -> Path:
        return self.storage_path / self.name

    def create(self, config_yaml: str, plan: list[dict]) -> None:
        """The run directory with its resolved config and plan; a rerun must keep the same config."""
        if self.config_file.exists() and self.config_file.read_text() != config_yaml:
            raise ValueError(
                f"run {self.name!r} exists in {self.root} with another config; "
                "resume it with the same config, or choose a new name with --set name=<new>"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_file, config_yaml)
        atomic_write_json(self.plan_file, plan)

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def plan_file(self) -> Path:
        return self.root / "plan.json"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def report_file(self) -> Path:
        return self.root / "report.md"

    @property
    def log_file(self) -> Path:
        return self.root / "distill.log"

    @property
    def ray_logs(self) -> Path:
        return self.root / "ray_logs"

    @property
    def baseline_test(self) -> Path:
        return self.root / "eval" / "baseline_test.json"

    @property
    def final_test(self) -> Path:
        return self.root / "eval" / "final_test.json"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def records_root(self) -> Path:
        return self.records_path if self.records_path is not None else self.root

    @property
    def stages(self) -> Path:
        """Every stage's records (`stage_records_dir`), under `records_root`."""
        return self.records_root / STAGES

    @property
    def train_storage(self) -> Path:
        """Ray Train's `storage_path` for this run."""
        return self.root / "ray_train"

    @property
    def train_run_name(self) -> str:
        """Ray Train's run name: with `train_storage`, where its checkpoints persist."""
        return f"{self.name}-student"

    def train_checkpoint(self, stage_id: str, step: int | None) -> Path:
        return self.train_storage / self.train_run_name / checkpoint_name(stage_id, step)

    def stage_output(self, stage_id: str) -> Path:
        """Where the trainer publishes a stage's student (`STAGE_STUDENT`) and results (`STAGE_RESULT`)."""
        return self.root / "checkpoints" / stage_slug(stage_id)
