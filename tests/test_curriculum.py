"""The curriculum plan (teachers × mask stages × data chunks) and the resumable state."""

import json

import pytest

from masters.config import validate_config
from masters.curriculum import CurriculumState, Stage, format_plan, plan_curriculum


def config(**sections):
    return validate_config(sections)


def one_teacher(**sections):
    return config(models={"teachers": [{"name": "teacher-l", "model": "zoo:teacher-l"}]}, **sections)


@pytest.mark.parametrize(
    ("max_mask_ratio", "ratios"),
    [(0.0, [0.0]), (0.2, [0.2, 0.15, 0.1, 0.05, 0.0]), (0.4, [0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.0])],
)
def test_each_teacher_restores_from_max_ratio_to_zero(max_mask_ratio, ratios):
    objective = "naive" if max_mask_ratio == 0 else "full"
    plan = plan_curriculum(one_teacher(mask={"max_mask_ratio": max_mask_ratio}, loss={"objective": objective}), 90)
    assert [stage.mask_ratio for stage in plan] == ratios
    assert plan[-1].mask_ratio == 0.0
    assert [stage.index for stage in plan] == list(range(len(ratios)))
    assert [stage.stage_id for stage in plan] == [f"teacher-l/{k}" for k in range(len(ratios))]
    assert plan[0].model_id == f"teacher-l@{max_mask_ratio:g}" and plan[-1].model_id == "teacher-l@0"
    # one shuffled pass: the chunks partition the questions and are as equal as they can be
    chunks = [stage.question_indices for stage in plan]
    assert sorted(i for chunk in chunks for i in chunk) == list(range(90))
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1
    assert [i for chunk in chunks for i in chunk] != list(range(90)), "questions were not shuffled"


def test_two_teacher_chain_splits_questions_and_steps_by_iteration_weight():
    cfg = config(
        models={
            "teachers": [
                {"name": "teacher-m", "model": "zoo:teacher-m", "iteration_weight": 1},
                {"name": "teacher-l", "model": "zoo:teacher-l", "iteration_weight": 3},
            ]
        },
        train={"questions_per_batch": 4, "epochs": 2},
        data={"seed": 7},
    )
    plan = plan_curriculum(cfg, 200)
    assert [s.stage_id for s in plan] == [f"teacher-m/{k}" for k in range(5)] + [f"teacher-l/{k}" for k in range(5)]
    assert {s.teacher_model for s in plan[:5]} == {"zoo:teacher-m"} and {s.teacher_model for s in plan[5:]} == {"zoo:teacher-l"}
    assert [s.mask_ratio for s in plan] == [0.2, 0.15, 0.1, 0.05, 0.0] * 2
    assert sum(len(s.question_indices) for s in plan[:5]) == 50
    assert sum(len(s.question_indices) for s in plan[5:]) == 150
    assert [len(s.question_indices) for s in plan] == [10] * 5 + [30] * 5
    # steps = ceil(chunk × epochs / questions_per_batch): 10×2/4 = 5, 30×2/4 = 15
    assert [s.optimizer_steps for s in plan] == [5] * 5 + [15] * 5
    # the same seed gives the same plan, another seed other chunks
    assert plan_curriculum(cfg, 200) == plan
    reseeded = plan_curriculum(cfg.model_copy(update={"data": cfg.data.model_copy(update={"seed": 8})}), 200)
    assert [s.question_indices for s in reseeded] != [s.question_indices for s in plan]


def test_iterations_split_by_weight_then_equally_by_stage():
    teachers = [
        {"name": "teacher-m", "model": "zoo:teacher-m", "iteration_weight": 1},
        {"name": "teacher-l", "model": "zoo:teacher-l", "iteration_weight": 2},
    ]
    plan = plan_curriculum(config(models={"teachers": teachers}, train={"iterations": 32}), 60)
    steps_m = [s.optimizer_steps for s in plan[:5]]
    steps_l = [s.optimizer_steps for s in plan[5:]]
    assert sum(steps_m) + sum(steps_l) == 32
    assert (sum(steps_m), sum(steps_l)) == (11, 21)  # 32 × 1/3 = 10.67 → 11 and 21.33 → 21
    assert max(steps_m) - min(steps_m) <= 1 and max(steps_l) - min(steps_l) <= 1
    assert min(steps_m + steps_l) >= 2 and plan[-1].mask_ratio == 0.0
    # exactly one step per stage is the least that still reaches ratio 0
    assert [s.optimizer_steps for s in plan_curriculum(one_teacher(train={"iterations": 5}), 60)] == [1] * 5


@pytest.mark.parametrize(
    ("sections", "num_questions", "message"),
    [
        ({}, 0, "num_questions must be at least 1"),
        ({}, 4, r"data.train_size.*4 questions, fewer than its 5 stages"),
        ({"train": {"iterations": 4}}, 50, r"train.iterations \(4\).*fewer than its 5 stages"),
        ({"train": {"iterations": 50, "epochs": 2}}, 50, "train.epochs"),
    ],
)
def test_bad_input_names_the_field(sections, num_questions, message):
    with pytest.raises(ValueError, match=message):
        plan_curriculum(one_teacher(**sections), num_questions)


def test_plan_serialises_and_prints():
    plan = plan_curriculum(one_teacher(), 23)
    assert [Stage.from_dict(json.loads(json.dumps(stage.to_dict()))) for stage in plan] == plan
    table = format_plan(plan)
    assert "teacher-l/0" in table and "teacher-l@0.15" in table and table.endswith("5 stages, 8 optimizer steps")


def test_state_walks_the_plan_and_round_trips_through_disk(tmp_path):
    plan = plan_curriculum(one_teacher(), 40)
    state = CurriculumState.fresh(plan)
    assert state.next_stage(plan) == plan[0]
    state.complete(plan[0], plan)
    state.complete(plan[1], plan)
    with pytest.raises(ValueError, match="not the next stage"):
        state.complete(plan[3], plan)
    assert state.completed == [plan[0].stage_id, plan[1].stage_id]

    assert CurriculumState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    assert CurriculumState.from_dict({**state.to_dict(), "global_step": 3}) == state  # saved by earlier versions
    path = state.save(tmp_path / "state.json")
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    resumed = CurriculumState.load(path)
    assert resumed == state and resumed.next_stage(plan) == plan[2]
    for stage in plan[2:]:
        resumed.complete(stage, plan)
    assert resumed.next_stage(plan) is None
    assert resumed.completed == [stage.stage_id for stage in plan]

    other_plan = plan_curriculum(one_teacher(data={"seed": 1}), 40)
    with pytest.raises(ValueError, match="belongs to another plan"):
        state.next_stage(other_plan)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        CurriculumState.load(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="lacks fields"):
        CurriculumState.from_dict({"version": 1, "completed": []})


def test_large_splits_are_shuffled_in_row_group_blocks_small_ones_question_by_question():
    import random

    from masters.curriculum import shuffled_questions

    plain = list(range(500))
    random.Random(3).shuffle(plain)
    assert shuffled_questions(500, 10, seed=3) == plain  # small runs keep the plain shuffle
    order = shuffled_questions(200_000, 10, seed=3)
    assert sorted(order) == list(range(200_000)) and order != sorted(order)
    # Every stage's 20,000 questions are whole aligned blocks of 64: each row group is read by one stage.
    stages = [order[k * 20_000 : (k + 1) * 20_000] for k in range(10)]
    row_groups = [{position // 64 for position in stage} for stage in stages]
    assert sum(len(groups) for groups in row_groups) <= 200_000 // 64 + 10  # at most a split block per stage boundary
    # In between, blocks shrink so every stage still mixes at least 64 blocks.
    mid = shuffled_questions(10 * 64 * 8, 10, seed=3)
    blocks = [mid[i : i + 8] for i in range(0, len(mid), 8)]
    assert all(block == list(range(block[0], block[0] + 8)) and block[0] % 8 == 0 for block in blocks)
    assert sorted(block[0] for block in blocks) != [block[0] for block in blocks]
