"""Model cards: what every stage knows about a model (DESIGN.md's model-card contract).

A card is plain data: its kind, where the weights are, how pixels are prepared for it
(``input_size``, ``resize``, ``mean``/``std`` and, for external models, the input ``layout``
and ``dtype`` in :class:`ExternalSpec`) and where it came from. Building a model from a card
lives in :mod:`core.models.resolve` (torch backbones) and :mod:`core.models.runtimes`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean/std of uint8 inputs normalised in the graph
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class RegistryError(ValueError):
    """A model name cannot be resolved, or a card file is invalid (the message says which)."""


def first_problem(e: ValidationError) -> str:
    """The first problem pydantic found, as ``field: message (and N more)``: one line for an
    error message instead of pydantic's multi-line dump."""
    err = e.errors()[0]
    loc = ".".join(str(part) for part in err["loc"])
    more = e.error_count() - 1
    return f"{loc + ': ' if loc else ''}{err['msg']}" + (f" (and {more} more)" if more else "")


class ModelCard(BaseModel):
    """What a stage needs to know to use a model, and where it came from."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="registry name (file <name>.json)")
    kind: Literal["backbone", "detector", "external", "verifier"]
    arch: str = Field(description="backbone registry name, detector or external model type")
    weights: str | None = Field(None, description="local weights file; None = random init")
    weights_sha256: str | None = Field(None, description="content hash of the weights file")
    input_size: int = Field(gt=0, description="nominal input side in pixels")
    resize: Literal["square", "short_side", "long_side"] = Field(
        "square", description="square: to input_size^2; *_side: that side to input_size"
    )
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int | None = Field(None, gt=0, description="descriptor size (None for detectors)")
    build: dict[str, Any] = Field({}, description="build_backbone kwargs (backbone), ExternalSpec (external) "
                                 "or VerifierSpec (verifier)")
    trained_on: str | None = Field(None, description="training recipe / image set")
    loss: str | None = None
    source_checkpoint: str | None = Field(None, description="weights training started from")
    train_time_s: float | None = Field(None, ge=0)
    metrics: dict[str, float] = Field({}, description="validation metrics, e.g. uAP, R@P90")

    @model_validator(mode="after")
    def _backbone_fields(self) -> ModelCard:
        if self.kind == "backbone" and (self.dim is None or "name" not in self.build):
            raise ValueError("a backbone card needs dim and build (build_backbone kwargs)")
        return self


class ExternalSpec(BaseModel):
    """Runtime settings of an external (ONNX / TorchScript) card, stored in ``ModelCard.build``."""

    model_config = ConfigDict(extra="forbid")

    layout: Literal["nhwc", "nchw"] = "nchw"
    dtype: Literal["uint8", "float32"] = Field("float32", description="uint8: raw pixels, normalised in the graph")
    input: str = Field("input", description="input tensor name (ONNX)")
    output: str = Field("output", description="output tensor name (ONNX; TorchScript dict outputs)")
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    intra_op_threads: int | None = Field(None, ge=1, description="None: torch's thread count in the actor")


TORCH_INPUT = ExternalSpec()  # what a torch backbone takes: float NCHW, (x/255 - mean) / std


def input_spec(card: ModelCard) -> ExternalSpec:
    """How pixels enter the model of ``card`` (validated; the error names the card)."""
    if card.kind == "backbone":
        return TORCH_INPUT
    if card.kind != "external":
        raise RegistryError(f"model {card.name!r} is a {card.kind}, not a descriptor model")
    try:
        spec = ExternalSpec.model_validate(card.build)
    except ValidationError as e:
        raise RegistryError(f"model {card.name!r}: invalid external settings in build: {first_problem(e)}") from e
    if spec.dtype == "uint8" and (tuple(card.mean), tuple(card.std)) != IDENTITY:
        raise RegistryError(f"model {card.name!r}: uint8 input is normalised inside the graph; "
                            f"mean/std must be {IDENTITY[0]}/{IDENTITY[1]}, got {card.mean}/{card.std}")
    return spec
