"""Model building, weight loading and the errors for weights that do not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from breakhis.data.transforms import normalize
from breakhis.model.networks import (
    ARCHITECTURES,
    WeightsError,
    build_model,
    head_module,
    last_conv_layer,
    read_state_dict,
    recompute_batchnorm_stats,
    set_backbone_trainable,
    set_train_mode,
    split_parameters,
    training_batchnorms,
)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_gives_two_logits_at_small_size(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, dropout=0.3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2)
    head = head_module(model, arch)
    assert isinstance(head[0], torch.nn.Dropout) and head[0].p == 0.3
    assert head[1].out_features == 2
    # Grad-CAM's layer holds the model's last convolution (a block ending in it, or itself).
    layer = last_conv_layer(model, arch)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert any(m is convs[-1] for m in layer.modules()), (arch, layer)
    backbone, head_params = split_parameters(model, arch)
    assert len(head_params) == 2  # weight and bias of the linear layer
    assert len(backbone) + 2 == len(list(model.parameters()))


def test_unknown_architecture_lists_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet51'.*resnet50, resnet18"):
        build_model("resnet51")


def test_torchvision_state_dict_loads_into_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pt"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", weights=str(path))
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_mean, reference.layer4[1].bn2.running_mean)
    assert model.fc[1].out_features == 2  # torchvision's 1000-class head was not used


def test_a_model_trained_here_loads_with_its_head(tmp_path: Path) -> None:
    trained = build_model("smallcnn")
    path = tmp_path / "ckpt.pt"
    # A training checkpoint dict, saved from a DDP-wrapped model: both are accepted.
    state = {f"module.{k}": v for k, v in trained.state_dict().items()}
    torch.save({"model": state, "epoch": 3}, path)
    model = build_model("smallcnn", weights=str(path))
    assert torch.equal(model.head[1].weight, trained.head[1].weight)


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match=r"does not fit resnet50: .*missing.*another shape"):
        build_model("resnet50", weights=str(path))


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(WeightsError, match="not a torch state dict"):
        read_state_dict(str(text))
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(WeightsError, match="expected a state dict"):
        read_state_dict(str(listing))
    with pytest.raises(WeightsError, match="cannot read"):
        read_state_dict(str(tmp_path / "missing.pt"))


def test_imagenet_offline_gives_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty cache and a proxy that refuses connections: what an air-gapped cluster sees.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(WeightsError, match="cannot download resnet18 ImageNet weights.*--weights"):
        build_model("resnet18", weights="imagenet")
    with pytest.raises(WeightsError, match="no ImageNet weights for 'smallcnn'"):
        build_model("smallcnn", weights="imagenet")


def test_freezing_keeps_the_backbone_and_its_statistics_still() -> None:
    torch.manual_seed(0)
    model = build_model("smallcnn")
    set_backbone_trainable(model, "smallcnn", trainable=False)
    set_train_mode(model, "smallcnn", backbone_frozen=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.randn(4, 3, 32, 32)).sum()
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.1.weight", "head.1.bias"}
    set_backbone_trainable(model, "smallcnn", trainable=True)
    assert all(p.requires_grad for p in model.parameters())


def _bright_tiles(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mostly-white tiles like H&E (benign 235, malignant 200): normalised, their mean is
    far from the zero that BatchNorm's running mean starts at."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=gen)
    base = torch.where(labels == 1, 200.0, 235.0)[:, None, None, None]
    pixels = base + 12.0 * torch.randn((n, 3, 32, 32), generator=gen)
    return normalize(pixels.clamp(0, 255).to(torch.uint8)), labels


def test_a_short_run_calls_both_classes_once_batchnorm_statistics_are_recomputed() -> None:
    torch.manual_seed(0)
    model = build_model("smallcnn", dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    images, labels = _bright_tiles(96, seed=1)
    batches = [images[i : i + 32] for i in range(0, 96, 32)]
    model.train()
    for i, x in enumerate(batches):  # three steps: the running averages lag far behind
        loss = torch.nn.functional.cross_entropy(model(x), labels[i * 32 : (i + 1) * 32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test_x, test_y = _bright_tiles(64, seed=2)
    with torch.no_grad():
        stale = model.eval()(test_x).argmax(1)
    assert stale.unique().numel() == 1  # the collapse: one class for every tile
    model.train()
    assert recompute_batchnorm_stats(model, batches) == 3
    assert model.training  # modes are left as they were
    with torch.no_grad():
        fresh = model.eval()(test_x).argmax(1)
    assert (fresh == test_y).float().mean() >= 0.95


def test_recomputed_statistics_are_the_batch_average_and_frozen_layers_keep_theirs() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18")
    set_train_mode(model, "resnet18", backbone_frozen=True)
    assert training_batchnorms(model) == []  # a frozen backbone: nothing to recompute
    before = model.bn1.running_mean.clone()
    assert recompute_batchnorm_stats(model, [torch.randn(4, 3, 32, 32)]) == 0
    assert torch.equal(model.bn1.running_mean, before)

    small = build_model("smallcnn").train()
    first_conv, first_bn = small.features[0], small.features[1]
    batches = [torch.randn(8, 3, 16, 16) + k for k in range(3)]
    recompute_batchnorm_stats(small, batches)
    with torch.no_grad():
        means = [first_conv(x).mean(dim=(0, 2, 3)) for x in batches]
    assert torch.allclose(first_bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert first_bn.momentum == 0.1  # restored for the training that follows
    assert recompute_batchnorm_stats(small, []) == 0
