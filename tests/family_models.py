"""Tiny random-weight models of every supported family, for tests (built in seconds, nothing downloaded).

Each is built from its family's config classes with its real processor class (`masters.tiny_vlms`),
saved as an ordinary Hugging Face directory and loaded back the way every code path loads models.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from masters.data import text_corpus
from masters.families import VLMFamily
from masters.models import load_model, save_model
from masters.records import Response, StageRecord
from masters.tiny_vlms import MICRO, build_model, build_processor, train_tokenizer


@dataclass
class TinyVLM:
    architecture: str
    model_dir: Path
    model: torch.nn.Module
    processor: object
    family: VLMFamily


def build_tiny_vlm(architecture: str, directory: Path, seed: int = 0) -> TinyVLM:
    """A saved and reloaded tiny `architecture` model (MICRO shape) with its processor and family."""
    tokenizer = train_tokenizer(text_corpus(seed=0, size=300), vocab_size=384, architecture=architecture)
    model = build_model(MICRO, tokenizer, architecture, seed=seed)
    save_model(model, build_processor(tokenizer, MICRO, architecture), directory)
    model, processor = load_model(directory)
    return TinyVLM(architecture, directory, model, processor, VLMFamily(model, processor))


def shapes_image(width: int, height: int, colour: str = "red") -> Image.Image:
    """A non-square picture: multi-tile families (InternVL, Qwen, Idefics3) split it into several pieces."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([width // 8, height // 8, width // 2, height // 2], fill=colour)
    draw.ellipse([width // 2, height // 3, width - 4, height - 4], fill="blue")
    return image


def user_turn(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def own_forward_logprobs(tiny: TinyVLM, question: str, image: Image.Image, response: list[int]) -> torch.Tensor:
    """Log-probs [len(response), V] of the model's own forward on the processor's full inputs.

    The reference path shares nothing with ours: the library's `apply_chat_template(tokenize=True)`
    (its own image loading, BOS handling and processor call), one unpadded row, and no position ids,
    so the model computes its own (mrope included).
    """
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = tiny.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt_length = inputs["input_ids"].shape[1]
    extended = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.shape == inputs["input_ids"].shape:
            tail = torch.tensor([response], dtype=value.dtype) if key == "input_ids" else torch.zeros((1, len(response)), dtype=value.dtype)
            if key == "attention_mask":
                tail = torch.ones_like(tail)
            value = torch.cat([value, tail], dim=1)
        extended[key] = value
    with torch.no_grad():
        logits = tiny.model(**extended).logits[0]
    return logits[prompt_length - 1 : prompt_length - 1 + len(response)].float().log_softmax(-1)


def stage_record(question_id: str, question: str, image: Image.Image, responses: list[Response]) -> StageRecord:
    return StageRecord(question_id, "test", png_bytes(image), question, "red", "teacher", 0.0, 0, responses)
