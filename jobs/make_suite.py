"""Export one split of the generated VQA suite to Parquet, a Hugging Face dataset, lmms-eval and VLMEvalKit.

Examples:
  python jobs/make_suite.py --split test --out suite/                 # every format, size from the config
  python jobs/make_suite.py --split train --size 10000 --format parquet --out suite/
  python jobs/make_suite.py --split heldout --config configs/x.yaml --set data.seed=3 --out suite/
  python jobs/make_suite.py --examples docs/images                    # one example PNG per family
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image

from jobs.cli import add_set_argument
from masters.config import ConfigError, load_config
from masters.data import (
    FAMILIES,
    SPLITS,
    make_sample,
    make_split,
    write_hf_dataset,
    write_lmms_eval,
    write_parquet,
    write_vlmevalkit_tsv,
)

FORMATS = ("parquet", "hf", "lmms_eval", "vlmevalkit")
EXAMPLE_ZOOM = 4  # docs show 64 px images at 4x with nearest-neighbour so the pixels stay visible


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--split", choices=SPLITS, default="test", help="Which split to export (default: test).")
    parser.add_argument(
        "--size",
        type=int,
        help="Number of samples. Default: data.<split>_size from the config (heldout uses data.test_size).",
    )
    parser.add_argument("--seed", type=int, help="Suite seed. Default: data.seed from the config.")
    parser.add_argument(
        "--families",
        nargs="+",
        metavar="FAMILY",
        help=f"Restrict to these families. Default: data.families, else all. Choices: {', '.join(FAMILIES)}.",
    )
    parser.add_argument("--image-size", type=int, default=64, help="Square image side in pixels (default: 64).")
    parser.add_argument(
        "--format",
        choices=(*FORMATS, "all"),
        nargs="+",
        default=["all"],
        help="Formats to write (default: all). parquet: <out>/<split>.parquet; hf: <out>/<split>_hf/ "
        "(datasets.load_from_disk); lmms_eval: <out>/<split>_lmms_eval/ (task YAML + data); "
        "vlmevalkit: <out>/masters_suite_<split>.tsv.",
    )
    parser.add_argument("--out", type=Path, default=Path("suite"), help="Output directory (default: ./suite).")
    parser.add_argument("--config", type=Path, help="Run config YAML whose `data` section gives sizes, seed, families.")
    add_set_argument(parser, "the --config")
    parser.add_argument(
        "--examples",
        type=Path,
        metavar="DIR",
        help="Instead of exporting, write one example image per family to DIR/data_<family>.png "
        f"(train split, index 0, zoomed {EXAMPLE_ZOOM}x) and print its question and answer.",
    )
    return parser.parse_args(argv)


def write_examples(directory: Path, seed: int, image_size: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for family in FAMILIES:
        sample = make_sample(family, "train", seed, 0, image_size)
        zoomed = sample.image.resize((image_size * EXAMPLE_ZOOM,) * 2, Image.Resampling.NEAREST)
        path = directory / f"data_{family}.png"
        temporary = path.with_name(f".{path.name}.tmp")
        zoomed.save(temporary, format="PNG")
        temporary.replace(path)
        print(f"{path}\t{sample.question}\t{sample.answer}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        data = load_config(args.config, args.set).data
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    seed = data.seed if args.seed is None else args.seed
    try:
        if args.examples is not None:
            write_examples(args.examples, seed, args.image_size)
            return 0
        default_size = {"train": data.train_size, "val": data.val_size}.get(args.split, data.test_size)
        size = default_size if args.size is None else args.size
        families = args.families or data.families
        started = time.perf_counter()
        samples = make_split(args.split, size, seed, families, args.image_size)
        print(f"generated {len(samples)} {args.split} samples (seed {seed}) in {time.perf_counter() - started:.2f} s")
        if not samples:
            print("nothing to write: --size is 0", file=sys.stderr)
            return 2
        formats = FORMATS if "all" in args.format else args.format
        writers = {
            "parquet": lambda: write_parquet(samples, args.out / f"{args.split}.parquet"),
            "hf": lambda: write_hf_dataset(samples, args.out / f"{args.split}_hf"),
            "lmms_eval": lambda: write_lmms_eval(samples, args.out / f"{args.split}_lmms_eval"),
            "vlmevalkit": lambda: write_vlmevalkit_tsv(samples, args.out / f"masters_suite_{args.split}.tsv"),
        }
        for name in formats:
            started = time.perf_counter()
            path = writers[name]()
            print(f"{name}: {path} ({time.perf_counter() - started:.2f} s)")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
