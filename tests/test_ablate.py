"""The ablation runner `jobs/ablate.py` and its summary (`masters.ablation`).

Fast: the interval arithmetic, ladder validation and `--dry-run`, none of which may start Ray.
Slow (CI runs it): a micro ladder (initial student, mask-progressive and full Masters on the large
teacher, two seeds) run for real: the two rungs share their records, the seeds differ, and the
summary's intervals are those of the per-seed results.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from ray_processes import VENV_BIN, free_ports, run_environment, stop_process_group
from safetensors.torch import load_file

from cluster.stage_store import read_parts
from jobs import ablate
from masters.ablation import format_summary, load_ladder, run_diagnostics, rung_config, summarize, t_interval
from masters.config import ConfigError, load_config
from masters.run_layout import RunLayout, stage_records_dir

ROOT = Path(__file__).resolve().parents[1]
LADDER = ROOT / "configs" / "ablations" / "ladder.yaml"
LADDER_TIMEOUT_S = 1200


# --------------------------------------------------------------------------- fast: arithmetic and validation


def test_t_interval_is_the_student_t_interval_of_the_mean():
    values = [0.30, 0.34, 0.35]
    mean, half_width = t_interval(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert half_width == pytest.approx(4.303 * statistics.stdev(values) / math.sqrt(3))  # t(0.975, df=2)
    assert t_interval([0.5]) == (0.5, 0.0)
    assert t_interval([0.2, 0.2, 0.2])[1] == 0.0


def test_summary_per_rung_and_family():
    results = {
        "a": {0: {"overall": 0.2, "per_family": {"x": 0.1, "y": 0.3}}, 1: {"overall": 0.4, "per_family": {"x": 0.3, "y": 0.5}}},
        "b": {0: {"overall": 0.5, "per_family": {"x": 0.5, "y": 0.5}}},
    }
    summary = summarize(results)
    assert summary["a"]["overall"]["mean"] == pytest.approx(0.3)
    assert summary["a"]["overall"]["half_width"] == pytest.approx(12.706 * statistics.stdev([0.2, 0.4]) / math.sqrt(2))
    assert summary["a"]["per_family"]["x"]["mean"] == pytest.approx(0.2)
    assert summary["a"]["overall"]["values"] == [0.2, 0.4]
    assert summary["b"]["overall"]["half_width"] == 0.0
    table = format_summary(summary, {"teacher-l": {"overall": 0.6, "per_family": {"x": 0.7, "y": 0.5}}})
    assert "| a | 2 | 30.0 ± " in table and "| *teacher-l* | – | 60.0 | – |" in table


def test_rungs_are_overrides_of_the_base(tmp_path):
    ladder = load_ladder(LADDER)
    moved = rung_config(ladder, "naive", seed=2, overrides=["storage_path=/mnt/runs", "train.seed=9"])
    assert Path(moved.storage_path) == Path("/mnt/runs/ladder/runs") and moved.train.seed == 2
    naive = rung_config(ladder, "naive", seed=2)
    default = load_config(ROOT / "configs" / "default.yaml")
    assert naive.train.lr == default.train.lr  # the rung inherits the embedded default's learning rate
    assert naive.loss.objective == "naive" and [t.name for t in naive.models.teachers] == ["teacher-l"]
    assert naive.generation.seed == naive.train.seed == 2
    assert naive.name == "naive-seed2"
    assert Path(naive.records_path) == Path(default.storage_path) / "ladder" / "records"
    assert Path(naive.storage_path) == Path(default.storage_path) / "ladder" / "runs"


@pytest.mark.parametrize(
    ("ladder_yaml", "message"),
    [
        ("name: x\nbase: ../default.yaml\nrungs: {a: null}\nseeds: [1, 1]\n", "seeds must be distinct"),
        ("name: x\nbase: ../default.yaml\nrungs: {}\n", "rungs"),
        ("name: 'a b'\nbase: ../default.yaml\nrungs: {a: null}\n", "name"),
        ("name: x\nbase: ../default.yaml\nrungs: {a: null}\nsteps: 3\n", "steps: unknown field"),
    ],
)
def test_bad_ladders_are_named(tmp_path, ladder_yaml, message):
    path = tmp_path / "ladder.yaml"
    path.write_text(ladder_yaml)
    with pytest.raises(ConfigError, match=message):
        load_ladder(path)


def test_unknown_rung_and_incomparable_rungs_fail_before_ray(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("the runner started Ray"))
    assert ablate.main(["--rungs", "naive", "nope", "--dry-run"]) == 2
    assert "'nope'" in capsys.readouterr().err
    (tmp_path / "other_data.yaml").write_text("data:\n  train_size: 64\n")
    (tmp_path / "ladder.yaml").write_text(
        f"name: x\nbase: {ROOT / 'configs' / 'default.yaml'}\nrungs:\n  a: other_data.yaml\n"
    )
    assert ablate.main(["--ladder", str(tmp_path / "ladder.yaml"), "--dry-run"]) == 2
    assert "changes data" in capsys.readouterr().err


def test_a_run_kept_with_another_config_stops_the_ladder_before_ray(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("the runner started Ray"))
    args = ["--rungs", "naive", "--seeds", "0", "--set", f"storage_path={tmp_path}"]
    ladder = load_ladder(LADDER, [0], ["naive"])
    layout = RunLayout.of(rung_config(ladder, "naive", 0, args[-1:]))
    layout.root.mkdir(parents=True)
    layout.config_file.write_text("name: an earlier run\n")
    assert ablate.main(args) == 2
    assert f"run 'naive-seed0' exists in {layout.root} with another config" in capsys.readouterr().err
    assert layout.config_file.read_text() == "name: an earlier run\n"


def test_a_ladder_no_single_service_covers_fails_before_ray(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("the runner started Ray"))
    (tmp_path / "large_03.yaml").write_text(
        "models:\n  teachers:\n    - {name: teacher-l, model: zoo:teacher-l}\nmask:\n  max_mask_ratio: 0.3\n"
    )
    (tmp_path / "mid.yaml").write_text("models:\n  teachers:\n    - {name: teacher-m, model: zoo:teacher-m}\n")
    (tmp_path / "ladder.yaml").write_text(
        f"name: x\nbase: {ROOT / 'configs' / 'default.yaml'}\nrungs:\n  a: large_03.yaml\n  b: mid.yaml\n"
    )
    assert ablate.main(["--ladder", str(tmp_path / "ladder.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no rung serves every teacher level" in err and "teacher-l@0.3" in err


def test_dry_run_lists_runs_and_shared_records(capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("the runner started Ray"))
    assert ablate.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for rung in ("sft", "naive", "mask_progressive", "full_large", "full_mid_large"):
        assert all(f"{rung}-seed{seed}" in out for seed in (0, 1, 2))
    # sft and naive train on the dataset answers: one record for all six runs, whatever the seed.
    assert "1 (teacher-l/0): sft-seed0 + sft-seed1 + sft-seed2 + naive-seed0 + naive-seed1 + naive-seed2" in out
    # mask_progressive and full (large teacher) consume the same generated responses, per seed.
    for seed in (0, 1, 2):
        assert f"mask_progressive-seed{seed} + full_large-seed{seed}" in out
    assert "46 stage records generated for 66 stage trainings" in out


LADDERS = sorted(path for path in LADDER.parent.glob("*.yaml") if "rungs" in yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("ladder", LADDERS, ids=lambda p: p.name)
def test_every_shipped_ladder_dry_runs(ladder, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("the runner started Ray"))
    assert ablate.main(["--ladder", str(ladder), "--dry-run"]) == 0
    assert "stage records generated" in capsys.readouterr().out


# --------------------------------------------------------------------------- slow: a micro ladder, for real


@pytest.fixture(scope="module")
def micro_ladder(tmp_path_factory) -> Path:
    """A micro ladder run end to end in its own Ray instance; returns its directory."""
    base = tmp_path_factory.mktemp("ablate")
    large_only = "models:\n  teachers:\n    - {name: teacher-l, model: zoo:teacher-l}\n"
    (base / "mask_progressive.yaml").write_text(large_only + "loss:\n  objective: mask_progressive\n")
    (base / "full.yaml").write_text(large_only + "loss:\n  objective: full\n")
    (base / "ladder.yaml").write_text(
        f"name: micro_ladder\nbase: {ROOT / 'configs' / 'micro.yaml'}\nseeds: [0, 1]\n"
        "rungs:\n  initial: null\n  mask_progressive: mask_progressive.yaml\n  full: full.yaml\n"
    )
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="ray-ablate-"))
    command = [
        str(VENV_BIN / "python"), "jobs/ablate.py", "--ladder", str(base / "ladder.yaml"),
        "--set", f"storage_path={base / 'runs'}", "--set", f"models.zoo_dir={base / 'zoo'}",
        "--set", f"serve.port={free_ports(1)[0]}",
    ]  # fmt: skip
    with (base / "ablate.log").open("w") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=run_environment(ray_tmpdir), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=LADDER_TIMEOUT_S)
        finally:
            stop_process_group(process, ray_tmpdir)
    output = (base / "ablate.log").read_text()
    assert code == 0, f"ablate.py failed:\n{output[-6000:]}"
    return base / "runs" / "micro_ladder"


def run_layout(ladder_dir: Path, rung: str, seed: int) -> RunLayout:
    """Where a run of the micro ladder lives, as jobs/ablate.py lays it out (`rung_config`)."""
    ladder = load_ladder(ladder_dir.parents[1] / "ladder.yaml", None, None)
    return RunLayout.of(rung_config(ladder, rung, seed, [f"storage_path={ladder_dir.parent}"]))


@pytest.mark.slow
def test_rungs_share_records_and_seeds_differ(micro_ladder):
    layouts = {(rung, seed): run_layout(micro_ladder, rung, seed) for rung in ("mask_progressive", "full") for seed in (0, 1)}
    stages = sorted(layouts["full", 0].stages.glob("*/*"))
    # 2 stages x 2 seeds, each generated once and trained on by both rungs (4 records, 8 stage trainings).
    assert len(stages) == 4, stages
    for layout in layouts.values():
        assert json.loads(layout.state_file.read_text())["completed"] == ["teacher-l/0", "teacher-l/1"]

    # The seeds sample different responses: the first stage's records of seed 0 and seed 1 differ.
    first = stage_records_dir(layouts["full", 0].records_root, "teacher-l", 0, "*")
    first_stage = sorted(first.parent.glob(first.name))
    assert len(first_stage) == 2
    texts = [sorted(map(str, read_parts(d, ["question_id", "responses"]).to_pylist())) for d in first_stage]
    assert texts[0] != texts[1]
    students = [load_file(layouts["mask_progressive", seed].student / "model.safetensors") for seed in (0, 1)]
    assert any(not torch.equal(students[0][name], students[1][name]) for name in students[0])


@pytest.mark.slow
def test_summary_intervals_come_from_the_seeds(micro_ladder):
    summary = json.loads((micro_ladder / "summary.json").read_text())
    assert set(summary["results"]) == {"initial", "mask_progressive", "full"}
    for rung, by_seed in summary["results"].items():
        values = [by_seed[seed]["overall"] for seed in ("0", "1")]
        if rung != "initial":  # each seed's value is that run's own final evaluation
            finals = [json.loads(run_layout(micro_ladder, rung, seed).final_test.read_text()) for seed in (0, 1)]
            assert values == [final["final student"]["accuracy"] for final in finals]
        row = summary["summary"][rung]["overall"]
        assert row["values"] == values
        assert row["mean"] == pytest.approx(statistics.fmean(values))
        assert row["half_width"] == pytest.approx(12.706 * statistics.stdev(values) / math.sqrt(2))
    initial = summary["reference"]["initial student"]["overall"]
    assert summary["summary"]["initial"]["overall"] == {"mean": initial, "half_width": 0.0, "values": [initial, initial]}
    assert "| mask_progressive | 2 |" in (micro_ladder / "summary.md").read_text()
    # The full objective's diagnostics come from its runs' logged steps; the JSD-only rung has none.
    assert summary["diagnostics"]["mask_progressive"]["0"] == {}
    full = summary["diagnostics"]["full"]["0"]
    assert full["grad_norm_grpo"] > 0 and full["grad_norm_jsd"] > 0 and 0 <= full["opposed_share"] <= 1
    assert (micro_ladder / "summary.png").read_bytes().startswith(b"\x89PNG")


def test_run_diagnostics_average_the_logged_steps():
    steps = [
        {"step": 1, "loss": 1.0},
        {"step": 2, "grad_norm_grpo": 2.0, "grad_norm_jsd": 1.0, "grad_cosine_grpo_jsd": -0.5, "distill_reward_length_corr": 0.2},
        {"step": 3, "grad_norm_grpo": 4.0, "grad_norm_jsd": 3.0, "grad_cosine_grpo_jsd": 0.1, "distill_reward_length_corr": 0.4},
    ]
    assert run_diagnostics(steps) == pytest.approx(
        {"grad_norm_grpo": 3.0, "grad_norm_jsd": 2.0, "grad_cosine_grpo_jsd": -0.2, "distill_reward_length_corr": 0.3, "opposed_share": 0.5}
    )
    assert run_diagnostics([{"step": 1, "loss": 1.0}]) == {}
