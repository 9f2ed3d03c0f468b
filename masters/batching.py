"""Stage records → padded training tensors, and the deterministic split of a stage over workers.

Row layout of a :class:`ResponseBatch` (one row per response, a question's G responses adjacent)::

    input_ids   [pad … pad | prompt (image tokens expanded) | response | pad … pad]
                 <-------- prompt_length columns --------->  <- T cols ->

Prompts are left-padded to a common ``prompt_length`` P and responses right-padded to a common T, so
the logits at column ``P - 1 + t`` predict response token ``t`` in every row. Positions are the model's
own (:mod:`masters.families`), giving each token the position it had when the response was generated.
The teacher's top-k ids and log-probs are stored per response token, so ``teacher_topk_*[:, t]`` is
the teacher's distribution for that same prediction (the tail bucket is their complement, computed
by :mod:`masters.losses`; the stored tail mass is not needed).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from masters.families import VLMFamily, inputs_on
from masters.losses import LossTargets
from masters.models import build_prompt
from masters.records import StageRecord, check_schema, table_to_records

# --------------------------------------------------------------------------- reading a stage


class StageTable:
    """The Parquet files of one stage directory, ordered by question id (independent of file layout).

    Only the `question_id` column is read up front (to order the questions and find each one's file,
    row group and row); :meth:`records` reads just the row groups that hold the asked-for rows. A
    worker's memory is therefore bounded by the row groups of one micro-batch (stages are written in
    row groups of `masters.records.ROWS_PER_ROW_GROUP` questions), not by the stage.
    """

    def __init__(self, stage_dir: str | Path):
        stage_dir = Path(stage_dir)
        # Files starting with "." or "_" are temp files of atomic writes or manifests, never data.
        paths = sorted(p for p in stage_dir.glob("*.parquet") if not p.name.startswith((".", "_")))
        if not paths:
            raise FileNotFoundError(
                f"stage directory {str(stage_dir)!r} holds no *.parquet files; "
                "run the generation pipeline for this stage first"
            )
        self._files = []
        question_ids, locations = [], []  # locations: (file, row group, row within it)
        for file_index, path in enumerate(paths):
            parquet = pq.ParquetFile(path, memory_map=True)
            check_schema(parquet.schema_arrow)
            self._files.append(parquet)
            for group in range(parquet.num_row_groups):
                ids = parquet.read_row_group(group, columns=["question_id"]).column(0).to_pylist()
                question_ids += ids
                locations += [(file_index, group, row) for row in range(len(ids))]
        if len(set(question_ids)) != len(question_ids):
            raise ValueError(f"stage directory {str(stage_dir)!r} holds a question id more than once")
        order = sorted(range(len(question_ids)), key=question_ids.__getitem__)
        self._locations = [locations[index] for index in order]

    def __len__(self) -> int:
        return len(self._locations)

    def records(self, positions: list[int]) -> list[StageRecord]:
        """The records at `positions` of the question-id order, reading only the row groups that hold them."""
        wanted = [self._locations[position] for position in positions]
        groups = {
            (file, group): self._files[file].read_row_group(group)
            for file, group in dict.fromkeys((file, group) for file, group, _ in wanted)
        }
        return table_to_records(pa.concat_tables([groups[(file, group)].slice(row, 1) for file, group, row in wanted]))


# --------------------------------------------------------------------------- sharding


@dataclass(frozen=True)
class ShardPlan:
    """Which questions each worker trains on at each optimizer step.

    Each epoch is a seeded permutation of the stage's questions cut into batches of
    `questions_per_batch` (a trailing partial batch is dropped; the next epoch's permutation drops
    different questions). Worker `rank` takes the `rank`-th contiguous slice of every batch and cuts
    it into `grad_accum_steps` micro-batches. Every step's questions depend only on (seed, step), so a
    resumed run sees exactly the batches an uninterrupted run would.
    """

    num_questions: int
    questions_per_batch: int
    world_size: int
    grad_accum_steps: int
    seed: int

    def __post_init__(self) -> None:
        per_update = self.world_size * self.grad_accum_steps
        if self.questions_per_batch % per_update:
            raise ValueError(
                f"train.questions_per_batch ({self.questions_per_batch}) must be a multiple of "
                f"train.num_workers × train.grad_accum_steps ({self.world_size} × {self.grad_accum_steps}); "
                "change one of them"
            )
        if self.num_questions < self.questions_per_batch:
            raise ValueError(
                f"the stage has {self.num_questions} questions, fewer than train.questions_per_batch "
                f"({self.questions_per_batch}); lower train.questions_per_batch or give the stage more questions"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_questions // self.questions_per_batch

    def batch_questions(self, step: int) -> list[int]:
        """All questions of optimizer step `step` (0-based, counted across epochs)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_questions, generator=generator)
        return order[index * self.questions_per_batch : (index + 1) * self.questions_per_batch].tolist()

    def worker_micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Worker `rank`'s questions at `step`, as `grad_accum_steps` equal micro-batches."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} workers")
        per_worker = self.questions_per_batch // self.world_size
        share = self.batch_questions(step)[rank * per_worker : (rank + 1) * per_worker]
        per_micro = per_worker // self.grad_accum_steps
        return [share[i : i + per_micro] for i in range(0, per_worker, per_micro)]


# --------------------------------------------------------------------------- collation


@dataclass
class ResponseBatch:
    """Model inputs of a micro-batch (B rows = all responses of its questions) and the loss targets.

    ``inputs`` is what the model's forward takes (`input_ids`, `attention_mask`, the model's own
    `position_ids`, and whatever the processor produced for the prompts: `pixel_values`,
    `image_grid_thw`, `token_type_ids`, …; see :mod:`masters.families`). ``targets`` is the
    :class:`~masters.losses.LossTargets` of the response columns: its ``target_ids`` [B, T] are the
    response tokens, so the student's logits at columns P - 1 … P + T - 2 (see
    :func:`masters.student_loss.response_logits`) line up with it position for position.
    """

    inputs: dict[str, torch.Tensor]
    prompt_length: int  # P
    targets: LossTargets

    @property
    def response_length(self) -> int:
        return self.targets.target_ids.shape[1]

    @property
    def num_response_tokens(self) -> int:
        return int(self.targets.response_mask.sum())

    def to(self, device: str | torch.device, float_dtype: torch.dtype = torch.float32) -> ResponseBatch:
        """On `device`, with floating inputs (pixels) in `float_dtype`, the model's dtype."""
        return ResponseBatch(
            inputs=inputs_on(self.inputs, device, float_dtype),
            prompt_length=self.prompt_length,
            targets=self.targets.to(device),
        )


def decode_image(image_png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(image_png)).convert("RGB")


def collate_records(records: list[StageRecord], family: VLMFamily) -> ResponseBatch:
    """Encode each question's prompt and image once (the processor's own template and image inputs),
    then lay out one row per response as described in the module docstring."""
    if not records:
        raise ValueError("collate_records needs at least one record")
    for record in records:
        if not record.responses:
            raise ValueError(f"question {record.question_id!r} has no responses; the stage records are incomplete")
        for response in record.responses:
            if not response.token_ids:
                raise ValueError(f"question {record.question_id!r} has a response with no tokens (EOS is a token)")
    topk = len(records[0].responses[0].teacher_topk_ids[0])
    prompts = [family.encode(build_prompt(family.processor, r.question), [decode_image(r.image_png)]) for r in records]
    rows = [(q, response) for q, record in enumerate(records) for response in record.responses]
    num_rows = len(rows)
    response_length = max(len(response.token_ids) for _, response in rows)

    response_ids = torch.full((num_rows, response_length), family.pad_id, dtype=torch.long)
    response_mask = torch.zeros((num_rows, response_length), dtype=torch.bool)
    topk_ids = torch.zeros((num_rows, response_length, topk), dtype=torch.long)
    topk_logprobs = torch.zeros((num_rows, response_length, topk), dtype=torch.float32)
    for row, (q, response) in enumerate(rows):
        length = len(response.token_ids)
        ids = torch.tensor(response.teacher_topk_ids, dtype=torch.long)
        if ids.shape != (length, topk):
            raise ValueError(
                f"question {records[q].question_id!r}: teacher top-k has shape {tuple(ids.shape)}, expected "
                f"({length}, {topk}); every token of a stage needs the same k"
            )
        response_ids[row, :length] = torch.tensor(response.token_ids, dtype=torch.long)
        response_mask[row, :length] = True
        topk_ids[row, :length] = ids
        topk_logprobs[row, :length] = torch.tensor(response.teacher_topk_logprobs, dtype=torch.float32)

    group_index = torch.tensor([q for q, _ in rows], dtype=torch.long)
    inputs = family.inputs([prompts[q] for q, _ in rows], [response.token_ids for _, response in rows])
    return ResponseBatch(
        inputs=inputs,
        prompt_length=max(len(p.token_ids) for p in prompts),
        targets=LossTargets(
            target_ids=response_ids,
            response_mask=response_mask,
            teacher_topk_ids=topk_ids,
            teacher_topk_logprobs=topk_logprobs,
            group_index=group_index,
            accuracy_reward=torch.tensor([response.accuracy_reward for _, response in rows], dtype=torch.float32),
        ),
    )
