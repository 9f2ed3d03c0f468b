"""Synthetic stage records for the trainer, loss and batching tests: built from a processor, no model needed."""

from __future__ import annotations

import io
import random

import pyarrow.parquet as pq
import torch
from PIL import Image

from masters.records import Response, StageRecord, records_to_table

QUESTIONS = ["Is there a red circle?", "How many squares are there?", "What color is the triangle?", "Count."]


def synthetic_records(
    processor, num_questions: int, group_size: int = 4, topk: int = 8, seed: int = 0, max_response_tokens: int = 6
) -> list[StageRecord]:
    """Deterministic stage records: random images, random response tokens (no special tokens), random
    teacher top-k log-probs that leave some mass to the tail, random 0/1 accuracy rewards."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    vocab_size = len(processor.tokenizer)
    first_plain_id = len(processor.tokenizer.all_special_ids)  # specials come first in the family's vocab
    records = []
    for q in range(num_questions):
        pixels = bytes(rng.randrange(256) for _ in range(32 * 32 * 3))
        png = io.BytesIO()
        Image.frombytes("RGB", (32, 32), pixels).save(png, format="PNG")
        question = QUESTIONS[q % len(QUESTIONS)] + " " * (q % 3)  # varied prompt lengths
        responses = []
        for j in range(group_size):
            length = rng.randint(1, max_response_tokens)
            token_ids = [rng.randrange(first_plain_id, vocab_size) for _ in range(length)]
            topk_ids = [torch.randperm(vocab_size, generator=generator)[:topk].tolist() for _ in range(length)]
            logprobs = torch.log_softmax(torch.randn(length, topk + 1, generator=generator) * 2, dim=-1)[:, :topk]
            responses.append(
                Response(
                    source="teacher" if j < group_size // 2 else "student",
                    text=f"answer {j}",
                    token_ids=token_ids,
                    accuracy_reward=float(rng.random() < 0.5),
                    teacher_topk_ids=topk_ids,
                    teacher_topk_logprobs=logprobs.tolist(),
                    teacher_tail_mass=(1 - logprobs.exp().sum(-1)).tolist(),
                )
            )
        records.append(
            StageRecord(
                question_id=f"q{q:04d}",
                family="synthetic",
                image_png=png.getvalue(),
                question=question,
                answer="yes",
                teacher="teacher-l",
                mask_ratio=0.1,
                stage_index=1,
                responses=responses,
            )
        )
    return records


def write_stage(records: list[StageRecord], stage_dir, files: int = 2) -> None:
    """Split the records over several Parquet files in reverse order, as a pipeline might."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    ordered = list(reversed(records))
    for f in range(files):
        pq.write_table(records_to_table(ordered[f::files]), stage_dir / f"part-{f:03d}.parquet")
