"""Tiny VLMs of every family: real processors, chat templates, save/load through the Auto classes, generation."""

import random

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessor, LogitsProcessorList

from masters.tiny_vlms import (
    ARCHITECTURES,
    MICRO,
    build_model,
    build_processor,
    end_of_turn_token,
    train_tokenizer,
)

QUESTION = "what shape?"

# The placeholder each family's chat template writes for an image, before the processor expands it.
IMAGE_PLACEHOLDERS = {
    "llava": "<image>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "internvl": "<IMG_CONTEXT>\n",
    "gemma3": "<start_of_image>",
    "idefics3": "<image>",
}
# The generation prompt each template ends with.
ASSISTANT_PROMPTS = {
    "llava": "<|assistant|>\n",
    "qwen2_5_vl": "<|im_start|>assistant\n",
    "qwen3_vl": "<|im_start|>assistant\n",
    "internvl": "<|im_start|>assistant\n",
    "gemma3": "<start_of_turn>model\n",
    "idefics3": "Assistant:",
}


def _corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Short question/answer strings like the suite's, so the BPE learns a few real merges."""
    rng = random.Random(seed)
    shapes = ["circle", "square", "triangle", "star", "ring"]
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    lines = []
    for _ in range(n):
        shape, color = rng.choice(shapes), rng.choice(colors)
        lines += [
            rng.choice(
                [f"what color is the {shape}?", f"is there a {color} {shape}?", "how many shapes are there?", QUESTION]
            ),
            rng.choice([color, shape, "yes", "no", str(rng.randint(0, 9)), f"a {color} {shape}"]),
        ]
    return lines


def _image(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 4, width // 2, height // 2), fill="red")
    draw.rectangle((width // 2, height // 2, width - 4, height - 4), fill="blue")
    return image


WIDE = _image(64, 48)
SQUARE = _image(40, 40)


def _messages(question: str = QUESTION, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _prompt(processor) -> str:
    return processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def family(request, corpus):
    """(architecture, tokenizer, processor, model) built once per architecture."""
    architecture = request.param
    tokenizer = train_tokenizer(corpus, vocab_size=384, architecture=architecture)
    processor = build_processor(tokenizer, MICRO, architecture=architecture)
    model = build_model(MICRO, tokenizer, architecture=architecture, seed=0).eval()
    return architecture, tokenizer, processor, model


def test_architectures_are_the_literal():
    assert ARCHITECTURES == ("llava", "qwen2_5_vl", "qwen3_vl", "internvl", "gemma3", "idefics3")


def test_tokenizer_has_the_family_tokens_as_single_special_ids(family):
    architecture, tokenizer, processor, model = family
    assert model.config.get_text_config().vocab_size == len(tokenizer)
    # Qwen pads on the right as released; the rest on the left.
    assert tokenizer.padding_side == ("right" if architecture.startswith("qwen") else "left")
    end = end_of_turn_token(architecture)
    assert tokenizer.tokenize(end) == [end]
    ids = tokenizer(f"yes{end}", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "yes"
    if architecture == "internvl":
        assert (tokenizer.start_image_token, tokenizer.end_image_token) == ("<img>", "</img>")
        assert (tokenizer.context_image_token, tokenizer.video_token) == ("<IMG_CONTEXT>", "<video>")
        assert tokenizer.context_image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if architecture == "gemma3":
        assert (tokenizer.boi_token, tokenizer.eoi_token, tokenizer.image_token) == (
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        )
        assert tokenizer.bos_token == "<bos>" and tokenizer.eos_token == "<eos>"
    if architecture == "idefics3":
        for token in ("<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_6_col_6>"):
            assert tokenizer.tokenize(token) == [token]


def test_chat_template_renders_the_image_placeholder_and_turns(family):
    architecture, tokenizer, processor, model = family
    prompt = _prompt(processor)
    assert IMAGE_PLACEHOLDERS[architecture] in prompt
    assert prompt.endswith(ASSISTANT_PROMPTS[architecture])
    assert QUESTION in prompt
    # Gemma 3 and Idefics3 (SmolVLM) templates write BOS themselves, once; our BPE never adds one.
    if architecture in ("gemma3", "idefics3"):
        assert prompt.startswith(tokenizer.bos_token)
        ids = processor(images=[WIDE], text=[prompt]).input_ids[0]
        assert ids.count(tokenizer.bos_token_id) == 1
    # The tokenizer carries the same template, so text-only callers render identically.
    assert tokenizer.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False) == prompt


def test_assistant_turn_ends_with_the_end_of_turn_token(family):
    architecture, tokenizer, processor, model = family
    rendered = processor.apply_chat_template(_messages(answer="a red circle"), tokenize=False)
    assert f"a red circle{end_of_turn_token(architecture)}" in rendered


def test_forward_and_generate(family):
    architecture, tokenizer, processor, model = family
    inputs = processor(images=[WIDE], text=[_prompt(processor)], return_tensors="pt")
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**inputs).logits
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert logits.shape == (1, length, len(tokenizer))
    assert torch.isfinite(logits).all()
    assert length < output.shape[1] <= length + 4
    assert torch.equal(output[:, :length], inputs["input_ids"])


# What each processor returns for one image. Batching code must pass all of it on: without
# `mm_token_type_ids` Qwen2.5-VL silently falls back to 1-D positions (Qwen3-VL raises), and without
# `token_type_ids` Gemma 3's image tokens silently attend causally instead of bidirectionally.
INPUT_KEYS = {
    "llava": {"input_ids", "attention_mask", "pixel_values"},
    "qwen2_5_vl": {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"},
    "qwen3_vl": {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"},
    "internvl": {"input_ids", "attention_mask", "pixel_values"},
    "gemma3": {"input_ids", "attention_mask", "token_type_ids", "pixel_values"},
    "idefics3": {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"},
}


def test_image_inputs_have_the_family_layout(family):
    architecture, tokenizer, processor, model = family
    inputs = processor(images=[WIDE], text=[_prompt(processor)], return_tensors="pt")
    assert set(inputs.keys()) == INPUT_KEYS[architecture]
    pixels = inputs["pixel_values"]
    image_token_id = model.config.image_token_id if hasattr(model.config, "image_token_id") else None
    if architecture.startswith("qwen"):
        # Flattened patches: one row per 8x8 patch of both frames of the temporal pair, and the (t, h, w) grid.
        assert pixels.dim() == 2 and pixels.shape[1] == 3 * 2 * MICRO.patch_size**2
        grid = inputs["image_grid_thw"]
        assert grid.shape == (1, 3) and int(grid.prod()) == pixels.shape[0]
        assert (inputs["input_ids"] == image_token_id).sum() == grid.prod() // 4
        assert "mm_token_type_ids" in inputs
    elif architecture == "internvl":
        # A 64x48 image is cut into a 2x2 grid of 32 px tiles plus a thumbnail.
        assert pixels.shape == (5, 3, MICRO.image_size, MICRO.image_size)
        assert (inputs["input_ids"] == image_token_id).sum() == 5 * processor.image_seq_length
        assert processor.image_seq_length == model.config.image_seq_length
    elif architecture == "gemma3":
        assert pixels.shape == (1, 3, MICRO.image_size, MICRO.image_size)
        assert (inputs["input_ids"] == model.config.image_token_index).sum() == model.config.mm_tokens_per_image
        assert processor.image_seq_length == model.config.mm_tokens_per_image
        assert inputs["token_type_ids"].sum() == model.config.mm_tokens_per_image
    elif architecture == "idefics3":
        # Four crops and the global image, each pixel-shuffled to image_seq_len tokens.
        assert pixels.shape == (1, 5, 3, MICRO.image_size, MICRO.image_size)
        assert (inputs["input_ids"] == image_token_id).sum() == 5 * processor.image_seq_len
        assert "<row_2_col_2>" in processor.tokenizer.decode(inputs["input_ids"][0])
    else:
        assert pixels.shape == (1, 3, MICRO.image_size, MICRO.image_size)
        assert (inputs["input_ids"] == image_token_id).sum() == MICRO.image_seq_length


def test_padded_batch_of_different_images(family):
    architecture, tokenizer, processor, model = family
    longer = processor.apply_chat_template(
        _messages("is there a red circle?"), add_generation_prompt=True, tokenize=False
    )
    prompts = [_prompt(processor), longer]
    # One list of images per prompt: Gemma3Processor reads a flat list as all images of ONE prompt.
    inputs = processor(images=[[WIDE], [SQUARE]], text=prompts, return_tensors="pt", padding=True)
    mask = inputs["attention_mask"]
    assert (mask == 0).any(), "the two prompts should differ in length"
    # Qwen pads on the right, as its released tokenizers do; every other family on the left.
    if architecture.startswith("qwen"):
        assert mask[:, 0].all() and not mask[:, -1].all()
    else:
        assert mask[:, -1].all() and not mask[:, 0].all()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(tokenizer))


class _Force(LogitsProcessor):
    """Makes `token_id` the only possible next token."""

    def __init__(self, token_id: int):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_id] = 0.0
        return forced


def test_generation_stops_on_the_end_of_turn_token(family):
    architecture, tokenizer, processor, model = family
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(architecture))
    eos = model.generation_config.eos_token_id
    assert isinstance(eos, list) and end_id in eos and tokenizer.eos_token_id in eos
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    inputs = processor(images=[SQUARE], text=[_prompt(processor)], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, logits_processor=LogitsProcessorList([_Force(end_id)])
        )
    assert output.shape[1] == inputs["input_ids"].shape[1] + 1 and output[0, -1] == end_id


def test_save_and_load_through_the_auto_classes(family, tmp_path):
    architecture, tokenizer, processor, model = family
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)

    assert type(loaded) is type(model)
    assert type(loaded_processor) is type(processor)
    assert type(loaded_processor.image_processor) is type(processor.image_processor)
    if hasattr(processor, "video_processor"):
        assert type(loaded_processor.video_processor) is type(processor.video_processor)
    assert loaded_processor.chat_template == processor.chat_template
    assert loaded_processor.tokenizer.chat_template == tokenizer.chat_template

    loaded_tokenizer = loaded_processor.tokenizer
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded_tokenizer.padding_side == tokenizer.padding_side
    assert loaded_tokenizer.special_tokens_map == tokenizer.special_tokens_map
    assert loaded_tokenizer.extra_special_tokens == tokenizer.extra_special_tokens
    assert sorted(loaded_tokenizer.all_special_tokens) == sorted(tokenizer.all_special_tokens)
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id

    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name

    # The reloaded processor builds the same inputs and the reloaded model scores them identically.
    prompt = _prompt(loaded_processor)
    assert prompt == _prompt(processor)
    inputs = loaded_processor(images=[WIDE], text=[prompt], return_tensors="pt")
    reference = processor(images=[WIDE], text=[prompt], return_tensors="pt")
    assert inputs.keys() == reference.keys()
    for key in inputs:
        assert torch.equal(inputs[key], reference[key]), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_seed_fixes_the_weights(corpus):
    tokenizer = train_tokenizer(corpus, vocab_size=384, architecture="qwen2_5_vl")
    first, second = (build_model(MICRO, tokenizer, "qwen2_5_vl", seed=3) for _ in range(2))
    other = build_model(MICRO, tokenizer, "qwen2_5_vl", seed=4)
    weights = [dict(m.named_parameters()) for m in (first, second, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_unknown_architecture_is_refused(corpus):
    with pytest.raises(ValueError, match="unknown architecture"):
        train_tokenizer(corpus, architecture="blip")  # type: ignore[arg-type]


def test_a_tokenizer_of_another_family_is_refused(corpus):
    tokenizer = train_tokenizer(corpus, vocab_size=384, architecture="llava")
    with pytest.raises(ValueError, match="architecture='gemma3'"):
        build_model(MICRO, tokenizer, architecture="gemma3")
    with pytest.raises(ValueError, match="lacks qwen3_vl's special tokens"):
        build_processor(tokenizer, MICRO, architecture="qwen3_vl")
