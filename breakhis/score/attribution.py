"""Why the model said what it said: captum attributions as one small map per tile.

    maps = attribute(model, images, "gradcam", target, layer=last_conv_layer(model, arch))
    png = overlay_png(tile_rgb, maps[0].numpy())

``images`` are the model's inputs (N, 3, S, S), already normalised; ``target``
is the class explained for each image (the scoring job explains the predicted
class). Every method returns float32 maps (N, map_size, map_size) on the CPU:

- ``gradcam`` (default): captum LayerGradCam on the last convolutional block,
  ReLU applied (the Grad-CAM paper's definition: only evidence *for* the
  target), explaining the target's logit; the coarse map (7x7 for a ResNet at
  224 px) is upsampled bilinearly. Costs one forward and one backward pass.
- ``integrated_gradients`` (``ig``): captum IntegratedGradients of the target
  logit from the all-zero normalised image (the training set's mean colour)
  in ``ig_steps`` steps, summed over the colour channels. Signed. Costs
  ``ig_steps`` forward+backward passes.
- ``occlusion``: captum Occlusion with a square ``occlusion_window`` (default
  side / 8 px) moved by half a window, replaced by the mean colour; the map is
  the drop of the target's *probability*. Signed. Costs one forward pass per
  window position.
- ``lime``: captum Lime on a ``lime_grid`` x ``lime_grid`` grid of square
  superpixels (the same for every tile, so maps are comparable), ``lime_samples``
  random on/off masks, a ridge regression (alpha 1, as in the LIME paper's
  package) of the target's probability. Signed. The masks are drawn from a seed
  computed from the image's own values, so the same tile always gets the same
  map, whichever batch or job it is scored in.

Pixel-level maps (IG, occlusion, LIME) are reduced to ``map_size`` by averaging
pixels (area resampling); coarser maps are upsampled bilinearly. Values are the
methods' own units, not rescaled, so maps of one method and model compare
across tiles.
"""

from __future__ import annotations

import io
import threading
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

METHODS: tuple[str, ...] = ("gradcam", "integrated_gradients", "occlusion", "lime")
"""Accepted methods; ``ig`` is accepted as a short name of integrated_gradients."""
_ALIASES = {"ig": "integrated_gradients", "grad-cam": "gradcam", "grad_cam": "gradcam"}


def canonical_method(method: str) -> str:
    """The canonical name of an attribution method (``ig`` -> ``integrated_gradients``).

    Raises ValueError naming the accepted methods for an unknown one.
    """
    name = _ALIASES.get(method.lower(), method.lower())
    if name not in METHODS:
        raise ValueError(
            f"unknown attribution method {method!r}; accepted: {', '.join(METHODS)} (or ig)"
        )
    return name


class _Probabilities(nn.Module):
    """The model's softmax output: perturbation methods explain a probability, not a logit."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


def attribute(
    model: nn.Module,
    images: torch.Tensor,
    method: str,
    target: torch.Tensor | Sequence[int] | int,
    *,
    layer: nn.Module | None = None,
    map_size: int = 64,
    ig_steps: int = 32,
    occlusion_window: int | None = None,
    lime_samples: int = 100,
    lime_grid: int = 8,
) -> torch.Tensor:
    """Attribution maps of ``model`` (in eval mode) for ``images`` (N, 3, H, W), normalised.

    ``target``: the class explained, one per image (or one for all). ``layer``
    is required by Grad-CAM (use model.last_conv_layer). Returns a float32 CPU
    tensor (N, map_size, map_size); see the module docstring for each method's
    meaning and cost. Raises ValueError for an unknown method, a missing layer
    or bad sizes.
    """
    method = canonical_method(method)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if map_size < 1:
        raise ValueError(f"map_size must be >= 1, got {map_size}")
    count = images.shape[0]
    if isinstance(target, int):
        target = [target] * count
    target_t = torch.as_tensor(target, dtype=torch.long, device=images.device).reshape(-1)
    if target_t.numel() != count:
        raise ValueError(f"target has {target_t.numel()} entries for {count} images")
    if count == 0:
        return torch.zeros((0, map_size, map_size), dtype=torch.float32)
    with torch.enable_grad():
        if method == "gradcam":
            raw = _gradcam(model, images, target_t, layer)
        elif method == "integrated_gradients":
            raw = _integrated_gradients(model, images, target_t, ig_steps)
        elif method == "occlusion":
            raw = _occlusion(model, images, target_t, occlusion_window)
        else:
            raw = _lime(model, images, target_t, lime_samples, lime_grid)
    return _to_map(raw.detach(), map_size)


def _gradcam(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, layer: nn.Module | None
) -> torch.Tensor:
    from captum.attr import LayerGradCam

    if layer is None:
        raise ValueError(
            "gradcam needs layer= (the last convolutional block, see breakhis/model/networks.py)"
        )
    return LayerGradCam(model, layer).attribute(images, target=target, relu_attributions=True)


def _integrated_gradients(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, steps: int
) -> torch.Tensor:
    from captum.attr import IntegratedGradients

    if steps < 2:
        raise ValueError(f"ig_steps must be >= 2, got {steps}")
    # Chunks of about one batch (not N x steps images at once) bound the memory.
    return IntegratedGradients(model).attribute(
        images,
        baselines=torch.zeros_like(images),
        target=target,
        n_steps=steps,
        internal_batch_size=max(images.shape[0], steps),
    )


def _occlusion(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, window: int | None
) -> torch.Tensor:
    from captum.attr import Occlusion

    side = min(images.shape[2], images.shape[3])
    window = window or max(2, side // 8)
    if not 1 <= window <= side:
        raise ValueError(f"occlusion_window must be in 1..{side} (the image side), got {window}")
    stride = max(1, window // 2)
    return Occlusion(_Probabilities(model)).attribute(
        images,
        sliding_window_shapes=(3, window, window),
        strides=(3, stride, stride),
        baselines=0.0,
        target=target,
        perturbations_per_eval=max(1, 64 // images.shape[0]),
    )


def grid_mask(height: int, width: int, grid: int) -> torch.Tensor:
    """Superpixel ids (1, 1, height, width): a ``grid`` x ``grid`` grid of rectangles."""
    rows = torch.arange(height) * grid // height
    cols = torch.arange(width) * grid // width
    return (rows[:, None] * grid + cols[None, :]).reshape(1, 1, height, width)


def image_seed(image: torch.Tensor) -> int:
    """A seed computed from an image's values: the same pixels always give the same seed."""
    return zlib.crc32(image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def _lime(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, samples: int, grid: int
) -> torch.Tensor:
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime

    if samples < 2:
        raise ValueError(f"lime_samples must be >= 2, got {samples}")
    if not 1 <= grid <= min(images.shape[2], images.shape[3]):
        raise ValueError(f"lime_grid must be in 1..{min(images.shape[2:])}, got {grid}")
    mask = grid_mask(images.shape[2], images.shape[3], grid).to(images.device)
    lime = Lime(_Probabilities(model), interpretable_model=SkLearnRidge(alpha=1.0))
    maps = []
    for index in range(images.shape[0]):
        image = images[index : index + 1]
        # captum draws LIME's masks from torch's global CPU generator: seed it from the
        # image for reproducible maps, without disturbing the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(image_seed(image))
            maps.append(
                lime.attribute(
                    image,
                    target=target[index : index + 1],
                    baselines=0.0,
                    feature_mask=mask,
                    n_samples=samples,
                    perturbations_per_eval=min(samples, 32),
                )
            )
    return torch.cat(maps)


def gradcam_with_logits(
    model: nn.Module,
    images: torch.Tensor,
    layer: nn.Module,
    choose_target: Callable[[torch.Tensor], Sequence[int]],
    *,
    map_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM from the forward pass that also gives the predictions: ``(logits (N, C)
    float32, maps (N, map_size, map_size) on the CPU)``.

    One forward pass of ``model`` over ``images`` (recording ``layer``'s activations),
    ``choose_target(logits)`` (detached) picks the class explained per image, then one
    backward pass: the same maps as ``attribute(model, images, "gradcam", target,
    layer=layer)`` (captum's LayerGradCam, ReLU applied) without its second forward pass.
    """
    recorded: list[torch.Tensor] = []
    caller = threading.get_ident()  # another thread's pass on the same model is not ours

    def record(_module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        if threading.get_ident() == caller:
            recorded.append(out)

    handle = layer.register_forward_hook(record)
    try:
        with torch.enable_grad():
            logits = model(images.detach().requires_grad_(True)).float()
    finally:
        handle.remove()
    if len(recorded) != 1:
        raise ValueError(f"the layer ran {len(recorded)} times in one forward pass, not once")
    activations = recorded[0]
    target = torch.as_tensor(choose_target(logits.detach()), dtype=torch.long)
    target = target.to(logits.device).reshape(-1, 1)
    # Samples do not interact in eval mode: the sum's gradient is each sample's own.
    (gradients,) = torch.autograd.grad(logits.gather(1, target).sum(), activations)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations).sum(dim=1, keepdim=True))
    return logits.detach(), _to_map(cam.detach(), map_size)


def _to_map(raw: torch.Tensor, map_size: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, map_size, map_size) float32 on the CPU, channels summed."""
    summed = raw.float().sum(dim=1, keepdim=True)
    height, width = summed.shape[2:]
    if height >= map_size and width >= map_size:
        resized = F.adaptive_avg_pool2d(summed, map_size)
    else:
        resized = F.interpolate(
            summed, size=(map_size, map_size), mode="bilinear", align_corners=False
        )
    return resized[:, 0].cpu()


def overlay_png(
    image: np.ndarray,
    attribution_map: np.ndarray,
    *,
    alpha: float = 0.6,
    scale: float | None = None,
) -> bytes:
    """A PNG of ``image`` (H, W, 3 uint8) with the signed map over it.

    The map is resized to the image and divided by ``scale`` (default: its own largest
    absolute value; pass one scale for every tile of a report so that colours compare
    across tiles), clipped to [-1, 1], coloured with ``map_colours()`` (a diverging map:
    one hue for evidence for the explained class, the other against) and blended with
    weight ``alpha`` x |value|: no evidence leaves the tile as it is. Returns the PNG bytes.
    Raises ValueError for a bad image shape, an ``alpha`` outside [0, 1] or a scale <= 0.
    """
    from matplotlib import colormaps
    from PIL import Image

    from breakhis.score.colours import map_colours

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    height, width = image.shape[:2]
    heat = np.nan_to_num(np.asarray(attribution_map, dtype=np.float32))
    heat = np.asarray(Image.fromarray(heat, mode="F").resize((width, height), Image.BILINEAR))
    peak = float(np.abs(heat).max()) if scale is None else float(scale)
    heat = np.clip(heat / peak, -1.0, 1.0) if peak > 0 else np.zeros_like(heat)
    colours = colormaps[map_colours()]((heat + 1.0) / 2.0)[..., :3]
    weight = (alpha * np.abs(heat))[..., None]
    blended = image.astype(np.float32) / 255.0 * (1 - weight) + colours * weight
    buffer = io.BytesIO()
    Image.fromarray(np.round(blended * 255).astype(np.uint8), mode="RGB").save(buffer, "PNG")
    return buffer.getvalue()
