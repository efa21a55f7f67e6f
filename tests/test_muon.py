"""optimizer: {name: muon}: torch's Muon for hidden conv/linear weights, `others` for the rest.

The contract: one dltrain muon section steps exactly as a hand-built pair of torch optimizers
(torch.optim.Muon over the hidden weights, the others' optimizer over the rest); conv filters
are stepped as (out, in·kh·kw) matrices whatever their memory layout; schedules and lr-find move
every group together; resume is bitwise; 2 processes train as 1.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from dltrain.config.loading import load_recipe
from dltrain.config.registry import OPTIMIZERS, SCHEDULERS
from dltrain.errors import RecipeError, UserError
from dltrain.experiments.lr_find import find_lr
from dltrain.muon import FilterBank, split_for_muon
from dltrain.optim import build_optimizer

from helpers.cli import QUICKSTART, words
from helpers.training import DIGITS, assert_same_tensors, train, weights

OTHERS_SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
MUON = {"name": "muon", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "others": OTHERS_SGD}


class Net(nn.Module):
    """Embedding, conv, norm, hidden linear and head: every kind of parameter Muon sorts."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.conv = nn.Conv2d(3, 6, 3)
        self.norm = nn.BatchNorm2d(6)
        self.hidden = nn.Linear(6, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, tokens):  # tokens: (N, 6, 6) ids → an image of embeddings
        x = self.embed(tokens).permute(0, 3, 1, 2)
        x = self.norm(self.conv(x)).relu().mean(dim=(2, 3))
        return self.head(self.hidden(x).relu())


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def batches(steps: int):
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield (
            torch.randint(0, 5, (16, 6, 6), generator=generator),
            torch.randint(0, 4, (16,), generator=generator),
        )


def muon_for(model: nn.Module, **section) -> torch.optim.Optimizer:
    return build_optimizer(OPTIMIZERS.validate({**MUON, **section}, "optimizer"), model, "cpu")


def train_steps(model: nn.Module, step, steps: int = 4) -> None:
    for x, y in batches(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        step()
        model.zero_grad(set_to_none=True)


# -- which parameters Muon takes -----------------------------------------------------------------


def test_muon_takes_hidden_conv_and_linear_weights_the_others_the_rest():
    model = net()
    matrices, rest, head = split_for_muon(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in matrices] == ["conv.weight", "hidden.weight"]
    assert [names[id(p)] for p in rest] == [
        "embed.weight",
        "conv.bias",
        "norm.weight",
        "norm.bias",
        "hidden.bias",
        "head.weight",
        "head.bias",
    ]
    assert head == "head"
    model.hidden.weight.requires_grad_(False)  # frozen: in neither
    matrices, rest, _ = split_for_muon(model)
    assert id(model.hidden.weight) not in {id(p) for p in matrices + rest}


# -- exactly the hand-built pair -----------------------------------------------------------------


def test_one_section_steps_exactly_as_torch_muon_and_sgd_built_by_hand():
    ours, theirs = net(), net()
    optimizer = muon_for(ours)
    # the hand-built pair: Muon over the hidden weights (the conv's as a 2-D matrix, as Keller
    # Jordan's reference flattens it), torch's SGD (fused, as dltrain's sgd on the CPU) for
    # the rest
    conv_matrix = theirs.conv.weight.detach().flatten(1).clone()
    muon = torch.optim.Muon(
        [conv_matrix, theirs.hidden.weight], lr=0.05, momentum=0.9, weight_decay=0.01
    )
    rest = [p for n, p in theirs.named_parameters() if n not in ("conv.weight", "hidden.weight")]
    sgd = torch.optim.SGD(rest, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, fused=True)

    def hand_step():
        conv_matrix.grad = theirs.conv.weight.grad.flatten(1)
        muon.step()
        with torch.no_grad():
            theirs.conv.weight.copy_(conv_matrix.view_as(theirs.conv.weight))
        sgd.step()

    train_steps(ours, optimizer.step)
    train_steps(theirs, hand_step)
    assert_same_tensors(ours.state_dict(), theirs.state_dict())
    assert not torch.equal(ours.conv.weight, net().conv.weight)  # it did train


def test_renormalize_scales_each_matrix_to_norm_sqrt_rows_before_its_step():
    ours, theirs = net(), net()
    optimizer = muon_for(ours, renormalize=True)
    muon = torch.optim.Muon([theirs.hidden.weight], lr=0.05, momentum=0.9, weight_decay=0.01)

    x, y = next(batches(1))
    for model in (ours, theirs):
        nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    with torch.no_grad():  # airbench94_muon's normalisation, by hand
        weight = theirs.hidden.weight
        weight.mul_(math.sqrt(weight.shape[0]) / weight.norm())
    muon.step()
    torch.testing.assert_close(ours.hidden.weight, theirs.hidden.weight, rtol=0, atol=1e-6)
    conv = ours.conv.weight.flatten(1)  # normalised, then one step of norm ~√rows·lr away
    assert conv.norm().item() == pytest.approx(math.sqrt(6), rel=0.1)


def test_a_filter_bank_is_the_same_matrix_in_any_memory_layout():
    weight = torch.randn(6, 3, 3, 3)
    weight.grad = torch.randn(6, 3, 3, 3)
    last = weight.detach().to(memory_format=torch.channels_last)
    last.grad = weight.grad.to(memory_format=torch.channels_last)
    banks = [FilterBank.of(weight), FilterBank.of(last)]
    values, grad = weight.flatten(1).clone(), weight.grad.flatten(1).clone()
    for bank in banks:
        bank.before_step()
        assert torch.equal(bank.matrix, values)
        assert torch.equal(bank.matrix.grad, grad)
        bank.matrix.add_(1.0)
        bank.after_step()
    assert torch.equal(banks[1].param, banks[0].param)
    assert banks[1].param.is_contiguous(memory_format=torch.channels_last)


# -- schedules, lr-find, the checkpoint's state --------------------------------------------------


def test_a_schedule_moves_muon_and_the_others_together():
    optimizer = muon_for(net())
    checked = SCHEDULERS.validate({"name": "onecycle"}, "scheduler")
    schedule = SCHEDULERS.build(checked, optimizer=optimizer, epochs=2, steps_per_epoch=5)
    seen = []
    for _ in range(10):
        muon_lr, others_lr = (g["lr"] for g in optimizer.param_groups)
        assert optimizer.muon.param_groups[0]["lr"] == muon_lr  # the same group dicts
        seen.append(muon_lr)
        assert others_lr == pytest.approx(muon_lr * 0.1 / 0.05, rel=1e-12)
        optimizer.step()
        schedule.step_batch()
    assert max(seen) == pytest.approx(0.05) and len(set(seen)) > 5


def test_lr_find_ramps_muon_and_keeps_the_others_ratio(tmp_path, monkeypatch):
    built = []

    def remember(*args):
        built.append(build_optimizer(*args))
        return built[-1]

    monkeypatch.setattr("dltrain.experiments.lr_find.build_optimizer", remember)
    seen = []
    recipe = load_recipe(
        QUICKSTART,
        ["device=cpu", f"output={tmp_path}", "optimizer={name: muon, others: {name: sgd}}"],
    )
    find_lr(recipe, start_lr=1e-4, end_lr=1e-1, steps=10, progress=lambda *a: seen.append(a))
    assert len(seen) == 10
    groups = built[0].param_groups
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.01 / 0.02, rel=1e-12)


def test_the_state_dict_holds_both_and_loads_into_a_new_one():
    model = net()
    optimizer = muon_for(model)
    train_steps(model, optimizer.step, 2)
    saved = copy.deepcopy(optimizer.state_dict())
    assert set(saved) == {"muon", "others"}
    buffers = [s["momentum_buffer"] for s in saved["muon"]["state"].values()]
    assert [tuple(b.shape) for b in buffers] == [(6, 27), (12, 6)]  # the conv as a matrix

    again = muon_for(copy.deepcopy(model))
    again.load_state_dict(saved)
    assert [g["lr"] for g in again.param_groups] == [0.05, 0.1]
    assert again.param_groups[0] is again.muon.param_groups[0]  # loading replaced the dicts
    assert len(again.state) == 2 + 7  # both states, read together


# -- whole runs ----------------------------------------------------------------------------------

MUON_DIGITS = {**DIGITS, "optimizer": {"name": "muon", "lr": 0.1, "others": {"name": "adamw"}}}


def test_a_muon_run_learns_and_resumes_bitwise(tmp_path):
    straight, report = train(tmp_path, MUON_DIGITS, "straight", "train.epochs=3")
    # digits with flips, crops and dropout in 3 epochs: adamw alone gets 0.36, muon 0.69
    assert report["accuracy"] >= 0.6
    train(tmp_path, MUON_DIGITS, "resumed", "train.epochs=2")
    first = tmp_path / "resumed" / "checkpoints" / "last.pt"
    resumed, _ = train(tmp_path, MUON_DIGITS, "resumed", "train.epochs=3", resume=first)
    assert_same_tensors(weights(straight.last_path), weights(resumed.last_path))


def test_the_run_says_which_layers_muon_takes(invoke):
    result = invoke(
        "fit", QUICKSTART, "train.epochs=1", "device=cpu", "optimizer=muon", "output=runs"
    )
    assert result.exit_code == 0, result.output
    # seed_cnn: 2 convs and 3 linear layers, the last of them (the Sequential's 14th) the head
    assert "muon: 4 weight matrices (20,310 parameters)" in words(result.output)
    said = "adamw: 6 other tensors, the head '14' (Linear 84→10) among them"
    assert said in words(result.output)


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("others", "where", "problem"),
    [
        ({"name": "muon"}, "optimizer.others.name", "cannot be muon"),
        ({"name": "sgd", "lrr": 0.1}, "optimizer.others.lrr", "lr"),
        ({"name": "sgd", "lr": -1}, "optimizer.others.lr", "greater than 0"),
        (3, "optimizer.others", "must be an optimizer section"),
    ],
)
def test_a_bad_others_section_is_refused_when_the_recipe_is_checked(others, where, problem):
    with pytest.raises(RecipeError) as caught:
        OPTIMIZERS.validate({"name": "muon", "others": others}, "optimizer")
    assert where in str(caught.value) and problem in str(caught.value)


def test_norms_and_biases_belong_in_others():
    with pytest.raises(UserError, match="optimizer.others"):
        muon_for(net(), norms_and_biases={"lr_scale": 2})
    optimizer = muon_for(net(), others={**OTHERS_SGD, "norms_and_biases": {"lr_scale": 0.5}})
    muon_group, head_group, small_group = optimizer.param_groups
    assert len(head_group["params"]) == 2  # the head's and the embedding's weights
    assert small_group["lr"] == pytest.approx(0.05)


def test_fp16_gradient_scaling_is_refused_before_a_step(tmp_path, invoke):
    # the scaler would unscale and check param_groups' gradients, which a filter bank's
    # matrix gets only inside step(): the conv's update would go unscaled and unchecked
    refused = invoke(
        "fit", QUICKSTART, "device=cpu", "optimizer=muon", "train.precision=fp16", "output=runs"
    )
    assert refused.exit_code == 2, refused.output
    assert "fp16 needs gradient scaling, which optimizer muon cannot take" in words(refused.output)
    assert "epoch 1/" not in refused.output
    bf16 = invoke("fit", QUICKSTART, "device=cpu", "optimizer=muon", "train.precision=bf16",
                  "train.epochs=1", "output=runs", "-q")  # fmt: skip
    assert bf16.exit_code == 0, bf16.output


def test_a_model_with_no_hidden_layer_is_refused():
    with pytest.raises(UserError, match="no hidden conv or linear weights.*'0'"):
        muon_for(nn.Sequential(nn.Linear(4, 3)))


def test_a_torch_without_muon_is_told_which_torch_has_it(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(UserError, match="torch 2.9"):
        muon_for(net())
