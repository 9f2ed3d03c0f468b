"""Write the masked checkpoints of a model for every level of the mask schedule.

    python jobs/mask_teacher.py --model zoo:teacher-l --out runs/masked/teacher-l
    python jobs/mask_teacher.py --model path/to/hf_model --out out/ --max-mask-ratio 0.4 --max-shard-size 2GB

Each level lands in `<out>/<ratio>/` as a full Hugging Face model directory (loadable by
transformers and vLLM); `<out>/sparsity.json` holds the per-tensor sparsity of every level.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import asdict
from pathlib import Path

from pydantic import ValidationError

from masters.config import MaskConfig, ModelsConfig, ratio_label
from masters.io import aligned_table, atomic_write_json
from masters.mask_export import export_masked_checkpoints
from masters.masking import TensorSparsity
from masters.zoo import resolve_model

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """`5GB`, `500MiB`, `1000000` → bytes (decimal and binary units, as `save_pretrained` accepts)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5GB, 500MiB or a number of bytes")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def format_report(reports: dict[float, list[TensorSparsity]]) -> str:
    """One row per masked tensor, one column of zeroed fractions per level."""
    ratios = list(reports)
    names = [entry.name for entry in reports[ratios[0]]]
    header = ["tensor", "numel", *(f"@{ratio_label(r)}" for r in ratios)]
    rows = [header]
    for i, name in enumerate(names):
        rows.append([name, str(reports[ratios[0]][i].numel), *(f"{reports[r][i].fraction:.4f}" for r in ratios)])
    totals = []
    for ratio in ratios:
        zeros = sum(entry.zeros for entry in reports[ratio])
        numel = sum(entry.numel for entry in reports[ratio])
        totals.append(f"{zeros / max(numel, 1):.4f}")
    rows.append(["all masked tensors", str(sum(e.numel for e in reports[ratios[0]])), *totals])
    return aligned_table(rows, right_aligned=range(1, len(header)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="`zoo:<role>` or a Hugging Face model directory (safetensors).")
    parser.add_argument("--out", required=True, type=Path, help="Output root: one directory per level, `<out>/<ratio>/`.")
    parser.add_argument("--max-mask-ratio", type=float, default=MaskConfig().max_mask_ratio, help="r_max (default %(default)s).")
    parser.add_argument("--mask-step", type=float, default=MaskConfig().mask_step, help="s (default %(default)s).")
    parser.add_argument("--scope", default=MaskConfig().scope, choices=["all_linear", "language_model", "vision_and_projector"])
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB", help="Largest safetensors shard (default 5GB).")
    parser.add_argument("--zoo-dir", default=ModelsConfig().zoo_dir, help="Where `zoo:` models are built (default %(default)s).")
    args = parser.parse_args(argv)

    try:
        mask = MaskConfig(max_mask_ratio=args.max_mask_ratio, mask_step=args.mask_step, scope=args.scope)
    except ValidationError as exc:
        parser.error("; ".join(
            f"{'--' + str(e['loc'][0]).replace('_', '-') if e['loc'] else 'schedule'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        ))
    try:
        model_dir = resolve_model(args.model, args.zoo_dir)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--model: {exc}")
    out_dirs = {ratio: args.out / ratio_label(ratio) for ratio in mask.ratios}
    reports = export_masked_checkpoints(model_dir, out_dirs, scope=mask.scope, max_shard_bytes=args.max_shard_size)

    print(format_report(reports))
    atomic_write_json(
        args.out / "sparsity.json",
        {
            "model": str(model_dir),
            "scope": mask.scope,
            "levels": [
                {"mask_ratio": r, "dir": str(out_dirs[r]), "tensors": [asdict(e) for e in reports[r]]} for r in reports
            ],
        },
    )
    print(f"\nwrote {len(out_dirs)} levels to {args.out}/{{{','.join(ratio_label(r) for r in mask.ratios)}}} "
          f"and {args.out / 'sparsity.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
