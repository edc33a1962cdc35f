"""Model building, weight loading and the errors for weights that do not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from breakhis.model import (
    ARCHITECTURES,
    WeightsError,
    build_model,
    head_module,
    last_conv_layer,
    read_state_dict,
    set_backbone_trainable,
    set_train_mode,
    split_parameters,
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
    assert isinstance(last_conv_layer(model, arch), torch.nn.Module)
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
