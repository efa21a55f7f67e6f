"""training/privacy.py: DP-SGD through Opacus from a recipe's `privacy:` section — the ε a run
reports is Opacus' accountant's for the steps taken, each sample's gradient is clipped before
the noise, a resumed run spends and learns exactly what a straight one does, and what Opacus
cannot train is refused before any work."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from helpers.training import assert_same_tensors, weights

opacus = pytest.importorskip("opacus")

PRIVATE = {
    "name": "private",
    "output": "runs",
    "device": "cpu",
    "seed": 0,
    "data": {"name": "digits", "val_split": 0.1, "batch_size": 64},
    "model": {"name": "mlp", "hidden": [64]},
    "optimizer": {"name": "sgd", "lr": 0.5},
    "train": {"epochs": 4},
    "privacy": {"epsilon": 3.0},
}


def write(tmp_path, name: str = "private", **sections) -> str:
    recipe = {**PRIVATE, "name": name}
    for key, value in sections.items():  # a section's keys over the base's; a model replaces
        recipe[key] = value if key == "model" else {**recipe[key], **value}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    return f"{name}.yaml"


def accountant_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    from opacus.accountants import create_accountant

    accountant = create_accountant("prv")
    accountant.step(noise_multiplier=noise, sample_rate=rate)  # its history: (σ, q, count)
    accountant.history = [(noise, rate, steps)]
    return accountant.get_epsilon(delta)


def test_the_reported_epsilon_is_the_accountants_and_within_the_target(tmp_path, invoke):
    """1,295 training digits, batch 64: sample rate 64/1295, 20 steps an epoch; δ auto = 1e-4.
    Every epoch's ε in metrics.csv is the accountant's after that many steps, the last one is
    report.json's and at most the target, and the model still learns."""
    fitted = invoke("fit", write(tmp_path))
    assert fitted.exit_code == 0, fitted.output
    report = json.loads((tmp_path / "runs/private/report.json").read_text())
    spent = report["privacy"]
    assert spent["delta"] == 1e-4 and spent["sample_rate"] == pytest.approx(64 / 1295)
    assert spent["steps"] == 4 * 20 and spent["accountant"] == "prv"
    with open(tmp_path / "runs/private/metrics.csv") as f:
        epochs = [float(row["epsilon"]) for row in csv.DictReader(f)]
    expected = [
        accountant_epsilon(spent["noise_multiplier"], spent["sample_rate"], 20 * k, 1e-4)
        for k in (1, 2, 3, 4)
    ]
    assert epochs == pytest.approx(expected, rel=1e-4)
    assert spent["epsilon"] == pytest.approx(expected[-1], rel=1e-6) and spent["epsilon"] <= 3.0
    assert epochs == sorted(epochs)  # each epoch spends more
    assert report["accuracy"] >= 0.7
    assert "spent (target 3) at δ 0.0001" in fitted.output  # the summary says it too
    lines = (tmp_path / "runs/private/events.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    logged = [e["epsilon"] for e in events if e["event"] == "epoch"]
    assert logged == pytest.approx(epochs, rel=1e-5)
    listed = invoke("runs", "runs", "--json", "--sort", "epsilon")
    assert json.loads(listed.stdout)[0]["epsilon"] == spent["epsilon"]  # dltrain runs shows it


def test_each_samples_gradient_is_clipped_before_the_noise(tmp_path):
    """On a tiny linear model the update's gradient is the sum of each sample's gradient clipped
    to max_grad_norm, over the expected batch size — computed here sample by sample, against
    what Opacus' optimizer holds after its step (noise made negligible)."""
    from dltrain.config.schema import resolve
    from dltrain.data.base import ArraySplit
    from dltrain.data.loaders import ResidentBatches
    from dltrain.training.privacy import make_private

    torch.manual_seed(0)
    x, y = torch.randn(64, 4) * 5, torch.randint(0, 2, (64,))  # gradients mostly above the bound
    model = torch.nn.Linear(4, 2)
    reference = torch.nn.Linear(4, 2)  # the same weights, without Opacus' hooks
    reference.load_state_dict(model.state_dict())
    recipe = resolve({**PRIVATE, "privacy": {"noise_multiplier": 1e-9, "max_grad_norm": 0.5}})
    split = ArraySplit(x, y)
    resident = ResidentBatches(split, 16, torch.device("cpu"), True, True, seed=0)
    private = make_private(recipe, model, resident, torch.optim.SGD(model.parameters(), lr=0.0))
    bx, by = next(private.batches.epoch(1))
    assert 0 < len(by) < 64  # a Poisson draw: its size varies around 16

    clipped, over = [torch.zeros_like(p) for p in model.parameters()], 0
    for xi, yi in zip(bx, by, strict=True):
        loss = torch.nn.functional.cross_entropy(reference(xi[None]), yi[None])
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        over += int(norm > 0.5)
        for total, g in zip(clipped, grads, strict=True):
            total += g * min(1.0, 0.5 / (norm.item() + 1e-6))
    assert over > len(by) / 2  # clipping is what this batch's sum depends on
    torch.nn.functional.cross_entropy(model(bx), by).backward()
    private.optimizer.step()
    for p, total in zip(model.parameters(), clipped, strict=True):
        torch.testing.assert_close(p.grad, total / 16, rtol=1e-4, atol=1e-6)


def test_a_resumed_private_run_spends_and_learns_what_a_straight_one_does(tmp_path, invoke):
    """With a given noise multiplier (σ does not depend on the epochs), 2 epochs then a resume
    to 4 end with the weights and the ε of 4 straight epochs: the accountant's history and the
    epoch's Poisson draws come back from the checkpoint and the seed."""
    budget = {"privacy": {"epsilon": None, "noise_multiplier": 1.1}}
    straight = invoke("fit", write(tmp_path, "straight", **budget), "-q")
    assert straight.exit_code == 0, straight.output
    name = write(tmp_path, "halted", **budget)
    assert invoke("fit", name, "-q", "train.epochs=2").exit_code == 0
    resumed = invoke("fit", name, "-q", "--resume", "runs/halted/checkpoints/last.pt")
    assert resumed.exit_code == 0, resumed.output
    assert_same_tensors(
        weights(tmp_path / "runs/straight/checkpoints/last.pt"),
        weights(tmp_path / "runs/halted/checkpoints/last.pt"),
    )

    def spent(run: str) -> float:
        return json.loads((tmp_path / f"runs/{run}/report.json").read_text())["privacy"]

    assert spent("halted")["epsilon"] == spent("straight")["epsilon"]
    assert spent("halted")["steps"] == spent("straight")["steps"] == 80


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"model": {"name": "resnet18"}}, "BatchNorm2d), stages.0.0.body.1 (BatchNorm2d)"),
        ({"data": {"as_sequence": "rows"}, "model": {"name": "lstm"}}, "rnn (LSTM)"),
        ({"data": {"as_sequence": "rows"}, "model": {"name": "rnn"}}, "use model: gru or lstm"),
        (
            {"data": {"as_sequence": "rows"}, "model": {"name": "transformer"}},
            "privacy.fix_model: true",
        ),
        (
            {"data": {"as_sequence": "rows"}, "model": {"name": "transformer"},
             "privacy": {"fix_model": True}},
            "model.pooling: mean",
        ),
        ({"train": {"compile": True}}, "train.compile: false"),
        ({"train": {"accumulate": 2}}, "raise data.batch_size instead"),
        ({"train": {"grad_clip": 1.0}}, "remove train.grad_clip"),
        ({"privacy": {"noise_multiplier": 1.0}}, "not both"),
        ({"optimizer": {"name": "muon"}}, "optimizer: muon: Opacus clips"),
    ],
)  # fmt: skip
def test_what_opacus_cannot_train_is_refused_before_training(tmp_path, invoke, sections, message):
    """One message naming the layers or setting and the fix, exit 2, no epoch begun."""
    refused = invoke("fit", write(tmp_path, **sections))
    assert refused.exit_code == 2, refused.output
    assert message in refused.output, refused.output
    assert "Traceback" not in refused.output and "epoch 1/" not in refused.output
    assert not (tmp_path / "runs/private/checkpoints").exists()


def test_fix_model_trains_a_batch_norm_network_and_serves_it_as_trained(tmp_path, invoke):
    """privacy.fix_model: Opacus puts GroupNorm in BatchNorm's place; eval and predict rebuild
    the same layers from the checkpoint (else its weights would not load)."""
    name = write(
        tmp_path, model={"name": "resnet18"}, train={"epochs": 1}, privacy={"fix_model": True}
    )
    fitted = invoke("fit", name, "-q")
    assert fitted.exit_code == 0, fitted.output
    state = torch.load(tmp_path / "runs/private/checkpoints/best.pt", weights_only=False)
    assert not any("running_mean" in key for key in state["model"])  # no batch norm left
    evaluated = invoke("eval", "runs/private/checkpoints/best.pt", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((tmp_path / "runs/private/report.json").read_text())
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(report["accuracy"])


def test_poisson_batches_vary_in_size_and_repeat_for_the_same_epoch():
    from dltrain.data.base import ArraySplit
    from dltrain.data.loaders import ResidentBatches
    from dltrain.training.privacy import PoissonBatches

    split = ArraySplit(torch.arange(1000).float()[:, None], torch.arange(1000))
    poisson = PoissonBatches(ResidentBatches(split, 50, torch.device("cpu"), True, True, 0), 7)
    assert len(poisson) == 20 and poisson.sample_rate == 0.05
    first = [y.tolist() for _, y in poisson.epoch(3)]
    sizes = [len(rows) for rows in first]
    assert len(set(sizes)) > 5 and 30 < sum(sizes) / len(sizes) < 70
    assert [y.tolist() for _, y in poisson.epoch(3)] == first
    assert [y.tolist() for _, y in poisson.epoch(3, start=5)] == first[5:]  # a resumed epoch
    assert [y.tolist() for _, y in poisson.epoch(4)] != first


def test_a_moving_average_of_private_weights_trains_and_reports(tmp_path, invoke):
    """train.ema under privacy: the average of released weights costs no privacy; it is what
    evaluates, and the run reports its ε as any private run."""
    fitted = invoke("fit", write(tmp_path, train={"ema": {"decay": 0.9}}), "-q")
    assert fitted.exit_code == 0, fitted.output
    report = json.loads((tmp_path / "runs/private/report.json").read_text())
    assert report["privacy"]["epsilon"] <= 3.0 and report["accuracy"] >= 0.6
    state = torch.load(tmp_path / "runs/private/checkpoints/last.pt", weights_only=False)
    assert "ema" in state and "privacy" in state


@pytest.mark.parametrize(
    "model",
    [
        {"name": "lstm", "hidden_size": 32},
        {"name": "gru", "hidden_size": 32},
        {"name": "transformer", "d_model": 32, "heads": 2, "layers": 1, "feedforward": 64,
         "pooling": "mean"},
    ],
    ids=["lstm", "gru", "transformer"],
)  # fmt: skip
def test_recurrent_and_attention_models_train_privately_once_fixed(tmp_path, invoke, model):
    """privacy.fix_model puts Opacus' DPLSTM / DPGRU / DPMultiheadAttention in; the digits read
    row by row train, report their ε, and the checkpoint evaluates as trained."""
    name = write(
        tmp_path, data={"as_sequence": "rows"}, model=model, train={"epochs": 2},
        privacy={"fix_model": True}, optimizer={"name": "adam", "lr": 0.01},
    )  # fmt: skip
    fitted = invoke("fit", name, "-q")
    assert fitted.exit_code == 0, fitted.output
    report = json.loads((tmp_path / "runs/private/report.json").read_text())
    assert report["privacy"]["epsilon"] <= 3.0 and report["accuracy"] > 0.2  # 10 classes
    evaluated = invoke("eval", "runs/private/checkpoints/best.pt", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(report["accuracy"])
