"""The curriculum on the cluster: stage records generated ahead of the trainer, stages yielded as trained.

    for finished in train_stages(config, stages, questions, layout, address, initial_student, finished_dir):
        ...  # finished.stage, finished.manifest (its records), finished.trained (its student and metrics)

Records never depend on the student being trained (its own responses come from its initial
weights), so one thread streams every pending stage through the generation pipeline
(`cluster.pipeline.run_stages`) while another runs one Ray Train `fit()` through all of them
(`cluster.train.train_curriculum`). A `StageHandoff` actor carries both directions: the generation
thread tells the trainer where a stage's records are, and the trainer's rank 0 tells the driver when
a stage's student is published. A failure on either side is passed to the other, so nobody waits for
a stage that will never come.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ray

from cluster.pipeline import StageRecords, run_stages
from cluster.responses import ServiceAddress
from cluster.stage_store import read_manifest
from cluster.train import StageTrainResult, TrainingStage, train_curriculum
from masters.config import MastersConfig
from masters.curriculum import Stage
from masters.data.source import QuestionIndex
from masters.run_layout import STAGE_STUDENT, RunLayout

logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class StageHandoff:
    """Stage by stage, where the records are (generation -> trainer) and that the student is published
    (trainer -> driver). `fail` wakes every waiter with the error."""

    def __init__(self):
        self._records: dict[str, str] = {}
        self._trained: set[str] = set()
        self._error: str | None = None
        self._changed = asyncio.Event()

    def ready(self, stage_id: str, directory: str) -> None:
        """`directory` must be absolute: the workers' working directory is not the caller's."""
        self._records[stage_id] = directory
        self._changed.set()

    def trained(self, stage_id: str) -> None:
        self._trained.add(stage_id)
        self._changed.set()

    def fail(self, message: str) -> None:
        self._error = message
        self._changed.set()

    async def records(self, stage_id: str) -> str:
        await self._until(lambda: stage_id in self._records, f"no records for stage {stage_id!r}")
        return self._records[stage_id]

    async def wait_trained(self, stage_id: str) -> None:
        await self._until(lambda: stage_id in self._trained, f"stage {stage_id!r} was not trained")

    async def _until(self, done: Callable[[], bool], what: str) -> None:
        while not done():
            if self._error is not None:
                raise RuntimeError(f"{what}: {self._error}")
            self._changed.clear()
            await self._changed.wait()


@dataclass
class FinishedStage:
    """A stage with its records written and its student trained and published."""

    stage: Stage
    manifest: dict  # its records' manifest (counts, rewards by source)
    trained: StageTrainResult

    def summary(self, val_accuracy: float) -> dict:
        """The stage's line of metrics.jsonl (what the report plots): means over its updates."""

        def mean(key: str) -> float | None:
            values = [m[key] for m in self.trained.metrics if key in m]
            return sum(values) / len(values) if values else None

        return {
            "stage_id": self.stage.stage_id,
            "teacher": self.stage.teacher,
            "mask_ratio": self.stage.mask_ratio,
            "steps": self.trained.steps,
            "val_accuracy": val_accuracy,
            "mean_accuracy_reward": mean("accuracy_reward"),
            "mean_distill_reward": mean("distill_reward"),
            "mean_divergence": mean("divergence"),
            "loss": mean("loss"),
            "records": self.manifest["counts"]["records"],
        }


class _Worker(threading.Thread):
    """A daemon thread whose failure reaches the handoff (and so every waiter) before it ends."""

    def __init__(self, name: str, handoff, work: Callable[[], object]):
        super().__init__(name=name, daemon=True)
        self.handoff, self.work, self.error = handoff, work, None

    def run(self) -> None:
        try:
            self.work()
        except BaseException as error:  # handed to the driver through the handoff and `error`
            self.error = error
            self.handoff.fail.remote(f"{self.name}: {type(error).__name__}: {error}")


def train_stages(
    config: MastersConfig,
    stages: list[Stage],
    questions: QuestionIndex,
    layout: RunLayout,
    address: ServiceAddress,
    initial_student: Path,
    finished_stage_dir: Path | None,
) -> Iterator[FinishedStage]:
    """Generate and train `stages` (the plan's pending ones, in order); yield each once its student is
    published. Training starts from the last finished stage's student (`finished_stage_dir`) or from
    `initial_student`, which also samples the student responses and stays the reference."""
    handoff = StageHandoff.remote()
    started = time.perf_counter()

    def hand_over(stage: Stage, records: StageRecords) -> None:
        counts = records.manifest["counts"]
        rewards = ", ".join(f"{source} {value:.2f}" for source, value in counts["mean_accuracy_by_source"].items() if value is not None)
        when = "written before" if records.skipped else f"{time.perf_counter() - started:.0f} s in"
        logger.info("stage %-12s records: %d groups from %s (%s); R_acc %s", stage.stage_id, counts["records"], stage.model_id, when, rewards)
        handoff.ready.remote(stage.stage_id, str(records.directory.resolve()))

    generation = _Worker(
        "generation",
        handoff,
        lambda: run_stages(config, stages, questions, layout.records_root, address, initial_student, on_stage_done=hand_over),
    )

    def train() -> None:
        results = train_curriculum(
            config,
            [TrainingStage(s.stage_id, s.optimizer_steps, str(layout.stage_output(s.stage_id))) for s in stages],
            handoff,
            student_in=finished_stage_dir / STAGE_STUDENT if finished_stage_dir else initial_student,
            reference=initial_student,
            run_name=layout.train_run_name,
            storage_path=str(layout.train_storage),
            finished_stage_dir=finished_stage_dir,
        )
        # Published stages were announced by the trainer's rank 0; again here, so that a lost
        # announcement (the worker gone right after it published) cannot leave the driver waiting.
        for result in results:
            handoff.trained.remote(result.stage_id)

    training = _Worker("training", handoff, train)

    def wait(request):
        try:
            return ray.get(request)
        except ray.exceptions.RayTaskError:
            # A thread failed (and said so before the handoff did): raise its own error.
            error = generation.error or training.error
            if error is None:
                raise
            raise error from None

    generation.start()
    training.start()
    for stage in stages:
        records = wait(handoff.records.remote(stage.stage_id))
        # Published before this driver started (it died after the publication), or announced now.
        trained = StageTrainResult.read(layout.stage_output(stage.stage_id))
        if trained is None:
            wait(handoff.wait_trained.remote(stage.stage_id))
            trained = StageTrainResult.read(layout.stage_output(stage.stage_id))
        yield FinishedStage(stage, read_manifest(records), trained)
    for worker in (generation, training):
        worker.join()
        if worker.error is not None:
            raise worker.error
