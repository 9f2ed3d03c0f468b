"""Evaluation: greedy batched answers scored by the rule judge, per family and overall, and the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from masters.data import FAMILIES, make_split
from masters.eval import evaluate, format_comparison, format_table
from masters.families import VLMFamily
from masters.models import generate_answers, load_model
from masters.tiny_vlms import MICRO, build_model
from masters.judging import rule_accuracy
from masters.sft import encode_examples, train_sft

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def micro(micro_model_dir):
    return load_model(micro_model_dir)


def test_report_matches_the_judge_on_each_answer(micro):
    model, processor = micro
    samples = make_split("val", 2 * len(FAMILIES) + 3, seed=0)
    report = evaluate(model, processor, samples, model_name="micro", split="val", batch_size=5, max_new_tokens=4)

    responses = []
    for start in range(0, len(samples), 5):
        batch = samples[start : start + 5]
        responses += generate_answers(model, VLMFamily(model, processor), [s.image for s in batch], [s.question for s in batch], max_new_tokens=4)
    assert [p["response"] for p in report.predictions] == responses
    assert [p["correct"] for p in report.predictions] == [rule_accuracy(r, s.answer, 1e-6) for r, s in zip(responses, samples)]

    assert report.count == len(samples) and set(report.per_family) == set(FAMILIES)
    assert sum(score.count for score in report.per_family.values()) == len(samples)
    assert report.accuracy == pytest.approx(sum(p["correct"] for p in report.predictions) / len(samples))
    table = format_table(report)
    assert all(family in table for family in FAMILIES) and "overall" in table
    assert json.loads(json.dumps(report.to_json()))["per_family"][FAMILIES[0]]["count"] == 3


def test_a_fitted_model_scores_higher_than_a_random_one(micro):
    """Evaluation sees learning: a micro model fitted to 8 samples answers them, the random one does not."""
    _, processor = micro
    samples = make_split("train", 8, seed=3, families=["shapes_exist", "shapes_count"])
    model = build_model(MICRO, processor.tokenizer, seed=0).eval()
    before = evaluate(model, processor, samples, batch_size=8, max_new_tokens=4)
    examples = encode_examples(processor, [s.image for s in samples], [s.question for s in samples], [s.answer for s in samples])
    train_sft(model, examples, VLMFamily(model, processor), steps=60, batch_size=8, lr=3e-3, progress=False)
    after = evaluate(model, processor, samples, batch_size=8, max_new_tokens=4)
    assert after.accuracy >= 0.75 and after.accuracy > before.accuracy, (before.predictions, after.predictions)


def test_comparison_table_lists_every_model(micro):
    model, processor = micro
    samples = make_split("val", 3, seed=0)
    reports = [evaluate(model, processor, samples, model_name=name, batch_size=3, max_new_tokens=2) for name in ("a", "b")]
    lines = format_comparison(reports).splitlines()
    assert lines[0].split()[1:] == ["a", "b"] and lines[-1].startswith("overall") and len(lines) == 5


def test_evaluate_job_writes_json(micro_model_dir, tmp_path):
    out = tmp_path / "report.json"
    command = [
        sys.executable, str(REPO / "jobs" / "evaluate.py"), "--model", str(micro_model_dir), "--split", "heldout",
        "--size", "6", "--batch-size", "4", "--max-new-tokens", "3", "--out", str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "overall" in result.stdout
    written = json.loads(out.read_text())
    report = written["models"][str(micro_model_dir)]
    assert written["split"] == "heldout" and report["count"] == 6 and len(report["predictions"]) == 6

    missing = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--model", "zoo:student", "--zoo-dir", str(tmp_path / "none")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert missing.returncode == 2 and "build_zoo.py" in missing.stderr
