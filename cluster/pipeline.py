"""The generation and reward pipeline of the curriculum's stages (design.md, steps 3-4), on Ray Data.

    stage questions ──► sample the teacher at the stage's level (`group_teacher` each)
        ──► groups: those + `group_student` student responses (generated once per run)
        ──► reward actor pool: R_acc (rule or LLM judge) + the teacher's top-k log-probs per token
        ──► driver: exactly-once check, Parquet parts + manifest, renamed into `stages/<teacher>/<k>-<hash>/`

The teacher service is reached through a Serve handle inside the cluster or over HTTP; what runs in
the Ray workers (sampling tasks, reward actors) lives in `cluster.responses`. The naive
and supervised baselines (`loss.objective` naive or sft) skip sampling: their group is the dataset
answer alone, scored by the unmasked teacher. A stage whose manifest matches is skipped; anything else is
removed and redone from the start. `run_stages` streams several stages through one execution.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from cluster.responses import DRAFT_RESPONSE_TYPE, DRAFT_SCHEMA, RewardScorer, ServiceAddress, sample_responses
from cluster.stage_store import (
    PartWriter,
    is_complete,
    read_manifest,
    read_parts,
    remove_partial,
    records_root,
    stage_dir,
    student_responses_dir,
)
from masters.config import MastersConfig
from masters.curriculum import Stage
from masters.data import VQASample
from masters.data.export import png_bytes
from masters.families import answer_token_ids
from masters.models import build_prompt
from masters.records import SCHEMA_VERSION, stage_schema
from serve.levels import STUDENT, model_id

logger = logging.getLogger(__name__)

STUDENT_SCHEMA = pa.schema([("question_id", pa.string()), ("responses", pa.list_(DRAFT_RESPONSE_TYPE))])

# Sampling tasks only wait on the teacher service: a sliver of CPU each, a few in flight so the
# engine's batch queue never runs dry.
SAMPLING_TASK_CPUS = 0.05
SAMPLING_TASKS = 2


class StageFailedError(RuntimeError):
    """A stage that cannot be written under its failure policy; nothing of it is left on disk."""


# --------------------------------------------------------------------------- stage planning and hashing


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def student_config_hash(config: MastersConfig, question_ids: Sequence[str]) -> str:
    """What the stored student responses depend on: the student, sampling and the questions."""
    generation = config.generation
    return _digest(
        {
            "schema_version": SCHEMA_VERSION,
            "student": config.models.student,
            "responses": generation.group_student,
            "sampling": generation.sampling.model_dump(),
            "seed": generation.seed,
            "data": config.data.model_dump(),
            "questions": _digest(list(question_ids)),
        }
    )


def stage_config_hash(
    config: MastersConfig, teacher: str, mask_ratio: float, stage_index: int, question_ids: Sequence[str], student_hash: str | None
) -> str:
    """What a stage's records depend on: what produced them, not the loss that will consume them (the
    mask_progressive and full objectives train on the same records). Execution knobs (actor counts,
    batch sizes, timeouts) are left out."""
    (teacher_config,) = [t for t in config.models.teachers if t.name == teacher]
    judge = config.rewards.judge.model_dump(exclude={"timeout_s", "max_retries", "api_key_env"})
    generation = config.generation.model_dump()
    if config.loss.on_dataset_responses:  # nothing is sampled: only how the teacher's scores are stored counts
        generation = {key: generation[key] for key in ("teacher_topk", "teacher_logprobs_dtype")}
    return _digest(
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
            "questions": _digest(list(question_ids)),
            "student_responses": student_hash,
        }
    )


def stage_records(config: MastersConfig, stage: Stage, train_ids: Sequence[str], run_dir: str | Path) -> tuple[str, Path]:
    """The config hash and directory of `stage`'s records: named by what produced them, so runs sharing a
    records root share a stage exactly when they would generate it alike (`jobs/ablate.py --dry-run` lists them)."""
    student_hash = None
    if not config.loss.on_dataset_responses and config.generation.group_student:
        student_hash = student_config_hash(config, train_ids)
    question_ids = [train_ids[i] for i in stage.question_indices]
    config_hash = stage_config_hash(config, stage.teacher, stage.mask_ratio, stage.teacher_stage, question_ids, student_hash)
    return config_hash, stage_dir(records_root(config, run_dir), stage.teacher, stage.teacher_stage, config_hash)


def judge_target(config: MastersConfig) -> tuple[str | None, str | None]:
    """The judge's endpoint and model: the config's, defaulting to our own unmasked last teacher."""
    judge = config.rewards.judge
    if not (config.rewards.use_accuracy and judge.kind == "llm"):
        return None, None
    endpoint = judge.endpoint or f"http://{config.serve.host}:{config.serve.port}/v1"
    return endpoint, judge.model or model_id(config.models.teachers[-1].name, 0.0)


def _question_rows(samples: Sequence[VQASample], processor, teacher: str, mask_ratio: float, stage_index: int, model: str) -> list[dict]:
    return [
        {
            "question_id": sample.id,
            "family": sample.family,
            "image_png": png_bytes(sample.image),
            "question": sample.question,
            "prompt": build_prompt(processor, sample.question),
            "answer": sample.answer,
            "teacher": teacher,
            "mask_ratio": mask_ratio,
            "stage_index": stage_index,
            "model_id": model,
            "responses": [],
        }
        for sample in samples
    ]


def _dataset(rows: list[dict], config: MastersConfig) -> ray.data.Dataset:
    """Rows as blocks of at most one engine batch, at least as many as sampling tasks, so the tasks
    and the reward actors work in parallel."""
    size = max(1, min(config.serve.max_batch_size, math.ceil(len(rows) / SAMPLING_TASKS)))
    # from_blocks puts the blocks from the driver; from_arrow would first run a 1-CPU metadata task
    # per block, which never schedules while the Serve replicas hold more than one of two CPUs.
    # Each block is built on its own: a slice of one big table would carry all its buffers along.
    return ray.data.from_blocks(
        [pa.Table.from_pylist(rows[start : start + size], schema=DRAFT_SCHEMA) for start in range(0, len(rows), size)]
    )


def _check_unique(samples: Sequence[VQASample]) -> list[str]:
    ids = [sample.id for sample in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("samples: question ids must be unique within a stage (the stage record has one row per question)")
    if not ids:
        raise ValueError("samples is empty: a stage needs at least one question")
    return ids


# --------------------------------------------------------------------------- student responses


@dataclass
class StepResult:
    directory: Path
    manifest: dict
    skipped: bool  # True when a matching finished directory was already there
    execution_stats: str = ""  # Ray Data's per-operator summary of the run that wrote it


def _with_samples(dataset, config: MastersConfig, address: ServiceAddress, n: int, source: str):
    """Add `n` sampled responses per question from `source`'s model (Ray tasks, a few in flight)."""
    return dataset.map_batches(
        sample_responses,
        batch_format="pyarrow",
        batch_size=config.serve.max_batch_size,
        compute=TaskPoolStrategy(size=SAMPLING_TASKS),
        num_cpus=SAMPLING_TASK_CPUS,
        fn_kwargs={"address": address, "config": config, "n": n, "source": source},
    )


def generate_student_responses(
    config: MastersConfig, samples: Sequence[VQASample], run_dir: str | Path, address: ServiceAddress, processor
) -> StepResult:
    """The initial student's `group_student` responses per question of the run's train split, once, in
    `<records>/student_responses/<hash>/`."""
    question_ids = _check_unique(samples)
    config_hash = student_config_hash(config, question_ids)
    directory = student_responses_dir(records_root(config, run_dir), config_hash)
    if is_complete(directory, config_hash):
        return StepResult(directory, read_manifest(directory), skipped=True)
    remove_partial(directory)
    rows = _question_rows(samples, processor, teacher="", mask_ratio=0.0, stage_index=-1, model=STUDENT)
    dataset = _with_samples(
        _dataset(rows, config), config, address, n=config.generation.group_student, source="student"
    )
    with PartWriter(directory, STUDENT_SCHEMA, kind="student_responses") as writer:
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.write(batch)
        manifest = writer.finish(
            question_ids,
            config_hash=config_hash,
            model=STUDENT,
            counts={"questions": len(question_ids), "responses": len(question_ids) * config.generation.group_student},
        )
    return StepResult(directory, manifest, skipped=False, execution_stats=dataset.stats())


def _stored_student_responses(config: MastersConfig, run_dir: str | Path, train_ids: list[str]) -> dict[str, list[dict]]:
    """The stored student responses of every question of the run, by question id."""
    config_hash = student_config_hash(config, train_ids)
    directory = student_responses_dir(records_root(config, run_dir), config_hash)
    if not is_complete(directory, config_hash):
        raise FileNotFoundError(
            f"{str(directory)!r} has no finished student responses; run generate_student_responses first"
        )
    return {row["question_id"]: row["responses"] for row in read_parts(directory).to_pylist()}


# --------------------------------------------------------------------------- one stage


def stage_samples(stage: Stage, train_samples: Sequence[VQASample]) -> list[VQASample]:
    """The stage's questions, in training order, from the run's train split."""
    if stage.question_indices and max(stage.question_indices) >= len(train_samples):
        raise ValueError(
            f"stage {stage.stage_id} indexes question {max(stage.question_indices)} but the train split has "
            f"{len(train_samples)}; plan the curriculum with the same data.train_size"
        )
    return [train_samples[i] for i in stage.question_indices]


def run_stage(
    config: MastersConfig,
    stage: Stage,
    train_samples: Sequence[VQASample],
    run_dir: str | Path,
    address: ServiceAddress,
    processor,
) -> StepResult:
    """Produce (or find) the records of `stage` in `<records>/stages/<teacher>/<k>-<hash>/`."""
    (result,) = run_stages(config, [stage], train_samples, run_dir, address, processor)
    return result


@dataclass
class _PendingStage:
    """A stage being produced by `run_stages`: its questions, where it goes, and what arrived so far."""

    stage: Stage
    question_ids: list[str]
    directory: Path
    config_hash: str
    rows: list[dict]
    tally: _StageTally = field(default_factory=lambda: _StageTally())
    writer: PartWriter | None = None
    arrived: int = 0  # groups seen, written or dropped


def run_stages(
    config: MastersConfig,
    stages: Sequence[Stage],
    train_samples: Sequence[VQASample],
    run_dir: str | Path,
    address: ServiceAddress,
    processor,
    on_stage_done: Callable[[Stage, StepResult], None] | None = None,
) -> list[StepResult]:
    """Produce (or find) the records of `stages`, in order, through one Ray Data execution.

    Every stage's questions stream through the same sampling tasks and reward actor pool (each row
    asks its own stage's teacher level), so the pool starts once, not once per stage. Each stage
    is still its own directory: written atomically when its last group arrives, then reported to
    `on_stage_done` (which the driver uses to hand it to the trainer). A stage already complete is
    skipped; anything else of it is removed and redone from the start.
    """
    generation = config.generation
    naive = config.loss.on_dataset_responses
    results: dict[str, StepResult] = {}
    pending: dict[tuple[str, int], _PendingStage] = {}
    train_ids = [sample.id for sample in train_samples]
    students: dict[str, list[dict]] | None = None
    for stage in stages:
        samples = stage_samples(stage, train_samples)
        question_ids = _check_unique(samples)
        teacher, mask_ratio, stage_index = stage.teacher, stage.mask_ratio, stage.teacher_stage
        if teacher not in [t.name for t in config.models.teachers]:
            raise ValueError(f"stage teacher {teacher!r} is not in models.teachers ({[t.name for t in config.models.teachers]})")
        config_hash, directory = stage_records(config, stage, train_ids, run_dir)
        if is_complete(directory, config_hash):
            logger.info("stage %s is complete in %s; skipping", stage.stage_id, directory)
            results[stage.stage_id] = StepResult(directory, read_manifest(directory), skipped=True)
            if on_stage_done:
                on_stage_done(stage, results[stage.stage_id])
            continue
        if read_manifest(directory) is not None:
            logger.warning("stage %s is damaged; redoing it", stage.stage_id)
        remove_partial(directory)
        rows = _question_rows(samples, processor, teacher, mask_ratio, stage_index, stage.model_id)
        if naive:  # the dataset's reference response, ending as the model's own responses do
            responses = answer_token_ids(processor, [sample.response for sample in samples])
            for row, sample, token_ids in zip(rows, samples, responses):
                row["responses"] = [{"source": "dataset", "text": sample.response, "token_ids": token_ids}]
        elif generation.group_student:
            if students is None:  # read once, and only when a stage is generated
                students = _stored_student_responses(config, run_dir, train_ids)
            missing = [qid for qid in question_ids if qid not in students]
            if missing:
                raise ValueError(
                    f"{len(missing)} stage questions have no stored student responses (e.g. {missing[:3]}); "
                    "generate them for every question of the run"
                )
            for row, sample in zip(rows, samples):
                row["responses"] = students[sample.id]
        pending[(teacher, stage_index)] = _PendingStage(stage, question_ids, directory, config_hash, rows)
    if not pending:
        return [results[stage.stage_id] for stage in stages]

    dataset = _dataset([row for item in pending.values() for row in item.rows], config)
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
        results[item.stage.stage_id] = StepResult(item.directory, manifest, skipped=False)
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
