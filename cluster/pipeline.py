"""The generation and reward pipeline of the curriculum's stages (docs/design.md, steps 3-4), on Ray Data.

    dataset file ──► read the stage's questions, row group by row group (the driver holds only ids)
        ──► sample the initial student (`group_student` each) and the teacher at the stage's level (`group_teacher`)
        ──► reward actor pool: R_acc (rule or LLM judge) + the teacher's top-k log-probs per token
        ──► driver: exactly-once check, Parquet parts + manifest, renamed into `stages/<teacher>/<k>-<hash>/`

The teacher service is reached through a Serve handle inside the cluster or over HTTP; what runs in
the Ray workers (sampling tasks, reward actors) lives in `cluster.responses`. The naive
and supervised baselines (`loss.objective` naive or sft) skip sampling: their group is the dataset
answer alone, scored by the unmasked teacher. A stage whose manifest matches is skipped; anything else is
removed and redone from the start. `run_stages` streams several stages through one execution.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from cluster.responses import READ_SCHEMA, RewardScorer, ServiceAddress, read_stage_questions, sample_responses
from cluster.stage_store import PartWriter, is_complete, read_manifest, remove_partial
from masters.config import MastersConfig
from masters.curriculum import Stage, model_id
from masters.data.source import QuestionIndex
from masters.io import json_digest
from masters.records import SCHEMA_VERSION, stage_schema
from masters.run_layout import stage_records_dir

logger = logging.getLogger(__name__)

# Sampling tasks only wait on the teacher service: a sliver of CPU each, a few in flight so the
# engine's batch queue never runs dry.
SAMPLING_TASK_CPUS = 0.05
SAMPLING_TASKS = 2


class StageFailedError(RuntimeError):
    """A stage that cannot be written under its failure policy; nothing of it is left on disk."""


# --------------------------------------------------------------------------- stage planning and hashing


def stage_config_hash(
    config: MastersConfig, teacher: str, mask_ratio: float, stage_index: int, question_ids: Sequence[str]
) -> str:
    """What a stage's records depend on: what produced them, not the loss that will consume them (the
    mask_progressive and full objectives train on the same records). Execution knobs (actor counts,
    batch sizes, timeouts) are left out."""
    (teacher_config,) = [t for t in config.models.teachers if t.name == teacher]
    judge = config.rewards.judge.model_dump(exclude={"timeout_s", "max_retries", "api_key_env"})
    generation = config.generation.model_dump(exclude={"questions_per_task"})
    if config.loss.on_dataset_responses:  # nothing is sampled: only how the teacher's scores are stored counts
        generation = {key: generation[key] for key in ("teacher_topk", "teacher_logprobs_dtype")}
    samples_student = not config.loss.on_dataset_responses and config.generation.group_student > 0
    return json_digest(
        {
            "schema_version": SCHEMA_VERSION,
            "responses": "dataset" if config.loss.on_dataset_responses else "generated",
            "teacher": teacher_config.model_dump(exclude={"iteration_weight"}),
            "mask_ratio": round(mask_ratio, 6),
            "stage_index": stage_index,
            "generation": generation,
            "use_accuracy": config.rewards.use_accuracy,
            "judge": judge if config.rewards.use_accuracy else None,
            "data": config.data.model_dump(),
            "questions": json_digest(list(question_ids)),
            "student": config.models.student if samples_student else None,
        }
    )


def stage_records(config: MastersConfig, stage: Stage, train_ids: Sequence[str], records_root: str | Path) -> tuple[str, Path]:
    """The config hash and directory of `stage`'s records under `records_root` (`RunLayout.records_root`):
    named by what produced them, so runs sharing a records root share a stage exactly when they would
    generate it alike (`jobs/ablate.py --dry-run` lists them)."""
    question_ids = [train_ids[i] for i in stage.question_indices]
    config_hash = stage_config_hash(config, stage.teacher, stage.mask_ratio, stage.teacher_stage, question_ids)
    return config_hash, stage_records_dir(records_root, stage.teacher, stage.teacher_stage, config_hash)


def judge_target(config: MastersConfig) -> tuple[str | None, str | None]:
    """The judge's endpoint and model: the config's, defaulting to our own unmasked last teacher."""
    judge = config.rewards.judge
    if not (config.rewards.use_accuracy and judge.kind == "llm"):
        return None, None
    endpoint = judge.endpoint or f"http://{config.serve.host}:{config.serve.port}/v1"
    return endpoint, judge.model or model_id(config.models.teachers[-1].name, 0.0)


def _stage_reads(config: MastersConfig, stage: Stage, questions: QuestionIndex) -> list[pa.Table]:
    """The stage's questions as blocks of row-group reads (`READ_SCHEMA`) of at most
    `generation.questions_per_task` questions, at least as many as sampling tasks, so the tasks and the
    reward actors work in parallel. A row group is read once per block that needs it: at scale a stage
    takes a few questions of each."""
    size = max(1, min(config.generation.questions_per_task, math.ceil(len(stage.question_indices) / SAMPLING_TASKS)))
    stage_columns = {
        "teacher": stage.teacher,
        "mask_ratio": stage.mask_ratio,
        "stage_index": stage.teacher_stage,
        "model_id": stage.model_id,
    }
    blocks, block, rows = [], [], 0
    for group_read in questions.row_group_reads(stage.question_indices):
        for start in range(0, len(group_read["rows"]), size):
            read = {key: value[start : start + size] for key, value in group_read.items() if key != "row_group"}
            if block and rows + len(read["rows"]) > size:
                blocks.append(pa.Table.from_pylist(block, schema=READ_SCHEMA))
                block, rows = [], 0
            block.append({**read, "row_group": group_read["row_group"], **stage_columns})
            rows += len(read["rows"])
    blocks.append(pa.Table.from_pylist(block, schema=READ_SCHEMA))
    return blocks


@dataclass
class StageRecords:
    """A stage's records as written: its directory and manifest."""

    directory: Path
    manifest: dict
    skipped: bool  # True when a matching finished directory was already there
    execution_stats: str = ""  # Ray Data's per-operator summary of the run that wrote it


def _with_samples(dataset, config: MastersConfig, address: ServiceAddress, n: int, source: str):
    """Add `n` sampled responses per question from `source`'s model (Ray tasks, a few in flight), a
    block (at most `generation.questions_per_task` questions, `_stage_reads`) per call. A `batch_size` here would
    count the read step's rows, which are row-group reads, and bundle a whole stage into one task."""
    return dataset.map_batches(
        sample_responses,
        batch_format="pyarrow",
        batch_size=None,
        compute=TaskPoolStrategy(size=SAMPLING_TASKS),
        num_cpus=SAMPLING_TASK_CPUS,
        fn_kwargs={"address": address, "config": config, "n": n, "source": source},
    )


# --------------------------------------------------------------------------- one stage


def run_stage(
    config: MastersConfig, stage: Stage, questions: QuestionIndex, records_root: str | Path, address: ServiceAddress, student_dir: str | Path
) -> StageRecords:
    """Produce (or find) the records of `stage` in `<records_root>/stages/<teacher>/<k>-<hash>/`."""
    (result,) = run_stages(config, [stage], questions, records_root, address, student_dir)
    return result


@dataclass
class _PendingStage:
    """A stage being produced by `run_stages`: its questions, where it goes, and what arrived so far."""

    stage: Stage
    question_ids: list[str]
    directory: Path
    config_hash: str
    tally: _StageTally = field(default_factory=lambda: _StageTally())
    writer: PartWriter | None = None
    arrived: int = 0  # groups seen, written or dropped


def run_stages(
    config: MastersConfig,
    stages: Sequence[Stage],
    questions: QuestionIndex,
    records_root: str | Path,
    address: ServiceAddress,
    student_dir: str | Path,
    on_stage_done: Callable[[Stage, StageRecords], None] | None = None,
    on_groups: Callable[[Stage, int], None] | None = None,
) -> list[StageRecords]:
    """Produce (or find) the records of `stages`, in order, through one Ray Data execution.

    `questions` indexes the run's train split; Ray Data tasks read each stage's questions from it,
    row group by row group, stage after stage. Every stage's questions stream through the same
    sampling tasks (the initial student's `group_student` responses, then the stage's teacher level's
    `group_teacher`) and reward actor pool, so the pool starts once, not once per stage. Each stage is
    still its own directory: written atomically when its last group arrives, then reported to
    `on_stage_done` (which the driver uses to hand it to the trainer). A stage already complete is
    skipped; anything else of it is removed and redone from the start. `student_dir`'s processor
    tokenizes the dataset responses of the naive and SFT baselines. `on_groups(stage, count)` hears of
    every batch of groups as it arrives (progress displays, benchmarks).
    """
    generation = config.generation
    naive = config.loss.on_dataset_responses
    results: dict[str, StageRecords] = {}
    pending: dict[tuple[str, int], _PendingStage] = {}
    blocks: list[pa.Table] = []
    for stage in stages:
        teacher = stage.teacher
        if teacher not in [t.name for t in config.models.teachers]:
            raise ValueError(f"stage teacher {teacher!r} is not in models.teachers ({[t.name for t in config.models.teachers]})")
        if not stage.question_indices:
            raise ValueError(f"stage {stage.stage_id} has no questions")
        if max(stage.question_indices) >= len(questions):
            raise ValueError(
                f"stage {stage.stage_id} indexes question {max(stage.question_indices)} but the train split has "
                f"{len(questions)}; plan the curriculum with the same data.train_size"
            )
        config_hash, directory = stage_records(config, stage, questions.ids, records_root)
        if is_complete(directory, config_hash):
            logger.info("stage %s is complete in %s; skipping", stage.stage_id, directory)
            results[stage.stage_id] = StageRecords(directory, read_manifest(directory), skipped=True)
            if on_stage_done:
                on_stage_done(stage, results[stage.stage_id])
            continue
        if read_manifest(directory) is not None:
            logger.warning("stage %s is damaged; redoing it", stage.stage_id)
        remove_partial(directory)
        question_ids = [questions.ids[i] for i in stage.question_indices]
        pending[(teacher, stage.teacher_stage)] = _PendingStage(stage, question_ids, directory, config_hash)
        blocks += _stage_reads(config, stage, questions)
    if not pending:
        return [results[stage.stage_id] for stage in stages]

    # from_blocks puts the blocks from the driver; from_arrow would first run a 1-CPU metadata task
    # per block, which never schedules while the Serve replicas hold more than one of two CPUs.
    dataset = ray.data.from_blocks(blocks).map_batches(
        read_stage_questions,
        batch_format="pyarrow",
        batch_size=None,  # a block's reads, each row group read once
        compute=TaskPoolStrategy(size=SAMPLING_TASKS),
        num_cpus=SAMPLING_TASK_CPUS,
        fn_kwargs={"path": questions.path, "dataset_responses_from": str(student_dir) if naive else None},
    )
    if not naive and generation.group_student:
        dataset = _with_samples(dataset, config, address, n=generation.group_student, source="student")
    if not naive and generation.group_teacher:
        dataset = _with_samples(
            dataset, config, address, n=generation.group_teacher, source="teacher"
        )
    judge_endpoint, judge_model = judge_target(config)
    dataset = dataset.map_batches(
        RewardScorer,
        batch_format="pyarrow",
        batch_size=config.rewards.batch_size,
        compute=ActorPoolStrategy(size=config.rewards.actors),
        num_cpus=config.rewards.actor_num_cpus,
        resources=config.rewards.actor_resources or None,
        fn_constructor_kwargs={
            "address": address,
            "config": config,
            "judge_endpoint": judge_endpoint,
            "judge_model": judge_model,
        },
        # A killed or crashed reward actor is restarted and its batch re-run; the output of the
        # failed attempt is dropped, so no question is lost or doubled (the writer asserts it).
        max_restarts=-1,
        max_task_retries=-1,
    )

    def finish(item: _PendingStage) -> None:
        manifest = item.writer.finish(
            item.question_ids,
            missing_ok=item.tally.dropped,
            config_hash=item.config_hash,
            stage=item.stage.to_dict(),
            model_id=item.stage.model_id,
            objective=config.loss.objective,
            counts=item.tally.counts(len(item.question_ids)),
            judge=item.tally.judge_summary(config, judge_endpoint, judge_model),
            dropped=[{"question_id": qid, "reason": reason} for qid, reason in sorted(item.tally.dropped.items())],
        )
        item.writer.__exit__(None, None, None)  # renames the stage directory into place
        item.writer = None
        results[item.stage.stage_id] = StageRecords(item.directory, manifest, skipped=False)
        if on_stage_done:
            on_stage_done(item.stage, results[item.stage.stage_id])

    try:
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            by_stage: dict[tuple[str, int], list[int]] = {}
            for index, key in enumerate(zip(batch.column("teacher").to_pylist(), batch.column("stage_index").to_pylist())):
                by_stage.setdefault(key, []).append(index)
            for key, indices in by_stage.items():
                item = pending[key]
                if item.writer is None:
                    schema = stage_schema(config.generation.teacher_logprobs_dtype)
                    item.writer = PartWriter(item.directory, schema, kind="stage").__enter__()
                part = batch.take(indices)
                item.writer.write(item.tally.add(part, config.rewards.judge.on_failure, item.stage.stage_id))
                item.arrived += part.num_rows
                if on_groups:
                    on_groups(item.stage, part.num_rows)
                if item.arrived == len(item.question_ids):
                    finish(item)
    except BaseException as error:
        # Unfinished stages leave nothing behind; finished ones stay (they are complete).
        for item in pending.values():
            if item.writer is not None:
                item.writer.__exit__(type(error), error, error.__traceback__)
        raise
    unfinished = [item.stage.stage_id for item in pending.values() if item.stage.stage_id not in results]
    if unfinished:
        raise RuntimeError(f"the pipeline ended before every group of stages {unfinished} arrived; nothing of them was written")
    stats = dataset.stats()
    for item in pending.values():
        results[item.stage.stage_id].execution_stats = stats
    return [results[stage.stage_id] for stage in stages]


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class _StageTally:
    """Per-stage counts gathered by the driver as groups arrive."""

    records: int = 0
    responses_by_source: dict[str, int] = field(default_factory=dict)
    accuracy_sum_by_source: dict[str, float] = field(default_factory=dict)
    judge_calls: int = 0
    judge_retries: int = 0
    scored_after_sampling: int = 0
    dropped: dict[str, str] = field(default_factory=dict)

    def add(self, batch: pa.Table, on_failure: str, stage: str) -> pa.Table:
        """Count a scored batch and return the groups to write; raises under `fail_stage` on a judge failure."""
        self.judge_calls += sum(batch.column("judge_calls").to_pylist())
        self.judge_retries += sum(batch.column("judge_retries").to_pylist())
        keep = []
        for index, (question_id, failure) in enumerate(
            zip(batch.column("question_id").to_pylist(), batch.column("judge_failure").to_pylist())
        ):
            if failure is None:
                keep.append(index)
                continue
            if on_failure == "fail_stage":
                raise StageFailedError(
                    f"stage {stage}: the judge could not score question {question_id!r}: {failure}. "
                    "Nothing of the stage was written. Fix the judge (rewards.judge.endpoint/model), raise "
                    "rewards.judge.max_retries / timeout_s, or set rewards.judge.on_failure=drop_group"
                )
            self.dropped[question_id] = failure
        kept = batch.take(keep)
        self.records += kept.num_rows
        self.scored_after_sampling += pc.sum(kept.column("teacher_forwards")).as_py() or 0
        # Arrow compute, not to_pylist: the responses carry the teacher's top-k, ~16k numbers a group.
        responses = pc.list_flatten(kept.column("responses"))
        per_source = (
            pa.table({"source": pc.struct_field(responses, "source"), "reward": pc.struct_field(responses, "accuracy_reward")})
            .group_by("source")
            .aggregate([("reward", "sum"), ("reward", "count", pc.CountOptions(mode="all"))])
        )
        sources, reward_sums, counts = (per_source.column(name).to_pylist() for name in ("source", "reward_sum", "reward_count"))
        for source, reward_sum, count in zip(sources, reward_sums, counts):
            self.responses_by_source[source] = self.responses_by_source.get(source, 0) + count
            self.accuracy_sum_by_source[source] = self.accuracy_sum_by_source.get(source, 0.0) + reward_sum
        return kept

    def counts(self, questions: int) -> dict:
        return {
            "questions": questions,
            "records": self.records,
            "dropped_groups": len(self.dropped),
            "responses_by_source": self.responses_by_source,
            # Responses the reward actors had the teacher score; its own samples were scored while sampling.
            "scored_after_sampling": self.scored_after_sampling,
            # NaN (rewards.use_accuracy off) is written as null: the manifest stays strict JSON.
            "mean_accuracy_by_source": {
                source: _finite_or_none(self.accuracy_sum_by_source[source] / count)
                for source, count in self.responses_by_source.items()
            },
        }

    def judge_summary(self, config: MastersConfig, endpoint: str | None, model: str | None) -> dict:
        judge = config.rewards.judge
        return {
            "kind": judge.kind if config.rewards.use_accuracy else None,
            "endpoint": endpoint,
            "model": model,
            "calls": self.judge_calls,
            "retries": self.judge_retries,
            "failed_groups": len(self.dropped),
            "on_failure": judge.on_failure,
        }
