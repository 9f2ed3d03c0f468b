"""Nested magnitude masks on a real (tiny) LLaVA model: exact sparsity, nesting, ties, restore, scope, export."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from masters.mask_export import MANIFEST, export_masked_checkpoints
from masters.masking import SAFETENSORS_INDEX, TeacherMasker, mask_levels, masked_parameter_names, write_level, zeroed_count

SCHEDULE = [0.2, 0.15, 0.1, 0.05, 0.0]
ROOT = Path(__file__).resolve().parents[1]


def tiny_llava(dtype: torch.dtype = torch.float32, seed: int = 0) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, tie_word_embeddings=True))
    return model.to(dtype).eval()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same_weights(expected: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    actual = model.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name


def test_each_tensor_loses_the_target_fraction_and_only_its_smallest_entries():
    model = tiny_llava()
    dense = snapshot(model)
    masker = TeacherMasker(model, SCHEDULE)
    assert masker.mask_ratio == 0.0
    for ratio in SCHEDULE:
        masker.set_mask_ratio(ratio)
        assert masker.mask_ratio == ratio
        report = {entry.name: entry for entry in masker.sparsity_report()}
        assert set(report) == set(masker.parameter_names)
        for name, param in model.named_parameters():
            if name not in report:
                continue
            target = zeroed_count(param.numel(), ratio)
            assert abs(report[name].zeros - target) <= 1, (name, ratio)
            assert abs(report[name].fraction - ratio) <= 1 / param.numel() + 0.5 / param.numel()
            zeroed = param == 0
            if zeroed.any() and (~zeroed).any():
                # the zeroed entries are exactly the smallest magnitudes; the kept ones are untouched
                assert dense[name][zeroed].abs().max() <= dense[name][~zeroed].abs().min()
            assert torch.equal(param[~zeroed], dense[name][~zeroed])


def test_masks_are_nested_across_all_levels():
    model = tiny_llava()
    masker = TeacherMasker(model, SCHEDULE)
    zero_sets = {}
    for ratio in [0.05, 0.2, 0.0, 0.15, 0.1]:  # visiting order must not matter
        masker.set_mask_ratio(ratio)
        zero_sets[ratio] = {name: param.detach() == 0 for name, param in model.named_parameters()}
    for smaller, larger in zip(sorted(SCHEDULE), sorted(SCHEDULE)[1:]):
        for name in masker.parameter_names:
            inner, outer = zero_sets[smaller][name], zero_sets[larger][name]
            assert not (inner & ~outer).any(), f"{name}: zeroed at {smaller} but kept at {larger}"
            assert outer.sum() > inner.sum(), f"{name}: {larger} zeroes no more than {smaller}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_at_the_threshold_are_kept(dtype):
    # gate_proj is 80x32 = 2560 entries: 256 of magnitude 0.25, 768 tied at 0.5 (both signs), the rest 1.0.
    # At 0.2 the 513th smallest is a 0.5: the 256 entries of 0.25 go and every 0.5 stays, though 512
    # entries were the target. At 0.5 the 1281st smallest is a 1.0: all 0.25s and 0.5s go, every 1.0 stays.
    values = torch.tensor([0.25] * 256 + [0.5, -0.5] * 384 + [1.0, -1.0] * 768, dtype=dtype)
    weight = values[torch.randperm(2560, generator=torch.Generator().manual_seed(0))].reshape(80, 32)
    assert (zeroed_count(2560, 0.2), zeroed_count(2560, 0.5)) == (512, 1280)
    model = tiny_llava(dtype)
    gate_proj = model.model.language_model.layers[0].mlp.gate_proj.weight
    with torch.no_grad():
        gate_proj.copy_(weight)
    masker = TeacherMasker(model, [0.2, 0.5, 0.0])
    masker.set_mask_ratio(0.2)
    assert torch.equal(gate_proj == 0, weight.abs() == 0.25)
    masker.set_mask_ratio(0.5)
    assert torch.equal(gate_proj == 0, weight.abs() < 1.0)
    masker.set_mask_ratio(0.0)
    assert torch.equal(gate_proj, weight)
    assert [level.zeros for level in mask_levels(weight, [0.2, 0.5, 0.0])] == [256, 1024, 0]


def test_ratio_zero_restores_every_parameter_bit_for_bit_after_any_levels():
    model = tiny_llava()
    dense = snapshot(model)
    masker = TeacherMasker(model, SCHEDULE)
    masker.set_mask_ratio(0.1)
    # masking touches only the masked weights
    unmasked = [name for name in dense if name not in masker.parameter_names]
    assert unmasked and all(torch.equal(dense[name], model.state_dict()[name]) for name in unmasked)
    for ratio in [0.2, 0.05, 0.15, 0.2, 0.0, 0.1, 0.1, 0.05]:
        masker.set_mask_ratio(ratio)
    masker.set_mask_ratio(0.0)
    assert_same_weights(dense, model)
    masker.set_mask_ratio(0.15)
    masker.set_mask_ratio(0)
    assert_same_weights(dense, model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_switch_gives_the_level_computed_from_the_dense_weights(dtype):
    # A switch rewrites only the bands between two levels; whatever the path, the result must be the
    # level written in one go from the dense weights.
    model = tiny_llava(dtype)
    dense = snapshot(model)
    masker = TeacherMasker(model, SCHEDULE)
    expected = {}
    for name in masker.parameter_names:
        for ratio, level in zip(SCHEDULE, mask_levels(dense[name], SCHEDULE)):
            expected[name, ratio] = write_level(dense[name], level.bound, torch.empty_like(dense[name]))
    path = [0.2, 0.15, 0.1, 0.05, 0.0, 0.1, 0.2, 0.0, 0.05, 0.15, 0.05, 0.2, 0.1]
    for ratio in path:
        masker.set_mask_ratio(ratio)
        live = model.state_dict()
        for name in masker.parameter_names:
            assert torch.equal(live[name], expected[name, ratio]), (name, ratio)


def test_masker_keeps_less_than_a_dense_copy():
    model = tiny_llava()
    masker = TeacherMasker(model, SCHEDULE)
    masked = [param for name, param in model.named_parameters() if name in masker.parameter_names]
    dense_bytes = sum(param.numel() * param.element_size() for param in masked)
    # r_max of the entries, each an int32 position and a float32 value (+ the rounding of each level)
    assert masker.kept_bytes <= sum(round(0.2 * param.numel() + 1) * (4 + 4) for param in masked)
    assert masker.kept_bytes < 0.5 * dense_bytes


def test_level_zero_is_always_available_and_other_ratios_are_rejected():
    model = tiny_llava()
    dense = snapshot(model)
    masker = TeacherMasker(model, [0.3])
    assert masker.mask_ratios == [0.0, 0.3]  # sorted, with the dense level added
    masker.set_mask_ratio(0.3)
    masker.set_mask_ratio(0.0)
    assert_same_weights(dense, model)
    with pytest.raises(ValueError, match=r"0\.25 is not a level.*\['0', '0\.3'\]"):
        masker.set_mask_ratio(0.25)
    with pytest.raises(ValueError, match="mask_ratios must lie in"):
        TeacherMasker(model, [0.2, 1.0])
    with pytest.raises(ValueError, match="scope must be one of"):
        TeacherMasker(model, [0.2], scope="everything")
    with pytest.raises(ValueError, match="Sequential is not a transformers VLM"):
        masked_parameter_names(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_scopes_select_the_linear_weights_of_their_parts_only():
    model = tiny_llava()
    names = {scope: set(masked_parameter_names(model, scope)) for scope in ("all_linear", "language_model", "vision_and_projector")}
    language, vision = names["language_model"], names["vision_and_projector"]
    assert language and vision and not language & vision
    assert names["all_linear"] == language | vision
    assert all(n.startswith("model.language_model.layers.") for n in language)
    assert all(n.startswith(("model.vision_tower.encoder.", "model.multi_modal_projector.")) for n in vision)
    assert any(n.startswith("model.multi_modal_projector.") for n in vision)
    # exactly the 2-D nn.Linear weights: 7 per Llama layer, 6 per CLIP layer, 2 in the projector
    assert len(language) == 7 * 2 and len(vision) == 6 * 2 + 2
    for name in names["all_linear"]:
        assert name.endswith(".weight") and dict(model.named_parameters())[name].ndim == 2
        assert not any(part in name for part in ("embed", "lm_head", "norm", "patch_embedding"))

    dense = snapshot(model)
    masker = TeacherMasker(model, SCHEDULE, scope="language_model")
    masker.set_mask_ratio(0.2)
    for name, tensor in model.state_dict().items():
        if name in language:
            assert (tensor == 0).any(), name
        else:
            assert torch.equal(tensor, dense[name]), name


@pytest.mark.parametrize(("dtype", "max_shard_bytes"), [(torch.float32, 30_000), (torch.bfloat16, 10**9)])
def test_export_writes_loadable_levels_equal_to_the_live_masks(tmp_path, dtype, max_shard_bytes):
    from masters.tiny_vlms import MICRO, build_processor, train_tokenizer

    model = tiny_llava(dtype)
    source = tmp_path / "source"
    model.save_pretrained(source)
    build_processor(train_tokenizer(["a red square left of a blue circle"] * 4, vocab_size=300), MICRO).save_pretrained(source)
    ratios = [0.2, 0.1, 0.0]
    reports = export_masked_checkpoints(
        source, {ratio: tmp_path / "out" / str(ratio) for ratio in ratios}, max_shard_bytes=max_shard_bytes
    )

    masker = TeacherMasker(model, ratios)
    for ratio in ratios:
        level_dir = tmp_path / "out" / str(ratio)
        shards = sorted(level_dir.glob("*.safetensors"))
        if max_shard_bytes < 10**6:
            assert len(shards) > 1 and (level_dir / SAFETENSORS_INDEX).is_file()
            header_bytes = [8 + int.from_bytes(shard.read_bytes()[:8], "little") for shard in shards]
            assert all(shard.stat().st_size - header <= max_shard_bytes for shard, header in zip(shards, header_bytes))
        else:
            assert [shard.name for shard in shards] == ["model.safetensors"]
        for copied in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json"):
            assert (level_dir / copied).read_bytes() == (source / copied).read_bytes()
        manifest = json.loads((level_dir / MANIFEST).read_text())
        assert manifest["mask_ratio"] == ratio and manifest["scope"] == "all_linear"

        masker.set_mask_ratio(ratio)
        loaded = LlavaForConditionalGeneration.from_pretrained(level_dir, dtype=dtype)
        assert_same_weights(snapshot(model), loaded)
        assert sorted(e.zeros for e in reports[ratio]) == sorted(e.zeros for e in masker.sparsity_report())
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_export_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        export_masked_checkpoints(tmp_path, {0.2: tmp_path / "out"})
    source = tmp_path / "source"
    tiny_llava().save_pretrained(source)
    with pytest.raises(ValueError, match="different directory per ratio"):
        export_masked_checkpoints(source, {0.2: tmp_path / "x", 0.1: tmp_path / "x"})
    for weights in source.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ValueError, match="no safetensors weights"):
        export_masked_checkpoints(source, {0.2: tmp_path / "out"})
    assert not (tmp_path / "out").exists()


def test_mask_teacher_job_writes_every_level_and_a_sparsity_report(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("mask_teacher", ROOT / "jobs" / "mask_teacher.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    model = tiny_llava()
    model.save_pretrained(tmp_path / "model")

    assert job.main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--max-mask-ratio", "0.1"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0", "0.05", "0.1", "sparsity.json"]
    report = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert [level["mask_ratio"] for level in report["levels"]] == [0.1, 0.05, 0.0]
    assert len(report["levels"][0]["tensors"]) == len(masked_parameter_names(model))
    printed = capsys.readouterr().out
    assert "language_model.model.layers.0.mlp.up_proj.weight" in printed and "@0.05" in printed

    with pytest.raises(SystemExit):
        job.main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "bad"), "--max-mask-ratio", "0.12"])
    assert "whole multiple" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        job.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "bad")])
    assert "--model" in capsys.readouterr().err


def test_vllm_level_switch_streams_the_exported_masks_from_the_checkpoint(micro_model_dir, tmp_path):
    """The vLLM engine's in-worker level switch, run against a stand-in for vLLM's model (vLLM needs a GPU):
    it hands `load_weights` exactly the tensors of the masked checkpoint export, and keeps no dense copy."""
    from serve.vllm_engine import _init_levels, _set_level

    class WeightSink(torch.nn.Module):  # what the switch needs of a vLLM model: a parameter's dtype/device, load_weights
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))
            self.loaded: dict[str, torch.Tensor] = {}

        def load_weights(self, weights):
            self.loaded = {key: tensor.clone() for key, tensor in weights}

    sink = WeightSink()
    assert _init_levels(sink, str(micro_model_dir), [0.0, 0.1, 0.2], "all_linear") > 0
    assert not any(isinstance(item, torch.Tensor) for entry in sink._masters_levels[-1] for item in entry)
    export_masked_checkpoints(micro_model_dir, {0.1: tmp_path / "0.1"})
    exported = load_file(tmp_path / "0.1" / "model.safetensors")
    masked_keys = {entry["name"] for entry in json.loads((tmp_path / "0.1" / "mask_manifest.json").read_text())["tensors"]}
    _set_level(sink, 0.1)
    assert set(sink.loaded) == masked_keys
    for key, tensor in sink.loaded.items():
        assert torch.equal(tensor, exported[key]), key
