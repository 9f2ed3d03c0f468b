"""The one place that knows how VLM families differ, discovered from the model and its processor.

Masking, both engines, stage records, the trainer's collate and evaluation ask this module, never a
family's attribute names. What it knows:

- **Parts.** The language model is `get_decoder()` and the vision tower `get_encoder("image")` (the
  library's own accessors); the projector is whatever else the base model holds (LLaVA, InternVL and
  Gemma 3's `multi_modal_projector`, Idefics3 / SmolVLM's `connector`) plus the projector Qwen-VL keeps
  inside its vision tower (`merger`, Qwen3-VL's `deepstack_merger_list`).
- **Prompt inputs.** Everything the processor returns besides `input_ids` / `attention_mask` travels
  with a prompt: tensors aligned with the tokens (`token_type_ids`, `mm_token_type_ids`) are padded
  like the tokens, and the image tensors (`pixel_values` as images, tiles or flattened patches,
  `image_grid_thw`, `pixel_attention_mask`, `image_sizes`, …) are concatenated in prompt order along
  their first dimension, never indexed per question.
- **Positions.** A model with its own position logic (Qwen-VL's 3-D mrope: `get_rope_index`) gets the
  positions that logic computes; every other model gets positions that count the attended tokens,
  which is what `generate` gives it under left padding.
- **Stop tokens.** Every id of `generation_config.eos_token_id` (e.g. Qwen's `<|im_end|>` and
  `<|endoftext|>`, Gemma's `<eos>` and `<end_of_turn>`), not the tokenizer's single EOS.
- **BOS.** A chat template that already writes BOS (Gemma 3) is tokenized without adding another.
- **Padding.** Prompts are always left padded, whatever side the tokenizer pads by default.

Supported: LLaVA, Qwen2.5-VL, Qwen3-VL, InternVL3 / InternVL3.5 (Hugging Face format), Gemma 3,
Idefics3 / SmolVLM. Any other model that has the same parts works too; one that lacks a part fails at
load time with an error naming its class and the part (`UnsupportedModelError`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torch import nn

MaskScope = Literal["all_linear", "language_model", "vision_and_projector"]
Part = Literal["vision_tower", "projector", "language_model"]

# The parts each mask scope covers.
SCOPE_PARTS: dict[str, tuple[Part, ...]] = {
    "all_linear": ("vision_tower", "projector", "language_model"),
    "language_model": ("language_model",),
    "vision_and_projector": ("vision_tower", "projector"),
}

# Projectors that live inside the vision tower rather than beside it (Qwen2.5-VL, Qwen3-VL).
PROJECTORS_IN_VISION_TOWER = ("merger", "deepstack_merger_list")


class UnsupportedModelError(ValueError):
    """A model whose parts or inputs this module cannot find; the message names the class and what is missing."""


# --------------------------------------------------------------------------- parts of the model


@dataclass(frozen=True)
class ModelParts:
    vision_tower: nn.Module
    projector: tuple[nn.Module, ...]
    language_model: nn.Module


def _base_model(model: nn.Module) -> nn.Module:
    """`model.model` of a `…ForConditionalGeneration`, where the parts and the position logic live."""
    return model.model if isinstance(getattr(model, "model", None), nn.Module) else model


def model_parts(model: nn.Module) -> ModelParts:
    """The vision tower, projector modules and language model of a `…ForConditionalGeneration` VLM."""
    name = type(model).__name__
    base = _base_model(model)
    if not hasattr(base, "get_decoder") or not hasattr(base, "get_encoder"):
        raise UnsupportedModelError(f"{name} is not a transformers VLM: its base model has no get_decoder/get_encoder")
    language = base.get_decoder()
    vision = base.get_encoder(modality="image")
    missing = [part for part, module in (("language model", language), ("vision tower", vision)) if module is base]
    if missing:
        raise UnsupportedModelError(
            f"{name} is not a supported VLM: no {' and no '.join(missing)} found (looked for get_decoder() and "
            "get_encoder('image'): vision_tower / visual / vision_model); see docs/models.md for adding a family"
        )
    projector = [child for child in base.children() if child is not language and child is not vision]
    projector += [getattr(vision, attr) for attr in PROJECTORS_IN_VISION_TOWER if isinstance(getattr(vision, attr, None), nn.Module)]
    projector = [module for module in projector if any(True for _ in module.parameters())]
    if not projector:
        raise UnsupportedModelError(
            f"{name} is not a supported VLM: no projector found (a base-model module beside the vision tower and "
            f"language model, or one of {PROJECTORS_IN_VISION_TOWER} inside the vision tower); see docs/models.md"
        )
    return ModelParts(vision, tuple(projector), language)


def part_weights(model: nn.Module) -> dict[Part, list[nn.Parameter]]:
    """The maskable weights of each part: 2-D `nn.Linear` weights, and in the projector every 2-D
    parameter (Gemma 3 projects with a raw `mm_input_projection_weight`). Embeddings, norms and biases
    are never listed; a projector inside the vision tower counts as projector only."""
    parts = model_parts(model)
    projector = list({id(p): p for module in parts.projector for p in module.parameters() if p.ndim == 2}.values())
    in_projector = {id(p) for p in projector}

    def linear_weights(module: nn.Module) -> list[nn.Parameter]:
        return [m.weight for m in module.modules() if isinstance(m, nn.Linear) and m.weight.ndim == 2]

    return {
        "vision_tower": [w for w in linear_weights(parts.vision_tower) if id(w) not in in_projector],
        "projector": projector,
        "language_model": linear_weights(parts.language_model),
    }


def masked_parameter_names(model: nn.Module, scope: MaskScope = "all_linear") -> list[str]:
    """Names (as in `model.named_parameters()`) of the weights `scope` masks, in model order."""
    if scope not in SCOPE_PARTS:
        raise ValueError(f"scope must be one of {sorted(SCOPE_PARTS)}, got {scope!r}")
    weights = part_weights(model)
    selected = {id(w) for part in SCOPE_PARTS[scope] for w in weights[part]}
    # named_parameters() yields a shared tensor once, so a weight tied elsewhere is listed once.
    return [name for name, param in model.named_parameters() if id(param) in selected]


# --------------------------------------------------------------------------- prompts and their inputs


@dataclass
class PromptInputs:
    """One prompt as the processor encoded it, ready to be batched with others.

    `token_inputs` are 1-D, one entry per token of `token_ids` (e.g. Gemma 3's `token_type_ids`);
    `image_inputs` keep the processor's leading dimension (images, tiles or patches of this prompt).
    """

    token_ids: list[int]
    token_inputs: dict[str, torch.Tensor]
    image_inputs: dict[str, torch.Tensor]


def template_writes_bos(tokenizer, text: str) -> bool:
    """True when `text` (a rendered chat template) already starts with BOS, so tokenizing must not add one."""
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def encode_prompt(processor, text: str, images: Sequence[Image.Image]) -> PromptInputs:
    """Run the processor once on one rendered prompt and its images (in the order the text names them)."""
    encoded = processor(
        images=[list(images)] if images else None,  # nested: one list of images per prompt, as every processor accepts
        text=[text],
        return_tensors="pt",
        add_special_tokens=not template_writes_bos(processor.tokenizer, text),
    )
    input_ids = encoded["input_ids"]
    token_inputs, image_inputs = {}, {}
    for key, value in encoded.items():
        if key in ("input_ids", "attention_mask") or not isinstance(value, torch.Tensor):
            continue
        if value.shape == input_ids.shape:
            token_inputs[key] = value[0]
        else:
            image_inputs[key] = value
    return PromptInputs(input_ids[0].tolist(), token_inputs, image_inputs)


def _concat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0; where trailing shapes differ (Idefics3's images per prompt), zero-pad them.

    Zero padding is what the processors themselves use: an all-zero image is dropped by the model.
    """
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].ndim)]
    padded = []
    for tensor in tensors:
        if list(tensor.shape[1:]) != shape:
            grown = tensor.new_zeros((tensor.shape[0], *shape))
            grown[tuple(slice(0, n) for n in tensor.shape)] = tensor
            tensor = grown
        padded.append(tensor)
    return torch.cat(padded)


def batch_inputs(
    prompts: Sequence[PromptInputs], continuations: Sequence[Sequence[int]] | None, pad_id: int
) -> dict[str, torch.Tensor]:
    """Model inputs (no positions) for rows of prompt + continuation.

    Layout: prompts left padded to a common length P, continuations right padded to a common T,
    so column P - 1 + t predicts continuation token t in every row. A prompt repeated over several
    rows (a question's group of responses) repeats its image inputs in row order.
    """
    if not prompts:
        raise ValueError("batch_inputs needs at least one prompt")
    continuations = continuations if continuations is not None else [[] for _ in prompts]
    if len(continuations) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    prompt_length = max(len(p.token_ids) for p in prompts)
    length = prompt_length + max((len(c) for c in continuations), default=0)
    rows = len(prompts)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)
    token_keys = list(dict.fromkeys(key for p in prompts for key in p.token_inputs))
    token_inputs = {
        key: torch.zeros((rows, length), dtype=next(p.token_inputs[key].dtype for p in prompts if key in p.token_inputs))
        for key in token_keys
    }
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        start = prompt_length - len(prompt.token_ids)
        end = prompt_length + len(continuation)
        input_ids[row, start:prompt_length] = torch.tensor(prompt.token_ids, dtype=torch.long)
        input_ids[row, prompt_length:end] = torch.tensor(list(continuation), dtype=torch.long)
        attention_mask[row, start:end] = 1
        for key, value in prompt.token_inputs.items():
            token_inputs[key][row, start:prompt_length] = value  # continuation tokens are text: type 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **token_inputs}
    image_keys = list(dict.fromkeys(key for p in prompts for key in p.image_inputs))
    for key in image_keys:
        inputs[key] = _concat_padded([p.image_inputs[key] for p in prompts if key in p.image_inputs])
    return inputs


def inputs_on(inputs: dict[str, torch.Tensor], device: str | torch.device, float_dtype: torch.dtype) -> dict:
    """Model inputs on `device`, floating ones (pixels) in the model's `float_dtype`, ids and masks as they are."""
    return {key: value.to(device, float_dtype if value.is_floating_point() else value.dtype) for key, value in inputs.items()}


def counting_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's index among its row's attended tokens (what `generate` gives under left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


# --------------------------------------------------------------------------- a loaded model + processor


class VLMFamily:
    """What the code paths need to know about one loaded model and its processor."""

    def __init__(self, model: nn.Module, processor):
        self.model_class = type(model).__name__
        self.processor = processor
        self.tokenizer = processor.tokenizer
        model_parts(model)  # fail now, naming the class, if a part is missing
        if self.tokenizer.pad_token_id is None:
            raise UnsupportedModelError(
                f"{self.model_class}: its tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token) "
                "and save the processor again"
            )
        base = _base_model(model)
        # Qwen-VL computes 3-D mrope positions from the tokens and image grids; no other family has this.
        self._rope_index = getattr(base, "get_rope_index", None)
        self._rope_index_args = set(inspect.signature(self._rope_index).parameters) if self._rope_index else set()
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.stop_token_ids = stop_token_ids(model, self.tokenizer)
        self.answer_end_id = answer_end_id(processor)
        if self.answer_end_id not in self.stop_token_ids:
            raise UnsupportedModelError(
                f"{self.model_class}: the chat template ends an answer with token {self.answer_end_id} "
                f"({self.tokenizer.convert_ids_to_tokens(self.answer_end_id)!r}), which is not among "
                f"generation_config.eos_token_id {list(self.stop_token_ids)}: generation would not stop where answers end; "
                "add it to generation_config.eos_token_id"
            )

    def encode(self, text: str, images: Sequence[Image.Image]) -> PromptInputs:
        return encode_prompt(self.processor, text, images)

    def inputs(
        self, prompts: Sequence[PromptInputs], continuations: Sequence[Sequence[int]] | None = None
    ) -> dict[str, torch.Tensor]:
        """`batch_inputs` plus the model's positions: everything a forward pass over the rows needs."""
        inputs = batch_inputs(prompts, continuations, self.pad_id)
        inputs["position_ids"] = self.position_ids(inputs)
        return inputs

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own positions for a batch from :meth:`inputs` ([3, B, L] for mrope, else [B, L])."""
        if self._rope_index is None:
            return counting_positions(inputs["attention_mask"])
        arguments = {key: value for key, value in inputs.items() if key in self._rope_index_args and key != "position_ids"}
        positions, _ = self._rope_index(**arguments)
        return positions


def stop_token_ids(model: nn.Module, tokenizer) -> tuple[int, ...]:
    """Every id generation stops on: `generation_config.eos_token_id` (an int or a list), else the tokenizer's EOS."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    ids = tuple(dict.fromkeys(int(i) for i in ids if i is not None))
    if not ids:
        raise UnsupportedModelError(
            f"{type(model).__name__}: neither generation_config.eos_token_id nor the tokenizer names an end-of-sequence "
            "token; set generation_config.eos_token_id"
        )
    return ids


def answer_end_id(processor) -> int:
    """The token the chat template writes right after an assistant answer (Qwen `<|im_end|>`, Gemma
    `<end_of_turn>`, the zoo's `</s>`): the first special token after the answer's text, else EOS.

    A dataset answer turned into a training response ends with it, as the model's own answers do.
    """
    tokenizer = processor.tokenizer
    marker = "0123"
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": marker}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    tail_ids = tokenizer(text[text.rfind(marker) + len(marker) :], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    found = next((i for i in tail_ids if i in special), tokenizer.eos_token_id)
    if found is None:
        raise UnsupportedModelError("the tokenizer has no EOS token and the chat template ends an answer with no special token")
    return int(found)


def answer_token_ids(processor, answers: Sequence[str]) -> list[list[int]]:
    """Each answer as the model should produce it: its tokens, then the template's answer end (`answer_end_id`)."""
    end = answer_end_id(processor)
    return [ids + [end] for ids in processor.tokenizer(list(answers), add_special_tokens=False)["input_ids"]]


def chat_template_of(processor) -> str | None:
    """The chat template prompts are rendered with (the processor's, else its tokenizer's)."""
    return getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
