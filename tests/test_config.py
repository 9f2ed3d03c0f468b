import pytest

from masters.config import ConfigError, MastersConfig, dump_config, load_config, relative_paths


def test_defaults_are_the_method_values():
    config = MastersConfig()
    assert config.mask.ratios == [0.2, 0.15, 0.1, 0.05, 0.0]
    assert (config.generation.group_teacher, config.generation.group_student) == (4, 4)
    assert config.generation.group_size == 8
    assert config.loss.kl_beta == 0.1
    assert (config.generation.sampling.temperature, config.generation.sampling.top_p) == (1.0, 0.9)
    assert (config.generation.sampling.top_k, config.generation.sampling.repetition_penalty) == (50, 1.05)
    assert [t.name for t in config.models.teachers] == ["teacher-m", "teacher-l"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.lr=-1"], "train.lr: Input should be greater than 0 (got -1)"),
        (["trian.lr=1e-4"], "trian: unknown field"),
        (["train.strategy=fsdp"], "train.strategy: Input should be 'ddp', 'fsdp2' or 'deepspeed' (got 'fsdp')"),
        (["mask.max_mask_ratio=0.23"], "must be a whole multiple of mask.mask_step"),
        (["mask.max_mask_ratio=1.5"], "mask.max_mask_ratio: Input should be less than 1"),
        (["generation.group_teacher=0", "generation.group_student=0"], "group_teacher + generation.group_student must be at least 1"),
        (["generation.teacher_responses=8"], "generation.teacher_responses: unknown field"),
        (["loss.objective=naive"], "set mask.max_mask_ratio=0"),
        (["serve.min_replicas=1"], "must be set together"),
        (["models.teachers=[]"], "needs at least one teacher"),
        (["train.num_workers=two"], "train.num_workers: Input should be a valid integer"),
        (["lr"], "must look like `section.field=value`"),
        (["storage_path=s3://bucket/runs"], "storage_path: must be a directory path, not a URI"),
        (["serve.max_ongoing_requests=8"], "must be at least serve.max_batch_size (16)"),
        (["serve.target_ongoing_requests=64"], "must be at most serve.max_ongoing_requests (32)"),
        (["generation.group_teacher=20"], "generation.group_teacher (20) is more samples than one request may ask for"),
        (["serve.max_score_items=2"], "responses are scored in the teacher's request, more than serve.max_score_items=2"),
    ],
)
def test_bad_values_name_the_field_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert expected in str(error.value)


def test_duplicate_teacher_names_rejected():
    with pytest.raises(ConfigError, match="teacher names must be unique"):
        load_config(None, ["models.teachers=[{name: t, model: zoo:teacher-l}, {name: t, model: zoo:teacher-m}]"])


@pytest.mark.parametrize("max_mask_ratio", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
def test_every_schedule_ends_at_a_plain_zero(max_mask_ratio):
    from masters.config import ratio_label

    ratios = load_config(None, [f"mask.max_mask_ratio={max_mask_ratio}"]).mask.ratios
    assert [ratio_label(r) for r in ratios][-1] == "0" and all(not ratio_label(r).startswith("-") for r in ratios)


def test_yaml_file_and_overrides_merge(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: ablation\ntrain:\n  lr: 0.001\n  strategy: fsdp2\n")
    config = load_config(path, ["train.lr=2e-4", "mask.max_mask_ratio=0.4"])
    assert config.name == "ablation"
    assert config.train.strategy == "fsdp2"
    assert config.train.lr == 2e-4
    assert config.mask.ratios == [0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.0]
    # The dump is itself a valid config that resolves to the same thing.
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config))
    assert load_config(again) == config


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listed)


def test_relative_paths_lists_every_relative_path_field_and_only_those():
    config = MastersConfig.model_validate(
        {
            "storage_path": "/mnt/runs",
            "models": {
                "zoo_dir": "cache/zoo",
                "teachers": [{"name": "m", "model": "zoo:teacher-m"}, {"name": "l", "model": "models/large"}],
                "student": "/mnt/models/student",
            },
            "data": {"dataset": "data/vqa"},
        }
    )
    assert relative_paths(config) == {
        "models.zoo_dir": "cache/zoo",
        "models.teachers[1].model": "models/large",
        "data.dataset": "data/vqa",
    }
    assert relative_paths(MastersConfig()) == {"storage_path": "runs", "models.zoo_dir": ".cache/zoo"}
