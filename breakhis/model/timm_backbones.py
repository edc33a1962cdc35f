"""Models of the ``timm`` library as classifiers of this project (``--arch timm:NAME``).

    model = build_timm("vit_small_patch16_224", dropout=0.0)        # random weights
    load_backbone(model, "timm:vit_small_patch16_224", read_state_dict("s3://m/uni.pt"), ...)

- **Random weights, no download.** ``timm.create_model(NAME, pretrained=False)``; weights
  come only from ``--weights PATH_OR_S3_URI`` (breakhis.model.networks.read_state_dict: a state dict
  saved by timm, ``torch.save(model.state_dict(), path)`` or a ``.safetensors`` file such as
  the ones pathology foundation models publish), loaded by breakhis.model.networks.load_backbone.
- **The head** is timm's own classifier made two-class (``num_classes=2``) with the run's
  dropout before it (``drop_rate``); a state dict with timm's 1000-class (or no) head loads
  into the backbone and the new head keeps its initialisation.
- **Input size.** A ViT-like model is built at its pretrained input size, so a state dict of
  it fits as saved, with ``dynamic_img_size`` (and ``dynamic_img_pad``): its position
  embeddings are resampled to whatever tile it is fed (S x S crops in training, S x W whole
  tiles in evaluation and scoring), padded to a multiple of its patch. Convolutional models
  take any size as they are.
- **Normalisation.** Training, scoring and export feed every model ImageNet-normalised
  pixels (breakhis.data.transforms.normalize). A timm model pretrained with other statistics
  (timm's pretrained config: e.g. 0.5/0.5 for many ViTs) gets them through a fixed
  per-channel affine in front (``TimmClassifier``), so it sees its own normalisation. The
  affine is a constant of the architecture, not a weight: it is not in the state dict.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from torch import nn

from breakhis.model.architectures import TIMM_PREFIX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def timm_name(arch: str) -> str:
    """``NAME`` of ``timm:NAME``."""
    return arch.removeprefix(TIMM_PREFIX)


def check_timm_name(name: str) -> None:
    """Raise ValueError when timm has no model ``name`` (naming close matches) or is not
    installed."""
    try:
        import timm
    except ImportError as err:
        raise ValueError(f"--arch timm:{name} needs the timm package (pip install timm)") from err
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ValueError(
            f"--arch timm:{name}: timm {timm.__version__} has no such model{hint} "
            "(python -c \"import timm; print(timm.list_models('*vit*'))\" lists them)"
        )


def pretrained_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) timm's pretrained config gives model ``name``; ImageNet's without one."""
    import timm

    cfg = timm.get_pretrained_cfg(name)
    mean = tuple(getattr(cfg, "mean", None) or IMAGENET_MEAN)
    std = tuple(getattr(cfg, "std", None) or IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3:  # a grey-scale model's statistics: use ImageNet's
        return IMAGENET_MEAN, IMAGENET_STD
    return mean, std


class TimmClassifier(nn.Module):
    """A timm model behind a fixed input affine (module docstring). ``model`` is the timm
    model; its state dict keys are ``model.`` + timm's."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        given_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        given_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        own_mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        own_std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # ((x * given_std + given_mean) - own_mean) / own_std as one multiply and one add.
        self.register_buffer("scale", given_std / own_std, persistent=False)
        self.register_buffer("shift", (given_mean - own_mean) / own_std, persistent=False)
        self.identity = bool(torch.equal(given_mean, own_mean) and torch.equal(given_std, own_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.identity:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        return self.model(x)


def build_timm(name: str, dropout: float, num_classes: int = 2) -> TimmClassifier:
    """The timm model ``name`` with random weights, a ``num_classes`` head behind ``dropout``,
    in train mode on CPU. Raises ValueError when timm has no such model."""
    import timm

    check_timm_name(name)
    kwargs = {"pretrained": False, "num_classes": num_classes, "drop_rate": dropout}
    try:
        model = timm.create_model(name, dynamic_img_size=True, dynamic_img_pad=True, **kwargs)
    except TypeError:  # not a ViT-like model: convolutional ones take any input size
        model = timm.create_model(name, **kwargs)
    mean, std = pretrained_normalisation(name)
    return TimmClassifier(model, mean, std)


def head_prefixes(model: TimmClassifier) -> tuple[str, ...]:
    """State-dict prefixes (``model.head.``, ``model.fc.``...) of the model's classifier(s)."""
    heads = model.model.get_classifier()
    heads = heads if isinstance(heads, tuple | list) else (heads,)
    wanted = {id(h) for h in heads}
    return tuple(
        f"model.{name}." for name, module in model.model.named_modules() if id(module) in wanted
    )


def with_model_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict saved by timm (keys as timm names them) in this module's keys
    (``model.`` + key); one saved here is returned as it is."""
    if any(k.startswith("model.") for k in state) and all(k.startswith("model.") for k in state):
        return state
    return {f"model.{k}": v for k, v in state.items()}


def last_conv(model: TimmClassifier) -> nn.Module:
    """The layer Grad-CAM explains: the last Conv2d (a ViT's only one is its patch
    embedding, which Grad-CAM explains poorly: prefer integrated gradients there)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("this timm model has no convolution for Grad-CAM; choose another method")
    return convs[-1]
