"""The generation and reward pipeline of the curriculum's stages (design.md, steps 3-4), on Ray Data.

    stage questions ──► sample the teacher at the stage's level (`teacher_responses` each)
        ──► groups: `group_teacher` teacher + `group_student` student responses (stored once per run)
        ──► reward actor pool: R_acc (rule or LLM judge) + the teacher's top-k log-probs per token
        ──► driver: exactly-once check, Parquet parts + manifest, renamed into `stages/<teacher>/<k>/`

The teacher service is reached through a Serve handle inside the cluster or over HTTP (any
address that speaks our OpenAI-compatible API with `token_ids` and `/v1/score`). The naive
baseline (`loss.objective == "naive"`) skips sampling: its group is the dataset answer alone,
scored by the unmasked teacher. A stage whose manifest matches is skipped; anything else is
removed and redone from the start. `run_stages` streams several stages through one execution.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy
from ray.serve.handle import DeploymentHandle

from cluster.judge import JudgeClient, JudgeError
from cluster.stage_store import (
    PartWriter,
    is_complete,
    read_manifest,
    read_parts,
    remove_partial,
    stage_dir,
    student_responses_dir,
)
from masters.config import MastersConfig
from masters.curriculum import Stage
from masters.data import VQASample
from masters.data.export import png_bytes
from masters.models import build_prompt
from masters.records import SCHEMA_VERSION, STAGE_SCHEMA
from masters.rewards import rule_accuracy
from serve.api import ChatCompletionRequest, ChatCompletionResponse, ScoreData, ScoreRequest, ScoreResponse
from serve.app import model_handle
from serve.levels import STUDENT, model_id

logger = logging.getLogger(__name__)

# A generated response before rewards: what sampling and the student join produce.
DRAFT_RESPONSE_TYPE = pa.struct([("source", pa.string()), ("text", pa.string()), ("token_ids", pa.list_(pa.int32()))])
# Rows between the steps: the stage record's question fields, the model to ask, the draft group.
DRAFT_SCHEMA = pa.schema(
    [*(STAGE_SCHEMA.field(name) for name in STAGE_SCHEMA.names if name != "responses"),
     ("model_id", pa.string()),
     ("responses", pa.list_(DRAFT_RESPONSE_TYPE))]
)
# What the reward actors emit: stage records plus bookkeeping the driver strips before writing.
SCORED_SCHEMA = STAGE_SCHEMA.append(pa.field("judge_calls", pa.int32())).append(
    pa.field("judge_retries", pa.int32())
).append(pa.field("judge_failure", pa.string()))  # null, or why this group has no R_acc
STUDENT_SCHEMA = pa.schema([("question_id", pa.string()), ("responses", pa.list_(DRAFT_RESPONSE_TYPE))])

# Sampling tasks only wait on the teacher service: a sliver of CPU each, a few in flight so the
# engine's batch queue never runs dry.
SAMPLING_TASK_CPUS = 0.05
SAMPLING_TASKS = 2
# Judge requests one reward actor keeps in flight.
JUDGE_CALLS_IN_FLIGHT = 16
# Requests to our own service are retried when it is overloaded (503) or restarting.
SERVICE_RETRIES = 5
SERVICE_BACKOFF_S = 0.5


class StageFailedError(RuntimeError):
    """A stage that cannot be written under its failure policy; nothing of it is left on disk."""


# --------------------------------------------------------------------------- reaching the models


@dataclass(frozen=True)
class ServiceAddress:
    """Where the teacher service answers: Serve handles in this cluster (`http_url=None`), or an HTTP base URL.

    Picklable, so each Ray worker connects on its own (`connect()`). Over HTTP the service must speak
    our API: `token_ids` on each choice and `/v1/score` (serve/api.py).
    """

    http_url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = None
    timeout_s: float = 300.0

    def connect(self, config: MastersConfig) -> ModelClient:
        if self.http_url is None:
            return ServeModelClient(config)
        return HttpModelClient(self.http_url, self.api_key_env, self.timeout_s)


class ModelClient(Protocol):
    """Chat completions and scores from the teacher service, all requests of a call in flight at once."""

    def chat_many(self, requests: list[ChatCompletionRequest]) -> list[ChatCompletionResponse]: ...

    def score_many(self, requests: list[ScoreRequest]) -> list[ScoreResponse]: ...


class ServeModelClient:
    """Calls the Serve deployments directly through handles (no HTTP hop inside the cluster)."""

    def __init__(self, config: MastersConfig):
        self.config = config
        self._handles: dict[str, DeploymentHandle] = {}

    def _handle(self, requested: str) -> DeploymentHandle:
        if requested not in self._handles:
            self._handles[requested] = model_handle(self.config, requested)
        return self._handles[requested]

    def chat_many(self, requests: list[ChatCompletionRequest]) -> list[ChatCompletionResponse]:
        pending = [self._handle(request.model).generate.remote(request) for request in requests]
        return [response.result() for response in pending]

    def score_many(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        pending = [self._handle(request.model).score.remote(request) for request in requests]
        return [response.result() for response in pending]


class HttpModelClient:
    """Our API over HTTP, with retries while the service is overloaded (503) or restarting."""

    def __init__(self, base_url: str, api_key_env: str | None, timeout_s: float, concurrency: int = 32):
        headers = {}
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"the teacher service's API key variable {api_key_env!r} is not set in the environment")
            headers["Authorization"] = f"Bearer {key}"
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(timeout=timeout_s, headers=headers, limits=httpx.Limits(max_connections=concurrency))
        self._pool = ThreadPoolExecutor(concurrency)

    def _post(self, route: str, payload: dict) -> dict:
        url = f"{self.base_url}{route}"
        for attempt in range(SERVICE_RETRIES + 1):
            if attempt:
                time.sleep(SERVICE_BACKOFF_S * 2 ** (attempt - 1))
            try:
                reply = self._http.post(url, json=payload)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if reply.status_code in (429, 502, 503, 504):
                problem = f"HTTP {reply.status_code}: {reply.text[:200]}"
                continue
            if reply.status_code != 200:
                raise RuntimeError(f"POST {url} answered HTTP {reply.status_code}: {reply.text[:500]}")
            return reply.json()
        raise RuntimeError(f"POST {url} failed {SERVICE_RETRIES + 1} times; last error: {problem}")

    def chat_many(self, requests: list[ChatCompletionRequest]) -> list[ChatCompletionResponse]:
        payloads = [request.model_dump(exclude_none=True) for request in requests]
        replies = self._pool.map(lambda payload: self._post("/chat/completions", payload), payloads)
        return [ChatCompletionResponse.model_validate(reply) for reply in replies]

    def score_many(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        payloads = [request.model_dump(exclude_none=True) for request in requests]
        replies = self._pool.map(lambda payload: self._post("/score", payload), payloads)
        return [ScoreResponse.model_validate(reply) for reply in replies]


@functools.lru_cache(maxsize=4)
def _cached_client(address: ServiceAddress, config_json: str) -> ModelClient:
    """One client per worker process: Ray reuses workers across sampling tasks, and handles and
    connection pools are worth keeping."""
    return address.connect(MastersConfig.model_validate_json(config_json))


def image_messages(image_png: bytes, question: str) -> list[dict]:
    """One user turn, image first, as OpenAI content parts (the order of `masters.models.chat_messages`)."""
    url = "data:image/png;base64," + base64.b64encode(image_png).decode()
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def request_seed(base_seed: int, model: str, question_id: str) -> int:
    """A stable per-request seed: reruns and retried tasks sample the same responses."""
    digest = hashlib.sha256(f"{base_seed}|{model}|{question_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# --------------------------------------------------------------------------- the Ray Data steps


def sample_responses(
    batch: pa.Table, address: ServiceAddress, config: MastersConfig, n: int, keep: int, source: str
) -> pa.Table:
    """Ask `model_id` for `n` samples per question and put the first `keep` in front of the group."""
    rows = batch.to_pylist()
    requests = [
        ChatCompletionRequest(
            model=row["model_id"],
            messages=image_messages(row["image_png"], row["question"]),
            n=n,
            seed=request_seed(config.generation.seed, row["model_id"], row["question_id"]),
            **_sampling_fields(config),
        )
        for row in rows
    ]
    replies = _cached_client(address, config.model_dump_json()).chat_many(requests)
    for row, reply in zip(rows, replies, strict=True):
        if len(reply.choices) != n:
            raise RuntimeError(f"{row['model_id']} returned {len(reply.choices)} choices for n={n}")
        sampled = [{"source": source, "text": c.message.content, "token_ids": c.token_ids} for c in reply.choices[:keep]]
        row["responses"] = sampled + row["responses"]
    return pa.Table.from_pylist(rows, schema=DRAFT_SCHEMA)


class RewardScorer:
    """A reward actor: the teacher's top-k log-probs on every response token, and R_acc per response.

    A judge failure marks the whole group (`judge_failure`) instead of raising, so the driver applies
    the stage's policy with the full count; no failed response is ever scored 0.
    """

    def __init__(self, address: ServiceAddress, config: MastersConfig, judge_endpoint: str | None, judge_model: str | None):
        self.client = address.connect(config)
        self.top_k = config.generation.teacher_topk
        self.items_per_request = config.serve.max_n
        self.use_accuracy = config.rewards.use_accuracy
        self.numeric_tolerance = config.rewards.judge.numeric_tolerance
        self.judge = None
        if self.use_accuracy and config.rewards.judge.kind == "llm":
            self.judge = JudgeClient.from_config(config.rewards.judge, judge_endpoint, judge_model)
            self._judge_pool = ThreadPoolExecutor(JUDGE_CALLS_IN_FLIGHT)
            self._background = ThreadPoolExecutor(1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        # The LLM judge works in the background while the teacher scores the same responses.
        accuracy = self._background.submit(self._accuracy, rows) if self.judge else None
        teacher_scores = self._teacher_scores(rows)
        accuracy = accuracy.result() if accuracy else self._accuracy(rows)
        records = []
        for row, scores, (rewards, calls, retries, failure) in zip(rows, teacher_scores, accuracy, strict=True):
            responses = []
            for response, data, reward in zip(row["responses"], scores, rewards, strict=True):
                if data.token_ids != response["token_ids"]:
                    raise RuntimeError(f"{row['model_id']} scored other tokens than sent for question {row['question_id']}")
                responses.append(
                    {
                        **response,
                        "accuracy_reward": reward,
                        "teacher_topk_ids": data.top_ids,
                        "teacher_topk_logprobs": data.top_logprobs,
                        "teacher_tail_mass": data.tail_mass,
                    }
                )
            record = {name: row[name] for name in STAGE_SCHEMA.names if name != "responses"}
            records.append(
                {**record, "responses": responses, "judge_calls": calls, "judge_retries": retries, "judge_failure": failure}
            )
        return pa.Table.from_pylist(records, schema=SCORED_SCHEMA)

    def _teacher_scores(self, rows: list[dict]) -> list[list[ScoreData]]:
        """Per group, the teacher's scores of its responses in order; requests hold at most serve.max_n items."""
        requests, owners = [], []
        for index, row in enumerate(rows):
            messages = image_messages(row["image_png"], row["question"])
            for start in range(0, len(row["responses"]), self.items_per_request):
                chunk = row["responses"][start : start + self.items_per_request]
                items = [{"messages": messages, "response_token_ids": r["token_ids"]} for r in chunk]
                requests.append(ScoreRequest(model=row["model_id"], items=items, top_k=self.top_k))
                owners.append(index)
        scores: list[list[ScoreData]] = [[] for _ in rows]
        for owner, reply in zip(owners, self.client.score_many(requests), strict=True):
            scores[owner] += sorted(reply.data, key=lambda data: data.index)
        return scores

    def _accuracy(self, rows: list[dict]) -> list[tuple[list[float], int, int, str | None]]:
        """Per group: R_acc per response (NaN when disabled), judge calls, retries, and a failure or None."""
        if not self.use_accuracy:
            return [([float("nan")] * len(row["responses"]), 0, 0, None) for row in rows]
        if self.judge is None:
            return [
                ([rule_accuracy(r["text"], row["answer"], self.numeric_tolerance) for r in row["responses"]], 0, 0, None)
                for row in rows
            ]
        futures = [
            [self._judge_pool.submit(self.judge.score, row["question"], row["answer"], r["text"]) for r in row["responses"]]
            for row in rows
        ]
        results = []
        for group in futures:
            rewards, calls, retries, failure = [], 0, 0, None
            for future in group:
                try:
                    verdict = future.result()
                except JudgeError as exc:
                    calls, retries, failure = calls + exc.calls, retries + exc.retries, failure or str(exc)
                    rewards.append(float("nan"))
                    continue
                calls, retries = calls + verdict.calls, retries + verdict.retries
                rewards.append(float(verdict.score))
            results.append((rewards, calls, retries, failure))
        return results


# --------------------------------------------------------------------------- stage planning and hashing


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sampling_fields(config: MastersConfig) -> dict:
    sampling = config.generation.sampling
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "repetition_penalty": sampling.repetition_penalty,
        "max_tokens": sampling.max_new_tokens,
    }


def student_config_hash(config: MastersConfig, question_ids: Sequence[str]) -> str:
    """What the stored student responses depend on: the student, sampling and the questions."""
    generation = config.generation
    return _digest(
        {
            "schema_version": SCHEMA_VERSION,
            "student": config.models.student,
            "responses": generation.student_responses,
            "sampling": generation.sampling.model_dump(),
            "seed": generation.seed,
            "data": config.data.model_dump(),
            "questions": _digest(list(question_ids)),
        }
    )


def stage_config_hash(
    config: MastersConfig, teacher: str, mask_ratio: float, stage_index: int, question_ids: Sequence[str], student_hash: str | None
) -> str:
    """What a stage's records depend on. Execution knobs (actor counts, batch sizes, timeouts) are left out."""
    (teacher_config,) = [t for t in config.models.teachers if t.name == teacher]
    judge = config.rewards.judge.model_dump(exclude={"timeout_s", "max_retries", "api_key_env"})
    return _digest(
        {
            "schema_version": SCHEMA_VERSION,
            "objective": config.loss.objective,
            "teacher": teacher_config.model_dump(exclude={"iteration_weight"}),
            "mask_ratio": round(mask_ratio, 6),
            "stage_index": stage_index,
            "generation": config.generation.model_dump(),
            "use_accuracy": config.rewards.use_accuracy,
            "judge": judge if config.rewards.use_accuracy else None,
            "data": config.data.model_dump(),
            "questions": _digest(list(question_ids)),
            "student_responses": student_hash,
        }
    )


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


def _with_samples(dataset, config: MastersConfig, address: ServiceAddress, n: int, keep: int, source: str):
    """Add `keep` of `n` sampled responses per question from `source`'s model (Ray tasks, a few in flight)."""
    return dataset.map_batches(
        sample_responses,
        batch_format="pyarrow",
        batch_size=config.serve.max_batch_size,
        compute=TaskPoolStrategy(size=SAMPLING_TASKS),
        num_cpus=SAMPLING_TASK_CPUS,
        fn_kwargs={"address": address, "config": config, "n": n, "keep": keep, "source": source},
    )


def generate_student_responses(
    config: MastersConfig, samples: Sequence[VQASample], run_dir: str | Path, address: ServiceAddress, processor
) -> StepResult:
    """The initial student's `student_responses` per question, once per run, in `runs/<name>/student_responses/`."""
    question_ids = _check_unique(samples)
    directory = student_responses_dir(run_dir)
    config_hash = student_config_hash(config, question_ids)
    if is_complete(directory, config_hash):
        return StepResult(directory, read_manifest(directory), skipped=True)
    remove_partial(directory)
    rows = _question_rows(samples, processor, teacher="", mask_ratio=0.0, stage_index=-1, model=STUDENT)
    dataset = _with_samples(
        _dataset(rows, config), config, address, n=config.generation.student_responses,
        keep=config.generation.student_responses, source="student",
    )
    with PartWriter(directory, STUDENT_SCHEMA, kind="student_responses") as writer:
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.write(batch)
        manifest = writer.finish(
            question_ids,
            config_hash=config_hash,
            model=STUDENT,
            counts={"questions": len(question_ids), "responses": len(question_ids) * config.generation.student_responses},
        )
    return StepResult(directory, manifest, skipped=False, execution_stats=dataset.stats())


def _student_groups(run_dir: str | Path, config: MastersConfig, question_ids: list[str]) -> tuple[dict[str, list[dict]], str]:
    """The first `group_student` stored student responses of each question, and the store's config hash."""
    directory = student_responses_dir(run_dir)
    manifest = read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(
            f"{str(directory)!r} has no finished student responses; run generate_student_responses first"
        )
    table = read_parts(directory)
    wanted = set(question_ids)
    groups = {
        row["question_id"]: row["responses"][: config.generation.group_student]
        for row in table.to_pylist()
        if row["question_id"] in wanted
    }
    missing = wanted - groups.keys()
    if missing:
        raise ValueError(
            f"{len(missing)} stage questions have no stored student responses (e.g. {sorted(missing)[:3]}); "
            "generate them for every question of the run"
        )
    return groups, manifest["config_hash"]


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
    """Produce (or find) the records of `stage` in `runs/<name>/stages/<teacher>/<k>/`."""
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
    naive = config.loss.objective == "naive"
    results: dict[str, StepResult] = {}
    pending: dict[tuple[str, int], _PendingStage] = {}
    for stage in stages:
        samples = stage_samples(stage, train_samples)
        question_ids = _check_unique(samples)
        teacher, mask_ratio, stage_index = stage.teacher, stage.mask_ratio, stage.teacher_stage
        if teacher not in [t.name for t in config.models.teachers]:
            raise ValueError(f"stage teacher {teacher!r} is not in models.teachers ({[t.name for t in config.models.teachers]})")
        students: dict[str, list[dict]] = {}
        student_hash = None
        if not naive and generation.group_student:
            students, student_hash = _student_groups(run_dir, config, question_ids)
        directory = stage_dir(run_dir, teacher, stage_index)
        config_hash = stage_config_hash(config, teacher, mask_ratio, stage_index, question_ids, student_hash)
        if is_complete(directory, config_hash):
            logger.info("stage %s is complete; skipping", stage.stage_id)
            results[stage.stage_id] = StepResult(directory, read_manifest(directory), skipped=True)
            if on_stage_done:
                on_stage_done(stage, results[stage.stage_id])
            continue
        if read_manifest(directory) is not None:
            logger.warning("stage %s was written under another config or is damaged; redoing it", stage.stage_id)
        remove_partial(directory)
        rows = _question_rows(samples, processor, teacher, mask_ratio, stage_index, stage.model_id)
        for row, sample in zip(rows, samples):
            if naive:
                eos = processor.tokenizer.eos_token_id
                token_ids = processor.tokenizer(sample.answer, add_special_tokens=False)["input_ids"] + [eos]
                row["responses"] = [{"source": "dataset", "text": sample.answer, "token_ids": token_ids}]
            else:
                row["responses"] = students.get(sample.id, [])
        pending[(teacher, stage_index)] = _PendingStage(stage, question_ids, directory, config_hash, rows)
    if not pending:
        return [results[stage.stage_id] for stage in stages]

    dataset = _dataset([row for item in pending.values() for row in item.rows], config)
    if not naive and generation.group_teacher:
        dataset = _with_samples(
            dataset, config, address, n=generation.teacher_responses, keep=generation.group_teacher, source="teacher"
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
                    item.writer = PartWriter(item.directory, STAGE_SCHEMA, kind="stage").__enter__()
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
        for group in kept.column("responses").to_pylist():
            for response in group:
                source = response["source"]
                self.responses_by_source[source] = self.responses_by_source.get(source, 0) + 1
                self.accuracy_sum_by_source[source] = self.accuracy_sum_by_source.get(source, 0.0) + response["accuracy_reward"]
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
