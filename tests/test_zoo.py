"""The zoo: config validation, the cache keyed by config and suite version, atomic builds, model references."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import masters.zoo as zoo
from masters.config import ConfigError
from masters.models import load_model, parameter_count
from masters.tiny_vlms import MICRO, build_model, train_tokenizer
from masters.zoo import ROLES, RoleConfig, ZooConfig, ensure_zoo, load_zoo_config, resolve_model, zoo_build_dir, zoo_key

REPO = Path(__file__).resolve().parents[1]


def micro_zoo_config(**changes) -> ZooConfig:
    role = RoleConfig(size=MICRO, steps=2, batch_size=4, lr=1e-3)
    fields = dict(vocab_size=300, tokenizer_corpus_size=50, train_size=8, val_size=4, max_new_tokens=3)
    return ZooConfig(**{**fields, "roles": {name: role for name in ROLES}, **changes})


@pytest.fixture(scope="module")
def built_zoo(tmp_path_factory):
    config, zoo_dir = micro_zoo_config(), tmp_path_factory.mktemp("zoo")
    return config, zoo_dir, ensure_zoo(config, zoo_dir, progress=False)


def test_default_ladder_sizes():
    tokenizer = train_tokenizer(["is there a red circle? yes"], vocab_size=512)
    params = {role: parameter_count(build_model(config.size, tokenizer)) for role, config in ZooConfig().roles.items()}
    assert params["teacher-l"] >= 8 * params["student"]
    assert params["student"] < params["teacher-m"] < params["teacher-l"]
    assert ZooConfig().roles["student"].steps < ZooConfig().roles["teacher-m"].steps


def test_configs_zoo_yaml_is_the_default():
    assert load_zoo_config(REPO / "configs" / "zoo" / "default.yaml") == ZooConfig()


def test_zoo_config_errors_name_the_field(tmp_path):
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({"train_size": 0, "stepz": 3}))
    with pytest.raises(ConfigError, match=r"train_size(.|\n)*stepz: unknown field"):
        load_zoo_config(path)
    path.write_text(yaml.safe_dump({"roles": {"student": micro_zoo_config().roles["student"].model_dump()}}))
    with pytest.raises(ConfigError, match=r"missing: \['teacher-l', 'teacher-m'\]"):
        load_zoo_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_zoo_config(tmp_path / "missing.yaml")


def test_build_writes_every_role_with_a_manifest(built_zoo):
    config, zoo_dir, paths = built_zoo
    manifest = zoo.read_manifest(config, zoo_dir)
    assert manifest["key"] == zoo_key(config) and set(manifest["roles"]) == set(ROLES)
    for role in ROLES:
        assert paths[role] == zoo_dir / zoo_key(config) / role
        model, processor = load_model(paths[role])
        assert parameter_count(model) == manifest["roles"][role]["params"]
        assert 0.0 <= manifest["roles"][role]["val_accuracy"] <= 1.0
    assert manifest["disk_bytes"] > 0


def test_frozen_vision_keeps_its_initialisation_and_the_language_model_trains(built_zoo):
    config, _, paths = built_zoo
    for role in ROLES:
        assert config.roles[role].freeze_vision
        trained, processor = load_model(paths[role])
        fresh = build_model(config.roles[role].size, processor.tokenizer, seed=config.roles[role].seed)
        fresh_state = fresh.state_dict()
        for name, tensor in trained.state_dict().items():
            frozen = "vision_tower" in name or "multi_modal_projector" in name
            assert torch.equal(tensor, fresh_state[name]) == frozen, name


def test_captions_are_trained_on_with_the_questions(tmp_path, monkeypatch):
    seen = {}

    def record(model, examples, family, **kwargs):
        seen["examples"] = len(examples)
        raise RuntimeError("stop after the first role")

    monkeypatch.setattr(zoo, "train_sft", record)
    for captions, expected in [(True, 16), (False, 8)]:  # train_size 8: each image once more with its description
        with pytest.raises(RuntimeError, match="stop after"):
            zoo.build_zoo(micro_zoo_config(captions=captions), tmp_path, progress=False, log=lambda _: None)
        assert seen["examples"] == expected


def test_cache_hit_returns_without_training(built_zoo, monkeypatch):
    config, zoo_dir, paths = built_zoo

    def must_not_train(*args, **kwargs):
        raise AssertionError("a cached zoo was trained again")

    monkeypatch.setattr(zoo, "train_sft", must_not_train)
    assert ensure_zoo(config, zoo_dir, progress=False) == paths


def test_changed_config_or_suite_version_gives_a_new_key(monkeypatch):
    config = micro_zoo_config()
    assert zoo_key(micro_zoo_config()) == zoo_key(config)
    assert zoo_key(micro_zoo_config(train_size=9)) != zoo_key(config)
    changed_student = {**config.roles, "student": config.roles["student"].model_copy(update={"lr": 2e-3})}
    assert zoo_key(micro_zoo_config(roles=changed_student)) != zoo_key(config)
    key = zoo_key(config)
    monkeypatch.setattr(zoo, "SUITE_VERSION", "another")
    assert zoo_key(config) != key


def test_interrupted_build_leaves_nothing_a_later_call_uses(tmp_path, monkeypatch):
    config, real_train = micro_zoo_config(seed=1), zoo.train_sft
    trained = []

    def train_then_crash(model, examples, family, **kwargs):
        trained.append(kwargs["description"])
        if len(trained) == 2:  # the student is trained and saved, then the second role fails mid-build
            raise RuntimeError("interrupted")
        return real_train(model, examples, family, **kwargs)

    monkeypatch.setattr(zoo, "train_sft", train_then_crash)
    with pytest.raises(RuntimeError, match="interrupted"):
        ensure_zoo(config, tmp_path, progress=False)
    assert not zoo_build_dir(config, tmp_path).exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
    with pytest.raises(FileNotFoundError, match="build_zoo.py"):
        resolve_model("zoo:student", tmp_path, config)

    monkeypatch.setattr(zoo, "train_sft", real_train)
    paths = ensure_zoo(config, tmp_path, progress=False)
    assert zoo.read_manifest(config, tmp_path) is not None
    assert resolve_model("zoo:student", tmp_path, config) == paths["student"]


def test_force_rebuilds(built_zoo, monkeypatch):
    config, zoo_dir, _ = built_zoo
    trained = []
    real_train = zoo.train_sft
    monkeypatch.setattr(zoo, "train_sft", lambda *a, **k: trained.append(k["description"]) or real_train(*a, **k))
    ensure_zoo(config, zoo_dir, force=True, progress=False)
    assert len(trained) == len(ROLES)
    assert zoo.read_manifest(config, zoo_dir) is not None


def test_resolve_model_references(built_zoo, micro_model_dir, tmp_path):
    config, zoo_dir, paths = built_zoo
    assert resolve_model("zoo:teacher-l", zoo_dir, config) == paths["teacher-l"]
    assert resolve_model(str(micro_model_dir), zoo_dir) == Path(micro_model_dir)
    with pytest.raises(ValueError, match="unknown zoo role 'teacher-xl'.*zoo:teacher-l"):
        resolve_model("zoo:teacher-xl", zoo_dir, config)
    with pytest.raises(FileNotFoundError, match="jobs/build_zoo.py"):
        resolve_model("zoo:student", tmp_path / "empty", config)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path), zoo_dir)


def test_build_zoo_job_builds_then_hits_the_cache(tmp_path):
    config_path = tmp_path / "zoo.yaml"
    config_path.write_text(yaml.safe_dump(micro_zoo_config(seed=2).model_dump(mode="json")))
    command = [sys.executable, str(REPO / "jobs" / "build_zoo.py"), "--config", str(config_path), "--zoo-dir", str(tmp_path / "zoo"), "--no-progress"]
    first = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "zoo built in" in first.stdout and "teacher-l" in first.stdout
    second = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "already built" in second.stdout and "zoo built in" not in second.stdout

    config_path.write_text(yaml.safe_dump({"roles": {"student": {"steps": 1}}}))
    bad = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "invalid zoo config" in bad.stderr and "roles" in bad.stderr


def test_micro_zoo_config_loads():
    config = load_zoo_config(REPO / "configs" / "zoo" / "micro.yaml")
    assert config.roles["student"].steps < config.roles["teacher-l"].steps
