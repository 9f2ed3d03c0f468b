"""Masked checkpoints on disk: a full Hugging Face model directory per mask level, as safetensors.

The masks are `masters.masking`'s, computed from the checkpoint tensor by tensor, so a level written here
equals `TeacherMasker`'s live weights at that level on a model loaded in the checkpoint's dtype.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from masters.families import MaskScope
from masters.io import atomic_directory
from masters.masking import (
    SAFETENSORS_INDEX,
    TensorSparsity,
    checkpoint_weight_map,
    mask_levels,
    masked_checkpoint_keys,
    write_level,
)

MANIFEST = "mask_manifest.json"
# Weight files of the source that must not travel into a masked directory (they hold dense weights).
_SOURCE_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Bytes per element of the safetensors dtype codes.
_SAFETENSORS_ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class _SourceTensor:
    key: str  # the name in the checkpoint (may differ from the in-memory name)
    file: Path
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]
    masked: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _SAFETENSORS_ITEMSIZE[self.dtype]


def _plan_shards(tensors: Sequence[_SourceTensor], max_shard_bytes: int) -> list[list[_SourceTensor]]:
    """Greedy packing in checkpoint order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[_SourceTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _safetensors_header(shard: Sequence[_SourceTensor]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in shard:
        entries[tensor.key] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8-byte alignment with spaces
    return len(header).to_bytes(8, "little") + header


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def export_masked_checkpoints(
    model_dir: str | Path,
    out_dirs: Mapping[float, str | Path],
    scope: MaskScope = "all_linear",
    max_shard_bytes: int = 5 * 2**30,
) -> dict[float, list[TensorSparsity]]:
    """Write a full Hugging Face model directory per mask ratio in `out_dirs` ({ratio: directory}).

    Each directory holds the model's config, processor and tokenizer files, the masked weights as
    safetensors shards of at most `max_shard_bytes` (plus an index when there are several) and
    `mask_manifest.json`; it is written to a temp dir and renamed into place. The source is read one
    tensor at a time and every level is written from the same read and the same sort, streaming,
    so memory stays near a few copies of the largest tensor whatever the model size. Masks equal
    `TeacherMasker`'s on a model loaded in the checkpoint's dtype. Returns each level's sparsity report.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model_dir {str(model_dir)!r} is not a Hugging Face model directory (no config.json)")
    if not out_dirs:
        raise ValueError("out_dirs is empty: give at least one {mask_ratio: directory}")
    bad = [ratio for ratio in out_dirs if not 0 <= ratio < 1]
    if bad:
        raise ValueError(f"mask ratios must lie in [0, 1), got {bad}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    mask_ratios = list(out_dirs)
    if len({Path(path).resolve() for path in out_dirs.values()}) != len(out_dirs):
        raise ValueError(f"out_dirs must name a different directory per ratio, got {dict(out_dirs)}")

    weight_map = checkpoint_weight_map(model_dir)
    masked_keys = masked_checkpoint_keys(model_dir, list(weight_map), scope)
    tensors = []
    for file in dict.fromkeys(weight_map.values()):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                info = handle.get_slice(key)
                if info.get_dtype() not in _SAFETENSORS_ITEMSIZE:
                    raise ValueError(f"tensor {key!r} has dtype {info.get_dtype()}, which the export cannot write")
                tensors.append(_SourceTensor(key, file, info.get_dtype(), tuple(info.get_shape()), key in masked_keys))
    shards = _plan_shards(tensors, max_shard_bytes)
    shard_names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    reports: dict[float, list[TensorSparsity]] = {ratio: [] for ratio in mask_ratios}

    with contextlib.ExitStack() as stack:
        # Every level's directory appears only if all of them were written.
        tmp_dirs = [stack.enter_context(atomic_directory(out_dirs[ratio])) for ratio in mask_ratios]
        for shard, shard_name in zip(shards, shard_names):
            header = _safetensors_header(shard)
            outputs = [open(tmp / shard_name, "wb") for tmp in tmp_dirs]
            try:
                for out in outputs:
                    out.write(header)
                for source in shard:
                    with safe_open(source.file, framework="pt") as handle:
                        dense = handle.get_tensor(source.key)
                    if not source.masked:
                        for out in outputs:
                            out.write(_tensor_bytes(dense))
                        continue
                    masked = torch.empty_like(dense)
                    for ratio, level, out in zip(mask_ratios, mask_levels(dense, mask_ratios), outputs):
                        write_level(dense, level.bound, masked)
                        out.write(_tensor_bytes(masked))
                        fraction = level.zeros / masked.numel()
                        reports[ratio].append(TensorSparsity(source.key, masked.numel(), level.zeros, fraction))
            finally:
                for out in outputs:
                    out.close()
        for ratio, tmp in zip(mask_ratios, tmp_dirs):
            if len(shards) > 1:
                index = {
                    "metadata": {"total_size": sum(t.nbytes for t in tensors)},
                    "weight_map": {t.key: name for shard, name in zip(shards, shard_names) for t in shard},
                }
                (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            for file in sorted(model_dir.iterdir()):
                if file.is_file() and not file.name.endswith(_SOURCE_WEIGHT_SUFFIXES) and file.name not in (
                    SAFETENSORS_INDEX, MANIFEST
                ):
                    shutil.copy2(file, tmp / file.name)
            manifest = {
                "source": str(model_dir.resolve()),
                "mask_ratio": ratio,
                "scope": scope,
                "shards": shard_names,
                "files": {f.name: f.stat().st_size for f in sorted(tmp.iterdir())},
                "tensors": [asdict(entry) for entry in reports[ratio]],
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return reports
