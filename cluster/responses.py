"""What runs inside the pipeline's Ray workers: reading questions, asking the teacher service, and the reward actors.

`read_stage_questions` (Ray Data tasks) reads a stage's questions from the dataset file, row group by
row group; `sample_responses` (Ray Data tasks) samples responses per question; `RewardScorer` (the
reward actor pool) adds R_acc and the teacher's top-k log-probs per response token. Both reach the service
through a `ModelClient`: Serve handles inside the cluster, or HTTP to any address that speaks our
OpenAI-compatible API with `token_ids` and `/v1/score`.

Every Ray worker that runs these imports this module first, so it imports neither torch nor
transformers (a test holds it to that): they cost ~9 s of CPU per new worker process, several
processes per stage, on two cores.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster.http import post_with_retries
from cluster.judge import JudgeClient, JudgeError
from masters.config import MastersConfig
from masters.curriculum import STUDENT
from masters.data.source import read_questions
from masters.io import api_key_from_env
from masters.judging import rule_accuracy
from masters.records import RESPONSE_TYPE, STAGE_SCHEMA, TEACHER_FIELDS, responses_array, teacher_columns
from serve.api import ChatCompletionRequest, ChatCompletionResponse, Samples, ScoreRequest, ScoreResponse, TokenScores
from serve.levels import model_handle

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

# Rows between the steps: the stage record's question fields, the model to ask, and the group so far.
# A response's R_acc is null until the reward actors add it, and so are the teacher's scores of one it
# has not scored yet (its own samples carry theirs, recorded while sampling).
DRAFT_SCHEMA = pa.schema(
    [*(STAGE_SCHEMA.field(name) for name in STAGE_SCHEMA.names if name != "responses"),
     ("model_id", pa.string()),
     STAGE_SCHEMA.field("responses")]
)
# What the reward actors emit: stage records plus bookkeeping the driver strips before writing.
SCORED_SCHEMA = pa.schema(
    [
        *STAGE_SCHEMA,
        ("judge_calls", pa.int32()),
        ("judge_retries", pa.int32()),
        ("judge_failure", pa.string()),  # null, or why this group has no R_acc
        ("teacher_forwards", pa.int32()),  # responses the reward actor had the teacher score (not recorded while sampling)
    ],
    metadata=STAGE_SCHEMA.metadata,
)

# Judge requests one reward actor keeps in flight.
JUDGE_CALLS_IN_FLIGHT = 16
# Requests to our own service are retried when it is overloaded (503) or restarting.
SERVICE_RETRIES = 5
SERVICE_BACKOFF_S = 0.5


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
    """Chat completions and scores from the teacher service, all requests of a call in flight at once.
    Scores come back as arrays: `Samples` per chat request, one `TokenScores` per score item in order."""

    def chat_many(self, requests: list[ChatCompletionRequest]) -> list[Samples]: ...

    def score_many(self, requests: list[ScoreRequest]) -> list[list[TokenScores]]: ...


class ServeModelClient:
    """Calls the Serve deployments directly through handles (no HTTP hop inside the cluster)."""

    def __init__(self, config: MastersConfig):
        self.config = config
        self._handles: dict[str, DeploymentHandle] = {}

    def _handle(self, requested: str) -> DeploymentHandle:
        if requested not in self._handles:
            self._handles[requested] = model_handle(self.config, requested)
        return self._handles[requested]

    def chat_many(self, requests: list[ChatCompletionRequest]) -> list[Samples]:
        return self._call_per_model("generate_many", requests)

    def score_many(self, requests: list[ScoreRequest]) -> list[list[TokenScores]]:
        return self._call_per_model("score_many", requests)

    def _call_per_model(self, method: str, requests: list) -> list:
        """The requests in handle calls of one model id and about one engine batch each.

        A call costs the caller and the replica a few milliseconds of routing and serialisation, more
        than a small model's forward, so requests travel together; but not more than one engine batch
        per call, so that the calls in flight spread over the replicas.
        """
        batch_items = self.config.serve.max_batch_size
        calls: list[tuple[str, list[int]]] = []
        by_model: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_model.setdefault(request.model, []).append(index)
        for model, indices in by_model.items():
            chunk, items = [], 0
            for index in indices:
                size = len(requests[index].items) if isinstance(requests[index], ScoreRequest) else 1
                if chunk and items + size > batch_items:
                    calls.append((model, chunk))
                    chunk, items = [], 0
                chunk.append(index)
                items += size
            calls.append((model, chunk))
        pending = [getattr(self._handle(model), method).remote([requests[i] for i in chunk]) for model, chunk in calls]
        results: list = [None] * len(requests)
        for (_, chunk), response in zip(calls, pending, strict=True):
            for index, result in zip(chunk, response.result(), strict=True):
                results[index] = result
        return results


class HttpModelClient:
    """Our API over HTTP, with retries while the service is overloaded or restarting (`cluster.http`)."""

    def __init__(self, base_url: str, api_key_env: str | None, timeout_s: float, concurrency: int = 32):
        key = api_key_from_env(api_key_env, "ServiceAddress.api_key_env")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(timeout=timeout_s, headers=headers, limits=httpx.Limits(max_connections=concurrency))
        self._pool = ThreadPoolExecutor(concurrency)

    def _post(self, route: str, payload: dict) -> dict:
        url = f"{self.base_url}{route}"
        reply, _ = post_with_retries(self._http, url, payload, SERVICE_RETRIES, SERVICE_BACKOFF_S)
        if reply.status_code != 200:
            raise RuntimeError(f"POST {url} answered HTTP {reply.status_code}: {reply.text[:500]}")
        return reply.json()

    def chat_many(self, requests: list[ChatCompletionRequest]) -> list[Samples]:
        payloads = [request.model_dump(exclude_none=True) for request in requests]
        replies = self._pool.map(lambda payload: self._post("/chat/completions", payload), payloads)
        return [Samples.from_response(ChatCompletionResponse.model_validate(reply)) for reply in replies]

    def score_many(self, requests: list[ScoreRequest]) -> list[list[TokenScores]]:
        payloads = [request.model_dump(exclude_none=True) for request in requests]
        replies = self._pool.map(lambda payload: self._post("/score", payload), payloads)
        return [
            [TokenScores.from_data(data) for data in sorted(ScoreResponse.model_validate(reply).data, key=lambda d: d.index)]
            for reply in replies
        ]


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


# Where each read comes from and which stage it feeds: `QuestionIndex.row_group_reads` plus the stage.
READ_SCHEMA = pa.schema(
    [
        ("row_group", pa.int32()),
        ("rows", pa.list_(pa.int32())),
        ("question_ids", pa.list_(pa.string())),
        ("teacher", pa.string()),
        ("mask_ratio", pa.float32()),
        ("stage_index", pa.int32()),
        ("model_id", pa.string()),
    ]
)


@functools.lru_cache(maxsize=1)
def _processor(directory: str):
    # Imported here: only the naive and SFT baselines tokenize in a worker (see the module docstring).
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(directory)


def read_stage_questions(batch: pa.Table, path: str, dataset_responses_from: str | None) -> pa.Table:
    """Draft rows for the reads in `batch` (`READ_SCHEMA`), each row group read once.

    With `dataset_responses_from` (a processor directory: the naive and SFT baselines) the group is the
    dataset's reference response, tokenized as the model's own responses end; otherwise it starts empty.
    """
    tables = []
    for read in batch.to_pylist():
        questions = read_questions(path, read["row_group"], read["rows"], read["question_ids"])
        if dataset_responses_from is None:
            responses = [[] for _ in range(questions.num_rows)]
        else:
            from masters.families import answer_token_ids  # torch: the baselines' workers only

            texts = questions.column("response").to_pylist()
            token_ids = answer_token_ids(_processor(dataset_responses_from), texts)
            responses = [[{"source": "dataset", "text": t, "token_ids": ids}] for t, ids in zip(texts, token_ids)]
        count = questions.num_rows
        tables.append(
            pa.table(
                {
                    "question_id": questions.column("id"),
                    "family": questions.column("family"),
                    "image_png": questions.column("image"),
                    "question": questions.column("question"),
                    "answer": questions.column("answer"),
                    "teacher": pa.array([read["teacher"]] * count, pa.string()),
                    "mask_ratio": pa.array([read["mask_ratio"]] * count, pa.float32()),
                    "stage_index": pa.array([read["stage_index"]] * count, pa.int32()),
                    "model_id": pa.array([read["model_id"]] * count, pa.string()),
                    "responses": responses_array(responses),
                },
                schema=DRAFT_SCHEMA,
            )
        )
    return pa.concat_tables(tables) if tables else DRAFT_SCHEMA.empty_table()


def sample_responses(
    batch: pa.Table, address: ServiceAddress, config: MastersConfig, n: int, source: str
) -> pa.Table:
    """Ask for `n` samples per question and put them in front of the group: from the initial student
    when `source` is `student`, or from the stage's teacher level (`model_id`), which in the same
    request records the top-k on its own samples as it draws them and scores the responses already in
    the group (the student's): one encoded prompt per question and level, no second pass."""
    rows = batch.select(["question_id", "image_png", "question", "model_id"]).to_pylist()
    groups = batch.column("responses").to_pylist()  # what earlier steps sampled: not scored yet, small
    teacher = source == "teacher"
    models = [row["model_id"] if teacher else STUDENT for row in rows]
    unscored = [[r for r in group if r["teacher_topk_ids"] is None] if teacher else [] for group in groups]
    requests = [
        ChatCompletionRequest(
            model=model,
            messages=image_messages(row["image_png"], row["question"]),
            n=n,
            seed=request_seed(config.generation.seed, model, row["question_id"]),
            score_top_logprobs=config.generation.teacher_topk if teacher else None,
            score_token_ids=[r["token_ids"] for r in others] or None,
            **_sampling_fields(config),
        )
        for row, model, others in zip(rows, models, unscored)
    ]
    replies = _cached_client(address, config.model_dump_json()).chat_many(requests)
    for group, model, others, reply in zip(groups, models, unscored, replies, strict=True):
        if len(reply.texts) != n:
            raise RuntimeError(f"{model} returned {len(reply.texts)} choices for n={n}")
        for response, scores in zip(others, reply.scored, strict=True):
            response.update(_teacher_fields(scores, response["token_ids"]))
        sampled = [
            {"source": source, "text": text, "token_ids": token_ids, **_teacher_fields(scores, token_ids)}
            for text, token_ids, scores in zip(reply.texts, reply.token_ids, reply.scores, strict=True)
        ]
        group[:0] = sampled
    return batch.drop_columns(["responses"]).append_column(DRAFT_SCHEMA.field("responses"), responses_array(groups))


def _teacher_fields(scores: TokenScores | None, token_ids: list[int]) -> dict:
    """The teacher's scores of a response as its record fields; null when it has none yet."""
    if scores is None:
        return dict.fromkeys(TEACHER_FIELDS)
    if not np.array_equal(scores.token_ids, token_ids):
        raise RuntimeError("the teacher service returned scores for other tokens than the response's")
    return {"teacher_topk_ids": scores.top_ids, "teacher_topk_logprobs": scores.top_logprobs, "teacher_tail_mass": scores.tail_mass}


class RewardScorer:
    """A reward actor: R_acc per response, and the teacher's top-k log-probs on every response token that
    has none yet (the dataset responses of the naive and SFT baselines, and the student's when no teacher
    samples; generated groups were scored while the teacher sampled).

    The responses stay Arrow columns: only their texts (and the unscored ones' tokens) become Python
    objects, and R_acc and any new scores go back in as columns. A judge failure marks the whole group
    (`judge_failure`) instead of raising, so the driver applies the stage's policy with the full count;
    no failed response is ever scored 0.
    """

    def __init__(self, address: ServiceAddress, config: MastersConfig, judge_endpoint: str | None, judge_model: str | None):
        self.client = address.connect(config)
        self.top_logprobs = config.generation.teacher_topk
        self.items_per_request = config.serve.max_score_items
        self.use_accuracy = config.rewards.use_accuracy
        self.numeric_tolerance = config.rewards.judge.numeric_tolerance
        self.judge = None
        if self.use_accuracy and config.rewards.judge.kind == "llm":
            self.judge = JudgeClient.from_config(config.rewards.judge, judge_endpoint, judge_model)
            self._judge_pool = ThreadPoolExecutor(JUDGE_CALLS_IN_FLIGHT)
            self._background = ThreadPoolExecutor(1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        groups = batch.column("responses").combine_chunks()
        responses = pc.list_flatten(groups)
        lengths = pc.list_value_length(groups).to_numpy(zero_copy_only=False)
        ends = np.cumsum(lengths)
        texts = pc.struct_field(responses, "text").to_pylist()
        texts_by_group = [texts[end - length : end] for end, length in zip(ends, lengths)]
        rows = batch.select(["question_id", "question", "answer", "model_id"]).to_pylist()  # images: only to score
        # The LLM judge works in the background while the teacher scores the same responses.
        accuracy = self._background.submit(self._accuracy, rows, texts_by_group) if self.judge else None
        unscored = np.flatnonzero(pc.is_null(pc.struct_field(responses, "teacher_topk_ids")).to_numpy(zero_copy_only=False))
        owners = np.searchsorted(ends, unscored, side="right")  # the group of each unscored response
        unscored_tokens = pc.struct_field(responses, "token_ids").take(unscored).to_pylist()
        scores = self._teacher_scores(rows, batch.column("image_png"), owners, unscored_tokens)
        accuracy = accuracy.result() if accuracy else self._accuracy(rows, texts_by_group)

        fields = {name: pc.struct_field(responses, name) for name in RESPONSE_TYPE.names}
        fields["accuracy_reward"] = pa.array(np.concatenate([[], *(rewards for rewards, *_ in accuracy)]), pa.float32())
        if unscored.size:
            # The new scores go where the unscored responses are; the others keep theirs.
            filled = teacher_columns([s.token_ids for s in scores], *([getattr(s, n) for s in scores] for n in ("top_ids", "top_logprobs", "tail_mass")))
            order = np.arange(len(responses))
            order[unscored] = len(responses) + np.arange(unscored.size)
            for name, column in filled.items():
                fields[name] = pa.concat_arrays([fields[name], column]).take(pa.array(order))
        scored = pa.StructArray.from_arrays([fields[name] for name in RESPONSE_TYPE.names], fields=list(RESPONSE_TYPE))
        column = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], ends]).astype(np.int32)), scored)
        question_fields = [batch.column(name).cast(STAGE_SCHEMA.field(name).type) for name in STAGE_SCHEMA.names[:-1]]
        _, calls, retries, failures = zip(*accuracy) if accuracy else ((), (), (), ())
        forwards = np.bincount(owners, minlength=batch.num_rows)
        bookkeeping = [pa.array(calls, pa.int32()), pa.array(retries, pa.int32()), pa.array(failures, pa.string()), pa.array(forwards, pa.int32())]
        return pa.Table.from_arrays([*question_fields, column, *bookkeeping], schema=SCORED_SCHEMA)

    def _teacher_scores(self, rows: list[dict], images: pa.ChunkedArray, owners: np.ndarray, token_ids: list[list[int]]) -> list[TokenScores]:
        """The teacher's scores of the responses `token_ids`, each of the group `owners[i]`, in order;
        one request per group and at most serve.max_score_items items."""
        requests, spans = [], []
        for start in range(len(token_ids)):
            if start and owners[start] == owners[start - 1] and start - spans[-1][0] < self.items_per_request:
                spans[-1] = (spans[-1][0], start + 1)
            else:
                spans.append((start, start + 1))
        for first, end in spans:
            row = rows[owners[first]]
            messages = image_messages(images[int(owners[first])].as_py(), row["question"])
            items = [{"messages": messages, "response_token_ids": ids} for ids in token_ids[first:end]]
            requests.append(ScoreRequest(model=row["model_id"], items=items, top_logprobs=self.top_logprobs))
        scores = [score for reply in self.client.score_many(requests) for score in reply]
        for sent, score, owner in zip(token_ids, scores, owners, strict=True):
            if not np.array_equal(score.token_ids, sent):
                raise RuntimeError(f"{rows[owner]['model_id']} scored other tokens than sent for question {rows[owner]['question_id']}")
        return scores

    def _accuracy(self, rows: list[dict], texts: list[list[str]]) -> list[tuple[list[float], int, int, str | None]]:
        """Per group: R_acc per response (NaN when disabled), judge calls, retries, and a failure or None."""
        if not self.use_accuracy:
            return [([float("nan")] * len(group), 0, 0, None) for group in texts]
        if self.judge is None:
            return [
                ([rule_accuracy(text, row["answer"], self.numeric_tolerance) for text in group], 0, 0, None)
                for row, group in zip(rows, texts)
            ]
        futures = [
            [self._judge_pool.submit(self.judge.score, row["question"], row["answer"], text) for text in group]
            for row, group in zip(rows, texts)
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


def _sampling_fields(config: MastersConfig) -> dict:
    sampling = config.generation.sampling
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "repetition_penalty": sampling.repetition_penalty,
        "max_tokens": sampling.max_new_tokens,
    }
