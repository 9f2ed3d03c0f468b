"""The transformers engine, model ids and image checks, without Ray."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from masters.config import ServeConfig, validate_config
from serve.api import ChatMessage, ServeError
from serve.engine import ChatPrompt, Sampling, TransformersEngine, chat_prompt, filter_logits
from serve.images import load_image
from serve.levels import Catalog

RATIOS = [0.2, 0.15, 0.1, 0.05, 0.0]


@pytest.fixture(scope="module")
def engine(micro_model_dir):
    return TransformersEngine(micro_model_dir, RATIOS)


def image_prompt(engine, question="what colour is the square?", colour=(200, 10, 10)):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return engine.encode_chat(ChatPrompt(messages, [Image.new("RGB", (40, 40), colour)]))


def sampling(**overrides) -> Sampling:
    fields = dict(n=1, max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.05)
    return Sampling(**(fields | overrides))


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# --------------------------------------------------------------------------- sampling


def test_filter_logits_matches_hf_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    no_penalty = torch.zeros_like(logits, dtype=torch.bool)
    ours = filter_logits(
        logits, no_penalty, torch.tensor([1.0, 0.7, 1.3]), torch.tensor([0.9, 0.5, 1.0]),
        torch.tensor([10, 0, 5]), torch.ones(3),
    )  # fmt: skip
    for row, (temperature, top_p, top_k) in enumerate([(1.0, 0.9, 10), (0.7, 0.5, 0), (1.3, 1.0, 5)]):
        scores = logits[row : row + 1] / temperature
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        scores = TopPLogitsWarper(top_p)(None, scores)
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(scores[0])), f"row {row} keeps other tokens"
        kept = ~torch.isinf(scores[0])
        torch.testing.assert_close(ours[row][kept], scores[0].log_softmax(-1)[kept])


def test_repetition_penalty_lowers_seen_tokens_like_hf():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = filter_logits(logits, seen, torch.ones(1), torch.ones(1), torch.zeros(1, dtype=torch.long), torch.tensor([2.0]))
    expected = torch.tensor([[1.0, -2.0, 0.5, 3.0]]).log_softmax(-1)
    torch.testing.assert_close(out, expected)


def test_greedy_generation_equals_transformers_generate(engine):
    prompt = image_prompt(engine)
    ours = engine.generate([(prompt, sampling(temperature=0.0, repetition_penalty=1.0, max_tokens=8))])[0][0]
    reference = engine.model.generate(
        input_ids=torch.tensor([prompt.token_ids]), **prompt.engine_input.image_inputs, max_new_tokens=8, do_sample=False
    )
    assert ours.token_ids == reference[0, len(prompt.token_ids) :].tolist()


def test_seeded_request_is_the_same_alone_and_in_any_batch(engine):
    prompt = image_prompt(engine)
    seeded = sampling(n=3, seed=1234)
    alone = engine.generate([(prompt, seeded)])[0]
    other = engine.encode_chat(ChatPrompt([{"role": "user", "content": "a much longer text question " * 3}], []))
    batched = engine.generate([(other, sampling(n=2, max_tokens=16)), (prompt, seeded), (prompt, sampling(n=1))])[1]
    assert [c.token_ids for c in alone] == [c.token_ids for c in batched]
    assert len({tuple(c.token_ids) for c in alone}) > 1, "samples of one request must differ"
    reseeded = engine.generate([(prompt, sampling(n=3, seed=4321))])[0]
    assert [c.token_ids for c in reseeded] != [c.token_ids for c in alone]
    fewer = engine.generate([(prompt, sampling(n=2, seed=1234))])[0]
    assert [c.token_ids for c in fewer] == [c.token_ids for c in alone[:2]], "sample j must not depend on n"


def test_sampling_never_emits_special_tokens_but_eos(engine):
    # A flat temperature makes every token likely, special ones included, unless they are excluded.
    completions = engine.generate([(image_prompt(engine), sampling(n=16, max_tokens=16, temperature=5.0, top_p=1.0, top_k=0, seed=7))])[0]
    special = set(engine.tokenizer.all_special_ids) - set(engine.family.stop_token_ids)
    emitted = {token for completion in completions for token in completion.token_ids}
    assert len(emitted) > 20, "a flat distribution should reach many tokens"
    assert not emitted & special


def test_generation_stops_at_max_tokens_and_reports_finish_reason(engine):
    completions = engine.generate([(image_prompt(engine), sampling(n=4, max_tokens=3))])[0]
    for completion in completions:
        assert 1 <= len(completion.token_ids) <= 3
        stopped = completion.token_ids[-1] in engine.family.stop_token_ids
        assert completion.finish_reason == ("stop" if stopped else "length")
        assert stopped or len(completion.token_ids) == 3


# --------------------------------------------------------------------------- scoring and levels


def direct_logprobs(engine, prompt, response):
    ids = torch.tensor([prompt.token_ids + response])
    with torch.inference_mode():
        logits = engine.model(input_ids=ids, **prompt.engine_input.image_inputs).logits
    return logits.float().log_softmax(-1)[0, len(prompt.token_ids) - 1 : -1]


def test_score_equals_a_direct_forward_and_is_batch_independent(engine):
    prompt, short = image_prompt(engine), image_prompt(engine, "how many?")
    response = [40, 41, 42, 43, 44]
    scores = engine.score([(short, [7, 8], 3), (prompt, response, 10)])[1]
    reference = direct_logprobs(engine, prompt, response)
    torch.testing.assert_close(torch.from_numpy(scores.logprobs), reference.gather(-1, torch.tensor(response)[:, None])[:, 0])
    top = reference.topk(10)
    assert scores.token_ids.tolist() == response and scores.top_ids.tolist() == top.indices.tolist()
    torch.testing.assert_close(torch.from_numpy(scores.top_logprobs), top.values, atol=1e-5, rtol=0)
    expected_tail = 1 - top.values.double().exp().sum(-1)
    torch.testing.assert_close(torch.from_numpy(scores.tail_mass).double(), expected_tail, atol=1e-6, rtol=0)


def test_scores_recorded_while_sampling_equal_a_separate_score_pass(engine):
    """`score_top_logprobs` records, per sampled token, the unprocessed distribution's top-k (not the filtered
    one the token was drawn from): equal to scoring the finished response in one forward, at a mask level,
    in a batch whose rows stop at different lengths."""
    engine.set_mask_ratio(0.1)
    try:
        prompts = [image_prompt(engine), image_prompt(engine, "how many?", colour=(10, 200, 10))]
        requests = [
            (p, sampling(n=2, max_tokens=6 - 3 * i, temperature=1.3, top_k=5, score_top_logprobs=8, seed=i)) for i, p in enumerate(prompts)
        ]  # rows of 6 and 3 tokens: a row stops recording when it finishes
        requests.append((prompts[0], sampling(max_tokens=3, seed=9)))  # no scores asked: none recorded
        completions = engine.generate(requests)
        assert completions[2][0].scores is None
        recorded = [(prompt, c) for (prompt, _), group in zip(requests[:2], completions[:2]) for c in group]
        assert {len(c.token_ids) for _, c in recorded} == {6, 3}
        scored = engine.score([(prompt, c.token_ids, 8) for prompt, c in recorded])
        for (_, completion), reference in zip(recorded, scored):
            scores = completion.scores
            assert scores.token_ids.tolist() == completion.token_ids and scores.top_ids.tolist() == reference.top_ids.tolist()
            for name in ("logprobs", "top_logprobs", "tail_mass"):
                np.testing.assert_allclose(getattr(scores, name), getattr(reference, name), atol=1e-5, rtol=0, err_msg=name)
    finally:
        engine.set_mask_ratio(0.0)


def test_the_engine_counts_the_token_positions_it_computes(engine):
    before = dict(engine.positions)
    prompt = image_prompt(engine)
    completions = engine.generate([(prompt, sampling(n=2, max_tokens=4, seed=3))])[0]
    generated = dict(engine.positions)
    assert generated["prefill"] - before["prefill"] == 2 * len(prompt.token_ids)  # each sample's row prefills
    # The first token comes from the prefill; every later one costs each row of the batch one position.
    assert generated["decode"] - before["decode"] == 2 * (max(len(c.token_ids) for c in completions) - 1)
    engine.score([(prompt, [40, 41, 42], 4)])
    assert engine.positions["score"] - generated["score"] == len(prompt.token_ids) + 3
    assert engine.health()["score_positions"] == engine.positions["score"]


def test_mask_levels_switch_in_place_and_level_zero_is_bit_exact(engine):
    dense = {name: tensor.clone() for name, tensor in engine.model.state_dict().items()}
    prompt, response = image_prompt(engine), [40, 41, 42]
    before = engine.score([(prompt, response, 5)])[0]
    assert engine.set_mask_ratio(0.2) > 0
    masked = engine.score([(prompt, response, 5)])[0]
    assert not np.array_equal(masked.logprobs, before.logprobs)
    engine.set_mask_ratio(0.0)
    assert all(torch.equal(dense[name], tensor) for name, tensor in engine.model.state_dict().items())
    assert engine.score([(prompt, response, 5)])[0] == before
    assert engine.health()["level_switches"] >= 2


def test_student_engine_serves_dense_only(micro_model_dir):
    student = TransformersEngine(micro_model_dir, [0.0])
    with pytest.raises(ValueError, match="dense only"):
        student.set_mask_ratio(0.2)


# --------------------------------------------------------------------------- model ids and images


def test_catalog_resolves_every_level_and_lists_ids_on_a_miss():
    catalog = Catalog.from_config(validate_config({}))
    assert "teacher-l@0.15" in catalog.model_ids and "teacher-m@0" in catalog.model_ids
    assert "student" in catalog.model_ids
    assert catalog.resolve("teacher-l@0.150").mask_ratio == 0.15
    assert catalog.resolve("teacher-l@0.0").model_id == "teacher-l@0"
    for bad in ("teacher-l@0.3", "teacher-l", "student@0", "teacher-x@0.1", "teacher-l@abc"):
        with pytest.raises(ServeError) as error:
            catalog.resolve(bad)
        assert error.value.status == 404 and "teacher-l@0.15" in error.value.message


def test_images_are_checked_before_decoding(tmp_path):
    config = ServeConfig(max_image_bytes=20_000, max_image_pixels=64 * 64)
    assert load_image(png_data_url(Image.new("RGB", (40, 30))), config).size == (40, 30)
    cases = {
        "image_too_large": png_data_url(Image.new("RGB", (300, 300))),  # a small PNG with too many pixels
        "invalid_image": "data:image/png;base64," + base64.b64encode(b"not an image at all").decode(),
        "local_images_disabled": str(tmp_path / "x.png"),
    }
    for code, url in cases.items():
        with pytest.raises(ServeError) as error:
            load_image(url, config)
        assert error.value.code == code and error.value.status == 400
    with pytest.raises(ServeError, match="max_image_bytes"):
        load_image("data:image/png;base64," + "A" * 40_000, config)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    allowed = config.model_copy(update={"allow_local_images": True})
    assert load_image(str(tmp_path / "x.png"), allowed).size == (8, 8)


def test_chat_prompt_keeps_image_order():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    message = ChatMessage.model_validate(
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(red)}},
                {"type": "text", "text": "and"},
                {"type": "image_url", "image_url": {"url": png_data_url(blue)}},
            ],
        }
    )
    prompt = chat_prompt([message], ServeConfig())
    assert [part["type"] for part in prompt.messages[0]["content"]] == ["image", "text", "image"]
    assert [image.getpixel((0, 0)) for image in prompt.images] == [(255, 0, 0), (0, 0, 255)]


# --------------------------------------------------------------------------- vLLM (GPU only)


def _vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.vllm
@pytest.mark.skipif(not _vllm_available(), reason="needs vLLM and a CUDA device")
def test_vllm_engine_scores_like_transformers_and_switches_levels(micro_model_dir):
    from serve.vllm_engine import VLLMEngine

    reference = TransformersEngine(micro_model_dir, RATIOS, device="cuda", dtype="float32")
    engine = VLLMEngine(micro_model_dir, RATIOS, "all_linear", "float32", tensor_parallel_size=1, max_top_k=64)
    prompt = image_prompt(engine)
    completions = engine.generate([(prompt, sampling(n=4, seed=3))])[0]
    assert len(completions) == 4
    assert [c.token_ids for c in engine.generate([(prompt, sampling(n=4, seed=3))])[0]] == [c.token_ids for c in completions]
    response = [40, 41, 42]
    expected = reference.score([(image_prompt(reference), response, 5)])[0]
    dense = engine.score([(prompt, response, 5)])[0]
    torch.testing.assert_close(torch.from_numpy(dense.logprobs), torch.from_numpy(expected.logprobs), atol=1e-3, rtol=0)
    engine.set_mask_ratio(0.2)
    assert not np.array_equal(engine.score([(prompt, response, 5)])[0].logprobs, dense.logprobs)
    engine.set_mask_ratio(0.0)
    assert engine.score([(prompt, response, 5)])[0] == dense
