"""The networks, built by name from a ``ModelConfig`` and the data's :class:`DataInfo`.

Image classifiers (:mod:`dtrain.models.vision`) take ``[B, *info.in_shape]`` floats and return
``[B, info.num_classes]`` logits; language models (:mod:`dtrain.models.lm`) take ``[B, T]``
token ids and return ``[B, T, info.vocab_size]`` logits. ``model.width``/``model.depth`` = 0
select each model's default (see its docstring)::

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, data.info)
"""

import logging
import math

from torch import nn

from dtrain.config import MODELS, ModelConfig
from dtrain.data import DataInfo
from dtrain.errors import UserError
from dtrain.models.lm import CharTransformer, LSTMLanguageModel
from dtrain.models.vision import MLP, DigitsCNN, MobileNet, resnet18, resnet20

__all__ = ["MODEL_KIND", "build_model", "num_parameters"]

logger = logging.getLogger(__name__)

MODEL_KIND: dict[str, str] = {
    "digits_cnn": "image",
    "mlp": "image",
    "resnet20": "image",
    "resnet18": "image",
    "mobilenet": "image",
    "char_transformer": "lm",
    "lstm_lm": "lm",
}
assert set(MODEL_KIND) == set(MODELS), "MODEL_KIND must name every model in config.MODELS"

# Models with a depth knob / with dropout; the others reject a non-default value.
_HAS_DEPTH = ("mlp", "char_transformer", "lstm_lm")
_HAS_DROPOUT = ("mlp", "char_transformer", "lstm_lm")


def _names(kind: str) -> str:
    names = [n for n, k in MODEL_KIND.items() if k == kind]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _check(cfg: ModelConfig, info: DataInfo) -> None:
    """UserError when the model does not fit the data or a knob does not apply."""
    kind = MODEL_KIND[cfg.name]
    data = f"data.name = {info.name!r}" if info.name else "the data"
    if kind == "image" and info.kind == "lm":
        raise UserError(
            f"model.name = {cfg.name!r} is an image classifier but {data} gives text: "
            f"use model.name = {_names('lm')}"
        )
    if kind == "lm" and info.kind == "image":
        raise UserError(
            f"model.name = {cfg.name!r} is a language model but {data} gives images: "
            f"use model.name = {_names('image')}"
        )
    if kind == "image" and cfg.name != "mlp" and len(info.in_shape) != 3:
        raise UserError(
            f"model.name = {cfg.name!r} needs images shaped [C, H, W] but {data} gives inputs "
            f"shaped {list(info.in_shape)}: use model.name = mlp or a 3-D data.synthetic_shape"
        )
    if cfg.depth and cfg.name not in _HAS_DEPTH:
        raise UserError(
            f"model.depth = {cfg.depth} has no effect on {cfg.name} (only on "
            f"{', '.join(_HAS_DEPTH)}): set model.depth = 0"
        )
    if cfg.dropout and cfg.name not in _HAS_DROPOUT:
        raise UserError(
            f"model.dropout = {cfg.dropout} has no effect on {cfg.name} (only on "
            f"{', '.join(_HAS_DROPOUT)}): set model.dropout = 0"
        )
    if cfg.name == "char_transformer" and (cfg.width or 128) % cfg.heads:
        raise UserError(
            f"model.width = {cfg.width or 128} must be divisible by model.heads = {cfg.heads}: "
            f"change one of them"
        )


def build_model(cfg: ModelConfig, info: DataInfo) -> nn.Module:
    """The network ``cfg.name`` sized for ``info``, initialised from the global torch RNG.

    Args:
        cfg: the ``[model]`` section.
        info: what the data gives (kind, input shape, classes or vocabulary).

    Returns:
        The model on the CPU, in training mode.

    Raises:
        UserError: the model does not fit the data (an image model on text, a CNN on flat
            inputs) or a knob it does not have is set.
    """
    _check(cfg, info)
    width = {"width": cfg.width} if cfg.width else {}
    depth = {"depth": cfg.depth} if cfg.depth else {}
    name = cfg.name
    if MODEL_KIND[name] == "image":
        image = {"num_classes": info.num_classes}
        if name == "mlp":
            model: nn.Module = MLP(
                in_features=math.prod(info.in_shape), dropout=cfg.dropout, **image, **width, **depth
            )
        else:
            build = {
                "digits_cnn": DigitsCNN,
                "resnet20": resnet20,
                "resnet18": resnet18,
                "mobilenet": MobileNet,
            }[name]
            model = build(in_channels=info.in_shape[0], **image, **width)
    elif name == "char_transformer":
        model = CharTransformer(
            vocab_size=info.vocab_size,
            seq_len=info.seq_len,
            heads=cfg.heads,
            dropout=cfg.dropout,
            **width,
            **depth,
        )
    else:
        model = LSTMLanguageModel(vocab_size=info.vocab_size, dropout=cfg.dropout, **width, **depth)
    logger.debug("model %s: %s parameters", name, f"{num_parameters(model):,}")
    return model


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
