"""The stage record: one row per question with its group of scored responses (design.md, contracts).

Written by the generation/reward pipeline as Parquet, read by the trainer. The teacher's top-k
log-probs are stored per response token so the trainer never needs the teacher's weights.
Bump `SCHEMA_VERSION` on any change; readers refuse other versions instead of misreading them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pyarrow as pa

SCHEMA_VERSION = 1

RESPONSE_TYPE = pa.struct(
    [
        ("source", pa.string()),  # "teacher" | "student" | "dataset" (naive baseline: the ground-truth answer)
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),  # the response tokens as generated, EOS included when emitted
        ("accuracy_reward", pa.float32()),
        ("teacher_topk_ids", pa.list_(pa.list_(pa.int32()))),  # [tokens][k]
        ("teacher_topk_logprobs", pa.list_(pa.list_(pa.float32()))),  # [tokens][k]
        ("teacher_tail_mass", pa.list_(pa.float32())),  # [tokens]: 1 - sum(exp(top-k log-probs))
    ]
)

STAGE_SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("family", pa.string()),
        ("image_png", pa.binary()),
        ("question", pa.string()),
        ("prompt", pa.string()),  # built by the processor's chat template
        ("answer", pa.string()),  # ground truth
        ("teacher", pa.string()),
        ("mask_ratio", pa.float32()),
        ("stage_index", pa.int32()),
        ("responses", pa.list_(RESPONSE_TYPE)),
    ],
    metadata={"masters_schema_version": str(SCHEMA_VERSION)},
)


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
    prompt: str
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
