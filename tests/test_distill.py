"""End-to-end tests of the driver `jobs/distill.py`.

Fast: argument and config errors, `--dry-run` and `--print-config`, none of which may start Ray.
Slow (CI runs them): the micro run submitted with `ray job submit` to a real `ray start` cluster,
its artifacts, a resubmission that trains nothing again, and a driver killed with SIGKILL in the
middle of a stage that, restarted, ends with the same student as the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from local_cluster import RUN_TIMEOUT_S, local_cluster, start_worker_node, submit
from ray_processes import VENV_BIN, free_ports, kill_strays, run_environment

from masters.config import MastersConfig, load_config
from masters.curriculum import Stage, plan_curriculum
from masters.run_layout import STAGE_STUDENT, RunLayout, stage_records_dir
from masters.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
DISTILL = ROOT / "jobs" / "distill.py"
MICRO = "configs/micro.yaml"


def load_driver():
    spec = importlib.util.spec_from_file_location("distill_driver", DISTILL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def driver():
    return load_driver()


@pytest.fixture
def no_ray_init(monkeypatch):
    """Fail loudly if the driver tries to start or join a Ray cluster."""
    import ray

    calls = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("the driver started Ray")

    monkeypatch.setattr(ray, "init", refuse)
    was_initialized = ray.is_initialized()
    yield calls
    assert not calls
    assert ray.is_initialized() == was_initialized  # another module's session may be up; we never start one


# --------------------------------------------------------------------------- fast: nothing starts


def test_dry_run_prints_plan_and_resources(driver, no_ray_init, capsys):
    assert driver.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    config = load_config(driver.EMBEDDED_DEFAULT)
    plan = plan_curriculum(config, config.data.train_size)
    assert f"{len(plan)} stages, {sum(s.optimizer_steps for s in plan)} optimizer steps" in out
    for stage in plan:
        assert stage.stage_id in out and stage.model_id in out
    for part in ("teacher service (transformers)", "reward actors", "trainer (ddp)"):
        assert part in out


def test_dry_run_of_micro_config(driver, no_ray_init, capsys):
    assert driver.main(["--config", str(ROOT / MICRO), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 stages, 8 optimizer steps" in out  # 2 teachers x 2 mask levels, 4 questions = 2 updates per stage
    assert "teacher-m@0.05" in out and "teacher-l@0" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--set", "train.lr=-1"], "train.lr"),
        (["--set", "train.lrr=1e-4"], "train.lrr: unknown field"),
        (["--set", "mask.mask_step=0.07"], "mask.mask_step"),
        (["--set", "trainlr"], "section.field=value"),
    ],
    ids=["negative-lr", "unknown-field", "step-not-dividing", "malformed"],
)
def test_bad_override_exits_2_naming_the_field(driver, no_ray_init, capsys, argv, expected):
    assert driver.main([*argv, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert expected in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("train:\n  lr: -1\n", "train.lr"),
        ("serve:\n  engine: sglang\n", "serve.engine"),
        ("train: [1, 2\n", "is not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
        (None, "does not exist"),
    ],
    ids=["bad-value", "bad-literal", "bad-yaml", "not-a-mapping", "missing-file"],
)
def test_bad_config_file_exits_2_naming_the_problem(driver, no_ray_init, capsys, tmp_path, content, expected):
    path = tmp_path / "run.yaml"
    if content is not None:
        path.write_text(content)
    # Not a dry run: validation must stop the driver before any run directory or Ray.
    assert driver.main(["--config", str(path), "--set", f"storage_path={tmp_path / 'runs'}"]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_run_kept_with_another_config_exits_2_before_ray(driver, no_ray_init, capsys, tmp_path):
    argv = ["--config", str(ROOT / MICRO), "--set", f"storage_path={tmp_path}"]
    layout = RunLayout.of(load_config(ROOT / MICRO, argv[-1:]))
    layout.root.mkdir(parents=True)
    layout.config_file.write_text("name: an earlier run\n")
    assert driver.main(argv) == 2
    err = capsys.readouterr().err
    assert f"run 'micro' exists in {layout.root} with another config" in err and "--set name=<new>" in err
    assert layout.config_file.read_text() == "name: an earlier run\n"


@pytest.mark.parametrize("argv", [[], ["--config", MICRO, "--set", "train.lr=3e-4", "--set", "name=tuned"]])
def test_print_config_round_trips(driver, no_ray_init, capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(ROOT)
    assert driver.main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert isinstance(yaml.safe_load(printed), dict)
    (tmp_path / "printed.yaml").write_text(printed)
    expected = load_config(argv[1] if argv else driver.EMBEDDED_DEFAULT, [a for a in argv[2:] if a != "--set"])
    assert load_config(tmp_path / "printed.yaml") == expected


def test_the_embedded_default_is_the_method_on_the_zoo_with_a_tiny_model_learning_rate():
    embedded = load_config(ROOT / "configs" / "default.yaml")
    method = MastersConfig()
    assert embedded.train.lr > method.train.lr  # 1e-6 leaves a 0.4M student unchanged in a few hundred updates
    assert embedded.train.epochs == 2 and embedded.generation.sampling.max_new_tokens == 48  # rationale, then answer
    # Nothing else differs from the method's defaults.
    assert embedded.train.model_copy(update={"lr": method.train.lr, "epochs": 1}) == method.train
    assert embedded.generation.sampling.model_copy(update={"max_new_tokens": 16}) == method.generation.sampling
    assert embedded.model_copy(update={"train": method.train, "generation": method.generation}) == method


def is_run_config(path: Path) -> bool:
    """Zoo configs (jobs/build_zoo.py) live in configs/zoo/, ablation ladders (jobs/ablate.py) hold `rungs`;
    everything else in configs/ is a run config."""
    relative = path.relative_to(ROOT / "configs")
    return relative.parts[0] != "zoo" and "rungs" not in yaml.safe_load(path.read_text())


RUN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if is_run_config(p))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in RUN_CONFIGS])
def test_dry_run_accepts_every_shipped_config(driver, no_ray_init, capsys, path):
    # An ablation is an override of the embedded default, run layered on it.
    layers = [str(driver.EMBEDDED_DEFAULT)] if path.parent.name == "ablations" else []
    assert driver.main([arg for layer in [*layers, str(path)] for arg in ("--config", layer)] + ["--dry-run"]) == 0
    assert "optimizer steps" in capsys.readouterr().out


# --------------------------------------------------------------------------- slow: real runs


def driver_args(base: Path, name: str, serve_port: int) -> list[str]:
    return [
        "jobs/distill.py", "--config", MICRO,
        "--set", f"storage_path={base / 'runs'}", "--set", f"models.zoo_dir={base / 'zoo'}",
        "--set", f"name={name}", "--set", f"serve.port={serve_port}",
    ]  # fmt: skip


def mtimes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*"))}


def planned_stage_ids(layout: RunLayout) -> list[str]:
    return [Stage.from_dict(stage).stage_id for stage in json.loads(layout.plan_file.read_text())]


def trained_files(layout: RunLayout) -> dict[str, int]:
    """Modification times of everything the trainer wrote: checkpoints and published stages."""
    published = {sid: mtimes(layout.stage_output(sid)) for sid in planned_stage_ids(layout)}
    return {"ray_train": mtimes(layout.train_storage), **published}


@dataclass
class SubmittedRun:
    layout: RunLayout
    base: Path
    first_seconds: float
    rerun_seconds: float
    stages_before_rerun: list[dict]
    checkpoints_before_rerun: dict[str, int]
    stage_files_before_rerun: dict[str, int]


@pytest.fixture(scope="module")
def submitted_run(tmp_path_factory) -> SubmittedRun:
    """The micro run submitted twice to one `ray start` cluster; the cluster is gone when this returns."""
    base = tmp_path_factory.mktemp("distill")
    layout = RunLayout(base / "runs", "micro")
    with local_cluster(base / "ray_start.log") as cluster:
        args = driver_args(base, layout.name, free_ports(1)[0])
        first_seconds = submit(cluster, args, base / "submit_1.log")
        stages_before = read_metrics(layout.metrics_file, "stage")
        checkpoints_before = trained_files(layout)
        stage_files_before = mtimes(layout.stages)
        rerun_seconds = submit(cluster, args, base / "submit_2.log")
    print(f"\nmicro run via `ray job submit`: {first_seconds:.0f}s; resubmitted: {rerun_seconds:.0f}s")
    return SubmittedRun(layout, base, first_seconds, rerun_seconds, stages_before, checkpoints_before, stage_files_before)


@pytest.mark.slow
def test_submitted_job_writes_a_complete_run(submitted_run):
    layout = submitted_run.layout
    stage_ids = planned_stage_ids(layout)
    assert len(stage_ids) == 4
    assert json.loads(layout.state_file.read_text())["completed"] == stage_ids
    assert [record["stage_id"] for record in submitted_run.stages_before_rerun] == stage_ids
    assert load_config(layout.config_file).name == "micro"

    report = layout.report_file.read_text()
    for name in ("families.png", "stages.png", "mask_schedule.png"):
        assert (layout.report_file.parent / name).read_bytes().startswith(b"\x89PNG"), name
        assert f"]({name})" in report
    for stage_id in stage_ids:
        assert f"| {stage_id} |" in report
    assert "final student" in report and "initial student" in report


@pytest.mark.slow
def test_submitted_student_loads_and_generates(submitted_run):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    student_dir = submitted_run.layout.student
    model = AutoModelForImageTextToText.from_pretrained(student_dir).eval()
    processor = AutoProcessor.from_pretrained(student_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "What color is the shape?" in prompt
    size = processor.image_processor.crop_size["height"] if processor.image_processor.crop_size else 32
    inputs = processor(images=[Image.new("RGB", (size, size), "red")], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
def test_resubmitted_job_trains_nothing_again(submitted_run):
    layout = submitted_run.layout
    assert read_metrics(layout.metrics_file, "stage") == submitted_run.stages_before_rerun
    assert trained_files(layout) == submitted_run.checkpoints_before_rerun
    assert mtimes(layout.stages) == submitted_run.stage_files_before_rerun
    assert (layout.student / "model.safetensors").exists()


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@pytest.mark.slow
def test_driver_killed_mid_stage_resumes_to_the_same_student(submitted_run):
    """SIGKILL while the second stage trains (the first is complete and the trainer has checkpointed
    the second stage's first update; the third's generation runs alongside), then rerun: the student
    must match the uninterrupted run's (bit for bit while the stage records match, within a pinned
    tolerance after)."""
    base = submitted_run.base
    layout = RunLayout(base / "runs", "killed")
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="ray-kill-", dir="/tmp"))
    env = run_environment(ray_tmpdir)
    # Run from `base` with a relative storage_path, as `python jobs/distill.py` runs by default: every
    # path the driver hands to Ray workers (whose working directory differs) must survive that.
    command = [
        sys.executable, str(ROOT / "jobs" / "distill.py"), "--config", str(ROOT / MICRO),
        "--set", "storage_path=runs", "--set", f"models.zoo_dir={base / 'zoo'}",
        "--set", f"models.zoo_config={ROOT / 'configs' / 'zoo' / 'micro.yaml'}",
        "--set", f"name={layout.name}", "--set", f"serve.port={free_ports(1)[0]}",
    ]  # fmt: skip
    stage_ids = None
    try:
        with (base / "killed_1.log").open("w") as log:
            driver = subprocess.Popen(command, cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)  # fmt: skip
            try:
                deadline = time.monotonic() + RUN_TIMEOUT_S
                while time.monotonic() < deadline and driver.poll() is None:
                    stage_ids = stage_ids or (layout.plan_file.exists() and planned_stage_ids(layout))
                    state = read_json(layout.state_file) or {"completed": []}
                    # The trainer's periodic checkpoint after the second stage's first update.
                    if stage_ids and state["completed"] and layout.train_checkpoint(stage_ids[1], 1).exists():
                        break
                    time.sleep(0.2)
                log_tail = (base / "killed_1.log").read_text()[-4000:]
                assert driver.poll() is None, f"the driver ended before the kill:\n{log_tail}"
                assert time.monotonic() < deadline, "the second stage never started"
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
                strays = kill_strays(ray_tmpdir)
        print(f"\nkilled the driver mid-stage; Ray processes still alive 10 s later (then killed): {strays}")

        # Killed inside stage 2: its last update and publication may have won the race, nothing later.
        completed = read_json(layout.state_file)["completed"]
        assert completed in (stage_ids[:1], stage_ids[:2]), completed
        assert not layout.student.exists()

        started = time.perf_counter()
        with (base / "killed_2.log").open("w") as log:
            result = subprocess.run(command, cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=RUN_TIMEOUT_S, start_new_session=True)  # fmt: skip
        print(f"resumed run: {time.perf_counter() - started:.0f}s")
        assert result.returncode == 0, (base / "killed_2.log").read_text()[-6000:]
    finally:
        kill_strays(ray_tmpdir)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)

    assert read_json(layout.state_file)["completed"] == stage_ids
    assert [r["stage_id"] for r in read_metrics(layout.metrics_file, "stage")] == stage_ids  # stage 1 was not redone

    # Training is bit-deterministic given a stage's records, so every checkpoint up to the first stage
    # whose records differ must be identical. Records do differ between two runs: Ray Serve batches
    # requests by arrival time, the batch changes float rounding, and the teacher log-probs move by
    # ~1e-6 (sometimes a sampled token flips). Adam's first steps normalise tiny gradients to about
    # ±lr, so a few weights then differ by up to 2·lr per step, while a stage skipped or trained twice
    # moves nearly all of them (measured: 0.3% vs 94% of the weights off by more than lr/2).
    reference = submitted_run.layout
    same_records = [stage_records_equal(reference, layout, stage_id) for stage_id in stage_ids]
    diverged = same_records.index(False) if False in same_records else len(stage_ids)
    for stage_id in stage_ids[:diverged]:
        published = [run.stage_output(stage_id) / STAGE_STUDENT for run in (reference, layout)]
        assert max_abs_diff(*published) == 0.0, stage_id
    config = load_config(layout.config_file)
    max_diff = max_abs_diff(layout.student, reference.student)
    moved = fraction_differing(layout.student, reference.student, config.train.lr / 2)
    print(f"stages with bit-identical records: {stage_ids[:diverged]}; max |resumed - uninterrupted| = "
          f"{max_diff:.3g}; weights off by > lr/2: {100 * moved:.2f}%")  # fmt: skip
    plan = plan_curriculum(config, config.data.train_size)
    assert max_diff <= 2 * config.train.lr * sum(stage.optimizer_steps for stage in plan[diverged:]) * (1 + 1e-3)
    assert moved <= 0.02


def max_abs_diff(model_a: Path, model_b: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(model_a / "model.safetensors"), load_file(model_b / "model.safetensors")
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def fraction_differing(model_a: Path, model_b: Path, threshold: float) -> float:
    from safetensors.torch import load_file

    a, b = load_file(model_a / "model.safetensors"), load_file(model_b / "model.safetensors")
    differing = sum(int(((a[k].double() - b[k].double()).abs() > threshold).sum()) for k in a)
    return differing / sum(tensor.numel() for tensor in a.values())


def stage_records_equal(run_a: RunLayout, run_b: RunLayout, stage_id: str) -> bool:
    import pyarrow.parquet as pq

    def rows(layout: RunLayout) -> list[dict]:
        (stage,) = [Stage.from_dict(s) for s in json.loads(layout.plan_file.read_text()) if Stage.from_dict(s).stage_id == stage_id]
        pattern = stage_records_dir(layout.records_root, stage.teacher, stage.teacher_stage, "*")
        (directory,) = pattern.parent.glob(pattern.name)  # one record per stage in a run's own store
        parts = sorted(directory.glob("*.parquet"))
        return sorted((row for part in parts for row in pq.read_table(part).to_pylist()), key=lambda r: r["question_id"])

    return rows(run_a) == rows(run_b)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["qwen2_5_vl", "internvl"])
def test_micro_run_of_a_real_family_saves_a_student_transformers_loads(architecture, tmp_path):
    """The whole method (Serve, Ray Data, Ray Train, HF save) with teachers and student of a real family's
    architecture: the micro zoo built as that family, run by `python jobs/distill.py`."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from masters.tiny_vlms import MODEL_CLASSES
    from masters.zoo import load_zoo_config, resolve_model

    ray_tmpdir = Path(tempfile.mkdtemp(prefix=f"ray-{architecture}-", dir="/tmp"))
    command = [
        sys.executable, str(ROOT / "jobs" / "distill.py"), "--config", str(ROOT / MICRO),
        "--set", f"models.zoo_config={ROOT / 'configs' / 'zoo' / f'micro_{architecture}.yaml'}",
        "--set", f"storage_path={tmp_path / 'runs'}", "--set", f"models.zoo_dir={tmp_path / 'zoo'}",
        "--set", f"name={architecture}", "--set", f"serve.port={free_ports(1)[0]}",
    ]  # fmt: skip
    try:
        with (tmp_path / "run.log").open("w") as log:
            result = subprocess.run(command, cwd=tmp_path, env=run_environment(ray_tmpdir), stdout=log,
                                    stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S, start_new_session=True)  # fmt: skip
    finally:
        kill_strays(ray_tmpdir)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    assert result.returncode == 0, (tmp_path / "run.log").read_text()[-6000:]

    layout = RunLayout(tmp_path / "runs", architecture)
    assert len(read_json(layout.state_file)["completed"]) == 4
    student = AutoModelForImageTextToText.from_pretrained(layout.student)
    assert type(student) is MODEL_CLASSES[architecture]
    processor = AutoProcessor.from_pretrained(layout.student)
    assert type(processor).__name__ == {"qwen2_5_vl": "Qwen2_5_VLProcessor", "internvl": "InternVLProcessor"}[architecture]
    zoo_config = load_zoo_config(ROOT / "configs" / "zoo" / f"micro_{architecture}.yaml")
    initial = AutoModelForImageTextToText.from_pretrained(resolve_model("zoo:student", tmp_path / "zoo", zoo_config))
    moved = [name for (name, a), b in zip(student.named_parameters(), initial.parameters()) if not torch.equal(a, b)]
    assert moved, "training did not change the student"


@pytest.mark.slow
def test_submitted_job_with_relative_paths_fails_before_start_on_two_nodes(tmp_path):
    """The README's submit with the default relative paths, on a head + worker cluster: the job stops at the
    config check, naming each relative field and the fix, before any Ray resource or file is made."""
    with local_cluster(tmp_path / "ray_start.log") as cluster:
        worker = start_worker_node(cluster, tmp_path / "ray_worker.log")
        try:
            command = [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url,
                       "--working-dir", str(ROOT), "--", "python", "jobs/distill.py", "--config", MICRO]  # fmt: skip
            for _ in range(3):
                result = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
                if "No available agent to submit job" not in result.stdout + result.stderr:
                    break
                time.sleep(5)
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "failed" in output, output[-4000:]
    assert "storage_path='runs'" in output and "models.zoo_dir='.cache/zoo'" in output, output[-4000:]
    assert "--set storage_path=/mnt/runs" in output
    assert "teacher service" not in output and "building zoo" not in output  # stopped before anything started
