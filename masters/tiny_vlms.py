"""Tiny random-weight VLMs of every real family, built offline in seconds.

Each family is built from its own transformers config classes and driven by its REAL processor class
(with the family's real image processor and, where the processor takes one, video processor), so code
that works here meets the same inputs, placeholder expansion, padding side and stop tokens as with the
released checkpoints, only at toy sizes: the way transformers' own tests build their tiny models.

Architectures and their classes:

* ``llava``      `LlavaForConditionalGeneration` (CLIP + Llama) + `LlavaProcessor` (`CLIPImageProcessor`),
  with our own turn format: the zoo's family.
* ``qwen2_5_vl`` `Qwen2_5_VLForConditionalGeneration` + `Qwen2_5_VLProcessor`
  (`Qwen2VLImageProcessor`, `Qwen2VLVideoProcessor`).
* ``qwen3_vl``   `Qwen3VLForConditionalGeneration` + `Qwen3VLProcessor`
  (`Qwen2VLImageProcessor`, `Qwen3VLVideoProcessor`).
* ``internvl``   `InternVLForConditionalGeneration` + `InternVLProcessor` (`GotOcr2ImageProcessor`,
  `InternVLVideoProcessor`), in the InternVL3.5 "-hf" format with a Qwen3 language model (InternVL3's
  Qwen2.5 language model differs only in its text config; the code paths are the same).
* ``gemma3``     `Gemma3ForConditionalGeneration` (SigLIP + Gemma 3 text) + `Gemma3Processor`.
* ``idefics3``   `Idefics3ForConditionalGeneration` (SmolVLM layout: Idefics3 vision + Llama) +
  `Idefics3Processor`. SmolVLM's own processor needs the `num2words` package, hence this family.

How `ModelSize` maps onto each family. The text fields (`text_*`, `max_positions`) and the vision
transformer's width, depth, heads and MLP (`vision_*`) map one to one everywhere; head_dim is
text_hidden_size // text_heads. The image fields differ, because each family sees images differently:

* llava: the image is resized and cropped to `image_size` square; (image_size / patch_size)**2 tokens.
* qwen2_5_vl, qwen3_vl: no fixed input size. `patch_size` is the ViT patch, 2x2 patches merge into one
  token, and `image_size` bounds the resized image's AREA: the image processor keeps the aspect ratio,
  snaps both sides to multiples of 2 * patch_size and fits the area between (2 * patch_size)**2
  (`min_pixels`, one token) and image_size**2 (`max_pixels`). A 64x48 image at image_size 32 and
  patch_size 8 becomes 16x32 pixels: 2x4 patches, 2 tokens.
* internvl: `image_size` is the TILE size. With `crop_to_patches` an image is cut into a grid of 1 to
  `INTERNVL_MAX_TILES` tiles matching its aspect ratio, plus a thumbnail of the whole image when there are
  several tiles; each tile gives (image_size / patch_size)**2 / 4 tokens (pixel shuffle, ratio 0.5).
* gemma3: every image is resized to `image_size` square (no pan-and-scan); the SigLIP patches are
  average-pooled down to `mm_tokens_per_image` = (image_size / patch_size / 2)**2 tokens.
* idefics3: `image_size` is the vision encoder's square input. An image is first resized so its longest
  side is 2 * image_size, then split into image_size crops (at most 2x2) plus a global view; each crop
  gives (image_size / patch_size)**2 / 4 tokens (pixel shuffle, scale factor 2).

Tokenizers are one byte-level BPE (trained with the `tokenizers` library on the given texts) with the family's
own special tokens (first in the vocabulary), named attributes the processors read, and a chat template
written here in the family's turn format. Qwen tokenizers pad on the RIGHT, as the released ones do;
every other family pads on the left. `model.generation_config.eos_token_id` is a list holding the token
that ends an assistant turn and the tokenizer's EOS, as the released generation configs do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    GotOcr2ImageProcessor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3Config,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SiglipVisionConfig,
)


class ModelSize(BaseModel):
    """Shape of one tiny model, in any family (the module docstring says how each family reads it).

    Parameter count is dominated by the text layers.
    """

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
        """Image tokens of a LLaVA model of this size: one per patch."""
        return (self.image_size // self.patch_size) ** 2


# The size the tests use: built and run in well under a second.
MICRO = ModelSize(text_hidden_size=64, text_layers=2, text_heads=4, text_intermediate_size=128,
                  vision_hidden_size=32, vision_layers=2, vision_heads=2, vision_intermediate_size=64,
                  image_size=32, patch_size=8)  # fmt: skip


Architecture = Literal["llava", "qwen2_5_vl", "qwen3_vl", "internvl", "gemma3", "idefics3"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)

# Qwen merges 2x2 ViT patches into one token and pairs frames in time; both as in every release.
QWEN_MERGE_SIZE = 2
QWEN_TEMPORAL_PATCH_SIZE = 2
# InternVL's pixel shuffle halves each side of the patch grid (InternVL2 to 3.5 all use 0.5).
INTERNVL_DOWNSAMPLE_RATIO = 0.5
# Most tiles an image is cut into (the releases use 12). 4 keeps a 64x48 image at 2x2 tiles + thumbnail.
INTERNVL_MAX_TILES = 4
# Idefics3's pixel shuffle merges scale_factor x scale_factor patches into one token.
IDEFICS3_SCALE_FACTOR = 2


# --------------------------------------------------------------------------- chat templates

# LLaVA (the zoo's family, our own turn format).
LLAVA_IMAGE_TOKEN = "<image>"
LLAVA_PAD_TOKEN = "<pad>"
LLAVA_BOS_TOKEN = "<s>"
LLAVA_EOS_TOKEN = "</s>"
LLAVA_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Each turn is `<|role|>\n…</s>\n`; a generation prompt opens the assistant turn, and the model
# ends its answer with `</s>`, the EOS token. Images come before the text of their message.
LLAVA_CHAT_TEMPLATE = (
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



# Templates are built by string concatenation with no newline right after a block tag: transformers
# renders chat templates with trim_blocks, which would silently drop such a newline.
def _content(image: str, video: str = "") -> str:
    """A message's content: a plain string, or parts rendered as the family's placeholders and text."""
    return (
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{image}"
        + (f"{{% elif part['type'] == 'video' %}}{video}" if video else "")
        + "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
    )


# Qwen: `<|im_start|>role\n…<|im_end|>\n`; an image is `<|vision_start|><|image_pad|><|vision_end|>`,
# whose `<|image_pad|>` the processor repeats once per merged patch. Unlike the released template no
# default system prompt is inserted, which keeps tiny test prompts short.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    + _content("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>")
    + "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# InternVL: the same ChatML turns; an image is `<IMG_CONTEXT>\n` in the text, which InternVLProcessor
# expands to `<img><IMG_CONTEXT>*(tokens per tile * tiles)</img>` (the released -hf template does the same).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    + _content("<IMG_CONTEXT>\n", "<video>\n")
    + "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Gemma 3: the template writes BOS itself (as the released one does; our tokenizer adds none, so the
# prompt carries exactly one). The assistant's role is `model`; there is no system role, so a system
# message is prepended to the first user turn. An image is `<start_of_image>`, which Gemma3Processor
# expands to `\n\n<start_of_image><image_soft_token>*mm_tokens_per_image<end_of_image>\n\n`.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% else %}{% set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if loop.first %}{{ first_user_prefix }}{% endif %}"
    + _content("<start_of_image>")
    + "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Idefics3 in SmolVLM's layout: BOS (`<|im_start|>`) once, then `User:<image>question<end_of_utterance>\n`
# (a colon without a space when the message opens with an image) and `Assistant:` as the generation
# prompt. Idefics3Processor expands `<image>` into its crops' `<fake_token_around_image>` framed tokens.
IDEFICS3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is not string and message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    + _content("<image>")
    + "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


# --------------------------------------------------------------------------- tokenizers


@dataclass(frozen=True)
class _TokenizerSpec:
    """A family's special tokens: which are bos/eos/pad, which are named attributes, which ends a turn."""

    specials: tuple[str, ...]  # every special token, in vocabulary order (ids 0, 1, …)
    eos: str
    pad: str
    end_of_turn: str  # what the model emits to end its answer; generation stops on it
    chat_template: str
    padding_side: Literal["left", "right"]
    bos: str | None = None
    # Named tokens the processors read as tokenizer attributes (e.g. `tokenizer.boi_token`); saved in
    # tokenizer_config.json and restored on load.
    named: dict[str, str] = field(default_factory=dict)
    # The tokenizer's `extra_special_tokens` list; None = every special that is not bos/eos/pad.
    extra: tuple[str, ...] | None = None


# As released: no BOS, `<|im_end|>` is EOS, `<|endoftext|>` pads, and padding is on the right.
_QWEN = _TokenizerSpec(
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
              "<|video_pad|>"),
    eos="<|im_end|>", pad="<|endoftext|>", end_of_turn="<|im_end|>",
    chat_template=QWEN_CHAT_TEMPLATE, padding_side="right",
)  # fmt: skip
_INTERNVL_NAMED = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
_IDEFICS3_IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>")
_IDEFICS3_GRID_TOKENS = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))

TOKENIZER_SPECS: dict[str, _TokenizerSpec] = {
    # Each turn is `<|role|>\n…</s>\n`; `</s>` ends the answer and is EOS.
    "llava": _TokenizerSpec(
        specials=(LLAVA_PAD_TOKEN, LLAVA_BOS_TOKEN, LLAVA_EOS_TOKEN, LLAVA_IMAGE_TOKEN, *LLAVA_ROLE_TOKENS),
        bos=LLAVA_BOS_TOKEN, eos=LLAVA_EOS_TOKEN, pad=LLAVA_PAD_TOKEN, end_of_turn=LLAVA_EOS_TOKEN,
        chat_template=LLAVA_CHAT_TEMPLATE, padding_side="left",
    ),
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": _QWEN,
    "internvl": _TokenizerSpec(
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", *_INTERNVL_NAMED.values()),
        eos="<|im_end|>", pad="<|endoftext|>", end_of_turn="<|im_end|>",
        chat_template=INTERNVL_CHAT_TEMPLATE, padding_side="left",
        named=_INTERNVL_NAMED,
    ),
    "gemma3": _TokenizerSpec(
        # pad, eos, bos first: ids 0, 1, 2 as in the released vocabulary.
        specials=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                  "<image_soft_token>"),
        bos="<bos>", eos="<eos>", pad="<pad>", end_of_turn="<end_of_turn>",
        chat_template=GEMMA3_CHAT_TEMPLATE, padding_side="left",
        named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    ),
    "idefics3": _TokenizerSpec(
        # SmolVLM's choice: `<|im_start|>` is BOS, `<end_of_utterance>` both ends a turn and is EOS.
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", *_IDEFICS3_IMAGE_TOKENS, "<global-img>",
                  *_IDEFICS3_GRID_TOKENS),
        bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>", end_of_turn="<end_of_utterance>",
        chat_template=IDEFICS3_CHAT_TEMPLATE, padding_side="left",
        # Idefics3Processor.__init__ REPLACES the tokenizer's extra_special_tokens with exactly these three
        # (on every load, too); listing the same three keeps a save/load round trip unchanged. The grid and
        # global-image tokens stay special tokens of the vocabulary all the same.
        extra=_IDEFICS3_IMAGE_TOKENS,
    ),
}  # fmt: skip


def _train_bpe(texts: Iterable[str], vocab_size: int, specials: Iterable[str]) -> Tokenizer:
    """A byte-level BPE trained on `texts`, with `specials` first in the vocabulary."""
    specials = list(specials)
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
    return tokenizer


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, architecture: Architecture = "llava"
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` with `architecture`'s special tokens and chat template."""
    spec = _spec(architecture)
    named_specials = {spec.bos, spec.eos, spec.pad}
    extra = spec.extra if spec.extra is not None else tuple(t for t in spec.specials if t not in named_specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(texts, vocab_size, spec.specials),
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        extra_special_tokens=list(extra),
        padding_side=spec.padding_side,
        chat_template=spec.chat_template,
        # `*_token` keywords become named attributes (`tokenizer.boi_token`, `.boi_token_id`), saved with it.
        **spec.named,
    )


def end_of_turn_token(architecture: Architecture) -> str:
    """The token that ends an assistant turn in `architecture`'s chat template."""
    return _spec(architecture).end_of_turn


def _spec(architecture: str) -> _TokenizerSpec:
    if architecture not in TOKENIZER_SPECS:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}")
    return TOKENIZER_SPECS[architecture]


def _check_tokenizer(tokenizer: PreTrainedTokenizerFast, architecture: str) -> None:
    """Refuse a tokenizer of another family: its missing placeholders would become wrong or None ids."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in _spec(architecture).specials if token not in vocab]
    if missing:
        raise ValueError(
            f"the tokenizer lacks {architecture}'s special tokens {missing[:4]}; "
            f"train it with train_tokenizer(..., architecture={architecture!r})"
        )


# --------------------------------------------------------------------------- processors


def _qwen_pixel_bounds(size: ModelSize) -> dict[str, int]:
    """Smallest and largest resized image area: one merged patch, and the area of an image_size square."""
    factor = size.patch_size * QWEN_MERGE_SIZE
    return {"shortest_edge": factor**2, "longest_edge": max(factor**2, size.image_size**2)}


def _patch_grid(size: ModelSize, architecture: str, divisor: int) -> int:
    """Patches per side of an `image_size` input; pixel shuffle / pooling need it divisible by `divisor`."""
    grid = size.image_size // size.patch_size
    if grid % divisor:
        raise ValueError(
            f"{architecture} needs image_size // patch_size ({grid}) divisible by {divisor}; "
            f"got image_size={size.image_size}, patch_size={size.patch_size}"
        )
    return grid


def internvl_image_seq_length(size: ModelSize) -> int:
    """Tokens per InternVL tile after pixel shuffle."""
    grid = _patch_grid(size, "internvl", int(1 / INTERNVL_DOWNSAMPLE_RATIO))
    return int(grid**2 * INTERNVL_DOWNSAMPLE_RATIO**2)


def gemma3_mm_tokens_per_image(size: ModelSize) -> int:
    """Tokens per Gemma 3 image: the patch grid average-pooled 2x2 (not at all if its side is odd)."""
    grid = _patch_grid(size, "gemma3", 1)
    side = grid // 2 if grid % 2 == 0 else grid
    return side**2


def idefics3_image_seq_len(size: ModelSize) -> int:
    """Tokens per Idefics3 crop after pixel shuffle."""
    grid = _patch_grid(size, "idefics3", IDEFICS3_SCALE_FACTOR)
    return grid**2 // IDEFICS3_SCALE_FACTOR**2


def build_processor(
    tokenizer: PreTrainedTokenizerFast, size: ModelSize, architecture: Architecture = "llava"
) -> ProcessorMixin:
    """The family's real processor, its image (and video) processor sized so small images stay a few tokens."""
    _check_tokenizer(tokenizer, architecture)
    template = _spec(architecture).chat_template
    if architecture == "llava":
        return LlavaProcessor(
            image_processor=CLIPImageProcessor(
                size={"shortest_edge": size.image_size},
                crop_size={"height": size.image_size, "width": size.image_size},
            ),
            tokenizer=tokenizer,
            patch_size=size.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token, which the "default" strategy drops again
            chat_template=template,
            image_token=LLAVA_IMAGE_TOKEN,
        )
    if architecture in ("qwen2_5_vl", "qwen3_vl"):
        qwen_sizes = dict(
            size=_qwen_pixel_bounds(size),
            patch_size=size.patch_size,
            merge_size=QWEN_MERGE_SIZE,
            temporal_patch_size=QWEN_TEMPORAL_PATCH_SIZE,
        )
        if architecture == "qwen2_5_vl":
            return Qwen2_5_VLProcessor(
                image_processor=Qwen2VLImageProcessor(**qwen_sizes),
                tokenizer=tokenizer,
                video_processor=Qwen2VLVideoProcessor(**qwen_sizes),
                chat_template=template,
            )
        # Qwen3-VL normalises to [-1, 1] (mean = std = 0.5), not with CLIP's statistics as Qwen2.5-VL does.
        half = [0.5, 0.5, 0.5]
        return Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessor(**qwen_sizes, image_mean=half, image_std=half),
            tokenizer=tokenizer,
            video_processor=Qwen3VLVideoProcessor(**qwen_sizes, image_mean=half, image_std=half),
            chat_template=template,
        )
    if architecture == "internvl":
        tile = {"height": size.image_size, "width": size.image_size}
        return InternVLProcessor(
            image_processor=GotOcr2ImageProcessor(
                size=tile, crop_to_patches=True, min_patches=1, max_patches=INTERNVL_MAX_TILES
            ),
            tokenizer=tokenizer,
            video_processor=InternVLVideoProcessor(size=tile),
            image_seq_length=internvl_image_seq_length(size),
            chat_template=template,
        )
    if architecture == "gemma3":
        return Gemma3Processor(
            image_processor=Gemma3ImageProcessor(
                size={"height": size.image_size, "width": size.image_size}, do_pan_and_scan=False
            ),
            tokenizer=tokenizer,
            image_seq_length=gemma3_mm_tokens_per_image(size),
            chat_template=template,
        )
    if architecture == "idefics3":
        return Idefics3Processor(
            image_processor=Idefics3ImageProcessor(
                do_image_splitting=True,
                # Longest side first resized to two crops' width, so an image splits into at most 2x2 crops.
                size={"longest_edge": 2 * size.image_size},
                max_image_size={"longest_edge": size.image_size},
            ),
            tokenizer=tokenizer,
            image_seq_len=idefics3_image_seq_len(size),
            chat_template=template,
        )
    raise ValueError(f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}")


# --------------------------------------------------------------------------- models


def _mrope_section(head_dim: int, architecture: str) -> list[int]:
    """Rotary frequencies per (time, height, width), summing to head_dim / 2, in the releases' proportions.

    Qwen2.5-VL splits its 64 frequencies 16/24/24 in contiguous blocks; Qwen3-VL 24/20/20, interleaved
    (t, h, w, t, h, w, …), which needs 3 * height <= head_dim / 2.
    """
    half = head_dim // 2
    if head_dim % 2 or half < 3:
        raise ValueError(f"{architecture} needs an even head_dim of at least 6, got {head_dim}")
    if architecture == "qwen2_5_vl":
        spatial = (half - half // 4) // 2
    else:
        spatial = max(1, half * 20 // 64)
    return [half - 2 * spatial, spatial, spatial]


def _text_common(size: ModelSize, tokenizer: PreTrainedTokenizerFast) -> dict:
    """Language-model fields every family shares: shape, vocabulary, special ids, tied embeddings."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=size.text_hidden_size,
        intermediate_size=size.text_intermediate_size,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads or size.text_heads,
        max_position_embeddings=size.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,  # halves the parameters of tiny models; both stay dense under masking
    )


def _vision_common(size: ModelSize) -> dict:
    """Vision-transformer fields of the CLIP, SigLIP, InternViT and Idefics3 towers."""
    return dict(
        hidden_size=size.vision_hidden_size,
        intermediate_size=size.vision_intermediate_size,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
    )


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _config(size: ModelSize, tokenizer: PreTrainedTokenizerFast, architecture: str):
    text = _text_common(size, tokenizer)
    head_dim = size.text_hidden_size // size.text_heads
    ids = tokenizer.convert_tokens_to_ids
    if architecture == "llava":
        return LlavaConfig(
            vision_config=CLIPVisionConfig(**_vision_common(size), projection_dim=size.vision_hidden_size),
            text_config=LlamaConfig(**text, **_special_ids(tokenizer)),
            image_token_index=ids(LLAVA_IMAGE_TOKEN),
            image_seq_length=size.image_seq_length,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,  # LLaVA reads the second-to-last vision layer
            tie_word_embeddings=True,
        )
    if architecture in ("qwen2_5_vl", "qwen3_vl"):
        rope = {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": _mrope_section(head_dim, architecture),
        }
        vision = dict(
            depth=size.vision_layers,
            hidden_size=size.vision_hidden_size,
            intermediate_size=size.vision_intermediate_size,
            num_heads=size.vision_heads,
            patch_size=size.patch_size,
            spatial_merge_size=QWEN_MERGE_SIZE,
            temporal_patch_size=QWEN_TEMPORAL_PATCH_SIZE,
            out_hidden_size=size.text_hidden_size,
        )
        token_ids = dict(
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
        )
        if architecture == "qwen2_5_vl":
            vision |= dict(
                # Windows of 2x2 merged patches, the last block attends globally (the release: 4x4, every 8th).
                window_size=2 * size.patch_size * QWEN_MERGE_SIZE,
                fullatt_block_indexes=[size.vision_layers - 1],
            )
            text |= dict(rope_parameters=rope, **_special_ids(tokenizer))
            return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True, **token_ids)
        vision |= dict(
            # A learned position grid of one image_size square, resampled to each image's grid.
            num_position_embeddings=(size.image_size // size.patch_size) ** 2,
            # Features from three depths are added to the first text layers (the release: 8, 16, 24 of 27).
            deepstack_visual_indexes=sorted({k * size.vision_layers // 4 for k in (1, 2, 3)}),
        )
        text |= dict(head_dim=head_dim, rope_parameters=rope | {"mrope_interleaved": True})
        return Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True, **token_ids)
    if architecture == "internvl":
        vision = InternVLVisionConfig(**_vision_common(size))
        return InternVLConfig(
            vision_config=vision,
            text_config=Qwen3Config(**text, **_special_ids(tokenizer), head_dim=head_dim),  # InternVL3.5: Qwen3
            image_token_id=tokenizer.context_image_token_id,
            image_seq_length=internvl_image_seq_length(size),
            downsample_ratio=INTERNVL_DOWNSAMPLE_RATIO,
            projector_hidden_act="gelu",
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=True,
        )
    if architecture == "gemma3":
        vision = SiglipVisionConfig(
            **_vision_common(size),
            vision_use_head=False,  # Gemma 3 reads the patch states, never SigLIP's pooled head
        )
        text = Gemma3TextConfig(
            **text,
            **_special_ids(tokenizer),
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            # The release alternates five sliding-window layers with one global one; keep the last layer
            # global so tiny models have both kinds.
            layer_types=[
                "full_attention" if (i + 1) % 6 == 0 or i == size.text_layers - 1 else "sliding_attention"
                for i in range(size.text_layers)
            ],
            sliding_window=max(16, size.max_positions // 8),
        )
        return Gemma3Config(
            vision_config=vision,
            text_config=text,
            mm_tokens_per_image=gemma3_mm_tokens_per_image(size),
            boi_token_index=tokenizer.boi_token_id,
            eoi_token_index=tokenizer.eoi_token_id,
            image_token_index=tokenizer.image_token_id,
            tie_word_embeddings=True,
        )
    if architecture == "idefics3":
        vision = Idefics3VisionConfig(**_vision_common(size))
        return Idefics3Config(
            vision_config=vision,
            text_config=LlamaConfig(**text, **_special_ids(tokenizer)),
            image_token_id=ids("<image>"),
            scale_factor=IDEFICS3_SCALE_FACTOR,
            tie_word_embeddings=True,
        )
    raise ValueError(f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}")


MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": LlavaForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "internvl": InternVLForConditionalGeneration,
    "gemma3": Gemma3ForConditionalGeneration,
    "idefics3": Idefics3ForConditionalGeneration,
}


def build_model(
    size: ModelSize, tokenizer: PreTrainedTokenizerFast, architecture: Architecture = "llava", seed: int = 0
) -> PreTrainedModel:
    """A freshly initialised `architecture` model of `size` whose vocabulary is exactly the tokenizer's."""
    _check_tokenizer(tokenizer, architecture)
    config = _config(size, tokenizer, architecture)
    torch.manual_seed(seed)
    model = MODEL_CLASSES[architecture](config)
    if architecture == "gemma3":
        # Gemma 3 initialises its projection matrix to zeros, which blocks every gradient into the vision
        # tower until it moves; a released checkpoint's is trained, so start it random as the others are.
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        torch.nn.init.normal_(projection, std=config.text_config.initializer_range)
    # Stop on the end of the assistant turn as well as on EOS, as the released generation configs do.
    stop = [tokenizer.convert_tokens_to_ids(end_of_turn_token(architecture)), tokenizer.eos_token_id]
    if architecture in ("qwen2_5_vl", "qwen3_vl", "internvl"):
        stop.append(tokenizer.pad_token_id)  # `<|endoftext|>`, the end of a document, also stops Qwen
    model.generation_config.eos_token_id = list(dict.fromkeys(stop))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
