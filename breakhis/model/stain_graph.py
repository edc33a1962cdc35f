"""Stain normalisation inside an exported model (breakhis.model.export): torch ports of the
normalisers of breakhis.data.stain, so that a caller of the TorchScript or ONNX file feeds the
decoded tile and the graph normalises it as training, evaluation and scoring did.

Each port does torchstain's numpy steps in float64, with the same rules for a tile the method
cannot estimate (breakhis.data.stain's docstring); tests/test_stain.py checks that it gives the
numpy path's pixels within one grey level.

- ``ReinhardGraph``: element-wise LAB conversions and per-image means and stds, no branch on
  data, so it traces and exports to ONNX.
- ``MacenkoGraph``: an eigendecomposition, percentiles and a stain-dependent pixel selection
  per image; compiled with TorchScript (``torch.jit.script``, kept as script when the model
  around it is traced). ONNX has no eigendecomposition: breakhis.model.export refuses ONNX for it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from breakhis.data.stain import (
    FLAT_STD,
    MACENKO_ALPHA,
    MACENKO_BETA,
    MACENKO_IO,
    MIN_TISSUE_FRACTION,
    MIN_TISSUE_PIXELS,
    StainNormalizer,
)

# torchstain's constants (torchstain.numpy.utils.rgb2lab / lab2rgb).
_RGB2XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE = (0.95047, 1.0, 1.08883)


class ReinhardGraph(nn.Module):
    """uint8 (N, 3, H, W) -> uint8 (N, 3, H, W): Reinhard's LAB statistics matched to the
    reference's (breakhis.data.stain.StainNormalizer of method ``reinhard``)."""

    def __init__(self, stain: StainNormalizer) -> None:
        super().__init__()
        rgb2xyz = torch.tensor(_RGB2XYZ, dtype=torch.float64)
        self.register_buffer("rgb2xyz", rgb2xyz)
        self.register_buffer("xyz2rgb", torch.linalg.inv(rgb2xyz))
        self.register_buffer("white", torch.tensor(_WHITE, dtype=torch.float64).view(1, 3, 1))
        self.register_buffer(
            "target_mean", torch.tensor(stain.lab_mean, dtype=torch.float64).view(1, 3, 1)
        )
        self.register_buffer(
            "target_std", torch.tensor(stain.lab_std, dtype=torch.float64).view(1, 3, 1)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        rgb = images.reshape(n, c, h * w).to(torch.float64) / 255.0
        rgb = torch.where(rgb > 0.04045, torch.pow((rgb + 0.055) / 1.055, 2.4), rgb / 12.92)
        xyz = torch.matmul(self.rgb2xyz, rgb) / self.white
        f = torch.where(
            xyz > 0.008856, torch.pow(xyz.clamp(min=1e-12), 1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0
        )
        # torchstain's L*a*b* in its split scaling (L in 0..100, a and b centred on 0).
        lab = torch.stack(
            (116.0 * f[:, 1] - 16.0, 500.0 * (f[:, 0] - f[:, 1]), 200.0 * (f[:, 1] - f[:, 2])),
            dim=1,
        )
        mean = lab.mean(dim=2, keepdim=True)
        std = lab.std(dim=2, keepdim=True, correction=0)
        flat = (std < FLAT_STD).any(dim=1, keepdim=True)
        safe_std = torch.where(std < FLAT_STD, torch.ones_like(std), std)
        lab = (lab - mean) / safe_std * self.target_std + self.target_mean
        y = (lab[:, 0] + 16.0) / 116.0
        out = torch.stack((lab[:, 1] / 500.0 + y, y, y - lab[:, 2] / 200.0), dim=1)
        out = torch.where(out > 0.2068966, torch.pow(out, 3.0), (out - 16.0 / 116.0) / 7.787)
        out = torch.matmul(self.xyz2rgb, out * self.white)
        out = torch.where(
            out > 0.0031308,
            1.055 * torch.pow(out.clamp(min=1e-12), 1.0 / 2.4) - 0.055,
            out * 12.92,
        )
        out = torch.floor(out.clamp(0.0, 1.0) * 255.0).to(torch.uint8)
        out = torch.where(flat, images.reshape(n, c, h * w), out)
        return out.reshape(n, c, h, w)


class MacenkoGraph(nn.Module):
    """uint8 (N, 3, H, W) -> uint8 (N, 3, H, W): Macenko's stain matrix and concentrations
    mapped onto the reference's (breakhis.data.stain.StainNormalizer of method ``macenko``).
    Meant to be compiled with ``torch.jit.script`` (see the module docstring)."""

    def __init__(self, stain: StainNormalizer) -> None:
        super().__init__()
        self.register_buffer("he_ref", torch.tensor(stain.stain_matrix, dtype=torch.float64))
        self.register_buffer(
            "max_c_ref", torch.tensor(stain.max_concentrations, dtype=torch.float64)
        )
        self.io = MACENKO_IO
        self.low = MACENKO_ALPHA / 100.0
        self.beta = MACENKO_BETA
        self.min_fraction = MIN_TISSUE_FRACTION
        self.min_pixels = MIN_TISSUE_PIXELS

    def _one(self, image: torch.Tensor) -> torch.Tensor:
        c, h, w = image.shape
        pixels = image.permute(1, 2, 0).reshape(-1, 3).to(torch.float64)
        od = -torch.log((pixels + 1.0) / self.io)
        tissue = od[(od >= self.beta).all(dim=1)]
        needed = max(self.min_pixels, int(math.ceil(self.min_fraction * float(h * w))))
        if tissue.shape[0] < needed:
            return image
        _, vectors = torch.linalg.eigh(torch.cov(tissue.T))
        plane = vectors[:, 1:3]
        projected = torch.matmul(tissue, plane)
        phi = torch.atan2(projected[:, 1], projected[:, 0])
        low = torch.quantile(phi, self.low)
        high = torch.quantile(phi, 1.0 - self.low)
        v_min = torch.matmul(plane, torch.stack((torch.cos(low), torch.sin(low))))
        v_max = torch.matmul(plane, torch.stack((torch.cos(high), torch.sin(high))))
        if bool(v_min[0] > v_max[0]):
            he = torch.stack((v_min, v_max), dim=1)
        else:
            he = torch.stack((v_max, v_min), dim=1)
        conc = torch.linalg.lstsq(he, od.T).solution
        max_c = torch.stack((torch.quantile(conc[0], 0.99), torch.quantile(conc[1], 0.99)))
        conc = conc / (max_c / self.max_c_ref).unsqueeze(1)
        out = self.io * torch.exp(-torch.matmul(self.he_ref, conc))
        if not bool(torch.isfinite(out).all()):
            return image
        out = torch.floor(out.clamp(max=255.0)).to(torch.uint8)
        return out.T.reshape(h, w, c).permute(2, 0, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._one(image) for image in images.unbind(0)])


def stain_graph(stain: StainNormalizer, *, script: bool) -> nn.Module:
    """The torch module of ``stain``; ``script`` compiles Macenko's with TorchScript (for a
    traced export; ONNX cannot hold it). Returns the module in eval mode."""
    if stain.method == "reinhard":
        return ReinhardGraph(stain).eval()
    module = MacenkoGraph(stain).eval()
    return torch.jit.script(module) if script else module
