"""Supervised fine-tuning of a VLM on (image, question, answer) triples: next-token loss on the answer only.

Used to train the zoo from scratch. On two CPU cores every millisecond counts, so the training set is
rendered and tokenised once (`encode_examples`) and each step only pads and concatenates tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm

from masters.families import PromptInputs, VLMFamily, answer_token_ids, encode_prompt
from masters.models import build_prompt

IGNORE_INDEX = -100  # label of prompt and padding positions: no loss there


@dataclass
class EncodedExamples:
    """Pre-processed training examples: each prompt encoded by the processor (image inputs included),
    and each answer's tokens followed by the token the chat template ends an answer with."""

    prompts: list[PromptInputs]
    answer_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)


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
) -> EncodedExamples:
    """Run the processor once per example, so training steps only pad and concatenate tensors."""
    if not (len(images) == len(questions) == len(answers)):
        raise ValueError(f"images, questions and answers differ in length: {len(images)}, {len(questions)}, {len(answers)}")
    prompts = [encode_prompt(processor, build_prompt(processor, q), [image]) for image, q in zip(images, questions)]
    return EncodedExamples(prompts, answer_token_ids(processor, answers))


def collate(examples: EncodedExamples, indices: Sequence[int], family: VLMFamily) -> dict[str, torch.Tensor]:
    """Model inputs of prompt + answer rows (`VLMFamily.inputs`: prompts left padded, answers right
    padded, the model's own positions) with labels on the answer tokens only."""
    answers = [examples.answer_ids[i] for i in indices]
    inputs = family.inputs([examples.prompts[i] for i in indices], answers)
    prompt_length = max(len(examples.prompts[i].token_ids) for i in indices)
    labels = torch.full_like(inputs["input_ids"], IGNORE_INDEX)
    for row, answer in enumerate(answers):
        labels[row, prompt_length : prompt_length + len(answer)] = torch.tensor(answer)
    return {**inputs, "labels": labels}


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: linear warm-up, then cosine decay to 10% of the peak (not 0: the last steps still learn)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_sft(
    model: torch.nn.Module,
    examples: EncodedExamples,
    family: VLMFamily,
    *,
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
        batch = collate(examples, order[cursor : cursor + batch_size], family)
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
