"""The restoration curriculum: teachers in chain order × mask stages × data chunks, and where a run is.

Our reading of the method (docs/method.md §1-2): one pass over the train questions, shuffled with
`data.seed` (in blocks of up to a row group at scale, `shuffled_questions`), is split between the teachers in proportion to `iteration_weight`; each teacher's share
is cut into M contiguous, equal chunks, and chunk k is trained with the responses of the teacher
masked at stage k's ratio r_max − k·s (the last stage is the full teacher). A stage's trainer draws
`questions_per_batch` questions per optimizer update from its chunk in order, wrapping around, for
`optimizer_steps` updates: `ceil(chunk × epochs / questions_per_batch)` by default, or, when
`train.iterations` is set, that total split between teachers by weight and then equally by stage.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from masters.config import MastersConfig, ratio_label
from masters.data.export import ROWS_PER_ROW_GROUP
from masters.io import aligned_table, atomic_write_json, json_digest

STATE_VERSION = 1
# The served name of the student being distilled (a teacher level's is `model_id`).
STUDENT = "student"


def model_id(teacher: str, mask_ratio: float) -> str:
    """The model id a teacher's mask level is served under, e.g. `teacher-l@0.15` (`serve.levels` resolves it)."""
    return f"{teacher}@{ratio_label(mask_ratio)}"


@dataclass(frozen=True)
class Stage:
    index: int  # position in the whole plan
    teacher: str
    teacher_model: str  # `zoo:<role>` or a model directory, as configured
    teacher_stage: int  # k: position within this teacher's schedule
    mask_ratio: float
    question_indices: tuple[int, ...]  # rows of the train split, in training order
    optimizer_steps: int

    @property
    def stage_id(self) -> str:
        """Stable id used in run paths and the curriculum state, e.g. `teacher-l/2`."""
        return f"{self.teacher}/{self.teacher_stage}"

    @property
    def model_id(self) -> str:
        """The served model id of this stage's teacher level, e.g. `teacher-l@0.1`."""
        return model_id(self.teacher, self.mask_ratio)

    def to_dict(self) -> dict:
        return {**asdict(self), "question_indices": list(self.question_indices)}

    @classmethod
    def from_dict(cls, data: dict) -> Stage:
        return cls(**{**data, "question_indices": tuple(data["question_indices"])})


def _split_by_weight(total: int, weights: list[float]) -> list[int]:
    """Integer shares of `total` proportional to `weights`, summing to `total` (largest remainder)."""
    quotas = [total * weight / sum(weights) for weight in weights]
    shares = [int(quota) for quota in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (shares[i] - quotas[i], i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _split_equally(total: int, parts: int) -> list[int]:
    """`parts` sizes differing by at most one, summing to `total`, larger ones first."""
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


def shuffled_questions(num_questions: int, num_stages: int, seed: int) -> list[int]:
    """The train split's positions in training order: a shuffle of blocks of consecutive positions.

    A block is as many questions as a dataset row group (`ROWS_PER_ROW_GROUP`) when every stage still
    gets at least that many blocks, fewer otherwise, down to single questions (a plain shuffle) for
    small runs. Each stage then reads whole row groups, each once, instead of a few questions of every
    row group of the split (10 stages read a 1.5M-question split 10 times over).
    """
    block = max(1, min(ROWS_PER_ROW_GROUP, num_questions // (num_stages * ROWS_PER_ROW_GROUP)))
    blocks = [list(range(start, min(start + block, num_questions))) for start in range(0, num_questions, block)]
    random.Random(seed).shuffle(blocks)  # with blocks of one, the same permutation as shuffling positions
    return [position for positions in blocks for position in positions]


def plan_curriculum(config: MastersConfig, num_questions: int) -> list[Stage]:
    """Every stage of the run in training order (see the module docstring for the rules)."""
    if num_questions < 1:
        raise ValueError(
            f"num_questions must be at least 1, got {num_questions}: the train split is empty "
            "(check data.dataset and data.train_size)"
        )
    teachers = config.models.teachers
    weights = [teacher.iteration_weight for teacher in teachers]
    num_stages = config.mask.num_stages
    train = config.train
    if train.iterations is not None and train.epochs != 1:
        raise ValueError(
            f"train.epochs ({train.epochs}) has no effect when train.iterations ({train.iterations}) is set; "
            "set train.epochs=1 or train.iterations=null"
        )

    order = shuffled_questions(num_questions, len(teachers) * num_stages, config.data.seed)
    question_shares = _split_by_weight(num_questions, weights)
    for teacher, share in zip(teachers, question_shares):
        if share < num_stages:
            raise ValueError(
                f"num_questions ({num_questions}, data.train_size) gives teacher {teacher.name!r} {share} questions, "
                f"fewer than its {num_stages} stages (mask.max_mask_ratio / mask.mask_step + 1): use more "
                "questions, fewer stages or a larger iteration_weight for it"
            )
    if train.iterations is not None:
        iteration_shares = _split_by_weight(train.iterations, weights)
        for teacher, share in zip(teachers, iteration_shares):
            if share < num_stages:
                raise ValueError(
                    f"train.iterations ({train.iterations}) gives teacher {teacher.name!r} {share} optimizer steps, "
                    f"fewer than its {num_stages} stages: raise train.iterations"
                )

    plan: list[Stage] = []
    start = 0
    for t, (teacher, share) in enumerate(zip(teachers, question_shares)):
        for k, chunk_size in enumerate(_split_equally(share, num_stages)):
            if train.iterations is None:
                steps = -(-chunk_size * train.epochs // train.questions_per_batch)
            else:
                # Update i of the teacher's T trains stage floor(i·M/T); it never exceeds M-1,
                # so the final stage (ratio 0) always gets its share.
                total = iteration_shares[t]
                steps = -(-(k + 1) * total // num_stages) - -(-k * total // num_stages)
            plan.append(
                Stage(
                    index=len(plan),
                    teacher=teacher.name,
                    teacher_model=teacher.model,
                    teacher_stage=k,
                    mask_ratio=config.mask.ratios[k],
                    question_indices=tuple(order[start : start + chunk_size]),
                    optimizer_steps=steps,
                )
            )
            start += chunk_size
    return plan


def plan_digest(plan: list[Stage]) -> str:
    """Fingerprint of a plan: a saved state only resumes the plan it was made for."""
    return json_digest([stage.to_dict() for stage in plan])


def format_plan(plan: list[Stage]) -> str:
    """A table of the plan for `--dry-run` and the docs."""
    rows = [("#", "stage", "teacher level", "model", "mask_ratio", "questions", "steps")]
    rows += [
        (
            str(stage.index),
            stage.stage_id,
            stage.model_id,
            stage.teacher_model,
            f"{stage.mask_ratio:.2f}",
            str(len(stage.question_indices)),
            str(stage.optimizer_steps),
        )
        for stage in plan
    ]
    total = sum(stage.optimizer_steps for stage in plan)
    return f"{aligned_table(rows)}\n{len(plan)} stages, {total} optimizer steps"


@dataclass
class CurriculumState:
    """Where a run is: the stages finished, in plan order.

    A finished stage is never redone; an unfinished one goes on from the trainer's last checkpoint.
    """

    plan_digest: str
    completed: list[str] = field(default_factory=list)  # stage ids

    @classmethod
    def fresh(cls, plan: list[Stage]) -> CurriculumState:
        return cls(plan_digest=plan_digest(plan))

    def next_stage(self, plan: list[Stage]) -> Stage | None:
        """The first unfinished stage, or None when the run is done."""
        self._check(plan)
        return plan[len(self.completed)] if len(self.completed) < len(plan) else None

    def complete(self, stage: Stage, plan: list[Stage]) -> None:
        """Record that `stage`, the next one, finished."""
        expected = self.next_stage(plan)
        if expected is None or expected.stage_id != stage.stage_id:
            raise ValueError(
                f"stage {stage.stage_id!r} is not the next stage of the plan "
                f"(next: {None if expected is None else expected.stage_id!r})"
            )
        self.completed.append(stage.stage_id)

    def _check(self, plan: list[Stage]) -> None:
        if self.plan_digest != plan_digest(plan):
            raise ValueError(
                "the saved curriculum state belongs to another plan (config, data or teachers changed); "
                "use a new run name or restore the original config"
            )
        if self.completed != [stage.stage_id for stage in plan[: len(self.completed)]]:
            raise ValueError(f"completed stages {self.completed} are not a prefix of the plan")

    def to_dict(self) -> dict:
        return {"version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> CurriculumState:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"curriculum state version {data.get('version')!r} is not {STATE_VERSION}")
        # Other keys are ignored: states saved by earlier versions also carry `global_step`, and still resume.
        missing = {"plan_digest", "completed"} - data.keys()
        if missing:
            raise ValueError(f"curriculum state lacks fields {sorted(missing)}")
        if not isinstance(data["completed"], list):
            raise ValueError("curriculum state: `completed` must be a list of stage ids")
        return cls(plan_digest=data["plan_digest"], completed=list(data["completed"]))

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> CurriculumState:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"curriculum state {str(path)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(data)
