"""Nested per-tensor magnitude masks of a teacher VLM, switched in place on a live model.

A level (mask ratio r) zeroes, in every masked weight tensor separately, the entries with |w| < λ,
λ chosen so the tensor loses the fraction r of its entries (ties at λ are kept). All levels of a
schedule come from one sort of |W| per tensor, so the masks are nested: whatever is zeroed at 0.15
is also zeroed at 0.20. Because they are nested, the entries zeroed at r_max split into bands, one per
step of the schedule (zeroed at 0.20 but not at 0.15, at 0.15 but not at 0.10, ...). A `TeacherMasker`
keeps each band's positions and original values, and a switch touches only the bands between the two
levels: zero them going up, write their values back going down. Ratio 0 writes every band back, so it
gives the original weights bit for bit.

What is masked: the weights `masters.families.masked_parameter_names` lists for the scope, i.e. the
2-D `nn.Linear` weights (and 2-D projector parameters) of the vision tower, projector and language
model of any supported family. Embeddings, the LM head, norms and biases are never masked; in a
checkpoint on disk, the tensors `masked_checkpoint_keys` finds. Writing masked checkpoints is
`masters.mask_export`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from masters.config import isclose_ratio, ratio_label
from masters.families import MaskScope, masked_parameter_names

SAFETENSORS_INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------- levels of one tensor


def zeroed_count(numel: int, mask_ratio: float) -> int:
    """How many entries a tensor of `numel` loses at `mask_ratio` when there are no ties (nearest integer)."""
    return min(math.floor(mask_ratio * numel + 0.5), numel - 1)


def _sorted_magnitudes(weight: torch.Tensor) -> torch.Tensor:
    """|weight| flattened and sorted ascending (float32 on the CPU, the weight's dtype elsewhere)."""
    magnitudes = weight.detach().abs().flatten()
    if magnitudes.device.type != "cpu":
        return torch.sort(magnitudes).values
    # On the CPU numpy's SIMD sort is ~10x faster than torch.sort (measured: 11.5M floats in 0.18 s vs
    # 2.1 s on 2 cores). Half types widen to float32, which is exact, so thresholds are unchanged.
    if magnitudes.dtype not in (torch.float32, torch.float64):
        magnitudes = magnitudes.float()
    magnitudes.numpy().sort()  # in place: the only temporary is |weight| itself
    return magnitudes


@dataclass(frozen=True)
class MaskLevel:
    """One level of one tensor."""

    bound: float | None  # the largest magnitude zeroed (zero iff |w| <= bound); None: nothing is masked
    zeros: int  # entries equal to zero at this level: the masked ones plus any that were zero already


def mask_levels(weight: torch.Tensor, mask_ratios: Sequence[float]) -> list[MaskLevel]:
    """Every level of `weight` for `mask_ratios`, from one sort of its magnitudes.

    λ = the k-th smallest |w| (k = `zeroed_count`); the level zeroes |w| < λ and keeps ties at λ.
    The bound is the representable value just below λ in the weight's dtype, so `|w| <= bound`
    is exactly `|w| < λ`. One sort serves every level, which is what makes the masks nested.
    """
    numel = weight.numel()
    counts = [zeroed_count(numel, ratio) for ratio in mask_ratios]
    if max(counts, default=0) <= 0:
        zeros = int((weight == 0).sum())
        return [MaskLevel(None, zeros) for _ in counts]
    ordered = _sorted_magnitudes(weight)
    thresholds = ordered[torch.tensor([max(count, 0) for count in counts], device=ordered.device)].to(weight.dtype)
    below = torch.nextafter(thresholds, torch.zeros_like(thresholds))
    bounds = [
        bound if count > 0 and threshold > 0 else None  # λ = 0: no |w| < 0, nothing to zero
        for count, threshold, bound in zip(counts, thresholds.tolist(), below.tolist())
    ]
    # Zeros at a level: |w| <= bound, or the entries already zero; counted on the sorted magnitudes.
    limits = torch.tensor([0.0 if bound is None else bound for bound in bounds], dtype=ordered.dtype, device=ordered.device)
    zeros = torch.searchsorted(ordered, limits, right=True).tolist()
    return [MaskLevel(bound, count) for bound, count in zip(bounds, zeros)]


def write_level(dense: torch.Tensor, bound: float | None, out: torch.Tensor) -> torch.Tensor:
    """`out` = `dense` with the entries |w| <= `bound` zeroed (a plain copy when `bound` is None)."""
    if bound is None:
        return out.copy_(dense, non_blocking=True)
    if dense.device != out.device:
        out.copy_(dense, non_blocking=True)
        dense = out
    # hardshrink zeroes |x| <= bound and passes every other entry through unchanged, in one pass
    # over memory: as fast as the copy itself (a copy + abs + compare + fill is ~7x slower on CPU).
    return torch.ops.aten.hardshrink.out(dense, bound, out=out)


# --------------------------------------------------------------------------- a live model


@dataclass(frozen=True)
class TensorSparsity:
    name: str
    numel: int
    zeros: int  # entries equal to zero at this level: the masked ones plus any that were zero already
    fraction: float


@dataclass
class _Band:
    """The entries of one tensor that one step of the schedule zeroes, with their original values."""

    indices: torch.Tensor  # flat positions, ascending (int32 when the tensor allows: half the bytes of int64)
    values: torch.Tensor  # the original weights at those positions


@dataclass
class _MaskedTensor:
    name: str
    param: nn.Parameter
    bands: list[_Band]  # bands[k]: zeroed at level k (ascending ratios) but not at level k - 1; bands[0] is empty
    bounds: list[float | None]  # per level (`MaskLevel.bound`)


def _bands(weight: torch.Tensor, bounds: Sequence[float | None]) -> list[_Band]:
    """Split the entries zeroed at the largest level into one band per level (`bounds` ascending)."""
    flat = weight.view(-1)
    magnitudes = flat.abs()
    index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    pin = flat.device.type == "cuda"
    bands, lower = [], None
    for bound in bounds:
        if bound is None or (lower is not None and bound <= lower):
            indices = torch.empty(0, dtype=torch.long, device=flat.device)  # this step zeroes nothing new
        else:
            selected = magnitudes <= bound
            if lower is not None:
                selected &= magnitudes > lower
            indices = selected.nonzero().view(-1)  # ascending: memory order makes the scatter cheap
            lower = bound
        bands.append(
            _Band(
                indices.to(index_dtype).cpu().pin_memory() if pin else indices.to(index_dtype),
                flat[indices].cpu().pin_memory() if pin else flat[indices],
            )
        )
    return bands


class TeacherMasker:
    """Switches a live model between the nested mask levels of `mask_ratios`, in place.

    Create it after the model is on its final device and in its final dtype, and let it own the masked
    weights from then on: a switch rewrites only the bands between two levels, so it relies on the
    other entries being untouched. Per masked tensor it keeps the positions and original values of
    the entries zeroed at the largest ratio: r_max × (index + value bytes), 0.2 × 8 bytes = 1.6 bytes
    per float32 weight, less than the 4 bytes of a dense copy. On an accelerator they stay in pinned
    CPU memory and a switch sends only the bands it needs. `mask_ratios` is kept sorted ascending
    and always includes 0 (the dense model).
    """

    def __init__(self, model: nn.Module, mask_ratios: Sequence[float], scope: MaskScope = "all_linear"):
        bad = [ratio for ratio in mask_ratios if not 0 <= ratio < 1]
        if bad:
            raise ValueError(f"mask_ratios must lie in [0, 1), got {bad}")
        ratios = [float(ratio) for ratio in mask_ratios]
        if not any(isclose_ratio(ratio, 0.0) for ratio in ratios):
            ratios.append(0.0)
        self.mask_ratios: list[float] = sorted(ratios)
        self.scope = scope
        self.model = model
        self._level_now = 0
        parameters = dict(model.named_parameters())
        self._tensors: list[_MaskedTensor] = []
        with torch.no_grad():
            for name in masked_parameter_names(model, scope):
                param = parameters[name]
                bounds = [level.bound for level in mask_levels(param.detach(), self.mask_ratios)]
                self._tensors.append(_MaskedTensor(name, param, _bands(param.detach(), bounds), bounds))

    @property
    def mask_ratio(self) -> float:
        """The level the live weights are at now."""
        return self.mask_ratios[self._level_now]

    @property
    def parameter_names(self) -> list[str]:
        return [tensor.name for tensor in self._tensors]

    @property
    def kept_bytes(self) -> int:
        """Memory the masker holds beyond the live model: every band's positions and original values."""
        return sum(
            band.indices.numel() * band.indices.element_size() + band.values.numel() * band.values.element_size()
            for tensor in self._tensors
            for band in tensor.bands
        )

    def set_mask_ratio(self, mask_ratio: float) -> None:
        """Put the live weights at `mask_ratio`, one of `mask_ratios`, from any level."""
        target = self._level(mask_ratio)
        with torch.no_grad():
            for tensor in self._tensors:
                live = tensor.param.detach()
                if target > self._level_now:
                    # More zeros: the entries of the bands in between are exactly those with
                    # |w| <= the target's bound, so one in-place hardshrink pass (as fast as a copy,
                    # where a scatter costs ~20x a copy per entry) zeroes them; zeros already there stay.
                    if tensor.bounds[target] is not None:
                        torch.ops.aten.hardshrink.out(live, tensor.bounds[target], out=live)
                    continue
                flat = live.view(-1)
                for band in tensor.bands[target + 1 : self._level_now + 1]:
                    # Fewer zeros: write the bands' original values back (index_copy_ wants int64).
                    indices = band.indices.to(flat.device, torch.long, non_blocking=True)
                    flat.index_copy_(0, indices, band.values.to(flat.device, non_blocking=True))
        if any(tensor.param.device.type == "cuda" for tensor in self._tensors):
            torch.cuda.synchronize()  # the host→device copies are asynchronous
        self._level_now = target

    def sparsity_report(self) -> list[TensorSparsity]:
        """Zeros per masked tensor of the live weights, at the current level."""
        report = []
        for tensor in self._tensors:
            zeros = int((tensor.param.detach() == 0).sum())
            report.append(TensorSparsity(tensor.name, tensor.param.numel(), zeros, zeros / tensor.param.numel()))
        return report

    def _level(self, mask_ratio: float) -> int:
        for level, ratio in enumerate(self.mask_ratios):
            if isclose_ratio(ratio, mask_ratio):
                return level
        raise ValueError(
            f"mask_ratio {mask_ratio} is not a level of this masker; choose one of "
            f"{[ratio_label(ratio) for ratio in self.mask_ratios]}"
        )


# --------------------------------------------------------------------------- the masked tensors of a checkpoint


def checkpoint_weight_map(model_dir: Path) -> dict[str, Path]:
    """{checkpoint key: safetensors file holding it} of a Hugging Face model directory."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: model_dir / file for key, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as handle:
            return dict.fromkeys(handle.keys(), single)
    raise ValueError(
        f"model_dir {str(model_dir)!r} holds no safetensors weights (model.safetensors or {SAFETENSORS_INDEX}); "
        "re-save the model with `save_pretrained` (safetensors is its default)"
    )


def masked_checkpoint_keys(model_dir: Path, checkpoint_keys: Sequence[str], scope: MaskScope) -> set[str]:
    """The checkpoint keys of the tensors `scope` masks, found by renaming each key as loading does.

    Checkpoints may use older names than the live model (LLaVA saves `language_model.model.layers…`
    for `model.language_model.layers…`), so we build the model on the meta device and map the
    keys with transformers' own conversion rules.
    """
    config = transformers.AutoConfig.from_pretrained(model_dir)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise ValueError(f"config.json of {str(model_dir)!r} names no known transformers architecture ({architecture!r})")
    with torch.device("meta"):
        skeleton = model_class._from_config(config)
    masked_names = set(masked_parameter_names(skeleton, scope))
    meta_state = skeleton.state_dict()
    transforms = get_model_conversion_mapping(skeleton)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    masked_keys, found = set(), set()
    for key in checkpoint_keys:
        name, converter = rename_source_key(key, renamings, converters, skeleton.base_model_prefix, meta_state)
        if name not in meta_state and key in meta_state:
            name, converter = key, None
        if name in masked_names:
            if converter is not None:
                raise ValueError(
                    f"checkpoint tensor {key!r} is converted (not just renamed) when loaded, so its mask on disk "
                    "would differ from the live model's; export from a checkpoint saved by this transformers version"
                )
            masked_keys.add(key)
            found.add(name)
    if found != masked_names:
        raise ValueError(
            f"checkpoint {str(model_dir)!r} lacks masked weights {sorted(masked_names - found)[:5]}…; "
            "is it a complete save of this architecture?"
        )
    return masked_keys
