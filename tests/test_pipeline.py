"""The generation and reward pipeline: the judge over HTTP, Serve handles vs HTTP, full stages on the
micro model, skip/redo, judge failure policies, the naive baseline and a reward actor killed mid-stage.

One Serve instance serves the module: the teacher service (micro model as teacher and student) and a
scripted OpenAI-style judge whose model id picks its behaviour.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster.judge import JudgeClient, JudgeError
from cluster.pipeline import StageFailedError, run_stage, run_stages, stage_config_hash, stage_records
from cluster.responses import ServiceAddress
from cluster.stage_store import MANIFEST, read_parts
from jobs import inspect_stage
from masters.config import validate_config
from masters.curriculum import plan_curriculum
from masters.data import make_split
from masters.data.source import QuestionIndex
from masters.records import table_to_records
from masters.run_layout import stage_records_dir
from serve.levels import APP_NAME, model_handle

pytestmark = pytest.mark.timeout(300)

TEACHER = "teacher-micro"
QUESTIONS = 12
JUDGE_ROUTE = "/scripted-judge"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _scripted_judge():
    """An OpenAI-style chat route whose replies follow a script named by the request's `model`.

    good: reasons, then `<answer>1</answer>` when the response equals the ground truth, else 0.
    bare: an unreadable first reply; the follow-up gets a bare "1".
    flaky: every conversation's first request gets a 503, the retry is answered like `good`.
    broken: always HTTP 500.
    mute: never a readable score, not even on the follow-up.
    rejects: HTTP 400 (a client error: not retried).
    breaks-on:<answer>: like `good`, but HTTP 500 whenever the ground truth is <answer>.
    slow: like `good` after 50 ms (lets a test act while a stage is in flight).
    """
    import asyncio
    import re

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    app = FastAPI()

    def tag(text: str, name: str) -> str:
        return re.search(rf"<{name}>\n(.*?)\n</{name}>", text, re.DOTALL).group(1)

    def completion(text: str) -> JSONResponse:
        return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    @serve.ingress(app)
    class ScriptedJudge:
        def __init__(self):
            self.seen: set[str] = set()
            self.requests = 0

        @app.get("/requests")
        async def count(self) -> JSONResponse:
            return JSONResponse({"requests": self.requests})

        @app.post("/v1/chat/completions")
        async def chat(self, request: Request) -> JSONResponse:
            self.requests += 1
            body = await request.json()
            script, messages = body["model"], body["messages"]
            prompt = messages[1]["content"]
            truth, response = tag(prompt, "ground_truth"), tag(prompt, "response")
            verdict = f"Compared the two. <answer>{int(truth.strip().lower() == response.strip().lower())}</answer>"
            follow_up = len(messages) > 2
            if script == "good":
                return completion(verdict)
            if script == "slow":
                await asyncio.sleep(0.05)
                return completion(verdict)
            if script == "bare":
                return completion("1" if follow_up else "It looks right to me.")
            if script == "flaky":
                key = json.dumps(messages)
                if key not in self.seen:
                    self.seen.add(key)
                    return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
                return completion(verdict)
            if script == "broken":
                return JSONResponse({"error": {"message": "internal"}}, status_code=500)
            if script == "mute":
                return completion("I cannot decide.")
            if script == "rejects":
                return JSONResponse({"error": {"message": "no such model"}}, status_code=400)
            if script.startswith("breaks-on:"):
                if truth.strip() == script.removeprefix("breaks-on:"):
                    return JSONResponse({"error": {"message": "internal"}}, status_code=500)
                return completion(verdict)
            raise AssertionError(f"unknown script {script}")

    return ScriptedJudge.bind()


def _config(tmp_path, port: int, model_dir, **sections):
    raw = {
        "name": "pipe",
        "storage_path": str(tmp_path),
        "models": {"teachers": [{"name": TEACHER, "model": str(model_dir)}], "student": str(model_dir)},
        "mask": {"max_mask_ratio": 0.05, "mask_step": 0.05},
        "generation": {
            "group_teacher": 2,
            "group_student": 2,
            "teacher_topk": 8,
            "sampling": {"max_new_tokens": 5},
        },
        "rewards": {"actors": 1, "batch_size": 3, "actor_num_cpus": 0.25},
        # Two replicas per model: test_a_level_in_use_spreads_over_both_replicas needs them.
        "serve": {"port": port, "replicas": 2, "num_cpus": 0.2, "max_batch_size": 8},
        "data": {"train_size": QUESTIONS},
    }
    for section, values in sections.items():
        raw[section] = {**raw[section], **values} if isinstance(values, dict) and section in raw else values
    return validate_config(raw)


@pytest.fixture(scope="module")
def service(ray_session, micro_model_dir, tmp_path_factory):
    """The teacher service and the scripted judge on one Serve instance, for the whole module."""
    from ray import serve

    from masters.models import load_model
    from serve.app import start

    port = _free_port()
    config = _config(tmp_path_factory.mktemp("unused"), port, micro_model_dir)
    try:
        start(config, {TEACHER: micro_model_dir, "student": micro_model_dir})
        serve.run(_scripted_judge(), name="scripted-judge", route_prefix=JUDGE_ROUTE)
        _, processor = load_model(micro_model_dir)
        yield {"port": port, "model_dir": micro_model_dir, "processor": processor}
    finally:
        serve.shutdown()


def _judge_url(port: int) -> str:
    return f"http://127.0.0.1:{port}{JUDGE_ROUTE}/v1"


def _stage_inputs(config):
    """The plan, the train split's index (the pipeline reads the questions) and its samples (what tests expect)."""
    plan = plan_curriculum(config, config.data.train_size)
    questions = QuestionIndex.open(config.data, "train", config.data.train_size, config.storage_path)
    train = make_split("train", config.data.train_size, config.data.seed)
    return plan, questions, train


def _batches_per_replica(model: str) -> dict[str, int]:
    """Engine batches run by each replica of `model`, from its health reports (each call reaches one replica)."""
    from ray import serve

    handle = serve.get_deployment_handle(model, app_name=APP_NAME)
    batches = {}
    for _ in range(40):
        state = handle.health.remote().result()
        batches[state["replica"]] = state["batches"]
        if len(batches) == 2:
            break
    return batches


def _directory_state(directory):
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in sorted(directory.iterdir())}


# --------------------------------------------------------------------------- the judge over HTTP


def test_worker_code_imports_neither_torch_nor_transformers_nor_serve():
    """Every sampling task and reward actor imports `cluster.responses` in a fresh process; torch and
    transformers there cost ~9 s of CPU per process, which on two cores made the pipeline 2x slower,
    and `ray.serve` ~0.65 s, which only the workers that reach the service pay (on their first call)."""
    heavy = subprocess.run(
        [sys.executable, "-c",
         "import sys, cluster.responses; print([m for m in ('torch', 'transformers', 'ray.serve') if m in sys.modules])"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert heavy == "[]", f"importing cluster.responses pulled in {heavy}"


def test_judge_client_follows_the_scripts(service):
    judge = lambda script, retries=2: JudgeClient(  # noqa: E731
        _judge_url(service["port"]), script, timeout_s=10, max_retries=retries, backoff_s=0.01
    )
    good = judge("good").score("How many circles?", "3", "3")
    assert (good.score, good.calls, good.retries) == (1, 1, 0)
    assert judge("good").score("How many circles?", "3", "4").score == 0

    bare = judge("bare").score("Is there a square?", "yes", "yes")
    assert (bare.score, bare.calls, bare.retries) == (1, 2, 0)  # the second call asks for a bare digit

    flaky = judge("flaky").score("What colour?", "red", "blue")
    assert (flaky.score, flaky.calls, flaky.retries) == (0, 2, 1)  # 503, then answered

    with pytest.raises(JudgeError, match="failed 3 times") as broken:
        judge("broken").score("q", "a", "a")
    assert (broken.value.calls, broken.value.retries) == (3, 2)

    with pytest.raises(JudgeError, match="no readable score twice") as mute:
        judge("mute").score("q", "a", "a")
    assert (mute.value.calls, mute.value.retries) == (2, 0)

    with pytest.raises(JudgeError, match="rejected the request with HTTP 400") as rejected:
        judge("rejects").score("q", "a", "a")
    assert rejected.value.calls == 1  # client errors are not retried


def test_judge_client_retries_timeouts():
    # A socket that accepts connections and never answers: every request times out.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        judge = JudgeClient(f"http://127.0.0.1:{port}/v1", "any", timeout_s=0.2, max_retries=1, backoff_s=0.01)
        with pytest.raises(JudgeError, match="ReadTimeout") as timed_out:
            judge.score("q", "a", "a")
    assert (timed_out.value.calls, timed_out.value.retries) == (2, 1)


# --------------------------------------------------------------------------- reaching the teacher


def test_a_level_in_use_spreads_over_both_replicas(service, tmp_path):
    """A level one replica already holds still goes to both replicas under load. With the level as a
    Serve multiplexed model id it did not: the router kept it on the replica holding it, and a whole
    pipeline stage ran on one of two replicas. Level 0 is fresh here: no earlier test asks for it."""
    from cluster.responses import image_messages
    from masters.data.export import png_bytes
    from serve.api import ChatCompletionRequest

    config = _config(tmp_path, service["port"], service["model_dir"])
    handle = model_handle(config, f"{TEACHER}@0")
    sample = make_split("train", 1, 0)[0]
    request = ChatCompletionRequest(
        model=f"{TEACHER}@0", messages=image_messages(png_bytes(sample.image), sample.question), n=1, seed=1, max_tokens=2
    )
    handle.generate.remote(request).result(timeout_s=60)  # one replica now holds level 0
    time.sleep(2)  # long enough for every router to learn which one
    before = _batches_per_replica(TEACHER)
    # Waves, not one burst: a router learns a replica's queue length in the background, and a burst
    # sent before it knows the second replica's goes to the first one whatever the routing policy.
    for wave in range(4):
        pending = [handle.generate.remote(request.model_copy(update={"seed": 6 * wave + i})) for i in range(6)]
        for response in pending:
            response.result(timeout_s=60)
    after = _batches_per_replica(TEACHER)
    assert len(before) == len(after) == 2
    assert all(after[replica] > before[replica] for replica in after), (before, after)


def test_http_and_serve_handles_give_the_same_samples_and_scores(service, tmp_path):
    from cluster.responses import image_messages
    from masters.data.export import png_bytes
    from serve.api import ChatCompletionRequest, ScoreRequest

    config = _config(tmp_path, service["port"], service["model_dir"])
    sample = make_split("train", 1, 0)[0]
    messages = image_messages(png_bytes(sample.image), sample.question)
    chat = ChatCompletionRequest(model=f"{TEACHER}@0.05", messages=messages, n=2, seed=7, max_tokens=4)
    by_handle = ServiceAddress().connect(config)
    over_http = ServiceAddress(http_url=f"http://127.0.0.1:{service['port']}/v1").connect(config)
    (sampled,) = by_handle.chat_many([chat])
    (sampled_http,) = over_http.chat_many([chat])
    assert sampled.token_ids == sampled_http.token_ids and sampled.texts == sampled_http.texts
    items = [{"messages": messages, "response_token_ids": token_ids} for token_ids in sampled.token_ids]
    score = ScoreRequest(model=f"{TEACHER}@0.05", items=items, top_logprobs=4)
    (scored,) = by_handle.score_many([score])
    (scored_http,) = over_http.score_many([score])
    assert all(by_handle == by_http for by_handle, by_http in zip(scored, scored_http, strict=True))
    assert [d.top_ids.shape for d in scored] == [(len(token_ids), 4) for token_ids in sampled.token_ids]


# --------------------------------------------------------------------------- full stages


def test_stage_on_the_micro_model_then_skip_and_redo(service, tmp_path, capsys):
    config = _config(tmp_path, service["port"], service["model_dir"])
    plan, questions, train = _stage_inputs(config)
    address = ServiceAddress()  # in-cluster Serve handles
    run_dir = tmp_path / "pipe"

    stage = plan[0]
    result = run_stage(config, stage, questions, run_dir, address, service["model_dir"])
    assert not result.skipped
    train_ids = [sample.id for sample in train]
    assert result.directory == stage_records(config, stage, train_ids, run_dir)[1]
    assert result.directory == stage_records_dir(run_dir, TEACHER, 0, result.manifest["config_hash"])
    records = table_to_records(read_parts(result.directory))
    assert sorted(r.question_id for r in records) == sorted(train[i].id for i in stage.question_indices)
    samples = {sample.id: sample for sample in train}
    for record in records:
        assert (record.teacher, record.mask_ratio, record.stage_index) == (TEACHER, pytest.approx(0.05), 0)
        sample = samples[record.question_id]  # read from the suite's Parquet file as generated
        assert (record.family, record.question, record.answer) == (sample.family, sample.question, sample.answer)
        assert [r.source for r in record.responses] == ["teacher", "teacher", "student", "student"]
        for response in record.responses:
            assert 1 <= len(response.token_ids) <= 5
            assert len(response.teacher_topk_ids) == len(response.token_ids)
            assert all(len(row) == 8 for row in response.teacher_topk_ids + response.teacher_topk_logprobs)
            assert all(lp <= 0 for row in response.teacher_topk_logprobs for lp in row)
            assert all(row == sorted(row, reverse=True) for row in response.teacher_topk_logprobs)
            assert all(-1e-4 <= tail <= 1 for tail in response.teacher_tail_mass)
            assert response.accuracy_reward in (0.0, 1.0)
    manifest = json.loads((result.directory / MANIFEST).read_text())
    assert manifest["counts"]["records"] == len(stage.question_indices)
    assert manifest["counts"]["responses_by_source"] == {"teacher": 2 * len(records), "student": 2 * len(records)}
    assert manifest["counts"]["scored_after_sampling"] == 0  # the teacher scored the group as it sampled
    assert manifest["counts"]["dropped_groups"] == 0 and manifest["judge"]["kind"] == "rule"
    assert manifest["schema_version"] == 2 and manifest["files"]

    # What a person sees: counts, histograms, sample groups, and the PNG.
    inspect_stage.main([str(result.directory), "--samples", "1", "--png", str(tmp_path / "stage.png")])
    shown = capsys.readouterr().out
    assert f"questions {len(records)}  records {len(records)}  dropped groups 0" in shown
    assert "R_acc (teacher)" in shown and "1 sample groups" in shown and (tmp_path / "stage.png").stat().st_size > 0

    # Rerun: the stage is found complete and left untouched.
    before = _directory_state(result.directory)
    again = run_stage(config, stage, questions, run_dir, address, service["model_dir"])
    assert again.skipped and _directory_state(result.directory) == before

    # A half-written stage: a crashed writer's temp sibling and a directory without a manifest.
    crashed = result.directory.parent / f".{result.directory.name}.abc123.tmp"
    crashed.mkdir()
    (crashed / "part-00000.parquet").write_bytes(b"half")
    (result.directory / MANIFEST).unlink()
    (result.directory / "part-00000.parquet").write_bytes(b"truncated")
    redone = run_stage(config, stage, questions, run_dir, address, service["model_dir"])
    assert not redone.skipped
    assert [p.name for p in result.directory.parent.iterdir()] == [result.directory.name]  # no temp leftovers
    assert len(table_to_records(read_parts(redone.directory))) == len(stage.question_indices)
    # Same seeds, same samples: the redone stage holds the same responses.
    by_question = lambda rs: {r.question_id: [response.token_ids for response in r.responses] for r in rs}  # noqa: E731
    assert by_question(table_to_records(read_parts(redone.directory))) == by_question(records)


def test_teacher_scores_recorded_while_sampling_equal_generate_then_score(service, tmp_path):
    """The teacher's top-k is recorded while it samples, and the student's responses are scored in the same
    request (one encoded prompt). The records mean what generate-then-score gave: the same teacher tokens as
    a plain request with the same seed, and the same top-k as a separate score pass (float32 records, to 1e-5)."""
    from cluster.responses import image_messages, request_seed
    from serve.api import ChatCompletionRequest, ScoreRequest

    config = _config(tmp_path, service["port"], service["model_dir"], generation={"teacher_logprobs_dtype": "float32"})
    plan, questions, _ = _stage_inputs(config)
    stage = plan[0]
    result = run_stage(config, stage, questions, tmp_path / "pipe", ServiceAddress(), service["model_dir"])
    records = table_to_records(read_parts(result.directory))
    # The reward actors had nothing left to score: the teacher's request scored the student's responses too.
    assert result.manifest["counts"]["scored_after_sampling"] == 0
    client, sampling = ServiceAddress().connect(config), config.generation.sampling
    plain = client.chat_many(
        [
            ChatCompletionRequest(
                model=stage.model_id,
                messages=image_messages(record.image_png, record.question),
                n=config.generation.group_teacher,
                seed=request_seed(config.generation.seed, stage.model_id, record.question_id),
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                repetition_penalty=sampling.repetition_penalty, max_tokens=sampling.max_new_tokens,
            )
            for record in records
        ]
    )  # fmt: skip
    rescored = client.score_many(
        [
            ScoreRequest(
                model=stage.model_id,
                items=[{"messages": image_messages(record.image_png, record.question), "response_token_ids": r.token_ids} for r in record.responses],
                top_logprobs=config.generation.teacher_topk,
            )
            for record in records
        ]
    )  # fmt: skip
    for record, reply, scores in zip(records, plain, rescored, strict=True):
        teacher = [r for r in record.responses if r.source == "teacher"]
        assert [r.token_ids for r in teacher] == reply.token_ids
        for response, score in zip(record.responses, scores, strict=True):
            assert response.teacher_topk_ids == score.top_ids.tolist()
            np.testing.assert_allclose(response.teacher_topk_logprobs, score.top_logprobs, atol=1e-5, rtol=0)
            np.testing.assert_allclose(response.teacher_tail_mass, score.tail_mass, atol=1e-5, rtol=0)


def test_all_stages_in_one_pipeline(service, tmp_path):
    """Both levels through one Ray Data execution: each stage lands in its own directory with exactly
    its questions at its own level and is reported once complete; a rerun skips both untouched."""
    config = _config(tmp_path, service["port"], service["model_dir"])
    plan, questions, train = _stage_inputs(config)
    assert [stage.mask_ratio for stage in plan] == [0.05, 0.0]
    run_dir, address = tmp_path / "pipe", ServiceAddress()

    reported = []
    results = run_stages(
        config, plan, questions, run_dir, address, service["model_dir"],
        on_stage_done=lambda stage, result: reported.append((stage.stage_id, result.skipped, result.directory.is_dir())),
    )  # fmt: skip
    assert sorted(reported) == [(stage.stage_id, False, True) for stage in plan]
    for stage, result in zip(plan, results):
        assert result.directory == stage_records(config, stage, [sample.id for sample in train], run_dir)[1]
        records = table_to_records(read_parts(result.directory))
        assert sorted(r.question_id for r in records) == sorted(train[i].id for i in stage.question_indices)
        assert all(r.mask_ratio == pytest.approx(stage.mask_ratio) and r.stage_index == stage.teacher_stage for r in records)
        assert result.manifest["model_id"] == stage.model_id
    teacher_stages = results[0].directory.parent
    assert sorted(teacher_stages.iterdir()) == sorted(result.directory for result in results)  # no temp leftovers

    before = [_directory_state(result.directory) for result in results]
    reported.clear()
    again = run_stages(config, plan, questions, run_dir, address, service["model_dir"],
                       on_stage_done=lambda stage, result: reported.append((stage.stage_id, result.skipped)))  # fmt: skip
    assert reported == [(stage.stage_id, True) for stage in plan] and all(result.skipped for result in again)
    assert [_directory_state(result.directory) for result in again] == before


def test_naive_objective_scores_dataset_answers_with_the_unmasked_teacher(service, tmp_path):
    config = _config(
        tmp_path, service["port"], service["model_dir"], loss={"objective": "naive"}, mask={"max_mask_ratio": 0.0}
    )
    plan, questions, train = _stage_inputs(config)
    (stage,) = plan
    # No sampling: the naive group is the dataset's reference response alone.
    result = run_stage(config, stage, questions, tmp_path / "pipe", ServiceAddress(), service["model_dir"])
    records = table_to_records(read_parts(result.directory))
    assert len(records) == QUESTIONS
    eos = service["processor"].tokenizer.eos_token_id
    references = {sample.id: sample.response for sample in train}
    for record in records:
        assert record.mask_ratio == 0.0
        (response,) = record.responses
        assert (response.source, response.text) == ("dataset", references[record.question_id])
        assert response.text.endswith(f"answer: {record.answer}") and response.accuracy_reward == 1.0
        assert response.token_ids[-1] == eos and len(response.teacher_topk_ids) == len(response.token_ids)
    assert result.manifest["model_id"] == f"{TEACHER}@0"


# --------------------------------------------------------------------------- judge failures in a stage


def _llm_config(tmp_path, service, script: str, on_failure: str, **sections):
    judge = {"kind": "llm", "endpoint": _judge_url(service["port"]), "model": script, "on_failure": on_failure}
    return _config(
        tmp_path,
        service["port"],
        service["model_dir"],
        rewards={"judge": {**judge, "max_retries": 1}},
        # Teacher-only groups: these tests need no student responses.
        generation={"group_student": 0},
        **sections,
    )


def test_judge_failures_drop_groups_or_fail_the_stage(service, tmp_path):
    plan, questions, train = _stage_inputs(_config(tmp_path, service["port"], service["model_dir"]))
    stage = plan[0]
    stage_samples = [train[i] for i in stage.question_indices]
    breaking_answer = stage_samples[0].answer
    broken = {s.id for s in stage_samples if s.answer == breaking_answer}
    assert len(broken) < len(stage_samples), "some groups must survive"
    config = _llm_config(tmp_path, service, f"breaks-on:{breaking_answer}", "drop_group")

    result = run_stage(config, stage, questions, tmp_path / "pipe", ServiceAddress(), service["model_dir"])
    kept = {r.question_id for r in table_to_records(read_parts(result.directory))}
    assert kept == {s.id for s in stage_samples} - broken
    manifest = result.manifest
    assert manifest["counts"]["dropped_groups"] == len(broken)
    assert {d["question_id"] for d in manifest["dropped"]} == broken
    assert all("failed 2 times" in d["reason"] for d in manifest["dropped"])
    assert manifest["judge"]["retries"] >= len(broken)  # each failed call was retried once

    failing = _llm_config(tmp_path, service, "broken", "fail_stage", name="pipe-fail")
    with pytest.raises(StageFailedError, match="on_failure=drop_group"):
        run_stage(failing, stage, questions, tmp_path / "pipe-fail", ServiceAddress(), service["model_dir"])
    teacher_stages = stage_records_dir(tmp_path / "pipe-fail", TEACHER, stage.teacher_stage, "-").parent
    assert not teacher_stages.exists() or list(teacher_stages.iterdir()) == []  # nothing half-written


# --------------------------------------------------------------------------- fault tolerance


def _reward_actor_pids() -> set[int]:
    """The processes of reward actors on this machine, by the title Ray gives an actor's process."""
    import psutil

    return {p.pid for p in psutil.process_iter(["cmdline"]) if "RewardScorer" in " ".join(p.info["cmdline"] or [])}


def _judge_requests(url: str) -> int:
    import httpx

    return httpx.get(url).json()["requests"]


def _kill_reward_actor_mid_stage(judge_requests_url: str, earlier: set, killed: list, stop: threading.Event) -> None:
    """Find this stage's reward actor process as soon as it exists, then SIGKILL it (a crash: Ray restarts
    the actor) once the judge has answered a few of its requests: the stage is mid-way."""
    start = _judge_requests(judge_requests_url)
    pid = None
    while not stop.is_set():
        if pid is None:
            pid = next(iter(_reward_actor_pids() - earlier), None)
        elif _judge_requests(judge_requests_url) >= start + 6:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.02)


def test_a_killed_reward_actor_loses_and_doubles_no_question(service, tmp_path):
    config = _llm_config(tmp_path, service, "slow", "fail_stage", data={"train_size": 40})
    config.rewards.batch_size = 2
    plan, questions, train = _stage_inputs(config)
    stage = plan[0]
    killed, stop = [], threading.Event()
    requests_url = f"http://127.0.0.1:{service['port']}{JUDGE_ROUTE}/requests"
    earlier = _reward_actor_pids()
    killer = threading.Thread(
        target=_kill_reward_actor_mid_stage,
        args=(requests_url, earlier, killed, stop),
        daemon=True,
    )
    killer.start()
    try:
        result = run_stage(config, stage, questions, tmp_path / "pipe", ServiceAddress(), service["model_dir"])
    finally:
        stop.set()
        killer.join()
    assert killed, "the reward actor was never killed: the stage finished before the judge got busy"
    ids = [qid for part in result.manifest["files"] for qid in
           pq.read_table(result.directory / part["name"], columns=["question_id"]).column("question_id").to_pylist()]
    assert sorted(ids) == sorted(train[i].id for i in stage.question_indices)  # every question exactly once
    assert result.manifest["counts"]["dropped_groups"] == 0
    # Judge calls are counted from the written groups only: the killed attempt's calls are not.
    assert result.manifest["judge"]["calls"] == 2 * len(ids)


def test_a_plan_for_a_larger_split_fails_before_anything_is_read(tmp_path):
    """Stage indices beyond the indexed split (a plan made for another data.train_size) fail with the fix named."""
    config = validate_config({"storage_path": str(tmp_path), "data": {"train_size": 40}})
    stage = plan_curriculum(config, 40)[0]
    questions = QuestionIndex.open(config.data, "train", 20, config.storage_path)
    with pytest.raises(ValueError, match="plan the curriculum with the same data.train_size"):
        run_stages(config, [stage], questions, tmp_path / "run", ServiceAddress(), tmp_path)
    assert not (tmp_path / "run").exists()


def test_a_stage_is_identified_by_what_produced_it_not_by_the_loss_that_consumes_it():
    """mask_progressive and full train on the same records (an ablation ladder generates them once);
    dataset answers (naive, sft), another teacher level or other sampling are other records."""

    def identity(**overrides):
        return stage_config_hash(validate_config(overrides), "teacher-l", 0.0, 1, ["q1", "q2"])

    full = identity(loss={"objective": "full"})
    assert identity(loss={"objective": "mask_progressive"}) == full
    assert identity(loss={"objective": "full", "kl_beta": 0.5}, train={"lr": 1e-3}) == full
    assert identity(loss={"objective": "naive"}, mask={"max_mask_ratio": 0.0}) != full
    assert identity(generation={"sampling": {"temperature": 0.7}}) != full
    assert identity(generation={"teacher_logprobs_dtype": "float32"}) != full
    assert identity(models={"student": "zoo:teacher-m"}) != full  # the group holds the student's own responses
    # sft and naive score the same dataset answers, and nothing is sampled for them: seeds do not matter.
    naive = identity(loss={"objective": "naive"}, mask={"max_mask_ratio": 0.0})
    assert identity(loss={"objective": "sft"}, mask={"max_mask_ratio": 0.0}, generation={"seed": 3}) == naive
