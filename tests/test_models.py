"""Model registry, the v1/v1b ResNet strides, DenseNet-BC-100, user factories and local pretrained weights."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn as nn
import torchvision

from pipeline.models import registry as models
from pipeline.models.registry import PretrainedWeightsError, UnknownModelError, build_model, list_models, register_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_and_runs_forward(name):
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 7)
    assert torch.isfinite(out).all()


def strides_of_first_bottlenecks(model: nn.Module) -> list[tuple]:
    """(conv1 stride, conv2 stride) of the first bottleneck of stages 2-4."""
    return [(s[0].conv1.stride, s[0].conv2.stride) for s in (model.layer2, model.layer3, model.layer4)]


def test_resnet50_v1b_has_torchvision_strides_and_v1_differs():
    v1b = build_model("resnet50_v1b", num_classes=10)
    tv = torchvision.models.resnet50(num_classes=10)
    v1 = build_model("resnet50_v1", num_classes=10)
    # ResNet-B: stride 2 on the 3x3 conv2, exactly as torchvision's resnet50 ...
    assert strides_of_first_bottlenecks(v1b) == strides_of_first_bottlenecks(tv) == [((1, 1), (2, 2))] * 3
    # ... and the original v1 puts it on the first 1x1 conv.
    assert strides_of_first_bottlenecks(v1) == [((2, 2), (1, 1))] * 3
    # Same architecture as torchvision's: identical state-dict keys and shapes, so its weights load.
    assert {k: v.shape for k, v in v1b.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}
    v1b.load_state_dict(tv.state_dict())
    # Both layouts downsample the same: 64 px in, 2 x 2 maps after layer4.
    x = torch.randn(1, 3, 64, 64)
    for model in (v1b, v1):
        feats = model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(model.conv1(x))))))
        assert feats.shape[-2:] == (2, 2)


def test_resnet50_v1b_starts_with_zero_gamma_in_last_bn_of_each_block():
    v1b = build_model("resnet50_v1b", num_classes=10)
    tv = build_model("resnet50", num_classes=10)
    blocks = [b for stage in (v1b.layer1, v1b.layer2, v1b.layer3, v1b.layer4) for b in stage]
    assert len(blocks) == 16
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    assert torch.all(tv.layer1[0].bn3.weight == 1)


def test_densenet100_is_densenet_bc_for_cifar():
    model = build_model("densenet100", num_classes=10)
    assert 760_000 <= n_params(model) <= 800_000  # the paper: "0.8M"; bamos/densenet.pytorch counts 769,162
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 100  # depth: 1 stem + 3 x 16 x 2 + 2 transitions + 1 classifier
    assert convs[0].kernel_size == (3, 3) and convs[0].stride == (1, 1) and convs[0].out_channels == 24
    # 32 px in: no stem downsampling, two transitions -> 8 x 8 maps at the end.
    assert model.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (8, 8)


def write_user_module(tmp_path, monkeypatch, body: str) -> None:
    pkg = tmp_path / "usernets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tiny.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_user_factory_is_imported_and_called_with_num_classes(tmp_path, monkeypatch):
    write_user_module(tmp_path, monkeypatch, """
        import torch.nn as nn

        def tiny_net(num_classes):
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

        def not_a_model(num_classes):
            return "oops"
    """)
    model = build_model("usernets.tiny:tiny_net", num_classes=5)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    with pytest.raises(UnknownModelError, match="no callable 'missing'.*tiny_net"):
        build_model("usernets.tiny:missing", num_classes=5)
    with pytest.raises(UnknownModelError, match="returned str, not a torch.nn.Module"):
        build_model("usernets.tiny:not_a_model", num_classes=5)


def test_user_factory_in_a_missing_module_is_a_clear_error():
    with pytest.raises(UnknownModelError, match="cannot import module 'no_such_pkg.nets'.*PYTHONPATH"):
        build_model("no_such_pkg.nets:net", num_classes=3)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UnknownModelError) as err:
        build_model("resnet5O", num_classes=10)
    message = str(err.value)
    assert "resnet5O" in message
    assert all(name in message for name in list_models())


def test_register_model_warns_on_duplicate_name():
    def resnet18(*, num_classes):
        return nn.Linear(1, num_classes)
    original = models._REGISTRY["resnet18"]
    try:
        with pytest.warns(UserWarning, match="'resnet18' is registered twice"):
            register_model(resnet18)
        assert isinstance(build_model("resnet18", num_classes=2), nn.Linear)
    finally:
        models._REGISTRY["resnet18"] = original


@pytest.mark.parametrize("wrap", ["state_dict", "checkpoint", "ddp_prefix"])
def test_pretrained_from_a_local_file(tmp_path, wrap):
    source = build_model("resnet18", num_classes=10)
    state = source.state_dict()
    if wrap == "checkpoint":
        state = {"model": state, "epoch": 3}
    elif wrap == "ddp_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    model = build_model("resnet18", num_classes=10, pretrained=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_pretrained_with_another_class_count_keeps_a_fresh_head(tmp_path, caplog):
    source = build_model("resnet18", num_classes=1000)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", num_classes=10, pretrained=str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.weight.shape == (10, 512)
    assert "stays randomly initialised" in caplog.text


def test_pretrained_from_another_architecture_is_an_error(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(build_model("resnet34", num_classes=10).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="do not fit the model.*unexpected"):
        build_model("resnet18", num_classes=10, pretrained=str(path))


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="weights file .*nope.pth does not exist"):
        build_model("resnet18", num_classes=10, pretrained=str(tmp_path / "nope.pth"))


def test_torchvision_weights_name_comes_from_the_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsError, match="not in the cache.*nothing is downloaded"):
        build_model("resnet18", num_classes=1000, pretrained="IMAGENET1K_V1")
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    source = build_model("resnet18", num_classes=1000)
    torch.save(source.state_dict(), cached)
    model = build_model("resnet18", num_classes=1000, pretrained="IMAGENET1K_V1")
    assert torch.equal(model.fc.weight, source.fc.weight)
    with pytest.raises(PretrainedWeightsError, match="neither a file nor a weights name"):
        build_model("resnet18", num_classes=1000, pretrained="IMAGENET9K")
