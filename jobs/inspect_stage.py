"""Look at what a stage of the generation and reward pipeline produced.

    python jobs/inspect_stage.py runs/default/stages/teacher-l/0-*
    python jobs/inspect_stage.py runs/default/stages/teacher-l/0-* --samples 5 --png stage.png

Prints the manifest (counts, judge calls, dropped groups), text histograms of the rewards, response
lengths and the teacher's log-prob of the response tokens, and a few sample groups. `--png` also
draws the histograms with matplotlib.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections import defaultdict
from pathlib import Path

from cluster.stage_store import read_manifest, read_parts

COLUMNS = ["question_id", "family", "question", "answer", "responses"]
BAR_WIDTH = 40
MAX_DISTINCT = 12  # up to this many distinct values, histograms list each value


def _bar(count: int, top: int) -> str:
    return "#" * round(BAR_WIDTH * count / top)


def text_histogram(values: list[float], discrete: bool, bins: int = 10) -> str:
    """A terminal histogram: one line per value for discrete series with few distinct values (R_acc,
    lengths), else `bins` equal-width bins. Non-finite values (R_acc switched off) are left out."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "  (no values)"
    distinct = sorted(set(values))
    if len(distinct) == 1:
        return f"  all {len(values)} values = {distinct[0]:.4g}"
    if discrete and len(distinct) <= MAX_DISTINCT:
        counts = [values.count(value) for value in distinct]
        return "\n".join(
            f"  {value:10.4g}  {count:6d}  {_bar(count, max(counts))}" for value, count in zip(distinct, counts)
        )
    lo, hi = distinct[0], distinct[-1]
    width = (hi - lo) / bins
    counts = [0] * bins
    for value in values:
        counts[min(int((value - lo) / width), bins - 1)] += 1
    lines = []
    for i, count in enumerate(counts):
        close = "]" if i == bins - 1 else ")"
        lines.append(f"  [{lo + i * width:8.3f}, {lo + (i + 1) * width:8.3f}{close}  {count:6d}  {_bar(count, max(counts))}")
    return "\n".join(lines)


def teacher_token_logprob(response: dict) -> float:
    """Mean teacher log-prob of the response's own tokens; a token outside the top-k counts at the
    tail bucket's log-mass (an upper bound)."""
    total = 0.0
    for token, ids, logprobs, tail in zip(
        response["token_ids"], response["teacher_topk_ids"], response["teacher_topk_logprobs"], response["teacher_tail_mass"]
    ):
        total += logprobs[ids.index(token)] if token in ids else math.log(max(tail, 1e-12))
    return total / max(len(response["token_ids"]), 1)


def summarize(rows: list[dict]) -> dict[str, list[float]]:
    """The series the histograms show, keyed by name."""
    series: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        rewards = [r["accuracy_reward"] for r in row["responses"]]
        if rewards and all(math.isfinite(r) for r in rewards):
            series["group mean R_acc"].append(sum(rewards) / len(rewards))
        for response in row["responses"]:
            source = response["source"]
            series[f"R_acc ({source})"].append(response["accuracy_reward"])
            series[f"response tokens ({source})"].append(len(response["token_ids"]))
            series[f"teacher log-prob per token ({source})"].append(teacher_token_logprob(response))
    return dict(series)


def print_report(directory: Path, samples: int, seed: int) -> dict[str, list[float]]:
    manifest = read_manifest(directory)
    if manifest is None:
        sys.exit(f"{directory} has no manifest.json: the stage is unfinished or this is not a stage directory")
    rows = read_parts(directory, columns=COLUMNS).to_pylist()
    stage = manifest.get("stage", {})
    print(f"stage {stage.get('teacher', '?')}/{stage.get('teacher_stage', '?')}  model {manifest.get('model_id')}  "
          f"objective {manifest.get('objective')}  written {manifest['created_at']} in {manifest['seconds']:.1f}s")
    counts = manifest.get("counts", {})
    print(f"questions {counts.get('questions')}  records {counts.get('records')}  dropped groups {counts.get('dropped_groups')}")
    for source, n in counts.get("responses_by_source", {}).items():
        accuracy = counts.get("mean_accuracy_by_source", {}).get(source)
        shown = "n/a" if accuracy is None else f"{accuracy:.3f}"
        print(f"  {source:8s} responses {n:7d}  mean R_acc {shown}")
    judge = manifest.get("judge", {})
    print(f"judge {judge.get('kind')}  calls {judge.get('calls')}  retries {judge.get('retries')}  "
          f"failed groups {judge.get('failed_groups')}  policy {judge.get('on_failure')}")
    for dropped in manifest.get("dropped", [])[:5]:
        print(f"  dropped {dropped['question_id']}: {dropped['reason'][:120]}")
    print(f"files {len(manifest['files'])}  rows {manifest['rows']}  config hash {manifest['config_hash']}")

    series = summarize(rows)
    for name, values in series.items():
        print(f"\n{name}  (n={len(values)})")
        print(text_histogram(values, discrete="log-prob" not in name))

    print(f"\n{min(samples, len(rows))} sample groups")
    for row in random.Random(seed).sample(rows, min(samples, len(rows))):
        print(f"\n[{row['question_id']}] {row['question']}  (answer: {row['answer']})")
        for response in row["responses"]:
            print(f"  {response['source']:8s} R_acc={response['accuracy_reward']:.0f}  {response['text']!r}")
    return series


def save_png(series: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 3
    rows = math.ceil(len(series) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, (name, values) in zip(axes.flat, series.items()):
        axis.hist([v for v in values if math.isfinite(v)], bins=10)
        axis.set_title(name, fontsize=9)
    for axis in list(axes.flat)[len(series):]:
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage_dir", type=Path, help="a stage directory, runs/<name>/stages/<teacher>/<k>-<hash>")
    parser.add_argument("--samples", type=int, default=3, help="sample groups to print (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="which sample groups (default 0)")
    parser.add_argument("--png", type=Path, help="also draw the histograms into this PNG file")
    args = parser.parse_args(argv)
    if not args.stage_dir.is_dir():
        parser.error(f"stage_dir {str(args.stage_dir)!r} is not a directory; pass runs/<name>/stages/<teacher>/<k>-<hash>")
    if args.samples < 0:
        parser.error("--samples must be >= 0")
    series = print_report(args.stage_dir, args.samples, args.seed)
    if args.png is not None:
        save_png(series, args.png, str(args.stage_dir))


if __name__ == "__main__":
    main()
