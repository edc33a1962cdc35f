"""The model architectures by name, without torch: what a config checks and ``--help``
lists (breakhis.model.networks builds them).

Besides torchvision's (and the small test CNN), any model of the ``timm`` library is accepted
as ``timm:NAME`` (e.g. ``timm:vit_small_patch16_224``, or a pathology foundation model's timm
architecture such as ``timm:vit_large_patch16_224`` for UNI). Its name is only checked for
its characters here: importing timm to list its models would import torch and cost ``--help``
seconds, so breakhis.model.timm_backbones checks the name against timm's registry when the model is
built (on the driver, before any worker starts), with a one-line error naming close matches.
"""

from __future__ import annotations

import re

ARCHITECTURES: tuple[str, ...] = ("resnet50", "resnet18", "vgg16", "efficientnet_b0", "smallcnn")
"""Accepted ``arch`` values besides ``timm:NAME``; resnet50 is the default."""
TIMM_PREFIX = "timm:"
"""``arch`` prefix of a timm model."""
ARCH_CHOICES: tuple[str, ...] = (*ARCHITECTURES, "timm:NAME")
"""What ``--help`` lists for ``--arch``."""
_TIMM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def is_timm(arch: str) -> bool:
    """Whether ``arch`` names a timm model (``timm:NAME``)."""
    return arch.startswith(TIMM_PREFIX)


def check_arch(arch: str) -> None:
    """Raise ValueError naming the accepted architectures when ``arch`` is not one (a timm
    name is checked against timm's registry later, when the model is built)."""
    if arch in ARCHITECTURES:
        return
    if is_timm(arch) and _TIMM_NAME.fullmatch(arch[len(TIMM_PREFIX) :]):
        return
    raise ValueError(
        f"unknown model {arch!r}; accepted: {', '.join(ARCHITECTURES)}, or timm:NAME for a "
        "model of the timm library (e.g. timm:vit_small_patch16_224)"
    )
