"""Supervised fine-tuning of a VLM on (image, question, answer) triples: next-token loss on the answer only.

Used to train the zoo from scratch. On two CPU cores every millisecond counts, so the training set is
rendered and tokenised once (`encode_examples`) and each step only pads and stacks tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from masters.models import build_prompt

IGNORE_INDEX = -100  # label of prompt and padding positions: no loss there


@dataclass
class EncodedExamples:
    """Pre-processed training examples: pixels, prompt tokens (image tokens expanded), answer tokens + EOS."""

    pixel_values: torch.Tensor  # [N, 3, H, W]
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(repr=False)
    seconds: float
    samples_per_second: float

    @property
    def final_loss(self) -> float:
        """Mean of the last tenth of the steps (at least one): a single step's loss is too noisy to report."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)


def encode_examples(
    processor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    answers: Sequence[str],
    chunk_size: int = 256,
) -> EncodedExamples:
    """Run the processor once over the whole set; the target is the answer followed by EOS `</s>`."""
    if not (len(images) == len(questions) == len(answers)):
        raise ValueError(f"images, questions and answers differ in length: {len(images)}, {len(questions)}, {len(answers)}")
    tokenizer = processor.tokenizer
    pixel_chunks, prompt_ids = [], []
    for start in range(0, len(images), chunk_size):
        end = start + chunk_size
        prompts = [build_prompt(processor, q) for q in questions[start:end]]
        batch = processor(images=list(images[start:end]), text=prompts)
        pixel_chunks.append(torch.from_numpy(np.stack(batch["pixel_values"])))
        prompt_ids.extend(list(ids) for ids in batch["input_ids"])
    answer_ids = [ids + [tokenizer.eos_token_id] for ids in tokenizer(list(answers), add_special_tokens=False)["input_ids"]]
    return EncodedExamples(torch.cat(pixel_chunks), prompt_ids, answer_ids)


def collate(examples: EncodedExamples, indices: Sequence[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+answer ids with labels on the answer tokens only.

    Right padding puts every sequence at positions 0.. like left-padded generation does (its position
    ids follow the attention mask), so the model trains on the positions it is later asked at.
    """
    sequences = [examples.prompt_ids[i] + examples.answer_ids[i] for i in indices]
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(indices), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(indices), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), length), dtype=torch.long)
    for row, (i, sequence) in enumerate(zip(indices, sequences)):
        prompt_length = len(examples.prompt_ids[i])
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, prompt_length : len(sequence)] = torch.tensor(examples.answer_ids[i])
        attention_mask[row, : len(sequence)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": examples.pixel_values[list(indices)],
    }


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: linear warm-up, then cosine decay to 10% of the peak (not 0: the last steps still learn)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_sft(
    model: torch.nn.Module,
    examples: EncodedExamples,
    *,
    pad_token_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    seed: int = 0,
    description: str = "sft",
    progress: bool = True,
) -> TrainResult:
    """`steps` AdamW updates on shuffled batches (reshuffled each epoch); the model is left in eval mode."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be at least 1")
    generator = torch.Generator().manual_seed(seed)
    # Parameters with requires_grad=False (a frozen vision tower) stay as they are.
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, steps, warmup_steps)
    )
    model.train()
    order = torch.randperm(len(examples), generator=generator).tolist()
    cursor, losses = 0, []
    started = time.perf_counter()
    bar = tqdm(range(steps), desc=description, disable=not progress, leave=False, mininterval=1.0)
    for _ in bar:
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(examples), generator=generator).tolist(), 0
        batch = collate(examples, order[cursor : cursor + batch_size], pad_token_id)
        cursor += batch_size
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    seconds = time.perf_counter() - started
    model.eval()
    return TrainResult(steps=steps, losses=losses, seconds=seconds, samples_per_second=steps * batch_size / seconds)
