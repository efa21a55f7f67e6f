"""optimizer.norms_and_biases: the parameters with fewer than 2 dims (biases, norm layers) in a
second param group with their own lr scale and weight decay, for every optimizer; frozen
parameters left out; schedules, lr-find and resume keep the groups' lr ratio."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dltrain.config.loading import load_recipe
from dltrain.config.registry import OPTIMIZERS, SCHEDULERS
from dltrain.errors import RecipeError
from dltrain.experiments.lr_find import find_lr
from dltrain.optim import build_optimizer
from dltrain.runs.folder import RunFolder

from helpers.cli import QUICKSTART, assert_user_error, dltrain
from helpers.training import DIGITS, assert_same_tensors, train, weights

SCALED = {"lr_scale": 64, "weight_decay": 0.0}


class ConvBnLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean(dim=(2, 3)))


def model() -> ConvBnLinear:
    torch.manual_seed(0)
    return ConvBnLinear()


def optimizer_for(net: nn.Module, **section) -> torch.optim.Optimizer:
    return build_optimizer(OPTIMIZERS.validate(section, "optimizer"), net, "cpu")


def take_steps(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 2, (8,))
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def group_ids(optimizer: torch.optim.Optimizer) -> list[list[int]]:
    return [[id(p) for p in group["params"]] for group in optimizer.param_groups]


# -- groups --------------------------------------------------------------------------------------


def test_weights_in_the_first_group_biases_and_norms_in_the_second():
    net = model()
    optimizer = optimizer_for(net, name="sgd", norms_and_biases=SCALED)
    assert group_ids(optimizer) == [
        [id(net.conv.weight), id(net.head.weight)],
        [id(net.conv.bias), id(net.bn.weight), id(net.bn.bias), id(net.head.bias)],
    ]


def test_without_the_key_one_group_as_before():
    net = model()
    optimizer = optimizer_for(net, name="sgd")
    assert group_ids(optimizer) == [[id(p) for p in net.parameters()]]
    # the resolved section leaves the unset key out, so older recipes resolve as before
    assert "norms_and_biases" not in OPTIMIZERS.validate({"name": "sgd"}, "optimizer")


# muon gives biases and norms their own optimizer (optimizer.others): tests/test_muon.py
@pytest.mark.parametrize("name", [n for n in OPTIMIZERS.names() if n != "muon"])
def test_every_optimizer_takes_the_scale_and_its_own_weight_decay(name):
    optimizer = optimizer_for(
        model(), name=name, lr=0.002, weight_decay=0.05, norms_and_biases=SCALED
    )
    main, small = optimizer.param_groups
    assert (main["lr"], main["weight_decay"]) == (0.002, 0.05)
    assert (small["lr"], small["weight_decay"]) == (0.002 * 64, 0.0)
    assert {k: v for k, v in main.items() if k not in ("params", "lr", "weight_decay")} == {
        k: v for k, v in small.items() if k not in ("params", "lr", "weight_decay")
    }


def test_weight_decay_defaults_to_the_optimizers():
    optimizer = optimizer_for(
        model(), name="adamw", weight_decay=0.05, norms_and_biases={"lr_scale": 2}
    )
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.05]
    assert optimizer.param_groups[1]["lr"] == 2 * optimizer.param_groups[0]["lr"]


def test_one_sgd_step_equals_torch_sgd_with_explicit_groups():
    settings = dict(momentum=0.85, nesterov=True, weight_decay=0.0013)
    ours = model()
    optimizer = optimizer_for(ours, name="sgd", lr=1.5, **settings, norms_and_biases=SCALED)
    theirs = copy.deepcopy(ours)
    by_hand = torch.optim.SGD(
        [
            {"params": [theirs.conv.weight, theirs.head.weight]},
            {
                "params": [theirs.conv.bias, theirs.bn.weight, theirs.bn.bias, theirs.head.bias],
                "lr": 1.5 * 64,
                "weight_decay": 0.0,
            },
        ],
        lr=1.5,
        **settings,
        fused=True,  # fused: auto on the CPU
    )
    take_steps(ours, optimizer)
    take_steps(theirs, by_hand)
    assert_same_tensors(ours.state_dict(), theirs.state_dict())
    assert not torch.equal(ours.conv.weight, model().conv.weight)  # it did train


def test_a_frozen_parameter_is_left_out_and_does_not_change():
    net = model()
    net.conv.requires_grad_(False)
    before = net.conv.weight.detach().clone()
    optimizer = optimizer_for(net, name="adamw", weight_decay=0.5, norms_and_biases=SCALED)
    in_optimizer = {id(p) for ids in [g["params"] for g in optimizer.param_groups] for p in ids}
    assert id(net.conv.weight) not in in_optimizer and id(net.conv.bias) not in in_optimizer
    assert group_ids(optimizer) == [
        [id(net.head.weight)],
        [id(net.bn.weight), id(net.bn.bias), id(net.head.bias)],
    ]
    take_steps(net, optimizer)
    assert torch.equal(net.conv.weight, before)
    # without the key: one group of every parameter, frozen ones too (the layout of
    # checkpoints written before norms_and_biases); a frozen one still never changes
    plain = optimizer_for(net, name="sgd", weight_decay=0.5)
    assert group_ids(plain) == [[id(p) for p in net.parameters()]]
    take_steps(net, plain)
    assert torch.equal(net.conv.weight, before)


def test_a_model_without_norms_or_biases_keeps_an_empty_second_group():
    net = nn.Linear(3, 2, bias=False)
    optimizer = optimizer_for(net, name="adam", norms_and_biases=SCALED)
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 0]
    net(torch.randn(4, 3)).sum().backward()
    optimizer.step()


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "where", "problem"),
    [
        ({"lr_scale": 0}, "optimizer.norms_and_biases.lr_scale", "greater than 0"),
        ({"weight_decay": -1}, "optimizer.norms_and_biases.weight_decay", "greater than or equal"),
        ({"lr_scal": 2}, "optimizer.norms_and_biases.lr_scal", "Did you mean 'lr_scale'"),
        ({"momentum": 0}, "optimizer.norms_and_biases.momentum", "unknown key"),
    ],
)
def test_bad_values_name_the_key(value, where, problem):
    with pytest.raises(RecipeError) as error:
        OPTIMIZERS.validate({"name": "sgd", "norms_and_biases": value}, "optimizer")
    assert error.value.path == where and problem in str(error.value)


def test_check_refuses_a_zero_lr_scale(tmp_path):
    proc = dltrain("check", QUICKSTART, "optimizer.norms_and_biases.lr_scale=0", cwd=tmp_path)
    assert_user_error(proc, "optimizer.norms_and_biases.lr_scale", "greater than 0")


def test_check_suggests_the_key_for_a_typo(invoke):
    result = invoke("check", str(QUICKSTART), "optimizer.norms_and_biases.weight_decy=0")
    assert result.exit_code == 2
    assert "optimizer.norms_and_biases.weight_decy" in result.output
    assert "Did you mean 'weight_decay'" in result.output


def test_check_accepts_the_key_and_switching_optimizer_keeps_it(invoke):
    result = invoke(
        "check", str(QUICKSTART), "optimizer.name=sgd", "optimizer.norms_and_biases.lr_scale=64"
    )
    assert result.exit_code == 0, result.output
    assert "norms_and_biases: {lr_scale: 64.0, weight_decay: null}" in result.output


def test_list_shows_the_key(invoke):
    result = invoke("list", "optimizers")
    assert result.exit_code == 0
    assert result.output.count("norms_and_biases") == len(OPTIMIZERS.names())


# -- schedules and lr-find keep the ratio --------------------------------------------------------


def lrs_over(schedule, steps: int) -> list[tuple[float, float]]:
    """(main, norms_and_biases) lrs used by each of `steps` optimizer steps."""
    out = []
    for _ in range(steps):
        main, small = (g["lr"] for g in schedule.optimizer.param_groups)
        out.append((main, small))
        assert schedule.last_lr() == main  # it reports the main group's lr
        schedule.optimizer.step()
        schedule.step_batch()
    return out


@pytest.mark.parametrize(
    "section",
    [
        {"name": "cosine", "warmup_epochs": 1},
        {"name": "cosine", "min_lr": 0.01},
        {"name": "onecycle"},
        {"name": "onecycle", "max_lr": 2.0},
        {"name": "step", "step_size": 1, "warmup_epochs": 1},
    ],
    ids=lambda s: "-".join(str(v) for v in s.values()),
)
def test_schedules_keep_the_ratio_at_every_step(section):
    optimizer = optimizer_for(model(), name="sgd", lr=0.1, momentum=0.9, norms_and_biases=SCALED)
    checked = SCHEDULERS.validate(section, "scheduler")
    schedule = SCHEDULERS.build(checked, optimizer=optimizer, epochs=4, steps_per_epoch=5)
    lrs = lrs_over(schedule, 20)
    assert len({main for main, _ in lrs}) > 5  # the schedule did change the lr
    for main, small in lrs:
        assert small == pytest.approx(64 * main, rel=1e-12, abs=0)
    if section.get("max_lr"):
        assert max(g["max_lr"] for g in optimizer.param_groups) == pytest.approx(2.0 * 64)


def test_plateau_keeps_the_ratio_down_to_min_lr():
    optimizer = optimizer_for(model(), name="sgd", lr=1.0, norms_and_biases=SCALED)
    checked = SCHEDULERS.validate({"name": "plateau", "patience": 0, "min_lr": 0.1}, "scheduler")
    schedule = SCHEDULERS.build(checked, optimizer=optimizer, epochs=9, steps_per_epoch=1)
    for _ in range(5):
        schedule.step_epoch(1.0)  # never improves: 1.0 → 0.1, then the floor
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 6.4])


def test_lr_find_ramps_the_main_lr_and_keeps_the_ratio(tmp_path, monkeypatch):
    built = []

    def remember(*args):
        built.append(build_optimizer(*args))
        return built[-1]

    monkeypatch.setattr("dltrain.experiments.lr_find.build_optimizer", remember)
    seen = []

    def progress(step, steps, lr, loss):
        main, small = (g["lr"] for g in built[0].param_groups)
        seen.append((lr, main, small))

    recipe = load_recipe(
        QUICKSTART,
        ["device=cpu", f"output={tmp_path}", "optimizer.norms_and_biases={lr_scale: 8}"],
    )
    find_lr(recipe, start_lr=1e-5, end_lr=1e-2, steps=12, progress=progress)
    assert len(seen) == 12
    for lr, main, small in seen:
        assert main == lr and small == pytest.approx(8 * lr, rel=1e-12)


# -- resume --------------------------------------------------------------------------------------


def test_resume_with_norms_and_biases_gives_the_same_weights(tmp_path):
    settings = ["optimizer.norms_and_biases={lr_scale: 4, weight_decay: 0}"]
    straight, _ = train(tmp_path, DIGITS, "straight", "train.epochs=2", *settings)
    train(tmp_path, DIGITS, "resumed", "train.epochs=1", *settings)
    first = RunFolder(tmp_path / "resumed")
    saved = torch.load(first.last_path, weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr"] for g in saved] == [0.003, 0.012] and saved[1]["weight_decay"] == 0.0
    resumed, _ = train(
        tmp_path, DIGITS, "resumed", "train.epochs=2", *settings, resume=first.last_path
    )
    assert_same_tensors(weights(straight.last_path), weights(resumed.last_path))
