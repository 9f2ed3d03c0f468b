"""An ablation ladder: rungs (config overrides) × seeds on top of a base config, and its summary.

A ladder file names a base run config, the seeds, and the rungs, each an override file layered on the
base (`masters.config.load_config`) or `null` for the initial student, which is evaluated, not trained.
Every run of a ladder writes its records into one shared `records_path`, so rungs whose records would
be generated alike (a stage's identity is what produced it, not the loss that consumes it) share them.
The summary is the mean over seeds with a 95% Student-t interval, overall and per family.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from masters.config import ConfigError, MastersConfig, format_validation_error, load_config, read_yaml_mapping


# Two-sided 95% quantiles of Student's t with 1..30 degrees of freedom (beyond 30 the normal 1.96 is within 2%).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


class LadderConfig(BaseModel):
    """What `jobs/ablate.py` runs: every rung at every seed on top of `base`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Directory of the ladder: `<base storage_path>/<name>/` holds its runs, records and summary.")
    base: str = Field(description="The base run config every rung overrides (relative paths: from the ladder file).")
    seeds: list[int] = Field(
        [0, 1, 2],
        min_length=1,
        description="Each seed sets generation.seed (the sampled responses) and train.seed (the batch order) of every rung.",
    )
    rungs: dict[str, str | None] = Field(
        min_length=1,
        description="Rung name -> override file layered on the base (relative paths: from the ladder file); "
        "null = the initial student, evaluated only.",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        return _check_plain(name, "a plain directory name")

    @field_validator("rungs")
    @classmethod
    def _plain_rungs(cls, rungs: dict[str, str | None]) -> dict[str, str | None]:
        for rung in rungs:
            _check_plain(rung, f"rung {rung!r}: a plain directory name")
        return rungs

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds


def _check_plain(name: str, what: str) -> str:
    if not name or "/" in name or name.startswith(".") or any(c.isspace() for c in name):
        raise ValueError(f"must be {what} (no '/', no spaces, not starting with '.'), got {name!r}")
    return name


def load_ladder(path: str | Path, seeds: list[int] | None = None, rungs: list[str] | None = None) -> LadderConfig:
    """The ladder file with its relative paths resolved, optionally restricted to `rungs` or other `seeds`."""
    path = Path(path)
    raw = read_yaml_mapping(path, "ladder file")
    try:
        ladder = LadderConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc).replace("invalid config", f"invalid ladder {str(path)!r}")) from None
    here = path.parent
    resolved = {name: None if file is None else str(here / file) for name, file in ladder.rungs.items()}
    if rungs is not None:
        unknown = [r for r in rungs if r not in resolved]
        if unknown:
            raise ConfigError(f"--rungs: {unknown} are not rungs of {str(path)!r}; its rungs are {list(resolved)}")
        resolved = {name: resolved[name] for name in rungs}
    return LadderConfig(name=ladder.name, base=str(here / ladder.base), seeds=seeds or ladder.seeds, rungs=resolved)


def ladder_dir(ladder: LadderConfig, base: MastersConfig) -> Path:
    """`<base storage_path>/<ladder name>/`: runs/, records/ and the summary files."""
    return Path(base.storage_path) / ladder.name


def run_name(rung: str, seed: int) -> str:
    return f"{rung}-seed{seed}"


def rung_config(ladder: LadderConfig, rung: str, seed: int, overrides: list[str] | None = None) -> MastersConfig:
    """The run config of `rung` at `seed`: base ⊕ rung file ⊕ `overrides` ⊕ the ladder's name, paths and seeds."""
    base = load_config(ladder.base, overrides)
    directory = ladder_dir(ladder, base)
    files = [ladder.base] + ([ladder.rungs[rung]] if ladder.rungs[rung] else [])
    # The ladder's own settings come last: `overrides` set the base's storage_path, not the runs'.
    return load_config(
        files,
        [
            *(overrides or []),
            f"name={run_name(rung, seed)}",
            f"storage_path={directory / 'runs'}",
            f"records_path={directory / 'records'}",
            f"generation.seed={seed}",
            f"train.seed={seed}",
        ],
    )


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95% Student-t interval of the mean (0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    quantile = _T975[len(values) - 2] if len(values) - 1 <= len(_T975) else 1.96
    return mean, quantile * statistics.stdev(values) / math.sqrt(len(values))


def summarize(results: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per rung: mean and 95% half-width over seeds of the overall and each family's accuracy, plus the per-seed values.

    `results[rung][seed]` is a test row `{"overall": float, "per_family": {family: float}}`.
    """
    summary = {}
    for rung, by_seed in results.items():
        seeds = sorted(by_seed)
        overall = [by_seed[s]["overall"] for s in seeds]
        families = sorted({f for s in seeds for f in by_seed[s]["per_family"]})
        mean, half_width = t_interval(overall)
        summary[rung] = {
            "seeds": seeds,
            "overall": {"mean": mean, "half_width": half_width, "values": overall},
            "top_answer_share": statistics.fmean(by_seed[s].get("top_answer_share", float("nan")) for s in seeds),
            "per_family": {
                family: dict(zip(("mean", "half_width"), t_interval([by_seed[s]["per_family"][family] for s in seeds])))
                for family in families
            },
        }
    return summary


# What the trainer logs about the full objective (masters.student_loss), averaged per run.
DIAGNOSTICS = ("grad_norm_grpo", "grad_norm_jsd", "grad_cosine_grpo_jsd", "distill_reward_length_corr")


def run_diagnostics(train_steps: list[dict]) -> dict[str, float]:
    """Means of the full objective's diagnostics over a run's logged steps, and the share of those steps
    whose GRPO and JSD gradients point against each other (empty for the other objectives)."""
    out = {}
    for name in DIAGNOSTICS:
        values = [step[name] for step in train_steps if name in step]
        if values:
            out[name] = statistics.fmean(values)
    cosines = [step["grad_cosine_grpo_jsd"] for step in train_steps if "grad_cosine_grpo_jsd" in step]
    if cosines:
        out["opposed_share"] = sum(c < 0 for c in cosines) / len(cosines)
    return out


def format_diagnostics(diagnostics: dict[str, dict[int, dict]]) -> str:
    """A Markdown table of the rungs' diagnostics, averaged over seeds (rungs without any are left out)."""
    names = [*DIAGNOSTICS, "opposed_share"]
    lines = ["| rung | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for rung, by_seed in diagnostics.items():
        rows = [row for row in by_seed.values() if row]
        if rows:
            cells = [f"{statistics.fmean(r[n] for r in rows if n in r):.3g}" if any(n in r for r in rows) else "–" for n in names]
            lines.append(f"| {rung} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_summary(summary: dict[str, dict], reference: dict[str, dict] | None = None) -> str:
    """A console/Markdown table: rung, seeds, overall mean ± 95% half-width, the mean share of the most
    common answer, then per-family means (in %)."""
    families = sorted({f for row in summary.values() for f in row["per_family"]})
    header = "| rung | seeds | overall (95% CI) | top answer | " + " | ".join(families) + " |"
    lines = [header, "|---|---:|---:|---:|" + "---:|" * len(families)]
    for rung, row in summary.items():
        overall = row["overall"]
        cells = [f"{100 * row['per_family'][f]['mean']:.1f}" if f in row["per_family"] else "–" for f in families]
        lines.append(
            f"| {rung} | {len(row['seeds'])} | {100 * overall['mean']:.1f} ± {100 * overall['half_width']:.1f} | "
            f"{100 * row['top_answer_share']:.0f}% | " + " | ".join(cells) + " |"
        )
    for name, row in (reference or {}).items():
        cells = [f"{100 * row['per_family'][f]:.1f}" if f in row["per_family"] else "–" for f in families]
        share = f"{100 * row['top_answer_share']:.0f}%" if "top_answer_share" in row else "–"
        lines.append(f"| *{name}* | – | {100 * row['overall']:.1f} | {share} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_summary(summary: dict[str, dict], reference: dict[str, dict], out: Path) -> Path:
    """Bars of each rung's mean overall accuracy with its 95% interval and the seeds as dots; the
    reference models (teachers) as dashed lines."""
    from masters.report import _save_figure, plt

    rungs = list(summary)
    figure, axis = plt.subplots(figsize=(1.4 * len(rungs) + 3, 4))
    means = [100 * summary[r]["overall"]["mean"] for r in rungs]
    errors = [100 * summary[r]["overall"]["half_width"] for r in rungs]
    axis.bar(range(len(rungs)), means, yerr=errors, capsize=6, color="#7aa6c2", label="mean ± 95% CI")
    for x, rung in enumerate(rungs):
        values = summary[rung]["overall"]["values"]
        axis.scatter([x] * len(values), [100 * v for v in values], color="black", s=12, zorder=3)
    for index, (name, row) in enumerate(reference.items()):
        axis.axhline(100 * row["overall"], linestyle="--", color=f"C{index + 1}", label=name)
    axis.set_xticks(range(len(rungs)), rungs, rotation=20, ha="right")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("Ablation ladder")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    return _save_figure(figure, out)
