"""The one home of models: cards, the registry, backbones and layers, weight I/O, preprocessing,
runtimes and encoders, and importing external models (ONNX, TorchScript, Meta's SSCD).

A model is always named by its card (:mod:`core.models.cards`); a stage turns a card into an
:class:`~core.models.encoders.Encoder` with :func:`~core.models.encoders.build_encoder`, whose
pixels come from the card's :class:`~core.models.preprocess.Preprocess`.
"""
