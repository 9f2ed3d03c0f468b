"""Build the tiny VLM family (large teacher, mid teacher, initial student) on the generated suite.

    .venv/bin/python jobs/build_zoo.py                      # built-in defaults (= configs/zoo/default.yaml)
    .venv/bin/python jobs/build_zoo.py --config my_zoo.yaml --zoo-dir /tmp/zoo
    .venv/bin/python jobs/build_zoo.py --force              # rebuild even if cached

Models land in `<zoo-dir>/<key>/<role>/` (Hugging Face format) with a manifest; `key` hashes the config
and the suite version, so a second call with the same config returns at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from masters.config import ConfigError, dump_config  # noqa: E402
from masters.zoo import ROLES, ensure_zoo, load_zoo_config, read_manifest, zoo_key  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train and cache the tiny VLM zoo (teacher-l, teacher-m, student) on the generated VQA suite.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="Zoo config YAML (see configs/zoo/default.yaml); default: built-in defaults.")
    parser.add_argument("--zoo-dir", default=".cache/zoo", help="Cache directory of zoo builds.")
    parser.add_argument("--force", action="store_true", help="Rebuild even when a complete build of this config exists.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    parser.add_argument("--print-config", action="store_true", help="Print the resolved zoo config and its key, then exit.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_zoo_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.print_config:
        print(f"# key: {zoo_key(config)}\n{dump_config(config)}", end="")
        return 0
    if args.threads < 1:
        print(f"--threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    cached = not args.force and read_manifest(config, args.zoo_dir) is not None
    started = time.perf_counter()
    paths = ensure_zoo(config, args.zoo_dir, force=args.force, progress=not args.no_progress)
    manifest = read_manifest(config, args.zoo_dir)
    if cached:
        print(f"zoo {zoo_key(config)} already built in {args.zoo_dir} (use --force to rebuild)")
    print(f"{'role':<9}  {'params':>10}  {'steps':>5}  {'final loss':>10}  {'val acc':>7}  {'time':>7}  path")
    for role in ROLES:
        summary = manifest["roles"][role]
        print(
            f"{role:<9}  {summary['params']:>10,}  {summary['steps']:>5}  {summary['final_loss']:>10.3f}  "
            f"{100 * summary['val_accuracy']:>6.1f}%  {summary['seconds']:>6.0f}s  {paths[role]}"
        )
    print(
        json.dumps(
            {
                "key": manifest["key"],
                "build_seconds": manifest["seconds"],
                "disk_mib": round(manifest["disk_bytes"] / 2**20, 1),
                "this_call_seconds": round(time.perf_counter() - started, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
