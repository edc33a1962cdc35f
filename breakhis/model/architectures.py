"""The model architectures by name, without torch: what a config checks and ``--help``
lists (breakhis.model.networks builds them)."""

from __future__ import annotations

ARCHITECTURES: tuple[str, ...] = ("resnet50", "resnet18", "vgg16", "efficientnet_b0", "smallcnn")
"""Accepted ``arch`` values; resnet50 is the default."""


def check_arch(arch: str) -> None:
    """Raise ValueError naming the accepted architectures when ``arch`` is not one."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model {arch!r}; accepted: {', '.join(ARCHITECTURES)}")
