"""The stage record: one row per question with its group of scored responses (docs/design.md, contracts).

Written by the generation/reward pipeline as Parquet, read by the trainer. The teacher's top-k
log-probs are stored per response token so the trainer never needs the teacher's weights.
Bump `SCHEMA_VERSION` on any change; readers refuse other versions instead of misreading them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 2  # 2: no `prompt` column (the trainer renders the student's own)

# Questions per Parquet row group: the unit a streaming reader holds in memory. At the paper's scale
# (8 responses x ~300 tokens x top-64 ids + float16 log-probs, ~0.9 MB a question) that is ~60 MB.
ROWS_PER_ROW_GROUP = 64


def response_type(logprobs_dtype: str = "float32") -> pa.StructType:
    """One scored response; `logprobs_dtype` is how the teacher's log-probs and tail mass are stored."""
    logprob = pa.float16() if logprobs_dtype == "float16" else pa.float32()
    return pa.struct(
        [
            ("source", pa.string()),  # "teacher" | "student" | "dataset" (naive baseline: the ground-truth answer)
            ("text", pa.string()),
            ("token_ids", pa.list_(pa.int32())),  # the response tokens as generated, EOS included when emitted
            ("accuracy_reward", pa.float32()),
            ("teacher_topk_ids", pa.list_(pa.list_(pa.int32()))),  # [tokens][k]
            ("teacher_topk_logprobs", pa.list_(pa.list_(logprob))),  # [tokens][k]
            ("teacher_tail_mass", pa.list_(logprob)),  # [tokens]: 1 - sum(exp(top-k log-probs))
        ]
    )


def stage_schema(logprobs_dtype: str = "float32") -> pa.Schema:
    """The stage record. Readers accept either log-prob dtype (`generation.teacher_logprobs_dtype`)."""
    return pa.schema(
        [
            ("question_id", pa.string()),
            ("family", pa.string()),
            ("image_png", pa.binary()),
            ("question", pa.string()),
            ("answer", pa.string()),  # ground truth
            ("teacher", pa.string()),
            ("mask_ratio", pa.float32()),
            ("stage_index", pa.int32()),
            ("responses", pa.list_(response_type(logprobs_dtype))),
        ],
        metadata={"masters_schema_version": str(SCHEMA_VERSION)},
    )


# As the reward actors produce records (the engines' float32); the stage writer casts to the config's dtype.
RESPONSE_TYPE = response_type("float32")
STAGE_SCHEMA = stage_schema("float32")


@dataclass
class Response:
    source: str
    text: str
    token_ids: list[int]
    accuracy_reward: float
    teacher_topk_ids: list[list[int]]
    teacher_topk_logprobs: list[list[float]]
    teacher_tail_mass: list[float]

    def __post_init__(self) -> None:
        lengths = {len(self.token_ids), len(self.teacher_topk_ids), len(self.teacher_topk_logprobs), len(self.teacher_tail_mass)}
        if len(lengths) != 1:
            raise ValueError(
                "a response needs one teacher top-k entry per token: got "
                f"{len(self.token_ids)} tokens, {len(self.teacher_topk_ids)} top-k id rows, "
                f"{len(self.teacher_topk_logprobs)} log-prob rows, {len(self.teacher_tail_mass)} tail masses"
            )


@dataclass
class StageRecord:
    question_id: str
    family: str
    image_png: bytes
    question: str
    answer: str
    teacher: str
    mask_ratio: float
    stage_index: int
    responses: list[Response] = field(default_factory=list)

    def to_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> StageRecord:
        responses = [Response(**response) for response in row["responses"]]
        return cls(**{**row, "responses": responses})


def responses_array(groups: list[list[dict]]) -> pa.ListArray:
    """The `responses` column for groups of response dicts whose per-token fields are arrays (or lists):
    `token_ids` [T], `teacher_topk_ids` and `teacher_topk_logprobs` [T, k], `teacher_tail_mass` [T].
    A response the teacher has not scored yet, or not rewarded, may leave those fields out (or None):
    they are null, as in the pipeline's drafts.

    Built from flat buffers instead of a Python object per number: a group of 8 responses with the
    top-64 on each token went from 3.4 to 1.2 ms (16 tokens) and from 142 to 2.8 ms (512 tokens),
    engine output to column (`benchmarks/score_transport.py`).
    """
    responses = [response for group in groups for response in group]
    tokens = [np.asarray(response["token_ids"], np.int32) for response in responses]
    teacher = teacher_columns(tokens, *([response.get(name) for response in responses] for name in TEACHER_FIELDS))
    struct = pa.StructArray.from_arrays(
        [
            pa.array([response["source"] for response in responses], pa.string()),
            pa.array([response["text"] for response in responses], pa.string()),
            pa.ListArray.from_arrays(_offsets([len(t) for t in tokens]), _concat(tokens, np.int32)),
            pa.array([response.get("accuracy_reward") for response in responses], pa.float32()),
            *teacher.values(),
        ],
        fields=list(RESPONSE_TYPE),
    )
    return pa.ListArray.from_arrays(_offsets([len(group) for group in groups]), struct)


TEACHER_FIELDS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_mass")


def teacher_columns(tokens: list[np.ndarray], top_ids: list, top_logprobs: list, tail_mass: list) -> dict[str, pa.Array]:
    """The teacher's fields of `RESPONSE_TYPE` for responses of `tokens` (token ids each), one value per
    response in each list ([T, k], [T, k], [T]; None where the teacher has not scored it: null)."""

    def per_token(name: str, values: list, dtype) -> pa.ListArray:
        missing = [value is None for value in values]
        flat = [np.empty(0, dtype) if value is None else np.asarray(value, dtype).reshape(-1) for value in values]
        _check_rows(name, [len(v) for v, gone in zip(flat, missing) if not gone], [t for t, gone in zip(tokens, missing) if not gone])
        return pa.ListArray.from_arrays(_offsets([len(v) for v in flat]), _concat(flat, dtype), mask=pa.array(missing, pa.bool_()))

    def per_token_topk(name: str, values: list, dtype) -> pa.ListArray:
        missing, rows = [value is None for value in values], []
        for value in values:
            try:
                row = np.empty((0, 0), dtype) if value is None else np.asarray(value, dtype)
            except ValueError:  # ragged nested lists
                row = None
            if row is not None and row.size == 0:
                row = row.reshape(0, 0)
            if row is None or row.ndim != 2:
                raise ValueError(f"{name} must be [tokens][k] per response, with the same k on every token")
            rows.append(row)
        _check_rows(name, [len(r) for r, gone in zip(rows, missing) if not gone], [t for t, gone in zip(tokens, missing) if not gone])
        row_offsets = _offsets(np.concatenate([np.full(len(r), r.shape[1]) for r in rows]) if rows else [])
        inner = pa.ListArray.from_arrays(row_offsets, _concat([r.reshape(-1) for r in rows], dtype))
        return pa.ListArray.from_arrays(_offsets([len(r) for r in rows]), inner, mask=pa.array(missing, pa.bool_()))

    return {
        "teacher_topk_ids": per_token_topk("teacher_topk_ids", top_ids, np.int32),
        "teacher_topk_logprobs": per_token_topk("teacher_topk_logprobs", top_logprobs, np.float32),
        "teacher_tail_mass": per_token("teacher_tail_mass", tail_mass, np.float32),
    }


def _offsets(lengths) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))


def _concat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(0, dtype)


def _check_rows(name: str, rows: list[int], tokens: list[np.ndarray]) -> None:
    for count, token_ids in zip(rows, tokens):
        if count != len(token_ids):
            raise ValueError(f"a response needs one {name} entry per token: got {count} for {len(token_ids)} tokens")


def records_to_table(records: list[StageRecord]) -> pa.Table:
    return pa.Table.from_pylist([record.to_row() for record in records], schema=STAGE_SCHEMA)


def table_to_records(table: pa.Table) -> list[StageRecord]:
    check_schema(table.schema)
    return [StageRecord.from_row(row) for row in table.to_pylist()]


def check_schema(schema: pa.Schema) -> None:
    version = (schema.metadata or {}).get(b"masters_schema_version", b"?").decode()
    if version != str(SCHEMA_VERSION):
        raise ValueError(
            f"stage records have schema version {version}, this code reads version {SCHEMA_VERSION}; "
            "regenerate the stage (delete its directory) or use the matching code version"
        )
