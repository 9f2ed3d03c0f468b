"""Evaluation as a Ray task, so the driver never loads a model itself and runs on any node of a cluster."""

from __future__ import annotations

from pathlib import Path

import ray

from masters.config import DataConfig, MastersConfig


@ray.remote(max_retries=2)
def _evaluate_task(model_dir: str, model_name: str, split: str, size: int, data: DataConfig, max_new_tokens: int, device: str):
    from masters.data import load_split
    from masters.eval import evaluate
    from masters.models import load_model

    model, processor = load_model(model_dir, device=device)
    samples = load_split(data, split, size)
    report = evaluate(model, processor, samples, model_name=model_name, split=split, max_new_tokens=max_new_tokens)
    return report.to_json()


def evaluate_models(config: MastersConfig, models: dict[str, Path], split: str, size: int) -> dict[str, dict]:
    """Greedy accuracy of each model on `split`, evaluated in parallel Ray tasks; keyed like `models`."""
    device = "cuda" if config.train.use_gpu else "cpu"
    options = {"num_gpus": 1} if config.train.use_gpu else {"num_cpus": 0.25}
    futures = {
        name: _evaluate_task.options(**options).remote(
            str(path),
            name,
            split,
            size,
            config.data,
            config.generation.sampling.max_new_tokens,
            device,
        )
        for name, path in models.items()
    }
    return {name: ray.get(future) for name, future in futures.items()}
