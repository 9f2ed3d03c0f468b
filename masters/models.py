"""Building, loading and prompting the VLMs: the tiny LLaVA family and any Hugging Face VLM.

The family is real transformers classes (`LlavaForConditionalGeneration`: CLIP vision tower +
Llama language model + MLP projector) with one byte-level BPE tokenizer shared by every model,
so teachers and students agree token for token, as the method requires.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from masters.families import VLMFamily, batch_inputs, chat_template_of

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Each turn is `<|role|>\n…</s>\n`; a generation prompt opens the assistant turn, and the model
# ends its answer with `</s>`, the EOS token. Images come before the text of their message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ModelSize(BaseModel):
    """Shape of one LLaVA model of the family. Parameter count is dominated by the text layers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_hidden_size: int = Field(ge=8)
    text_layers: int = Field(ge=1)
    text_heads: int = Field(ge=1)
    text_kv_heads: int | None = Field(None, ge=1, description="Grouped-query heads; None = text_heads.")
    text_intermediate_size: int = Field(ge=8)
    vision_hidden_size: int = Field(ge=8)
    vision_layers: int = Field(ge=2, description="At least 2: LLaVA reads the second-to-last vision layer.")
    vision_heads: int = Field(ge=1)
    vision_intermediate_size: int = Field(ge=8)
    image_size: int = Field(64, ge=8)
    patch_size: int = Field(8, ge=1)
    max_positions: int = Field(512, ge=32)

    @model_validator(mode="after")
    def _shapes_divide(self) -> ModelSize:
        if self.text_hidden_size % self.text_heads:
            raise ValueError(f"text_hidden_size ({self.text_hidden_size}) must be divisible by text_heads ({self.text_heads})")
        if self.text_heads % (self.text_kv_heads or self.text_heads):
            raise ValueError(f"text_heads ({self.text_heads}) must be divisible by text_kv_heads ({self.text_kv_heads})")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(
                f"vision_hidden_size ({self.vision_hidden_size}) must be divisible by vision_heads ({self.vision_heads})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        return self

    @property
    def image_seq_length(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# The size the tests use: built and run in well under a second.
MICRO = ModelSize(
    text_hidden_size=64,
    text_layers=2,
    text_heads=4,
    text_intermediate_size=128,
    vision_hidden_size=32,
    vision_layers=2,
    vision_heads=2,
    vision_intermediate_size=64,
    image_size=32,
    patch_size=8,
)


# --------------------------------------------------------------------------- tokenizer and processor


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`; the special tokens come first in the vocabulary."""
    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, *ROLE_TOKENS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[IMAGE_TOKEN, *ROLE_TOKENS],
        padding_side="left",  # decoder-only generation pads on the left
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, size: ModelSize) -> LlavaProcessor:
    # The torchvision-backed class: a saved processor reloads as this one, so training and serving agree.
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size.image_size},
        crop_size={"height": size.image_size, "width": size.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=size.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, which the "default" strategy drops again
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_model(size: ModelSize, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlavaForConditionalGeneration:
    """A freshly initialised LLaVA model of `size` whose vocabulary is exactly the tokenizer's."""
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden_size,
        intermediate_size=size.vision_intermediate_size,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        projection_dim=size.vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_hidden_size,
        intermediate_size=size.text_intermediate_size,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads or size.text_heads,
        max_position_embeddings=size.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,  # halves the parameters of tiny models; both stay dense under masking
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=size.image_seq_length,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- loading and saving


def resolve_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: str = "auto"
) -> tuple[torch.nn.Module, LlavaProcessor]:
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
    from masters.io import atomic_directory

    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if metadata is not None:
            (tmp / "masters.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return Path(out_dir)


def vocab_fingerprint(processor) -> str:
    """A digest of the tokenizer's vocabulary: teachers and student must share it token for token."""
    import hashlib

    vocab = processor.tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]


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
            f"teachers and student must share one chat template; {', '.join(differ)} differ from {first}: "
            "save every model with the same processor (chat_template.jinja)"
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
    inputs = batch_inputs(prompts, None, family.pad_id)
    inputs = {
        key: value.to(parameter.device, parameter.dtype if value.is_floating_point() else value.dtype)
        for key, value in inputs.items()
    }
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=family.pad_id)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in family.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
