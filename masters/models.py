"""Loading, saving and prompting any Hugging Face VLM: the zoo's or a released checkpoint.

Building tiny models of each family is `masters.tiny_vlms`; what differs between families at run time
is `masters.families`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from masters.families import VLMFamily, batch_inputs, chat_template_of, inputs_on
from masters.io import atomic_directory, json_digest


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- loading and saving


def resolve_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: str = "auto"
) -> tuple[torch.nn.Module, object]:
    """Any VLM directory that `AutoModelForImageTextToText` and `AutoProcessor` load, in eval mode."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(model_dir)!r} is not a Hugging Face model directory (no config.json); "
            "build the zoo with `python jobs/build_zoo.py` or pass a saved model directory"
        )
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=resolve_dtype(dtype, device))
    processor = AutoProcessor.from_pretrained(model_dir)
    return model.to(device).eval(), processor


def save_model(model: torch.nn.Module, processor, out_dir: str | Path, metadata: dict | None = None) -> Path:
    """`save_pretrained` of model and processor into `out_dir`, written to a temp dir and renamed into place."""
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if metadata is not None:
            (tmp / "masters.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return Path(out_dir)


def vocab_fingerprint(processor) -> str:
    """A digest of the tokenizer's vocabulary: teachers and student must share it token for token."""
    return json_digest(sorted(processor.tokenizer.get_vocab().items()))


def check_shared_tokenizer(processors_by_name: dict[str, object]) -> None:
    """Raise if any two models tokenize or template prompts differently.

    The trainer compares distributions token by token, and a stage's prompt, rendered once with the
    student's template, is what every teacher scores: both must mean the same tokens to all models.
    """
    fingerprints = {name: vocab_fingerprint(p) for name, p in processors_by_name.items()}
    if len(set(fingerprints.values())) > 1:
        raise ValueError(
            "teachers and student must share one tokenizer; vocabulary digests differ: "
            + ", ".join(f"{name}={digest}" for name, digest in fingerprints.items())
        )
    templates = {name: chat_template_of(p) for name, p in processors_by_name.items()}
    if len(set(templates.values())) > 1:
        first = next(iter(templates))
        differ = [name for name, template in templates.items() if template != templates[first]]
        raise ValueError(
            f"teachers and student must share one chat template; the template of {', '.join(differ)} differs "
            f"from {first}'s: save every model with the same processor (chat_template.jinja)"
        )


# --------------------------------------------------------------------------- prompts


def chat_messages(question: str, answer: str | None = None) -> list[dict]:
    """One user turn with an image and the question, and the assistant's answer when given."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def build_prompt(processor, question: str) -> str:
    """The prompt text the model answers, built by the processor's own chat template."""
    return processor.apply_chat_template(chat_messages(question), add_generation_prompt=True, tokenize=False)


@torch.inference_mode()
def generate_answers(
    model: torch.nn.Module,
    family: VLMFamily,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy answers for a batch, stripped of the prompt and special tokens.

    Each prompt is encoded on its own and the batch is left padded (`VLMFamily.inputs`), so an answer does
    not depend on what else is in the batch; `generate` computes the model's own positions and stops
    on any of `generation_config`'s EOS ids.
    """
    parameter = next(model.parameters())
    prompts = [family.encode(build_prompt(family.processor, q), [image]) for image, q in zip(images, questions)]
    inputs = inputs_on(batch_inputs(prompts, None, family.pad_id), parameter.device, parameter.dtype)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=family.pad_id)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in family.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
