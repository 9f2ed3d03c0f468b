"""Batching: stage records → padded tensors, alignment of targets and teacher top-k, sharding."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from masters.batching import ShardPlan, StageTable, collate_records
from masters.families import VLMFamily
from masters.models import build_prompt, load_model
from masters.records import RESPONSE_TYPE, Response, StageRecord, responses_array
from masters.student_loss import response_logits
from stage_records import synthetic_records, write_stage

def test_responses_array_from_numpy_matches_the_python_lists():
    rng = np.random.default_rng(0)

    def response(tokens: int, k: int) -> dict:
        return {
            "source": "teacher", "text": f"{tokens} tokens", "token_ids": rng.integers(0, 300, tokens).astype(np.int32),
            "accuracy_reward": 1.0, "teacher_topk_ids": rng.integers(0, 300, (tokens, k)).astype(np.int32),
            "teacher_topk_logprobs": -rng.random((tokens, k)).astype(np.float32),
            "teacher_tail_mass": rng.random(tokens).astype(np.float32),
        }

    groups = [[response(3, 4), response(1, 4)], [], [response(5, 2)]]
    as_lists = [[{key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in r.items()} for r in g]
                for g in groups]
    column = responses_array(groups)
    assert column.equals(pa.array(as_lists, type=pa.list_(RESPONSE_TYPE)))
    assert responses_array(as_lists).equals(column)  # lists are taken as well

    misaligned = response(3, 4) | {"teacher_topk_logprobs": np.zeros((2, 4), np.float32)}
    with pytest.raises(ValueError, match="one teacher_topk_logprobs entry per token: got 2 for 3 tokens"):
        responses_array([[misaligned]])
    with pytest.raises(ValueError, match=r"teacher_topk_ids must be \[tokens\]\[k\]"):
        responses_array([[response(3, 4) | {"teacher_topk_ids": [[1, 2], [3], [4, 5]]}]])


def test_responses_array_leaves_what_a_draft_lacks_null():
    """The pipeline's drafts: a response not scored or rewarded yet has null fields, not empty ones."""
    scored = {"source": "teacher", "text": "a", "token_ids": [4, 5], "teacher_topk_ids": [[4, 1], [5, 1]],
              "teacher_topk_logprobs": [[-0.5, -1.0], [-0.25, -2.0]], "teacher_tail_mass": [0.1, 0.2]}
    draft = {"source": "student", "text": "b", "token_ids": [6]}
    column = responses_array([[scored, draft]])
    expected = [[scored | {"accuracy_reward": None},
                 draft | {"accuracy_reward": None, "teacher_topk_ids": None, "teacher_topk_logprobs": None, "teacher_tail_mass": None}]]
    assert column.equals(pa.array(expected, type=pa.list_(RESPONSE_TYPE)))
    assert responses_array([[], []]).equals(pa.array([[], []], type=pa.list_(RESPONSE_TYPE)))


def with_responses(record: StageRecord, *responses: Response) -> StageRecord:
    return StageRecord(**{**record.__dict__, "responses": list(responses)})


@pytest.fixture(scope="module")
def micro(micro_model_dir):
    model, processor = load_model(micro_model_dir)
    return model, processor


@pytest.fixture(scope="module")
def records(micro):
    return synthetic_records(micro[1], num_questions=6, group_size=4, topk=8, seed=1)


def test_stage_table_reads_all_files_in_question_order(records, tmp_path):
    write_stage(records, tmp_path / "stage", files=3)
    (tmp_path / "stage" / ".part-9.parquet.tmp.parquet").write_bytes(b"half-written")  # never read
    table = StageTable(tmp_path / "stage")
    assert len(table) == len(records)
    read = table.records([0, 5, 2])
    assert [r.question_id for r in read] == ["q0000", "q0005", "q0002"]
    assert read[1].responses[3].teacher_topk_ids == records[5].responses[3].teacher_topk_ids


def test_stage_table_rejects_empty_and_duplicated_stages(records, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.parquet files"):
        StageTable(tmp_path / "empty")
    write_stage(records[:2] + records[:1], tmp_path / "dup", files=1)
    with pytest.raises(ValueError, match="question id more than once"):
        StageTable(tmp_path / "dup")


@pytest.fixture(scope="module")
def family(micro):
    return VLMFamily(*micro)


def test_collate_aligns_responses_and_teacher_topk(micro, family, records):
    _, processor = micro
    batch = collate_records(records[:3], family)
    input_ids, attention_mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    targets = batch.targets
    P = batch.prompt_length
    assert input_ids.shape == (12, P + batch.response_length)
    row = 0
    for q, record in enumerate(records[:3]):
        # The prompt columns hold exactly the processor's own encoding of this question, left-padded.
        alone = processor(images=[Image.open(io.BytesIO(record.image_png))], text=[build_prompt(processor, record.question)], return_tensors="pt")
        prompt_ids = alone["input_ids"][0]
        for response in record.responses:
            n = len(response.token_ids)
            assert torch.equal(input_ids[row, P - len(prompt_ids) : P], prompt_ids)
            assert attention_mask[row, : P - len(prompt_ids)].sum() == 0
            assert input_ids[row, P : P + n].tolist() == response.token_ids
            assert targets.target_ids[row, :n].tolist() == response.token_ids
            assert targets.response_mask[row].tolist() == [True] * n + [False] * (batch.response_length - n)
            assert attention_mask[row, P:].tolist() == [1] * n + [0] * (batch.response_length - n)
            assert targets.teacher_topk_ids[row, :n].tolist() == response.teacher_topk_ids
            assert torch.allclose(targets.teacher_topk_logprobs[row, :n], torch.tensor(response.teacher_topk_logprobs))
            assert targets.group_index[row] == q
            assert targets.accuracy_reward[row] == response.accuracy_reward
            # Positions count real tokens only, as in left-padded generation.
            real = attention_mask[row].bool()
            assert batch.inputs["position_ids"][row, real].tolist() == list(range(int(real.sum())))
            row += 1
    assert torch.equal(batch.inputs["pixel_values"][0], batch.inputs["pixel_values"][3])  # one image per question, repeated per response


def test_response_logits_predict_each_response_token(micro, family, records):
    """Padded batch log-probs of every response token equal those of an unpadded forward of that row alone."""
    model, _ = micro
    batch = collate_records(records[:3], family)
    logits = response_logits(model, batch)
    logprobs = torch.log_softmax(logits, -1).gather(-1, batch.targets.target_ids.unsqueeze(-1)).squeeze(-1)
    row = 0
    for record in records[:3]:
        for response in record.responses:
            single = collate_records([with_responses(record, response)], family)
            assert single.prompt_length + single.response_length == single.inputs["input_ids"].shape[1]
            with torch.no_grad():
                full = model(**{k: v for k, v in single.inputs.items() if k != "position_ids"}).logits[0]
            n = len(response.token_ids)
            P = single.prompt_length
            expected = torch.log_softmax(full[P - 1 : P - 1 + n], -1)[torch.arange(n), torch.tensor(response.token_ids)]
            torch.testing.assert_close(logprobs[row, :n], expected, atol=1e-5, rtol=1e-5)
            row += 1


def test_loss_ignores_prompt_and_padding(micro, family, records):
    """A question's per-response divergences D_j do not change when batched with longer prompts and responses."""
    from masters.config import LossConfig, RewardConfig
    from masters.student_loss import student_loss

    model, processor = micro
    config = LossConfig(objective="mask_progressive")
    vocab = len(processor.tokenizer)
    with torch.no_grad():
        alone = student_loss(model, None, collate_records(records[:1], family), config, RewardConfig(), vocab)
        mixed_batch = collate_records(records[:1] + records[1:4], family)
        assert mixed_batch.response_length > max(len(r.token_ids) for r in records[0].responses)
        mixed = student_loss(model, None, mixed_batch, config, RewardConfig(), vocab)
        # Garbage in padded target positions changes nothing either.
        mask = mixed_batch.targets.response_mask
        mixed_batch.targets.teacher_topk_logprobs[~mask] = 123.0
        mixed_batch.targets.target_ids[~mask] = vocab + 5
        garbage = student_loss(model, None, mixed_batch, config, RewardConfig(), vocab)
    torch.testing.assert_close(mixed.divergence[:4], alone.divergence, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(garbage.divergence, mixed.divergence)


def test_collate_rejects_ragged_topk(family, records):
    record = with_responses(records[0], records[0].responses[0])
    short = Response(**{**record.responses[0].__dict__})
    short.teacher_topk_ids = [ids[:4] for ids in short.teacher_topk_ids]
    with pytest.raises(ValueError, match="every token of a stage needs the same k"):
        collate_records([records[1], with_responses(record, short)], family)


# --------------------------------------------------------------------------- sharding


def test_shards_are_disjoint_and_cover_each_epoch():
    plan = ShardPlan(num_questions=24, questions_per_batch=8, world_size=2, grad_accum_steps=2, seed=3)
    assert plan.steps_per_epoch == 3
    for epoch in range(2):
        seen = []
        for step in range(epoch * 3, epoch * 3 + 3):
            per_rank = [plan.worker_micro_batches(step, rank) for rank in range(2)]
            assert all(len(micro) == 2 and all(len(m) == 2 for m in micro) for micro in per_rank)
            step_questions = [q for micro in per_rank for m in micro for q in m]
            assert sorted(step_questions) == sorted(plan.batch_questions(step))
            seen += step_questions
        assert sorted(seen) == list(range(24))  # complete and disjoint within the epoch
    assert plan.batch_questions(0) != plan.batch_questions(3)  # each epoch reshuffles
    # Deterministic: a fresh plan (a resumed run, another worker) gives the same batches.
    again = ShardPlan(num_questions=24, questions_per_batch=8, world_size=2, grad_accum_steps=2, seed=3)
    assert [again.worker_micro_batches(s, 1) for s in range(6)] == [plan.worker_micro_batches(s, 1) for s in range(6)]
    other_seed = ShardPlan(num_questions=24, questions_per_batch=8, world_size=2, grad_accum_steps=2, seed=4)
    assert other_seed.batch_questions(0) != plan.batch_questions(0)


def test_partial_batch_is_dropped_per_epoch():
    plan = ShardPlan(num_questions=10, questions_per_batch=4, world_size=2, grad_accum_steps=1, seed=0)
    assert plan.steps_per_epoch == 2
    used = plan.batch_questions(0) + plan.batch_questions(1)
    assert len(set(used)) == 8 and set(used) <= set(range(10))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"questions_per_batch": 6, "world_size": 2, "grad_accum_steps": 2}, "multiple of train.num_workers"),
        ({"num_questions": 3}, "fewer than train.questions_per_batch"),
    ],
)
def test_shard_plan_rejects_bad_sizes(kwargs, message):
    arguments = {"num_questions": 16, "questions_per_batch": 4, "world_size": 2, "grad_accum_steps": 1, "seed": 0}
    with pytest.raises(ValueError, match=message):
        ShardPlan(**{**arguments, **kwargs})


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_stage_writer_stores_teacher_logprobs_in_the_configured_dtype(records, tmp_path, dtype):
    """float16 (the default) rounds each stored log-prob to half precision and nothing else; float32 is exact.
    Row groups hold at most ROWS_PER_ROW_GROUP questions, so a streaming reader holds one at a time."""
    from cluster.stage_store import PartWriter
    from masters.records import ROWS_PER_ROW_GROUP, records_to_table, stage_schema

    many = [
        StageRecord(**{**record.__dict__, "question_id": f"{record.question_id}-{copy}"})
        for copy in range(ROWS_PER_ROW_GROUP // len(records) + 2)
        for record in records
    ]
    with PartWriter(tmp_path / "stage", stage_schema(dtype), kind="stage") as writer:
        writer.write(records_to_table(many))
        writer.finish([r.question_id for r in many])
    (part,) = (tmp_path / "stage").glob("*.parquet")
    metadata = pq.ParquetFile(part).metadata
    assert metadata.num_row_groups > 1 and all(
        metadata.row_group(i).num_rows <= ROWS_PER_ROW_GROUP for i in range(metadata.num_row_groups)
    )
    table = StageTable(tmp_path / "stage")
    read = {r.question_id: r for r in table.records(list(range(len(table))))}
    for record in many:
        for stored, original in zip(read[record.question_id].responses, record.responses):
            expected = np.asarray(original.teacher_topk_logprobs, np.float32)
            if dtype == "float16":
                expected = expected.astype(np.float16).astype(np.float32)
            assert np.array_equal(np.asarray(stored.teacher_topk_logprobs, np.float32), expected)
            assert stored.teacher_topk_ids == original.teacher_topk_ids and stored.token_ids == original.token_ids


def test_stage_table_reads_only_the_row_groups_of_the_asked_for_rows(records, tmp_path):
    """A worker's memory is bounded by its micro-batch's row groups, not by the stage."""
    from cluster.stage_store import PartWriter
    from masters.records import ROWS_PER_ROW_GROUP, records_to_table, stage_schema

    many = [
        StageRecord(**{**record.__dict__, "question_id": f"{copy:03d}-{record.question_id}"})
        for copy in range(2 * ROWS_PER_ROW_GROUP // len(records) + 2)
        for record in records
    ]
    with PartWriter(tmp_path / "stage", stage_schema("float32"), kind="stage") as writer:
        writer.write(records_to_table(many))
        writer.finish([r.question_id for r in many])
    table = StageTable(tmp_path / "stage")
    assert len(table) == len(many)
    (parquet,) = table._files
    assert parquet.num_row_groups >= 3
    reads = []
    original = parquet.read_row_group
    parquet.read_row_group = lambda group, **kwargs: reads.append((group, kwargs)) or original(group, **kwargs)
    by_id = sorted(many, key=lambda r: r.question_id)
    got = table.records([5, len(many) - 1, 6])
    assert [r.question_id for r in got] == [by_id[5].question_id, by_id[-1].question_id, by_id[6].question_id]
    assert got[0].responses[0].token_ids == by_id[5].responses[0].token_ids
    assert len(reads) == 2 and all(kwargs == {} for _, kwargs in reads)  # two row groups, nothing else
