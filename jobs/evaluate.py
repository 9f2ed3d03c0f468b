"""Evaluate VLMs on a split of the generated suite: per-family and overall accuracy, greedy answers.

    .venv/bin/python jobs/evaluate.py --model zoo:teacher-l --split test
    .venv/bin/python jobs/evaluate.py --model zoo:teacher-l zoo:teacher-m zoo:student --split test --out ladder.json
    .venv/bin/python jobs/evaluate.py --model runs/default/student --split heldout --size 256

A model is `zoo:<role>` (built by jobs/build_zoo.py) or any directory AutoModelForImageTextToText and
AutoProcessor load. Prints a table per model (and a side-by-side one for several); --out writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from masters.config import ConfigError  # noqa: E402
from masters.data import SPLITS, make_split  # noqa: E402
from masters.eval import evaluate, format_comparison, format_table  # noqa: E402
from masters.io import atomic_write_json  # noqa: E402
from masters.models import load_model  # noqa: E402
from masters.zoo import load_zoo_config, resolve_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Accuracy of VLMs on a split of the generated VQA suite.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", nargs="+", required=True, help="zoo:<role> (teacher-l, teacher-m, student) or HF model dirs.")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--size", type=int, default=256, help="Number of samples (families round-robin).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the generated split.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--max-new-tokens", type=int, default=48, help="Response length limit (the suite's rationale, then the answer)."
    )
    parser.add_argument("--numeric-tolerance", type=float, default=1e-6, help="Relative tolerance of the rule judge.")
    parser.add_argument("--out", default=None, help="Write the reports (with every prediction) to this JSON file.")
    parser.add_argument("--zoo-dir", default=".cache/zoo", help="Where zoo: models are cached.")
    parser.add_argument("--zoo-config", default=None, help="Zoo config YAML of the build zoo: names (default: built-in).")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("size", "batch_size", "max_new_tokens", "threads"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        zoo_config = load_zoo_config(args.zoo_config)
        model_dirs = {ref: resolve_model(ref, args.zoo_dir, zoo_config) for ref in args.model}
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    samples = make_split(args.split, args.size, seed=args.seed)
    reports = []
    for ref, model_dir in model_dirs.items():
        model, processor = load_model(model_dir, device=args.device)
        report = evaluate(
            model,
            processor,
            samples,
            model_name=ref,
            split=args.split,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            numeric_tolerance=args.numeric_tolerance,
            progress=True,
        )
        print(format_table(report) + "\n")
        reports.append(report)
    if len(reports) > 1:
        print(format_comparison(reports))
    if args.out:
        atomic_write_json(
            args.out,
            {
                "split": args.split,
                "size": args.size,
                "seed": args.seed,
                "models": {ref: report.to_json() for ref, report in zip(model_dirs, reports)},
            },
        )
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
