"""Model factories: validation of their arguments, output shapes, parameter counts, learning."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn

import dltrain.models  # noqa: F401  (registers the models)
from dltrain.config.registry import MODELS
from dltrain.errors import UserError
from dltrain.models.torchvision_models import GrayToRGB

DIGITS, CIFAR, MNIST = (1, 8, 8), (3, 32, 32), (1, 28, 28)


def build(name: str, input_shape: tuple[int, ...], num_classes: int = 10, **kwargs) -> nn.Module:
    """Validate a model section as a recipe would, then build it."""
    section = MODELS.validate({"name": name, **kwargs}, "model")
    return MODELS.build(section, input_shape=input_shape, num_classes=num_classes)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def logits(model: nn.Module, input_shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(batch, *input_shape))


# -- output shapes ------------------------------------------------------------------------------

CONV_NETS = [
    "seed_cnn",
    "resnet18",
    "resnet34",
    "torchvision:resnet18",
    "torchvision:mobilenet_v3_small",
]


@pytest.mark.parametrize("name", CONV_NETS)
@pytest.mark.parametrize(("input_shape", "num_classes"), [(DIGITS, 10), (CIFAR, 10), (MNIST, 3)])
def test_conv_net_output_shape(name, input_shape, num_classes):
    model = build(name, input_shape, num_classes)
    assert logits(model, input_shape).shape == (2, num_classes)


def test_resnet50_output_shape():
    assert logits(build("resnet50", CIFAR), CIFAR).shape == (2, 10)


@pytest.mark.parametrize(
    ("input_shape", "kwargs"),
    [
        ((20,), {}),
        ((20,), {"hidden": [], "activation": "gelu"}),
        ((20,), {"hidden": [16, 8, 4], "activation": "tanh", "dropout": 0.5, "batch_norm": True}),
        (DIGITS, {"activation": "sigmoid"}),  # images are flattened
    ],
)
def test_mlp_output_shape(input_shape, kwargs):
    assert logits(build("mlp", input_shape, 4, **kwargs), input_shape, batch=3).shape == (3, 4)


def test_seed_cnn_non_square_and_many_channels():
    assert logits(build("seed_cnn", (5, 40, 24), 7), (5, 40, 24)).shape == (2, 7)


# -- architectures ------------------------------------------------------------------------------


def test_seed_cnn_is_the_tutorial_net_on_cifar():
    model = build("seed_cnn", CIFAR)
    assert n_params(model) == 62006
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [c.padding for c in convs] == [(0, 0), (0, 0)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(400, 120), (120, 84), (84, 10)]


def test_seed_cnn_auto_padding_on_small_images():
    convs = [m for m in build("seed_cnn", DIGITS).modules() if isinstance(m, nn.Conv2d)]
    assert [c.padding for c in convs] == [(2, 2), (2, 2)]
    mnist_convs = [m for m in build("seed_cnn", MNIST).modules() if isinstance(m, nn.Conv2d)]
    assert mnist_convs[0].padding == (0, 0)


def test_seed_cnn_too_small_for_explicit_padding():
    with pytest.raises(UserError, match="padding"):
        build("seed_cnn", DIGITS, padding=0)


def test_seed_cnn_dropout():
    model = build("seed_cnn", CIFAR, dropout=0.3)
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.3}
    assert n_params(model) == 62006


def test_resnet18_cifar_form():
    model = build("resnet18", CIFAR)
    assert n_params(model) == 11_173_962
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_resnet_zero_init_residual():
    model = build("resnet18", MNIST, zero_init_residual=True)
    last_bns = [block.body[-1] for stage in model.stages for block in stage]
    assert len(last_bns) == 8
    assert all(torch.all(bn.weight == 0) for bn in last_bns)


def test_torchvision_grayscale_is_wrapped():
    assert isinstance(build("torchvision:resnet18", MNIST), GrayToRGB)
    assert not isinstance(build("torchvision:resnet18", CIFAR), GrayToRGB)


def test_torchvision_googlenet_returns_plain_logits_in_training():
    model = build("torchvision:googlenet", CIFAR).train()
    assert isinstance(model(torch.randn(2, *CIFAR)), torch.Tensor)


# -- wrong input --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["seed_cnn", "resnet18", "torchvision:resnet18"])
def test_conv_nets_refuse_tabular_input(name):
    with pytest.raises(UserError, match=r"needs image input .* shape \(64,\); use model: mlp"):
        build(name, (64,))


def test_torchvision_refuses_other_channel_counts():
    with pytest.raises(UserError, match="4 channels"):
        build("torchvision:resnet18", (4, 32, 32))


# -- validation ---------------------------------------------------------------------------------


def test_validate_fills_defaults():
    section = MODELS.validate({"name": "mlp"}, "model")
    assert section == {
        "name": "mlp",
        "hidden": [256, 128],
        "activation": "relu",
        "dropout": 0.0,
        "batch_norm": False,
    }


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"name": "mlp", "hidden": "abc"}, r"model\.hidden: .*valid list"),
        ({"name": "mlp", "hidden": [64, 0]}, r"model\.hidden: .*positive"),
        ({"name": "mlp", "activation": "swish"}, r"model\.activation: .*'relu', 'tanh', 'sigmoid'"),
        ({"name": "mlp", "dropout": 1.5}, r"model\.dropout: .*less than 1"),
        ({"name": "seed_cnn", "padding": "same"}, r"model\.padding"),
        ({"name": "seed_cnn", "padding": -1}, r"model\.padding"),
        ({"name": "seed_cnn", "width": 2.0}, r"model\.width: unknown key"),
        ({"name": "resnet18", "num_classes": 10}, r"model\.num_classes: .*run time"),
        ({"name": "torchvision:resnet81"}, r"unknown torchvision model 'resnet81'.*'resnet18'"),
    ],
)
def test_validate_rejects(section, message):
    with pytest.raises(UserError, match=message):
        MODELS.validate(section, "model")


# -- pretrained weights (never downloaded: the download function is replaced) ------------------


def test_unknown_weights_name():
    with pytest.raises(UserError, match="no weights 'IMAGENET'.*IMAGENET1K_V1"):
        build("torchvision:resnet18", CIFAR, weights="IMAGENET")


def test_weights_download_failure(monkeypatch, tmp_path):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(UserError, match=r"could not be fetched.*weights: null.*\$TORCH_HOME"):
        build("torchvision:resnet18", CIFAR, weights="DEFAULT")


def test_pretrained_weights_get_a_new_head(monkeypatch):
    import torchvision

    imagenet = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(
        "torchvision.models._api.load_state_dict_from_url", lambda url, *a, **k: imagenet
    )
    model = build("torchvision:resnet18", MNIST, 5, weights="IMAGENET1K_V1")
    assert torch.equal(model.model.conv1.weight, imagenet["conv1.weight"])
    assert model.model.fc.out_features == 5
    assert logits(model, MNIST).shape == (2, 5)


# -- learning -----------------------------------------------------------------------------------


def test_mlp_learns_separable_data():
    torch.manual_seed(0)
    x = torch.randn(256, 20)
    y = (x @ torch.randn(20) > 0).long()
    model = build("mlp", (20,), 2, hidden=[32])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9


def test_seed_cnn_loss_goes_down_on_patterns():
    torch.manual_seed(0)
    stripes = torch.zeros(8, 8)
    stripes[::2] = 1.0
    y = torch.randint(0, 2, (64,))
    # Class 0: horizontal stripes, class 1: vertical stripes, both noisy.
    x = torch.where(y[:, None, None] == 0, stripes, stripes.T) + 0.3 * torch.randn(64, 8, 8)
    x = x[:, None]
    model = build("seed_cnn", DIGITS, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_fine_tuning_a_frozen_backbone_trains_only_the_head_on_the_weights_statistics(
    monkeypatch, tmp_path
):
    import torchvision

    from helpers.training import recipe, train

    imagenet = torchvision.models.mobilenet_v3_small().state_dict()
    monkeypatch.setattr(
        "torchvision.models._api.load_state_dict_from_url", lambda url, *a, **k: imagenet
    )
    base = recipe(
        {
            "name": "synthetic",
            "shape": [3, 32, 32],
            "num_classes": 3,
            "train_size": 64,
            "test_size": 16,
            "val_split": 0,
            "batch_size": 16,
        },
        {"name": "torchvision:mobilenet_v3_small", "weights": "DEFAULT"},
        epochs=1,
        optimizer={"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
        device="cpu",
    )
    run, _ = train(tmp_path, base, "frozen", "model.freeze=backbone")
    saved = torch.load(run.last_path, weights_only=True)
    tuned = saved["model"]
    head = "classifier.3"  # mobilenet_v3_small's last Linear: replaced for 3 classes
    assert tuned[f"{head}.weight"].shape == (3, 1024)
    statistics = ("running_", "num_batches_tracked")  # BatchNorm buffers: they still adapt
    backbone = [
        k for k in imagenet if not k.startswith(head) and not any(s in k for s in statistics)
    ]
    assert backbone and all(torch.equal(tuned[k], imagenet[k]) for k in backbone)
    # normalize: auto means the weights' own statistics, not the dataset's
    assert saved["data_meta"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert saved["data_meta"]["std"] == pytest.approx([0.229, 0.224, 0.225])

    run, _ = train(tmp_path, base, "all")  # freeze: none (the default) trains every layer
    tuned = torch.load(run.last_path, weights_only=True)["model"]
    assert not torch.equal(tuned["features.0.0.weight"], imagenet["features.0.0.weight"])


def test_freezing_a_backbone_without_pretrained_weights_is_refused():
    with pytest.raises(UserError, match="model.weights is null"):
        build("torchvision:resnet18", CIFAR, freeze="backbone")
