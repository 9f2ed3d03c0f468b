"""Every supported family through every code path: masking, the engine, collate + loss, evaluation.

Each case runs on a tiny random-weight model built from the family's config classes with its real
processor class (tests/family_models.py), saved and loaded as an ordinary Hugging Face directory.
"""

from __future__ import annotations

import pytest
import torch

from masters.config import LossConfig, RewardConfig
from masters.batching import collate_records
from masters.data import make_split
from masters.eval import evaluate
from masters.families import UnsupportedModelError, VLMFamily, masked_parameter_names, part_weights
from masters.mask_export import export_masked_checkpoints
from masters.masking import TeacherMasker
from masters.models import load_model
from masters.records import Response
from masters.student_loss import response_logits, student_loss
from masters.tiny_vlms import ARCHITECTURES
from serve.engine import ChatPrompt, Sampling, TransformersEngine
from family_models import TinyVLM, build_tiny_vlm, own_forward_logprobs, shapes_image, stage_record, user_turn

# Families whose processor cuts a non-square image into several tiles or patches.
MULTI_PIECE = {"qwen2_5_vl", "qwen3_vl", "internvl", "idefics3"}
QUESTIONS = ("what colour is the square?", "is there a blue circle left of the red square in this picture?")
IMAGES = ((64, 48), (40, 56))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny(request, tmp_path_factory) -> TinyVLM:
    return build_tiny_vlm(request.param, tmp_path_factory.mktemp(request.param) / "model")


@pytest.fixture(scope="module")
def engine(tiny) -> TransformersEngine:
    return TransformersEngine(tiny.model_dir, [0.1, 0.0])


def sampling(**overrides) -> Sampling:
    fields = dict(n=3, max_tokens=6, temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.05, seed=7)
    return Sampling(**(fields | overrides))


def encoded(engine, index: int):
    return engine.encode_chat(ChatPrompt(user_turn(QUESTIONS[index]), [shapes_image(*IMAGES[index])]))


# --------------------------------------------------------------------------- masking


def test_all_linear_masks_vision_tower_projector_and_language_model(tiny):
    model = tiny.model
    weights = part_weights(model)
    assert all(weights[part] for part in ("vision_tower", "projector", "language_model")), {k: len(v) for k, v in weights.items()}
    masked = set(masked_parameter_names(model, "all_linear"))
    language = set(masked_parameter_names(model, "language_model"))
    vision_and_projector = set(masked_parameter_names(model, "vision_and_projector"))
    assert language | vision_and_projector == masked and not language & vision_and_projector
    parameters = dict(model.named_parameters())
    # Every 2-D projector parameter is masked, raw ones (Gemma 3's mm_input_projection_weight) included.
    projector_ids = {id(w) for w in weights["projector"]}
    assert {name for name in masked if id(parameters[name]) in projector_ids} and all(
        any(id(p) == i for p in parameters.values()) for i in projector_ids
    )
    assert not any("embed" in name or "norm" in name or "lm_head" in name for name in masked)


def test_levels_are_nested_and_ratio_zero_restores_every_bit(tiny):
    model = tiny.model
    dense = {name: p.detach().clone() for name, p in model.named_parameters()}
    masker = TeacherMasker(model, [0.2, 0.1])
    names = masker.parameter_names
    zeroed = {}
    for ratio in (0.1, 0.2):
        masker.set_mask_ratio(ratio)
        zeroed[ratio] = {name: dict(model.named_parameters())[name].detach() == 0 for name in names}
        total = sum(int(z.sum()) for z in zeroed[ratio].values())
        numel = sum(z.numel() for z in zeroed[ratio].values())
        assert abs(total / numel - ratio) < 0.02
    assert all(torch.all(zeroed[0.2][name] | ~zeroed[0.1][name]) for name in names)  # zeroed at 0.1 ⇒ at 0.2
    masker.set_mask_ratio(0.0)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), dense[name]), name


def test_masked_checkpoint_export_equals_the_live_masker(tiny, tmp_path):
    export_masked_checkpoints(tiny.model_dir, {0.1: tmp_path / "0.1"})
    exported, _ = load_model(tmp_path / "0.1")
    live, _ = load_model(tiny.model_dir)
    TeacherMasker(live, [0.1]).set_mask_ratio(0.1)
    exported_parameters = dict(exported.named_parameters())
    for name, param in live.named_parameters():
        assert torch.equal(param, exported_parameters[name]), name


# --------------------------------------------------------------------------- engine


def test_prompts_carry_their_image_inputs_and_one_bos(tiny, engine):
    prompt = encoded(engine, 0)
    pieces = prompt.engine_input.image_inputs["pixel_values"]
    if tiny.architecture in ("internvl", "qwen2_5_vl", "qwen3_vl"):
        assert pieces.shape[0] > 2, f"a 64x48 image should split into several tiles/patches, got {tuple(pieces.shape)}"
    bos = tiny.processor.tokenizer.bos_token_id
    assert prompt.token_ids[:2] != [bos, bos]


def test_generate_samples_n_completions_that_stop_or_run_to_max_tokens(tiny, engine):
    prompts = [encoded(engine, 0), encoded(engine, 1)]
    results = engine.generate([(prompts[0], sampling()), (prompts[1], sampling(n=2))])
    assert [len(r) for r in results] == [3, 2]
    stops = set(tiny.family.stop_token_ids)
    forbidden = set(engine.unsampleable_ids.tolist())
    assert not stops & forbidden  # every stop token (Gemma's <end_of_turn> too) can be sampled
    for completion in results[0] + results[1]:
        assert 1 <= len(completion.token_ids) <= 6 and not set(completion.token_ids) & forbidden
        assert (completion.finish_reason == "stop") == (completion.token_ids[-1] in stops)
    again = engine.generate([(prompts[0], sampling())])[0]
    assert [c.token_ids for c in again] == [c.token_ids for c in results[0]]  # seeded: same draws in any batch


def test_score_equals_the_models_own_forward_on_the_processors_inputs(tiny, engine):
    prompts = [encoded(engine, 0), encoded(engine, 1)]
    responses = [[c.token_ids for c in r][0] for r in engine.generate([(p, sampling(n=1, max_tokens=5)) for p in prompts])]
    responses[1] = responses[1] + responses[0]  # different lengths: padding on both sides of the batch
    top_k = 8
    scores = engine.score([(prompt, response, top_k) for prompt, response in zip(prompts, responses)])
    for index, (score, response) in enumerate(zip(scores, responses)):
        reference = own_forward_logprobs(tiny, QUESTIONS[index], shapes_image(*IMAGES[index]), response)
        expected = reference.topk(top_k, dim=-1)
        assert score.token_ids.tolist() == response
        torch.testing.assert_close(torch.from_numpy(score.top_logprobs), expected.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            torch.from_numpy(score.logprobs), reference[torch.arange(len(response)), torch.tensor(response)], atol=1e-5, rtol=0
        )


def test_generation_stops_on_every_generation_config_eos_id(tiny, tmp_path):
    """Make a token the model greedily emits third a stop id: generation ends there, as a stop."""
    engine = TransformersEngine(tiny.model_dir, [0.0])
    greedy = sampling(n=1, temperature=0.0, repetition_penalty=1.0, max_tokens=6)
    first = engine.generate([(encoded(engine, 0), greedy)])[0][0].token_ids
    special = set(tiny.processor.tokenizer.all_special_ids)
    target = next((i, t) for i, t in enumerate(first) if t not in special)
    model, processor = load_model(tiny.model_dir)
    model.generation_config.eos_token_id = [*tiny.family.stop_token_ids, target[1]]
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    stopping = TransformersEngine(tmp_path, [0.0])
    completion = stopping.generate([(encoded(stopping, 0), greedy)])[0][0]
    assert completion.token_ids == first[: first.index(target[1]) + 1]
    assert completion.finish_reason == "stop"


# --------------------------------------------------------------------------- collate + loss


def test_collate_and_loss_match_the_models_own_forward_and_train_every_part(tiny, engine):
    top_k = 8
    records = []
    for index in range(2):
        prompt = encoded(engine, index)
        completions = engine.generate([(prompt, sampling(n=2, max_tokens=5, seed=index))])[0]
        scores = engine.score([(prompt, c.token_ids, top_k) for c in completions])
        responses = [
            Response(
                "teacher", c.text, c.token_ids, float(i % 2), s.top_ids.tolist(), s.top_logprobs.tolist(), s.tail_mass.tolist()
            )
            for i, (c, s) in enumerate(zip(completions, scores))
        ]
        records.append(stage_record(f"q{index}", QUESTIONS[index], shapes_image(*IMAGES[index]), responses))

    student, processor = load_model(tiny.model_dir)
    student.train()
    family = VLMFamily(student, processor)
    batch = collate_records(records, family)
    with torch.no_grad():
        logprobs = response_logits(student, batch).float().log_softmax(-1)
    row = 0
    for index, record in enumerate(records):
        for response in record.responses:
            n = len(response.token_ids)
            reference = own_forward_logprobs(tiny, QUESTIONS[index], shapes_image(*IMAGES[index]), response.token_ids)
            torch.testing.assert_close(logprobs[row, :n], reference, atol=1e-5, rtol=0)
            row += 1

    loss_config = LossConfig(objective="full", kl_beta=0.0)
    output = student_loss(student, None, batch, loss_config, RewardConfig(), len(processor.tokenizer))
    output.loss.backward()
    weights = part_weights(student)
    for part in ("vision_tower", "projector", "language_model"):
        assert any(w.grad is not None and w.grad.abs().sum() > 0 for w in weights[part]), f"no gradient reaches the {part}"


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_evaluation_answers_do_not_depend_on_batch_size(tiny, padding_side):
    _, processor = load_model(tiny.model_dir)
    processor.tokenizer.padding_side = padding_side
    samples = make_split("val", 8, seed=3)
    one = evaluate(tiny.model, processor, samples, batch_size=1, max_new_tokens=4)
    eight = evaluate(tiny.model, processor, samples, batch_size=8, max_new_tokens=4)
    assert [p["response"] for p in one.predictions] == [p["response"] for p in eight.predictions]


# --------------------------------------------------------------------------- unknown models


def test_a_model_without_vision_parts_fails_at_load_naming_its_class(micro_model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, micro_processor = load_model(micro_model_dir)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM .*no vision tower"):
        VLMFamily(model, micro_processor)


def test_a_template_answer_end_that_does_not_stop_generation_fails_at_load(micro_model_dir):
    """The answer end must be a stop id, or generated answers would run past where dataset answers end."""
    model, processor = load_model(micro_model_dir)
    model.generation_config.eos_token_id = [processor.tokenizer.pad_token_id]
    with pytest.raises(UnsupportedModelError, match=r"ends an answer with token .*'</s>'.*add it to generation_config"):
        VLMFamily(model, processor)


def test_a_tokenizer_without_pad_token_fails_at_load_with_the_fix(micro_model_dir):
    model, processor = load_model(micro_model_dir)
    processor.tokenizer.pad_token = None
    with pytest.raises(UnsupportedModelError, match="no pad token; set one"):
        VLMFamily(model, processor)
