"""Attribution maps: shapes, determinism, where they point, and the overlay PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from breakhis.model.networks import build_model, last_conv_layer
from breakhis.score.attribution import (
    METHODS,
    attribute,
    canonical_method,
    grid_mask,
    image_seed,
    overlay_png,
)

SIDE = 32
FAST = {"ig_steps": 8, "lime_samples": 24, "lime_grid": 4, "occlusion_window": 8, "map_size": 16}


@pytest.fixture(scope="module")
def smallcnn() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("smallcnn").eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_small_varied_reproducible_maps(smallcnn, images, method) -> None:
    layer = last_conv_layer(smallcnn, "smallcnn")
    maps = attribute(smallcnn, images, method, [1, 0, 1], layer=layer, **FAST)
    assert maps.shape == (3, 16, 16) and maps.dtype == torch.float32
    assert maps.device.type == "cpu"
    assert torch.isfinite(maps).all()
    assert all(float(m.std()) > 0 for m in maps), "a map is constant"
    again = attribute(smallcnn, images, method, [1, 0, 1], layer=layer, **FAST)
    assert torch.equal(maps, again)
    # The same tile in another batch gets the same map (LIME's seed comes from the pixels).
    alone = attribute(smallcnn, images[2:], method, [1], layer=layer, **FAST)
    assert torch.allclose(alone[0], maps[2], rtol=1e-4, atol=1e-9)
    if method == "gradcam":
        assert (maps >= 0).all()  # ReLU'd: evidence for the target only


class _LeftHalfModel(nn.Module):
    """Malignant logit = mean red intensity of the left half; the right half is ignored."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = self.conv(x)[:, :, :, : x.shape[3] // 2].mean(dim=(1, 2, 3))
        return torch.stack([-feature, feature], dim=1)


@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion", "lime"])
def test_maps_point_at_the_pixels_the_model_uses(method: str) -> None:
    model = _LeftHalfModel().eval()
    x = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(2)) + 0.5
    maps = attribute(model, x, method, 1, **{**FAST, "lime_samples": 64})
    # Columns of 2 px: 0-5 lie in the left half, 10-15 away from every window touching it.
    left, right = maps[:, :, :6].abs().mean(), maps[:, :, 10:].abs().mean()
    assert float(left) > 20 * float(right)
    assert float(maps[:, :, :6].mean()) > 0  # red on the left raises the malignant logit


def test_gradcam_needs_the_layer_and_names_are_checked(smallcnn, images) -> None:
    with pytest.raises(ValueError, match="layer="):
        attribute(smallcnn, images, "gradcam", 1)
    with pytest.raises(ValueError, match="accepted: gradcam, integrated_gradients"):
        attribute(smallcnn, images, "shap", 1)
    with pytest.raises(ValueError, match="2 entries for 3 images"):
        attribute(smallcnn, images, "ig", [0, 1])
    assert canonical_method("IG") == "integrated_gradients"


def test_lime_superpixel_grid_and_seed() -> None:
    mask = grid_mask(6, 4, 2)
    assert mask.shape == (1, 1, 6, 4)
    assert mask[0, 0].tolist() == [[0, 0, 1, 1]] * 3 + [[2, 2, 3, 3]] * 3
    image = torch.rand(1, 3, 8, 8)
    assert image_seed(image) == image_seed(image.clone())
    assert image_seed(image) != image_seed(image + 1)


def test_overlay_colours_evidence_for_and_against_on_one_scale() -> None:
    from breakhis.evaluate.figures import DIVERGING_MAPS, map_colours

    assert map_colours() in DIVERGING_MAPS
    image = np.full((40, 60, 3), 128, dtype=np.uint8)
    attribution_map = np.zeros((8, 8), dtype=np.float32)
    attribution_map[:4, :4] = 2.0  # top-left quarter: for the class
    attribution_map[4:, 4:] = -2.0  # bottom-right: against it
    decoded = np.asarray(Image.open(io.BytesIO(overlay_png(image, attribution_map)))).astype(int)
    assert decoded.shape == (40, 60, 3)
    for_, against = decoded[:12, :20].reshape(-1, 3), decoded[30:, 40:].reshape(-1, 3)
    assert np.abs(for_ - 128).max() > 40 and np.abs(against - 128).max() > 40
    assert np.abs(for_.mean(0) - against.mean(0)).max() > 30  # two hues, not one
    assert (decoded[:12, 40:] == 128).all()  # no evidence: the tile as it is
    # One scale for two tiles: half the evidence, half the colour; its own scale: the same.
    half = np.asarray(Image.open(io.BytesIO(overlay_png(image, attribution_map / 2, scale=2.0))))
    full = np.asarray(Image.open(io.BytesIO(overlay_png(image, attribution_map, scale=2.0))))
    own = np.asarray(Image.open(io.BytesIO(overlay_png(image, attribution_map / 2))))
    assert np.abs(half[:12, :20].astype(int) - 128).max() < np.abs(full[:12, :20] - 128.0).max()
    assert np.array_equal(own, full)
    with pytest.raises(ValueError, match="scale must be > 0"):
        overlay_png(image, attribution_map, scale=0.0)
    with pytest.raises(ValueError, match="uint8"):
        overlay_png(image.astype(np.float32), attribution_map)
