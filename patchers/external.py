"""External descriptor members: ONNX (onnxruntime) and TorchScript models users already have.

A card of kind ``external`` names the runtime in ``arch`` (a key of ``RUNTIMES``), the model
file in ``weights``, and its preprocessing: ``resize`` + ``input_size`` (the config's scale
replaces ``input_size``), ``mean``/``std`` for float inputs, and in ``build`` the input
``layout`` (nhwc/nchw), ``dtype`` (uint8: raw 0-255 pixels, normalisation inside the graph;
float32: ``(pixel/255 - mean) / std``) and the input/output tensor names (see
:class:`pretrain.external.ExternalSpec`).

Patches of one batch can differ in shape (``short_side``/``long_side`` keep the aspect
ratio), so a batch is split into groups of equal shape and each group runs as one call:
patches of one image (its crops) and images of one aspect ratio share a call.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchers.encoders import Encoder, register_encoder
from pretrain.external import ExternalSpec, external_spec
from pretrain.registry import ModelCard, RegistryError

INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resized_size(size: tuple[int, int], rule: str, target: int) -> tuple[int, int]:
    """(w, h) after ``rule``: square -> target x target; short_side/long_side -> that side = target."""
    w, h = size
    if rule == "square":
        return target, target
    side = min(w, h) if rule == "short_side" else max(w, h)
    return max(1, round(w * target / side)), max(1, round(h * target / side))


class Preprocess:
    """PIL image -> one input row (H, W, 3) or (3, H, W), uint8 or normalised float32."""

    def __init__(self, card: ModelCard, spec: ExternalSpec, scale: int) -> None:
        self.rule, self.scale, self.spec = card.resize, scale, spec
        self.mean = np.asarray(card.mean, np.float32)
        self.std = np.asarray(card.std, np.float32)

    def __call__(self, img: Image.Image) -> np.ndarray:
        img = img.convert("RGB")
        size = resized_size(img.size, self.rule, self.scale)
        if size != img.size:
            img = img.resize(size, INTERPOLATION[self.spec.interpolation])
        x = np.asarray(img, np.uint8)
        if self.spec.dtype == "float32":
            x = (x.astype(np.float32) / 255.0 - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1) if self.spec.layout == "nchw" else x)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class GroupedEncoder:
    """Preprocess each patch, run equal-shape groups through ``forward``, L2-normalise rows."""

    def __init__(self, name: str, preprocess: Preprocess, forward: Callable[[np.ndarray], np.ndarray],
                 dim: int) -> None:
        self.name, self.preprocess, self.forward, self.dim = name, preprocess, forward, dim

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        inputs = [self.preprocess(im) for im in images]
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, x in enumerate(inputs):
            groups[x.shape].append(i)
        out = np.empty((len(images), self.dim), np.float32)
        for rows in groups.values():
            y = np.asarray(self.forward(np.stack([inputs[i] for i in rows])))
            if y.ndim != 2 or y.shape != (len(rows), self.dim):
                raise RuntimeError(f"model {self.name!r}: expected output ({len(rows)}, {self.dim}), "
                                   f"got {y.shape}")
            out[rows] = l2_normalize(y)
        return out


def onnx_forward(card: ModelCard, spec: ExternalSpec, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """An onnxruntime session (CUDA provider on a cuda device when present) as ``x -> rows``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = spec.intra_op_threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(card.weights, sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise RegistryError(f"model {card.name!r}: {card.weights} is not a loadable ONNX model: {e}") from e
    for what, given, names in (("inputs", spec.input, [i.name for i in session.get_inputs()]),
                               ("outputs", spec.output, [o.name for o in session.get_outputs()])):
        if given not in names:
            raise RegistryError(f"model {card.name!r}: {card.weights} has {what} {names}, card says {given!r}")
    return lambda x: session.run([spec.output], {spec.input: x})[0]


def torchscript_forward(card: ModelCard, spec: ExternalSpec, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """A TorchScript module as ``x -> rows`` (an archive holds TorchScript code and tensors,
    not arbitrary pickled Python objects)."""
    try:
        module = torch.jit.load(card.weights, map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise RegistryError(f"model {card.name!r}: {card.weights} is not a TorchScript archive: {e}") from e

    @torch.inference_mode()
    def forward(x: np.ndarray) -> np.ndarray:
        y = module(torch.from_numpy(x).to(device))
        if isinstance(y, dict):
            y = y[spec.output]
        return y.float().cpu().numpy()
    return forward


Runtime = Callable[[ModelCard, ExternalSpec, str], Callable[[np.ndarray], np.ndarray]]
RUNTIMES: dict[str, Runtime] = {"onnx": onnx_forward, "torchscript": torchscript_forward}


def _runtime(card: ModelCard, device: str) -> tuple[ExternalSpec, Callable[[np.ndarray], np.ndarray]]:
    spec = external_spec(card)
    if card.arch not in RUNTIMES:
        raise RegistryError(f"model {card.name!r}: unknown external runtime {card.arch!r}; known: {sorted(RUNTIMES)}")
    if not card.weights or not Path(card.weights).is_file():
        raise RegistryError(f"model {card.name!r}: model file {card.weights} does not exist")
    return spec, RUNTIMES[card.arch](card, spec, device)


def probe_dim(card: ModelCard, device: str = "cpu") -> int:
    """The descriptor size of an external model: its output for one grey input_size patch."""
    spec, forward = _runtime(card, device)
    x = Preprocess(card, spec, card.input_size)(Image.new("RGB", (card.input_size, card.input_size), (128,) * 3))
    try:
        y = np.asarray(forward(x[None]))
    except Exception as e:  # whatever the runtime raises for a wrong input
        raise RegistryError(f"model {card.name!r}: {card.weights} rejects a {spec.layout} {spec.dtype} "
                            f"input of shape {x[None].shape}: {e}") from e
    if y.ndim != 2 or y.shape[0] != 1:
        raise RegistryError(f"model {card.name!r}: {card.weights} gives output shape {y.shape}; "
                            "expected (batch, dim)")
    return int(y.shape[1])


@register_encoder("external")
def external_encoder(card: ModelCard, scale: int, device: str) -> Encoder:
    """The encoder of an external card, resizing by its rule to ``scale``."""
    if card.dim is None:
        raise RegistryError(f"model {card.name!r}: an external card needs dim")
    spec, forward = _runtime(card, device)
    return GroupedEncoder(card.name, Preprocess(card, spec, scale), forward, card.dim)
