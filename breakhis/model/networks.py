"""The classifiers: torchvision backbones with a new two-class head.

    model = build_model("resnet50", weights="imagenet")          # internet needed once
    model = build_model("resnet50", weights="s3://models/resnet50-imagenet.pt")  # air-gapped
    model = build_model("smallcnn")                              # tests and the demo

Every architecture ends in the same head, ``Dropout(dropout) -> Linear(features, 2)``,
registered where torchvision keeps its classifier (``fc`` for ResNets,
``classifier.6`` for VGG16, ``classifier`` for EfficientNet, ``head`` for the
small CNN), so a torchvision state dict loads into the backbone unchanged.

Weights come from one of three places:

- ``imagenet``: torchvision's own download (cached under ``$TORCH_HOME``);
- a local path or ``s3://`` URI of a state dict, e.g. written on a machine with
  internet by ``torch.save(torchvision.models.resnet50(weights="DEFAULT").state_dict(), path)``
  for clusters without it. The file may also hold a whole model of this module
  (head included) or a training checkpoint dict with a ``model`` entry;
- ``none``: random initialisation.
"""

from __future__ import annotations

import io
import logging
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torchvision
from torch import nn

from breakhis import storage
from breakhis.model.architectures import ARCHITECTURES, check_arch, is_timm  # noqa: F401

log = logging.getLogger(__name__)

NUM_CLASSES = 2

_DOWNLOAD_TIMEOUT_S = 60.0


class WeightsError(ValueError):
    """Weights that cannot be had, or do not fit the architecture."""


class SmallCNN(nn.Module):
    """Four conv blocks and the common head: a model that trains in seconds on a CPU.

    Not in the seeds' comparison; it exists so tests and the demo exercise the
    whole pipeline at 32-64 px without a ResNet's cost.
    """

    def __init__(self, dropout: float = 0.2, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i, out in enumerate((width, width * 2, width * 4, width * 8)):
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = _head(channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def _head(features: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(features, NUM_CLASSES))


def _resnet(factory: Callable[..., nn.Module]) -> Callable[[float], nn.Module]:
    def build(dropout: float) -> nn.Module:
        model = factory(weights=None)
        model.fc = _head(model.fc.in_features, dropout)
        return model

    return build


def _vgg16(dropout: float) -> nn.Module:
    model = torchvision.models.vgg16(weights=None)
    # Index 5 was VGG's own dropout before its last layer; ours lives in the head.
    model.classifier[5] = nn.Identity()
    model.classifier[6] = _head(model.classifier[6].in_features, dropout)
    return model


def _efficientnet_b0(dropout: float) -> nn.Module:
    model = torchvision.models.efficientnet_b0(weights=None)
    model.classifier = _head(model.classifier[1].in_features, dropout)
    return model


_BUILDERS: dict[str, Callable[[float], nn.Module]] = {
    "resnet50": _resnet(torchvision.models.resnet50),
    "resnet18": _resnet(torchvision.models.resnet18),
    "vgg16": _vgg16,
    "efficientnet_b0": _efficientnet_b0,
    "smallcnn": lambda dropout: SmallCNN(dropout),
}
_HEAD_PREFIX: dict[str, str] = {
    "resnet50": "fc.",
    "resnet18": "fc.",
    "vgg16": "classifier.6.",
    "efficientnet_b0": "classifier.",
    "smallcnn": "head.",
}
_IMAGENET: dict[str, Callable[[], torchvision.models.WeightsEnum]] = {
    "resnet50": lambda: torchvision.models.ResNet50_Weights.DEFAULT,
    "resnet18": lambda: torchvision.models.ResNet18_Weights.DEFAULT,
    "vgg16": lambda: torchvision.models.VGG16_Weights.DEFAULT,
    "efficientnet_b0": lambda: torchvision.models.EfficientNet_B0_Weights.DEFAULT,
}


def build_model(
    arch: str = "resnet50", weights: str = "none", dropout: float = 0.2, num_classes: int = 2
) -> nn.Module:
    """A classifier with a new head (``Dropout -> Linear``, ``num_classes`` outputs: 2 for
    benign vs malignant, 8 for the subtypes), in train mode, on CPU.

    ``weights``: ``"none"``, ``"imagenet"``, or a local path / ``s3://`` URI of a
    state dict (see the module docstring). Returns the model. Raises ValueError
    for an unknown ``arch``, a ``dropout`` outside [0, 1) or ``num_classes`` < 2, and
    WeightsError (a ValueError) when the weights cannot be fetched or do not fit ``arch``.
    """
    check_arch(arch)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if is_timm(arch):
        from breakhis.model.timm_backbones import build_timm, timm_name

        model = build_timm(timm_name(arch), dropout, num_classes)
    else:
        model = _BUILDERS[arch](dropout)
        if num_classes != NUM_CLASSES:
            # Only another head: a two-class model is built exactly as before (same RNG draws).
            head = head_module(model, arch)
            head[-1] = nn.Linear(head[-1].in_features, num_classes)
    if weights == "none":
        return model
    if weights == "imagenet":
        state = imagenet_state_dict(arch)
        source = f"torchvision's ImageNet weights for {arch}"
    else:
        state = read_state_dict(weights)
        source = weights
    load_backbone(model, arch, state, source=source)
    return model


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torch.hub opens its URL without a timeout; a firewalled cluster would hang forever.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet state dict for ``arch``, downloaded once into ``$TORCH_HOME``.

    Returns the state dict (with torchvision's 1000-class head). Raises
    WeightsError when ``arch`` has no ImageNet weights or the download fails
    (no internet), saying how to pass a file instead.
    """
    check_arch(arch)
    if is_timm(arch):
        raise WeightsError(
            f"--weights imagenet is torchvision's download, and {arch} is a timm model: "
            "give --weights none (random) or a local path / s3:// URI of a state dict saved "
            "by timm (nothing is downloaded at run time)"
        )
    if arch not in _IMAGENET:
        raise WeightsError(
            f"--weights imagenet: there are no ImageNet weights for {arch!r}; "
            f"use --weights none, or one of {', '.join(_IMAGENET)}"
        )
    enum = _IMAGENET[arch]()
    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            return enum.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as err:  # URLError and timeouts are OSErrors
        raise WeightsError(
            f"--weights imagenet: cannot download {arch} ImageNet weights from {enum.url} "
            f"({err}). On a cluster without internet, save them on a machine with it, e.g. "
            f'`python -c "import torch, torchvision; torch.save(torchvision.models.{arch}'
            f"(weights='DEFAULT').state_dict(), '{arch}.pt')\"`, copy the file to the "
            f"cluster or S3 and pass --weights PATH_OR_S3_URI (or use --weights none)"
        ) from err


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a local path or ``s3://`` URI.

    Accepts a plain state dict, or a dict holding one under ``model`` (this
    project's checkpoints) or ``state_dict``. Prefixes added by DDP
    (``module.``) and torch.compile (``_orig_mod.``) are removed. Returns the
    state dict. Raises WeightsError naming the URI when the file is missing or
    holds something else.
    """
    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, OSError) as err:
        raise WeightsError(
            f"--weights {uri}: cannot read the file ({err}); accepted: imagenet, none, "
            "or a local path / s3:// URI of a torch state dict"
        ) from err
    try:
        if uri.lower().endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            obj = load_safetensors(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and tensor errors all mean "not a state dict"
        raise WeightsError(f"--weights {uri}: not a torch state dict file ({err})") from err
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise WeightsError(
            f"--weights {uri}: expected a state dict (parameter name -> tensor), "
            f"got {type(obj).__name__}"
        )
    return {_strip_prefixes(k): v for k, v in obj.items()}


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def load_backbone(
    model: nn.Module, arch: str, state: dict[str, torch.Tensor], *, source: str
) -> bool:
    """Load ``state`` into ``model``: every backbone tensor must fit exactly.

    The head is loaded too when ``state`` has one of the same shape (a model
    fine-tuned here); otherwise (torchvision's 1000-class head) the new head
    keeps its initialisation. Returns True when the head was loaded. Raises
    WeightsError naming ``source`` and the missing, unexpected and misshapen
    tensors when the backbone does not fit.
    """
    prefix = _head_prefixes(model, arch)
    if is_timm(arch):
        from breakhis.model.timm_backbones import with_model_prefix

        state = with_model_prefix(state)
    own = model.state_dict()
    own_backbone = {k for k in own if not k.startswith(prefix)}
    given_backbone = {k for k in state if not k.startswith(prefix)}
    missing = sorted(own_backbone - given_backbone)
    unexpected = sorted(given_backbone - own_backbone)
    misshapen = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own_backbone & given_backbone
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or misshapen:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                problems.append(f"{len(keys)} {label} ({', '.join(keys[:4])}...)")
        if misshapen:
            problems.append(f"{len(misshapen)} of another shape ({', '.join(misshapen[:3])})")
        origin = "timm's" if is_timm(arch) else "torchvision's"
        raise WeightsError(
            f"--weights {source} does not fit {arch}: {'; '.join(problems)}. "
            f"Give a state dict of {origin} {arch.removeprefix('timm:')} or of a {arch} "
            "trained here"
        )
    head = {k: v for k, v in state.items() if k.startswith(prefix)}
    own_head = {k: v for k, v in own.items() if k.startswith(prefix)}
    head_fits = head.keys() == own_head.keys() and all(
        head[k].shape == own_head[k].shape for k in head
    )
    backbone_state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    model.load_state_dict({**own, **backbone_state, **(head if head_fits else {})})
    log.info(
        "loaded %s into %s (%s)",
        source,
        arch,
        "head included" if head_fits else "backbone only; new 2-class head",
    )
    return head_fits


def _head_prefixes(model: nn.Module, arch: str) -> tuple[str, ...]:
    """State-dict prefixes of the head of ``model`` (built by build_model for ``arch``)."""
    if is_timm(arch):
        from breakhis.model.timm_backbones import head_prefixes

        return head_prefixes(model)
    return (_HEAD_PREFIX[arch],)


def head_module(model: nn.Module, arch: str) -> nn.Module:
    """The two-class head of a model built by build_model(): ``Dropout -> Linear``, or a
    timm model's classifier (its dropout is timm's ``drop_rate``)."""
    check_arch(arch)
    return model.get_submodule(_head_prefixes(model, arch)[0].rstrip("."))


def split_parameters(model: nn.Module, arch: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(backbone, head)`` parameters, for a lower backbone learning rate and freezing."""
    head_ids = {id(p) for p in head_module(model, arch).parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    head = [p for p in model.parameters() if id(p) in head_ids]
    return backbone, head


def set_backbone_trainable(model: nn.Module, arch: str, trainable: bool) -> None:
    """Freeze (``False``) or unfreeze the backbone's parameters; the head always trains."""
    backbone, head = split_parameters(model, arch)
    for param in backbone:
        param.requires_grad_(trainable)
    for param in head:
        param.requires_grad_(True)


def set_train_mode(model: nn.Module, arch: str, backbone_frozen: bool) -> None:
    """Put ``model`` in train mode; with a frozen backbone its normalisation layers stay
    in eval mode, so their running statistics (ImageNet's) do not drift either."""
    model.train()
    if not backbone_frozen:
        return
    head = head_module(model, arch)
    head_modules = set(head.modules())
    for module in model.modules():
        if module not in head_modules and isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def last_conv_layer(model: nn.Module, arch: str) -> nn.Module:
    """The layer whose activations Grad-CAM explains: the last convolutional block.

    Accepts a model from build_model() (not wrapped in DDP). Raises ValueError
    for an unknown ``arch``.
    """
    check_arch(arch)
    if is_timm(arch):
        from breakhis.model.timm_backbones import last_conv

        return last_conv(model)
    if arch in ("resnet50", "resnet18"):
        return model.layer4[-1]
    if arch == "efficientnet_b0":
        return model.features[-1]
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1]


def embedding_layer(model: nn.Module, arch: str) -> tuple[nn.Module, int]:
    """(the module whose input is a tile's embedding, that embedding's length): the model's
    classification head. Its input is what the backbone hands the classifier: the pooled
    features (torchvision: after global average pooling, before the head's dropout; VGG:
    its second 4,096-wide layer; timm: the pre-logits features, those of timm's
    ``forward_head(x, pre_logits=True)``). Raises ValueError when the head has no Linear
    layer to read the length from."""
    head = head_module(model, arch)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{arch}: its classification head has no Linear layer; no embedding")
    return head, linears[0].in_features


def training_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that are in training mode and track running
    statistics (a frozen backbone's, put in eval mode by set_train_mode, are left out)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]


@torch.no_grad()
def recompute_batchnorm_stats(
    model: nn.Module,
    inputs: Iterable[torch.Tensor],
    layers: Sequence[nn.modules.batchnorm._BatchNorm] | None = None,
) -> int:
    """Replace the running mean and variance of ``layers`` (default: training_batchnorms)
    by their average over ``inputs`` (model-ready batches), with the weights as they are.

    Why: BatchNorm's running statistics are an exponential average (momentum 0.1)
    over the steps of training, taken while the weights change under them. After
    a handful of steps (a short run, a small data set, many workers) they are
    still mostly their initial values or those of older weights, and the model
    in eval mode sees activations at another scale than it was trained on: its
    predictions collapse to one class while train-mode accuracy is high (seen on
    the demo: validation ROC-AUC 0.96 with every tile called benign). Averaging
    the batch statistics of recent training batches under the final weights
    (PreciseBN; Wu and Johnson, 2021, "Rethinking 'Batch' in BatchNorm") gives
    eval mode the statistics the weights were trained with. Unlike
    ``torch.optim.swa_utils.update_bn`` it leaves the other layers' statistics
    (a frozen pretrained backbone's) untouched and the modes as they were.

    Returns the number of batches used; with no input or no such layer it
    changes nothing and returns 0. The caller averages the result across
    data-parallel ranks (see average_batchnorm_stats).
    """
    layers = training_batchnorms(model) if layers is None else list(layers)
    batches = list(inputs)
    if not layers or not batches:
        return 0
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = {m: m.training for m in model.modules()}
    try:
        for m in layers:
            m.train()
        # Everything else as it was: dropout in the head does not affect the BatchNorm
        # layers before it, and a frozen backbone's layers stay in eval mode.
        for x in batches:
            model(x)
    except BaseException:
        for m, (momentum, mean, var) in zip(layers, saved, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.momentum = momentum
        raise
    finally:
        for module, mode in was_training.items():
            module.training = mode
    for m, (momentum, _, _) in zip(layers, saved, strict=True):
        m.momentum = momentum
    return len(batches)
