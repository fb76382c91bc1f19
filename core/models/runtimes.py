"""Model runtimes: a card -> ``forward(input array) -> (B, dim) array``.

``torch`` runs a copydet backbone (built from its card by :func:`core.models.resolve.build_model`);
``onnx`` (onnxruntime) and ``torchscript`` run external models users already have, named by the
card's ``arch``. Inputs are what :meth:`core.models.preprocess.Preprocess.to_input` makes.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from core.logs import last_line
from core.models.cards import ExternalSpec, ModelCard, RegistryError, input_spec
from core.models.preprocess import Preprocess

Forward = Callable[[np.ndarray], np.ndarray]
DYNAMIC_ADVICE = ("copydet runs batches of several images at each configured scale (non-square for short_side/"
                  "long_side cards): re-export the model with dynamic batch, height and width axes")


def check_dynamic_input(card: ModelCard, spec: ExternalSpec, shape: list[int | str | None]) -> None:
    """Refuse an ONNX input ``shape`` with a fixed batch, height or width (ints are fixed, names
    and None dynamic): onnxruntime rejects any other size deep inside an extraction job."""
    if len(shape) != 4:
        raise RegistryError(f"model {card.name!r}: {card.weights} input {spec.input!r} has shape {shape}; "
                            f"expected 4 dims ({spec.layout})")
    h, w = (1, 2) if spec.layout == "nhwc" else (2, 3)
    fixed = [f"{axis} {shape[i]}" for axis, i in (("batch", 0), ("height", h), ("width", w))
             if isinstance(shape[i], int)]
    if fixed:
        raise RegistryError(f"model {card.name!r}: {card.weights} input {spec.input!r} has shape {shape} with "
                            f"fixed {', '.join(fixed)}; {DYNAMIC_ADVICE}")


def onnx_forward(card: ModelCard, spec: ExternalSpec, device: str) -> Forward:
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
    check_dynamic_input(card, spec, next(i.shape for i in session.get_inputs() if i.name == spec.input))
    return lambda x: session.run([spec.output], {spec.input: x})[0]


def torchscript_forward(card: ModelCard, spec: ExternalSpec, device: str) -> Forward:
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
            if spec.output not in y:
                raise RegistryError(f"model {card.name!r}: {card.weights} output dict has keys {sorted(y)}; the "
                                    f"card's output name is {spec.output!r} (use --output-name KEY)")
            y = y[spec.output]
        return y.float().cpu().numpy()
    return forward


AUTOCAST = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_forward(card: ModelCard, device: str, precision: str = "float32") -> Forward:
    """A copydet backbone (weights from the card) as ``x -> rows``; on a GPU, ``float16`` /
    ``bfloat16`` run it under autocast (on the CPU it always runs in float32)."""
    from core.models.resolve import build_model

    model = build_model(card).eval().to(device)
    dtype = AUTOCAST.get(precision) if device.startswith("cuda") else None

    @torch.inference_mode()
    def forward(x: np.ndarray) -> np.ndarray:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            return model(torch.from_numpy(x).to(device)).float().cpu().numpy()
    return forward


Runtime = Callable[[ModelCard, ExternalSpec, str], Forward]
RUNTIMES: dict[str, Runtime] = {"onnx": onnx_forward, "torchscript": torchscript_forward}


def runtime(card: ModelCard, device: str = "cpu", precision: str = "float32") -> Forward:
    """The forward function of a descriptor card on ``device`` (``precision``: torch models only)."""
    spec = input_spec(card)
    if card.kind == "backbone":
        return torch_forward(card, device, precision)
    if card.arch not in RUNTIMES:
        raise RegistryError(f"model {card.name!r}: unknown external runtime {card.arch!r}; known: {sorted(RUNTIMES)}")
    if not card.weights or not Path(card.weights).is_file():
        raise RegistryError(f"model {card.name!r}: model file {card.weights} does not exist")
    return RUNTIMES[card.arch](card, spec, device)


def probe_dim(card: ModelCard, device: str = "cpu") -> int:
    """The descriptor size of a model: its output for one grey ``input_size`` patch. A batch of
    two at another size (non-square for *_side cards) must give as many rows of that size too,
    as extraction feeds such batches; checked here, so a model that cannot take them is refused
    at import, not deep inside an extraction job."""
    forward = runtime(card, device)
    side = card.input_size
    dim = _probe(card, forward, 1, (side, side)).shape[1]
    other = side + max(1, side // 2)
    size = (other, other) if card.resize == "square" else (side, other)
    y = _probe(card, forward, 2, size, f"; {DYNAMIC_ADVICE}")
    if y.shape[1] != dim:
        raise RegistryError(f"model {card.name!r}: {card.weights} gives {dim}-d rows at {side}x{side} but "
                            f"{y.shape[1]}-d rows at {size[0]}x{size[1]}; expected the same size at every scale")
    return int(dim)


def _probe(card: ModelCard, forward: Forward, batch: int, size: tuple[int, int], advice: str = "") -> np.ndarray:
    """The model's ``(batch, dim)`` output for ``batch`` grey patches of ``size`` (h, w); errors
    name the input shape (plus ``advice``)."""
    pre = Preprocess.for_card(card)
    x = pre.to_input(np.full((batch, *size, 3), 128, np.uint8))
    try:
        y = np.asarray(forward(x))
    except RegistryError:  # the runtime's own message (e.g. a missing output key) says it best
        raise
    except Exception as e:  # whatever the runtime raises for a wrong input
        raise RegistryError(f"model {card.name!r}: {card.weights} rejects a {pre.spec.layout} {pre.spec.dtype} "
                            f"input of shape {x.shape}: {last_line(e)}{advice}") from e
    if y.ndim != 2 or y.shape[0] != batch:
        raise RegistryError(f"model {card.name!r}: {card.weights} gives output shape {y.shape} for input shape "
                            f"{x.shape}; expected ({batch}, dim){advice}")
    return y

