"""Evaluation: greedy batched answers on a split, scored by the rule judge, per family and overall.

Works for any model `masters.models.load_model` loads (the zoo or any Hugging Face VLM whose processor
has a chat template), since prompts come from the processor's own chat template.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from masters.families import VLMFamily
from masters.models import generate_answers
from masters.judging import rule_accuracy


@dataclass
class FamilyScore:
    accuracy: float
    count: int


@dataclass
class EvalReport:
    model: str
    split: str
    accuracy: float
    count: int
    per_family: dict[str, FamilyScore]
    seconds: float
    predictions: list[dict] = field(repr=False)  # id, family, question, answer, response, correct

    def to_json(self) -> dict:
        return asdict(self)


def evaluate(
    model: torch.nn.Module,
    processor,
    samples: Sequence,
    *,
    model_name: str = "model",
    split: str = "",
    batch_size: int = 32,
    max_new_tokens: int = 16,
    numeric_tolerance: float = 1e-6,
    progress: bool = False,
) -> EvalReport:
    """Accuracy of greedy answers to `samples` (objects with id, family, question, answer, image)."""
    if not samples:
        raise ValueError("evaluate needs at least one sample; check the split size")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    family = VLMFamily(model, processor)
    predictions = []
    batches = range(0, len(samples), batch_size)
    for start in tqdm(batches, desc=f"eval {model_name}", disable=not progress, leave=False):
        batch = samples[start : start + batch_size]
        responses = generate_answers(
            model, family, [s.image for s in batch], [s.question for s in batch], max_new_tokens=max_new_tokens
        )
        for sample, response in zip(batch, responses):
            correct = rule_accuracy(response, sample.answer, numeric_tolerance)
            predictions.append(
                {
                    "id": sample.id,
                    "family": sample.family,
                    "question": sample.question,
                    "answer": sample.answer,
                    "response": response,
                    "correct": correct,
                }
            )
    by_family: dict[str, list[float]] = defaultdict(list)
    for prediction in predictions:
        by_family[prediction["family"]].append(prediction["correct"])
    per_family = {
        family: FamilyScore(accuracy=sum(scores) / len(scores), count=len(scores))
        for family, scores in sorted(by_family.items())
    }
    return EvalReport(
        model=model_name,
        split=split,
        accuracy=sum(p["correct"] for p in predictions) / len(predictions),
        count=len(predictions),
        per_family=per_family,
        seconds=time.perf_counter() - started,
        predictions=predictions,
    )


def format_table(report: EvalReport) -> str:
    """A plain-text table: one row per family, then the overall accuracy."""
    width = max([len("overall"), *(len(family) for family in report.per_family)])
    lines = [
        f"{report.model} on {report.split or 'samples'} ({report.seconds:.1f} s)",
        f"{'family':<{width}}  {'n':>5}  {'accuracy':>8}",
    ]
    for family, score in report.per_family.items():
        lines.append(f"{family:<{width}}  {score.count:>5}  {100 * score.accuracy:>7.1f}%")
    lines.append(f"{'overall':<{width}}  {report.count:>5}  {100 * report.accuracy:>7.1f}%")
    return "\n".join(lines)


def format_comparison(reports: Sequence[EvalReport]) -> str:
    """Several models side by side: rows are families (then overall), columns are models."""
    families = sorted({family for report in reports for family in report.per_family})
    width = max([len("overall"), *(len(family) for family in families)])
    columns = [max(len(report.model), 7) for report in reports]
    lines = [f"{'family':<{width}}  " + "  ".join(f"{r.model:>{c}}" for r, c in zip(reports, columns))]
    for family in families:
        cells = []
        for report, column in zip(reports, columns):
            score = report.per_family.get(family)
            cells.append(f"{'-' if score is None else f'{100 * score.accuracy:.1f}%':>{column}}")
        lines.append(f"{family:<{width}}  " + "  ".join(cells))
    lines.append(f"{'overall':<{width}}  " + "  ".join(f"{f'{100 * r.accuracy:.1f}%':>{c}}" for r, c in zip(reports, columns)))
    return "\n".join(lines)


def accuracy_row(report: dict) -> dict:
    """A saved report (`EvalReport.to_json`) as a row of the accuracy table: overall and per family."""
    return {
        "overall": report["accuracy"],
        "per_family": {family: score["accuracy"] for family, score in report["per_family"].items()},
    }


def format_accuracy_table(rows: dict[str, dict]) -> str:
    """Models (`accuracy_row`s by name) down, overall then each family across, in percent."""
    families = sorted({family for row in rows.values() for family in row["per_family"]})
    name_width = max(len(name) for name in rows)
    header = "model".ljust(name_width) + "  overall  " + "  ".join(f[:12].rjust(12) for f in families)
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        cells = "  ".join(f"{100 * row['per_family'].get(f, float('nan')):12.1f}" for f in families)
        lines.append(f"{name.ljust(name_width)}  {100 * row['overall']:6.1f}%  {cells}")
    return "\n".join(lines)

