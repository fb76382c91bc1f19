"""The training YAML (``copydet pretrain/finetune CONFIG``): typed, strict, errors name the key.

One file describes BYOL pretraining of every backbone and the fan-out of fine-tuned models::

    backbones: [resnet152, r50_ibn_a, vit_b16]
    sets: 11                 # or recipes: [basic, paste, ...]

Each (set, backbone) pair becomes one :class:`RunSpec`, the plain-data description that a
training loop (``train_loop_per_worker(config)``) receives, so a run can start on any worker.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from core.models.backbones import list_backbones
from core.models.registry import registry_path
from core.models.verifier import VerifierSpec
from core.store import absolute
from core.yamlconf import ConfigError, ConfigModel, load_as

TrainConfigError = ConfigError


class DataSection(ConfigModel):
    train: str = Field(description="folder of unlabeled training photos")
    limit: int | None = Field(None, ge=4, description="use at most this many photos (sorted by name)")
    val_photos: int = Field(0, ge=0, description="photos held aside as validation references")
    val_distractors: int = Field(0, ge=0, description="photos held aside as distractor queries")
    max_side: int = Field(512, ge=16, description="decoded photos are shrunk to this longer side")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="a run stops when more of its photos than "
                                    "this do not decode or edit (they are replaced until then)")


class RaySection(ConfigModel):
    address: str | None = Field(None, description="cluster address; None = local Ray")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks) per run")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=-1, description="worker failures a run recovers from")
    launcher: Literal["trainer", "inline"] = Field(
        "trainer", description="trainer: a TorchTrainer per run; inline: the loop runs inside a Ray task"
    )
    max_concurrent: int | None = Field(None, ge=1, description="fan-out runs in flight (None: all)")


class ModelSection(ConfigModel):
    dim: int | None = Field(256, ge=8, description="descriptor size (null: the pooled trunk features, no projection)")
    img_size: int = Field(224, ge=16, le=1024, description="training input side in pixels")
    img_size_for: dict[str, int] = Field({}, description="per-backbone input side, overrides img_size")
    pool: str | None = Field(None, description="pooling (default: the backbone's)")

    def for_backbone(self, backbone: str) -> ModelSection:
        """This section with ``img_size`` set for ``backbone``."""
        return self.model_copy(update={"img_size": self.img_size_for.get(backbone, self.img_size), "img_size_for": {}})


class PretrainSection(ConfigModel):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=2, description="photos per step per worker (2 views each)")
    steps_per_epoch: int | None = Field(None, ge=1, description="cap the steps of an epoch")
    lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    momentum: tuple[float, float] = Field((0.99, 1.0), strict=False, description="target EMA: start, end (cosine)")
    proj_hidden: int = Field(4096, ge=8)
    proj_dim: int = Field(256, ge=8)
    pred_hidden: int = Field(4096, ge=8)
    recipe: str = Field("byol_views", description="recipe that makes the two views")


class LossSection(ConfigModel):
    name: str = Field("arcface", description="a key of pretrain.losses.LOSSES")
    params: dict[str, Any] = Field({}, description="keyword arguments of the loss")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from pretrain.losses import LOSSES  # pytorch-metric-learning: import late

        if v not in LOSSES:
            raise ValueError(f"unknown loss {v!r}; known: {', '.join(LOSSES)}")
        return v

    @model_validator(mode="after")
    def _params_work(self) -> LossSection:
        from pretrain.losses import check_loss

        check_loss(self.name, self.params)
        return self


class FinetuneSection(ConfigModel):
    init: str = Field("random", description="random | byol | registry name | checkpoint path")
    pool: str | None = Field(None, description="pooling while fine-tuning (default: model.pool); "
                             "a GeM variant reads the same trunk, e.g. gem_grid2 after a gem BYOL")
    epochs: int = Field(1, ge=1)
    photos_per_batch: int = Field(16, ge=2, description="P: distinct photos per step per worker")
    copies: int = Field(2, ge=1, description="K: recipe copies of each photo per step")
    steps_per_epoch: int | None = Field(None, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    loss: LossSection = LossSection()


class VerifierSection(VerifierSpec):
    """The learned verifier (``copydet train-verifier``): a pair transformer (the
    :class:`~core.models.verifier.VerifierSpec` fields) over region tokens of a frozen descriptor
    model, trained on recipe copies (positives) against kNN-mined neighbours (negatives)."""

    tokens: str = Field("sscd_distilled", description="frozen descriptor model that describes the regions")
    miner: str = Field("sscd", description="global descriptor model that mines hard negatives")
    miner_scale: int = Field(224, ge=32)
    neighbours: int = Field(5, ge=1, description="a copy's negatives are drawn from its photo's nearest neighbours")
    epochs: int = Field(1, ge=1)
    photos_per_batch: int = Field(32, ge=2, description="copies per step per worker (each: 1 positive, 2 negatives)")
    steps_per_epoch: int | None = Field(None, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)


class TrainConfig(ConfigModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="model-name prefix")
    output: str = Field("runs/train", description="run folders and Ray Train storage")
    registry: str | None = Field(None, description="model registry folder (default: $COPYDET_REGISTRY or ./models)")
    seed: int = 0
    backbones: list[str] = Field([], description="trained by pretrain / finetune (not by train-verifier)")
    sets: int | None = Field(None, ge=1, description="fan out over the first N set recipes")
    recipes: list[str] | None = Field(None, min_length=1, description="or name the set recipes")
    data: DataSection
    model: ModelSection = ModelSection()
    ray: RaySection = RaySection()
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads per rank (None: Ray's/torch's)")
    pretrain: PretrainSection = PretrainSection()
    finetune: FinetuneSection = FinetuneSection()
    verifier: VerifierSection = VerifierSection()

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        from pretrain.recipes import (  # recipes pull in AugLy: import late
            RECIPES,
            recipe_names,
        )

        unknown = [b for b in self.backbones if b not in list_backbones()]
        if unknown:
            raise ValueError(f"backbones: unknown {unknown}; registered: {', '.join(list_backbones())}")
        if (self.sets is None) == (self.recipes is None):
            raise ValueError("give exactly one of sets (a count) and recipes (names)")
        if self.sets is not None:
            recipe_names(self.sets)  # raises with the allowed range
        extra = sorted(set(self.model.img_size_for) - set(self.backbones))
        if extra:
            raise ValueError(f"model.img_size_for: {extra} are not in backbones {self.backbones}")
        bad = [r for r in [*(self.recipes or []), self.pretrain.recipe] if r not in RECIPES]
        if bad:
            raise ValueError(f"unknown recipes {bad}; known: {', '.join(RECIPES)}")
        return self

    def set_recipes(self) -> list[str]:
        """The recipes that define the training sets, in fan-out order."""
        from pretrain.recipes import recipe_names

        return list(self.recipes) if self.recipes is not None else recipe_names(self.sets or 1)

    def anchored(self) -> TrainConfig:
        """This config with its folders as absolute paths, read where the command runs (a
        checkpoint ``finetune.init`` is resolved by the driver already). The YAML keeps them as
        written, so that ``copydet submit`` can refuse relative ones, which would name a folder on
        the wrong machine."""
        return self.model_copy(update={
            "output": absolute(self.output), "registry": absolute(self.registry_dir()),
            "data": self.data.model_copy(update={"train": absolute(self.data.train)})})

    def registry_dir(self) -> str:
        return str(registry_path(self.registry))


class RunSpec(ConfigModel):
    """One training run as plain data: what ``train_loop_per_worker`` receives."""

    kind: Literal["byol", "finetune", "verifier"]
    name: str = Field(description="registry name of the model this run produces")
    backbone: str
    recipe: str = Field(description="set recipe; a verifier run's recipes joined by '+'")
    run_dir: str
    registry: str
    seed: int
    data: DataSection
    model: ModelSection
    num_workers: int = 1
    use_gpu: bool = False
    loader_workers: int = 0
    torch_threads: int | None = None
    pretrain: PretrainSection = PretrainSection()
    finetune: FinetuneSection = FinetuneSection()
    verifier: VerifierSection = VerifierSection()
    init_weights: str | None = Field(None, description="weights file fine-tuning starts from")
    fault: dict[str, Any] | None = Field(
        None, description="test hook: {'epoch': E, 'marker': path, 'after_s': s} kills the worker once in epoch E"
    )


def load_train_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """Read and validate a training YAML; ``overrides`` are ``key.sub=value`` (YAML values)."""
    return load_as(TrainConfig, path, overrides or [], what="training config")
