"""The model family: build, save/load through the Auto classes, prompting, and the SFT loop that trains it."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from masters.data import make_split
from masters.families import VLMFamily
from masters.models import build_prompt, check_shared_tokenizer, generate_answers, load_model, parameter_count, save_model
from masters.sft import IGNORE_INDEX, collate, encode_examples, train_sft
from masters.tiny_vlms import LLAVA_EOS_TOKEN, LLAVA_IMAGE_TOKEN, MICRO, ModelSize, build_model, train_tokenizer


@pytest.fixture(scope="module")
def micro_processor(micro_model_dir):
    return AutoProcessor.from_pretrained(micro_model_dir)


@pytest.fixture(scope="module")
def train_samples():
    return make_split("train", 16, seed=0)


def test_micro_is_small():
    tokenizer = train_tokenizer(["is there a red circle? yes", "how many squares are there? 3"], vocab_size=300)
    assert parameter_count(build_model(MICRO, tokenizer)) <= 2_000_000


def test_save_load_round_trip_through_auto_classes(micro_processor, train_samples, tmp_path):
    model = build_model(MICRO, micro_processor.tokenizer, seed=1).eval()
    save_model(model, micro_processor, tmp_path / "model", metadata={"note": "round trip"})
    assert (tmp_path / "model" / "masters.json").is_file()

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "model").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "model")
    assert isinstance(loaded, LlavaForConditionalGeneration)
    assert processor.tokenizer.get_vocab() == micro_processor.tokenizer.get_vocab()

    # The saved processor's chat template builds the prompt, and the processor expands the image token.
    prompt = build_prompt(processor, "is there a red circle?")
    assert prompt == f"<|user|>\n{LLAVA_IMAGE_TOKEN}is there a red circle?{LLAVA_EOS_TOKEN}\n<|assistant|>\n"
    inputs = processor(images=[train_samples[0].image], text=[prompt], return_tensors="pt")
    image_token_id = processor.tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN)
    assert (inputs["input_ids"] == image_token_id).sum().item() == MICRO.image_seq_length
    assert inputs["pixel_values"].shape[-2:] == (MICRO.image_size, MICRO.image_size)

    with torch.no_grad():
        expected = model(**inputs).logits
        actual = loaded(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_load_model_rejects_a_non_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_zoo.py"):
        load_model(tmp_path)


def test_generate_answers_batches_left_padded_prompts(micro_model_dir, train_samples):
    model, processor = load_model(micro_model_dir)
    family = VLMFamily(model, processor)
    samples = train_samples[:4]
    answers = generate_answers(model, family, [s.image for s in samples], [s.question for s in samples], max_new_tokens=4)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    # Greedy decoding of one sample alone gives the same answer as inside the padded batch.
    alone = generate_answers(model, family, [samples[1].image], [samples[1].question], max_new_tokens=4)
    assert alone[0] == answers[1]


def test_shared_tokenizer_check(micro_processor):
    other = train_tokenizer(["a completely different corpus of words"], vocab_size=300)
    check_shared_tokenizer({"teacher": micro_processor, "student": micro_processor})
    with pytest.raises(ValueError, match="share one tokenizer"):
        check_shared_tokenizer({"teacher": micro_processor, "student": SimpleNamespace(tokenizer=other)})


def test_shared_tokenizer_check_compares_chat_templates(micro_model_dir):
    """Same vocabulary, another template: the stage prompts would mean different things to the models."""
    student = AutoProcessor.from_pretrained(micro_model_dir)
    teacher = AutoProcessor.from_pretrained(micro_model_dir)
    teacher.chat_template = teacher.chat_template.replace("<|assistant|>", "<|system|>")
    with pytest.raises(ValueError, match="share one chat template; the template of teacher differs from student"):
        check_shared_tokenizer({"student": student, "teacher": teacher})


def test_model_size_rejects_shapes_that_do_not_divide():
    with pytest.raises(ValueError, match="patch_size"):
        ModelSize(**{**MICRO.model_dump(), "image_size": 30})
    with pytest.raises(ValueError, match="text_heads"):
        ModelSize(**{**MICRO.model_dump(), "text_heads": 3})


def test_collate_puts_labels_on_the_answer_and_eos_only(micro_processor, train_samples):
    samples = train_samples[:3]
    examples = encode_examples(
        micro_processor, [s.image for s in samples], [s.question for s in samples], [s.answer for s in samples]
    )
    tokenizer = micro_processor.tokenizer
    family = VLMFamily(build_model(MICRO, tokenizer), micro_processor)
    batch = collate(examples, [0, 1, 2], family)
    prompt_length = max(len(p.token_ids) for p in examples.prompts)
    for row, sample in enumerate(samples):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert labelled[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(labelled[:-1]) == sample.answer
        # The prompt part of the sequence is exactly what the processor builds for generation (left padded).
        prompt_ids = examples.prompts[row].token_ids
        assert batch["input_ids"][row][prompt_length - len(prompt_ids) : prompt_length].tolist() == prompt_ids
    assert batch["pixel_values"].shape == (3, 3, MICRO.image_size, MICRO.image_size)


def test_sft_lowers_the_loss(micro_processor, train_samples):
    examples = encode_examples(
        micro_processor,
        [s.image for s in train_samples],
        [s.question for s in train_samples],
        [s.answer for s in train_samples],
    )
    model = build_model(MICRO, micro_processor.tokenizer, seed=0)
    result = train_sft(
        model, examples, VLMFamily(model, micro_processor), steps=30, batch_size=8, lr=3e-3,
        warmup_steps=3, progress=False,
    )
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.5 * first, result.losses
    assert not model.training
