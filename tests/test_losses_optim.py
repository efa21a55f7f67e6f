"""Losses, optimizers and lr schedules: values, recipe validation, and exact resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from dltrain.config.registry import LOSSES, OPTIMIZERS, SCHEDULERS
from dltrain.errors import RecipeError, UserError
from dltrain.losses import balanced_weights
from dltrain.optim import LrSchedule, constant_schedule

C = 4
COUNTS = torch.tensor([10, 20, 30, 40])


def make_loss(**section):
    checked = LOSSES.validate(section, "loss")
    return LOSSES.build(checked, num_classes=C, class_counts=COUNTS)


def make_optimizer(params, **section):
    checked = OPTIMIZERS.validate(section, "optimizer")
    return OPTIMIZERS.build(checked, params=params, device_type="cpu")


def make_schedule(optimizer, epochs=4, steps_per_epoch=5, **section) -> LrSchedule:
    checked = SCHEDULERS.validate(section, "scheduler")
    return SCHEDULERS.build(
        checked, optimizer=optimizer, epochs=epochs, steps_per_epoch=steps_per_epoch
    )


def sgd(lr=1.0, **kwargs) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, **kwargs)


def lrs_over(schedule: LrSchedule, steps: int) -> list[float]:
    """The lr used by each of `steps` optimizer steps."""
    out = []
    for _ in range(steps):
        out.append(schedule.last_lr())
        schedule.optimizer.step()
        schedule.step_batch()
    return out


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(8, C, requires_grad=True), torch.randint(0, C, (8,))


# -- losses -----------------------------------------------------------------------------------


def test_cross_entropy_matches_torch(batch):
    logits, y = batch
    weights = [1.0, 2.0, 0.5, 3.0]
    loss = make_loss(name="cross_entropy", label_smoothing=0.1, class_weights=weights)
    expected = F.cross_entropy(logits, y, weight=torch.tensor(weights), label_smoothing=0.1)
    torch.testing.assert_close(loss(logits, y), expected)
    plain = make_loss(name="cross_entropy")
    torch.testing.assert_close(plain(logits, y), F.cross_entropy(logits, y))


def test_balanced_weights():
    expected = torch.tensor([100 / (4 * n) for n in (10, 20, 30, 40)])
    torch.testing.assert_close(balanced_weights(COUNTS), expected)
    loss = make_loss(name="cross_entropy", class_weights="balanced")
    torch.testing.assert_close(loss.weight, expected)
    assert "weight" in dict(loss.named_buffers())  # so loss.to(device) moves it


def test_nll_equals_cross_entropy_with_weights(batch):
    logits, y = batch
    nll = make_loss(name="nll", class_weights="balanced")
    expected = F.cross_entropy(logits, y, weight=balanced_weights(COUNTS))
    torch.testing.assert_close(nll(logits, y), expected)


@pytest.mark.parametrize("name", ["cross_entropy", "nll"])
def test_wrong_length_class_weights(name):
    with pytest.raises(UserError, match=r"loss\.class_weights.*expected 4"):
        make_loss(name=name, class_weights=[1.0, 2.0])


def test_mse_is_against_one_hot(batch):
    logits, y = batch
    expected = F.mse_loss(logits, F.one_hot(y, C).float())
    torch.testing.assert_close(make_loss(name="mse")(logits, y), expected)


@pytest.mark.parametrize(
    "section",
    [
        {"name": "cross_entropy", "label_smoothing": 0.2, "class_weights": "balanced"},
        {"name": "nll"},
        {"name": "mse"},
        {"name": "bce_with_logits"},
        {"name": "bce_with_logits", "pos_weight": 3.0},
        {"name": "smooth_l1", "beta": 0.5},
        {"name": "huber", "delta": 2.0},
    ],
)
def test_each_loss_is_a_finite_scalar_with_gradients(section, batch):
    logits, y = batch
    value = make_loss(**section)(logits, y)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_huber_is_torchs_huber_loss_and_delta_times_smooth_l1():
    """On values (regression): torch's HuberLoss; and delta × smooth L1 with beta = delta."""
    outputs = torch.tensor([[0.0], [0.5], [3.0], [-4.0]])
    targets = torch.tensor([0.2, -0.5, 0.0, 1.0])
    huber = LOSSES.validate({"name": "huber", "delta": 1.5}, "loss")
    ours = LOSSES.build(huber, num_classes=1, task="regression")
    expected = torch.nn.HuberLoss(delta=1.5)(outputs.squeeze(-1), targets)
    torch.testing.assert_close(ours(outputs, targets), expected)
    smooth_l1 = LOSSES.validate({"name": "smooth_l1", "beta": 1.5}, "loss")
    smooth = LOSSES.build(smooth_l1, num_classes=1, task="regression")
    torch.testing.assert_close(ours(outputs, targets), 1.5 * smooth(outputs, targets))


def test_loss_handles_half_logits(batch):
    logits, y = batch
    value = make_loss(name="cross_entropy", class_weights="balanced")(logits.bfloat16(), y)
    assert value.dtype == torch.float32 and torch.isfinite(value)


# -- optimizers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section",
    [
        {"name": "sgd", "lr": 0.1},
        {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
        {"name": "adam", "lr": 0.1, "betas": [0.8, 0.99], "amsgrad": True},
        {"name": "adamw", "lr": 0.1},
        {"name": "rmsprop", "lr": 0.01, "momentum": 0.5},
        {"name": "adagrad", "lr": 0.1},
        {"name": "adam", "lr": 0.1, "fused": True},  # fused kernels exist on CPU too
    ],
)
def test_each_optimizer_lowers_a_quadratic(section):
    model = torch.nn.Linear(3, 1)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))

    def loss_fn() -> torch.Tensor:
        return (model(x) - 1.0).pow(2).mean()

    optimizer = make_optimizer(model.parameters(), **section)
    before = loss_fn()
    before.backward()
    optimizer.step()
    assert loss_fn().item() < before.item()


def test_fused_auto_on_cuda_and_cpu_only():
    params = [torch.nn.Parameter(torch.zeros(2))]
    adam = OPTIMIZERS.validate({"name": "adam"}, "o")
    for device_type in ("cpu", "cuda"):  # constructed only: kernels are checked at step time
        assert OPTIMIZERS.build(adam, params=params, device_type=device_type).defaults["fused"]
    assert not OPTIMIZERS.build(adam, params=params, device_type="mps").defaults["fused"]
    rms = OPTIMIZERS.build(
        OPTIMIZERS.validate({"name": "rmsprop"}, "o"), params=params, device_type="cuda"
    )
    assert "fused" not in rms.defaults


def test_fused_auto_on_the_cpu_steps_as_torchs_fused_adam():
    """The default on the CPU is torch's fused kernel: the same update as fused=True by hand,
    and within rounding of the per-parameter loop."""
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(3)]
    grads = [torch.randn(5, 3), torch.randn(3)]

    def stepped(**kwargs):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer = (
            OPTIMIZERS.build(OPTIMIZERS.validate({"name": "adam", "lr": 0.1}, "o"), params=params)
            if kwargs.get("ours")
            else torch.optim.Adam(params, lr=0.1, fused=kwargs.get("fused"))
        )
        for _ in range(3):
            optimizer.step()
        return params

    ours, fused, loop = stepped(ours=True), stepped(fused=True), stepped(fused=False)
    for a, b, c in zip(ours, fused, loop):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c)


def test_fused_true_where_unsupported_is_a_user_error():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(UserError, match=r"optimizer\.fused"):
        make_optimizer(params, name="rmsprop", fused=True)
    checked = OPTIMIZERS.validate({"name": "sgd", "fused": True}, "optimizer")
    with pytest.raises(UserError, match=r"optimizer\.fused.*'xla'"):
        OPTIMIZERS.build(checked, params=params, device_type="xla")


def test_nesterov_needs_momentum():
    with pytest.raises(UserError, match=r"optimizer\.nesterov.*momentum"):
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], name="sgd", nesterov=True)


def test_misspelt_key_names_path_and_suggestion():
    with pytest.raises(RecipeError) as info:
        OPTIMIZERS.validate({"name": "adam", "lrr": 0.1}, "optimizer")
    assert "optimizer.lrr" in str(info.value) and "'lr'" in str(info.value)


@pytest.mark.parametrize("lr", [0, -1])
def test_non_positive_lr_rejected(lr):
    with pytest.raises(RecipeError, match=r"optimizer\.lr"):
        OPTIMIZERS.validate({"name": "sgd", "lr": lr}, "optimizer")


def test_runtime_args_refused_in_recipes():
    with pytest.raises(RecipeError, match=r"optimizer\.device_type"):
        OPTIMIZERS.validate({"name": "sgd", "device_type": "cuda"}, "optimizer")


# -- schedules --------------------------------------------------------------------------------


def test_constant_schedule():
    schedule = constant_schedule(sgd(0.3))
    assert lrs_over(schedule, 5) == [0.3] * 5
    schedule.step_epoch(1.0)
    assert schedule.last_lr() == 0.3


def test_warmup_ramps_linearly():
    # 1 warmup epoch of 5 steps: base * 1/5, 2/5, ..., 5/5, then the cosine starts at base.
    lrs = lrs_over(make_schedule(sgd(1.0), name="cosine", warmup_epochs=1), 7)
    assert lrs[:6] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert lrs[6] < 1.0


def test_fractional_warmup_on_step_schedule():
    lrs = lrs_over(make_schedule(sgd(1.0), name="step", step_size=10, warmup_epochs=0.4), 4)
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 1.0])  # 0.4 epoch x 5 steps = 2 warmup steps


def test_cosine_reaches_min_lr_at_last_step():
    schedule = make_schedule(sgd(1.0), name="cosine", min_lr=0.1)
    lrs = lrs_over(schedule, 20)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 10 / 19)))
    assert all(a >= b for a, b in zip(lrs[:-1], lrs[1:], strict=True))


def test_step_decays_at_epoch_boundaries():
    lrs = lrs_over(make_schedule(sgd(1.0), name="step", step_size=2, gamma=0.5), 20)
    assert lrs == pytest.approx([1.0] * 10 + [0.5] * 10)


def test_multistep_decays_at_milestones():
    lrs = lrs_over(make_schedule(sgd(1.0), name="multistep", milestones=[3, 1], gamma=0.1), 20)
    assert lrs == pytest.approx([1.0] * 5 + [0.1] * 10 + [0.01] * 5)


def test_onecycle_peaks_at_max_lr():
    schedule = make_schedule(sgd(0.1, momentum=0.9), name="onecycle", max_lr=2.0, pct_start=0.25)
    lrs = lrs_over(schedule, 25)  # 5 steps past the end: no error, lr stays at its last value
    assert max(lrs) == pytest.approx(2.0)
    assert lrs.index(max(lrs)) == round(0.25 * 20) - 1
    assert lrs[0] == pytest.approx(2.0 / 25)
    assert lrs[19] == pytest.approx(2.0 / 25 / 1e4)
    assert lrs[20:] == pytest.approx([lrs[19]] * 5)


def test_onecycle_defaults_to_optimizer_lr_and_skips_momentum_for_plain_sgd():
    optimizer = sgd(0.5)
    assert max(lrs_over(make_schedule(optimizer, name="onecycle"), 20)) == pytest.approx(0.5)
    assert optimizer.param_groups[0]["momentum"] == 0


def test_plateau_reduces_after_patience():
    schedule = make_schedule(sgd(1.0), name="plateau", patience=2, factor=0.5)
    losses = [1.0, 1.0, 1.0, 1.0, 0.5, None]
    seen = []
    for loss in losses:
        lrs_over(schedule, 5)
        schedule.step_epoch(loss)
        seen.append(schedule.last_lr())
    # Epochs 2 and 3 do not improve (patience 2); epoch 4 is the third: lr halves.
    assert seen == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5, 0.5])


def test_plateau_warmup_then_reduction_sticks():
    schedule = make_schedule(sgd(1.0), name="plateau", patience=0, warmup_epochs=1)
    assert lrs_over(schedule, 5) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    schedule.step_epoch(1.0)
    lrs_over(schedule, 5)
    schedule.step_epoch(2.0)  # worse, patience 0: reduce
    assert lrs_over(schedule, 5) == pytest.approx([0.1] * 5)


def test_warmup_longer_than_run_is_a_user_error():
    with pytest.raises(UserError, match=r"scheduler\.warmup_epochs"):
        make_schedule(sgd(), epochs=2, name="cosine", warmup_epochs=2)


def test_cosine_min_lr_above_lr_is_a_user_error():
    with pytest.raises(UserError, match=r"scheduler\.min_lr"):
        make_schedule(sgd(0.1), name="cosine", min_lr=0.5)


SCHEDULES = [
    {"name": "step", "step_size": 1, "gamma": 0.7, "warmup_epochs": 1.5},
    {"name": "multistep", "milestones": [2, 3], "warmup_epochs": 0.5},
    {"name": "cosine", "min_lr": 0.01, "warmup_epochs": 1},
    {"name": "onecycle", "anneal_strategy": "linear"},
    {"name": "plateau", "patience": 0, "warmup_epochs": 1},
]


def run(optimizer, schedule, steps, start=0):
    """Train-like loop: plateau sees a loss that worsens every other epoch."""
    lrs = []
    for k in range(start, start + steps):
        lrs.append(schedule.last_lr())
        optimizer.step()
        schedule.step_batch()
        if (k + 1) % 5 == 0:
            schedule.step_epoch(float((k // 5) % 2))
    return lrs


@pytest.mark.parametrize("section", SCHEDULES, ids=lambda s: s["name"])
def test_resume_continues_identically(section):
    def fresh():
        optimizer = sgd(0.5, momentum=0.9)
        return optimizer, make_schedule(optimizer, **section)

    optimizer, schedule = fresh()
    uninterrupted = run(optimizer, schedule, 20)

    optimizer, schedule = fresh()
    first = run(optimizer, schedule, 8)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    optimizer, schedule = fresh()
    schedule.load_state_dict(saved["schedule"])
    optimizer.load_state_dict(saved["optimizer"])
    assert first + run(optimizer, schedule, 12, start=8) == uninterrupted


def test_loading_another_schedule_is_a_user_error():
    state = make_schedule(sgd(), name="cosine").state_dict()
    with pytest.raises(UserError, match="checkpoint's lr schedule is 'cosine'"):
        constant_schedule(sgd()).load_state_dict(state)


# -- the update's numerics ------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_clipping_acts_on_the_true_gradient_whatever_the_loss_scale(precision):
    # fp16 scales the loss by 2**16: clipping before unscaling would clip the scaled gradient
    # and leave an update 65536 times too small. The gradient of sum(w)/2 is 0.5 per weight
    # (32768 once scaled: still finite in fp16, so the scaler takes the step; the halving is
    # done in fp32, as autocast does for a real loss, else the scale itself would overflow).
    from dltrain.training.precision import MixedPrecision

    layer = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(layer.weight)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    numerics = MixedPrecision(precision, torch.device("cpu"))
    with numerics.autocast():
        loss = layer(torch.ones(1, 4)).float().sum() / 2
    numerics.backward(loss)
    numerics.step(optimizer, layer.parameters(), grad_clip=0.25)
    # the gradient (0.5, 0.5, 0.5, 0.5) has norm 1; clipped to norm 0.25, SGD with lr 1 moves by it
    assert torch.allclose(layer.weight.detach(), torch.full((1, 4), -0.125), rtol=1e-3)
