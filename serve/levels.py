"""Model ids: every mask level of a teacher is `<name>@<ratio>`, the student is `student`.

Teacher ids are written by `masters.curriculum.model_id` (`teacher-l@0.15`, `teacher-l@0`), and any
spelling of the same number (`teacher-l@0.0`, `teacher-l@0.150`) resolves to the same level.
`model_handle` turns a model id into an in-cluster Serve handle. The module imports neither torch nor
the engines: the pipeline's Ray workers import it to reach the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from masters.config import MastersConfig, isclose_ratio
from masters.curriculum import STUDENT, model_id
from serve.api import ServeError

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

APP_NAME = "masters"


@dataclass(frozen=True)
class ServedModel:
    """One configured model: its deployment and the mask ratios it serves (the student: only dense)."""

    name: str
    ratios: tuple[float, ...]
    is_teacher: bool

    @property
    def model_ids(self) -> list[str]:
        if not self.is_teacher:
            return [self.name]
        return [model_id(self.name, ratio) for ratio in self.ratios]


@dataclass(frozen=True)
class Level:
    """A resolved model id: which deployment, at which mask ratio, under its canonical id."""

    model: ServedModel
    mask_ratio: float

    @property
    def model_id(self) -> str:
        return model_id(self.model.name, self.mask_ratio) if self.model.is_teacher else self.model.name


class Catalog:
    """The model ids the service answers, from the config's teachers, mask schedule and student."""

    def __init__(self, models: list[ServedModel]):
        self.models = {model.name: model for model in models}

    @classmethod
    def from_config(cls, config: MastersConfig) -> Catalog:
        ratios = tuple(config.mask.ratios)
        teachers = [ServedModel(t.name, ratios, is_teacher=True) for t in config.models.teachers]
        return cls([*teachers, ServedModel(STUDENT, (0.0,), is_teacher=False)])

    @property
    def model_ids(self) -> list[str]:
        return [mid for model in self.models.values() for mid in model.model_ids]

    def resolve(self, requested: str) -> Level:
        """The level a model id names, or a 404 `ServeError` listing the valid ids."""
        name, at, ratio_text = requested.partition("@")
        model = self.models.get(name)
        if model is not None and model.is_teacher == bool(at):
            if not model.is_teacher:
                return Level(model, 0.0)
            try:
                ratio = float(ratio_text)
            except ValueError:
                ratio = None
            for level in model.ratios:
                if ratio is not None and isclose_ratio(ratio, level):
                    return Level(model, level)
        raise ServeError(
            404,
            f"model {requested!r} does not exist; valid model ids: {', '.join(self.model_ids)}",
            param="model",
            code="model_not_found",
        )


def model_handle(config: MastersConfig, requested: str) -> DeploymentHandle:
    """An in-cluster handle for one model id: `await model_handle(cfg, "teacher-l@0.15").generate.remote(req)`."""
    level = Catalog.from_config(config).resolve(requested)
    # Imported here: a worker that never reaches the service (a reward actor of a generated stage)
    # skips ray.serve, ~0.65 s of CPU per process on two cores.
    from ray import serve

    return serve.get_deployment_handle(level.model.name, app_name=APP_NAME)
