"""system/threads.py: `train.threads: auto` times real steps on copies and keeps the faster
count (said in the header and events.jsonl), never more than the usable cores, without
changing what the run computes; a number is used as given, and an explicit OMP_NUM_THREADS
wins over auto."""

from __future__ import annotations

import json
import time

import pytest
import torch

from dltrain.system.host import usable_cores
from dltrain.system.threads import ThreadChoice, choose_threads, cores_per_process

from helpers.training import TABULAR, assert_same_tensors, train, weights

DROPOUT = ("model.dropout=0.3",)  # dropout draws from the random stream at each step


def start_event(run) -> dict:
    lines = (run.root / "events.jsonl").read_text().splitlines()
    return next(json.loads(line) for line in lines if '"start"' in line)


@pytest.fixture
def no_thread_variable(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def test_auto_times_each_count_and_trains_as_the_count_it_picked(tmp_path, no_thread_variable):
    auto_run, _ = train(tmp_path, TABULAR, "auto", "train.epochs=2", *DROPOUT)
    event = start_event(auto_run)
    assert event["threads_chosen"] == "auto" and 1 <= event["threads"] <= usable_cores()
    timed = {int(n) for n in event["step_ms_by_threads"]}
    assert timed == ({1, usable_cores()} if usable_cores() > 1 else set())
    # the steps it timed ran on copies, with the random streams put back: the run is the
    # one a fixed count gives, bit for bit
    fixed_run, _ = train(
        tmp_path, TABULAR, "fixed", "train.epochs=2", *DROPOUT, f"train.threads={event['threads']}"
    )
    assert start_event(fixed_run)["threads_chosen"] == "recipe"
    assert_same_tensors(weights(auto_run.last_path), weights(fixed_run.last_path))


def test_one_and_two_threads_train_the_same_weights(tmp_path, no_thread_variable):
    one, _ = train(tmp_path, TABULAR, "one", "train.epochs=2", *DROPOUT, "train.threads=1")
    two, _ = train(tmp_path, TABULAR, "two", "train.epochs=2", *DROPOUT, "train.threads=2")
    assert (start_event(one)["threads"], start_event(two)["threads"]) == (1, 2)
    assert_same_tensors(weights(one.last_path), weights(two.last_path))


def test_an_explicit_thread_variable_wins_over_auto(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run, _ = train(tmp_path, TABULAR, "env", "train.epochs=1")
    event = start_event(run)
    assert (event["threads"], event["threads_chosen"], event["step_ms_by_threads"]) == (
        1,
        "environment",
        {},
    )


def test_processes_share_the_cores_and_auto_stays_within_its_share(monkeypatch, no_thread_variable):
    assert cores_per_process(1) == usable_cores()
    assert cores_per_process(usable_cores()) == 1 and cores_per_process(10 * usable_cores()) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(usable_cores()))  # under fit --nproc
    never = lambda: pytest.fail("nothing to time with one core each")  # noqa: E731
    assert choose_threads("auto", torch.device("cpu"), never) == ThreadChoice(1, "auto", {})


def test_auto_keeps_fewer_threads_unless_more_are_clearly_faster(monkeypatch, no_thread_variable):
    import dltrain.system.threads as threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    for timed, expected in (({1: 10.0, 4: 9.6}, 1), ({1: 10.0, 4: 9.4}, 4), ({1: 3.0, 4: 40.0}, 1)):
        monkeypatch.setattr(threads, "_window_ms", lambda step, count, t=timed: t[count])
        choice = choose_threads("auto", torch.device("cpu"), lambda: lambda: None)
        assert (choice.threads, choice.step_ms) == (expected, timed)
        assert torch.get_num_threads() == expected
    torch.set_num_threads(1)


def test_auto_counts_the_stalls_that_a_busy_machine_causes(monkeypatch, no_thread_variable):
    """At 2 threads most steps are faster, but every fourth one stalls (a thread held up by
    other work, as on a loaded machine): per step that is slower on the whole, and auto must
    see it — a median of single steps would pick 2 threads here."""
    import dltrain.system.threads as threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    calls = {"at 2": 0}

    def stalling_step() -> None:
        if torch.get_num_threads() == 1:
            time.sleep(0.0015)
            return
        calls["at 2"] += 1
        time.sleep(0.015 if calls["at 2"] % 4 == 0 else 0.001)

    choice = choose_threads("auto", torch.device("cpu"), lambda: stalling_step)
    assert choice.threads == 1, choice.step_ms
    assert choice.step_ms[2] > choice.step_ms[1]
    torch.set_num_threads(1)


def test_drift_is_twice_as_slow_or_twice_as_fast():
    from dltrain.system.threads import drifted

    assert not drifted(2.0, 1.0) and not drifted(0.5, 1.0) and not drifted(1.3, 1.0)
    assert drifted(2.01, 1.0) and drifted(0.49, 1.0)


def test_a_drifting_step_time_is_timed_again_without_changing_the_run(
    tmp_path, monkeypatch, no_thread_variable
):
    import dltrain.training.loop as loop

    epochs_seen = []

    def drift_after_the_second_epoch(ms_per_step: float, baseline_ms: float) -> bool:
        epochs_seen.append(ms_per_step)
        return len(epochs_seen) == 2  # the load changed in epoch 2

    monkeypatch.setattr(loop, "RECHECK_MIN_EPOCH_SECONDS", 0.0)  # these epochs are short
    monkeypatch.setattr(loop, "drifted", drift_after_the_second_epoch)
    timed, _ = train(tmp_path, TABULAR, "timed", "train.epochs=4", *DROPOUT)
    events = [json.loads(line) for line in (timed.root / "events.jsonl").read_text().splitlines()]
    again = [event for event in events if event["event"] == "threads"]
    if usable_cores() == 1:
        assert again == []  # nothing to choose between
        return
    assert len(again) == 1 and again[0]["threads_chosen"] == "auto"
    assert {int(n) for n in again[0]["step_ms_by_threads"]} == {1, usable_cores()}
    fixed, _ = train(tmp_path, TABULAR, "fixed", "train.epochs=4", *DROPOUT, "train.threads=1")
    assert_same_tensors(weights(timed.last_path), weights(fixed.last_path))


def test_the_first_epoch_is_held_against_the_step_time_the_choice_measured(
    tmp_path, monkeypatch, no_thread_variable
):
    """A choice made in a lull of the load is caught after one epoch: epoch 1 is compared with
    the measured step time of the chosen count, later epochs with epoch 1."""
    import dltrain.training.loop as loop

    compared = []
    monkeypatch.setattr(loop, "RECHECK_MIN_EPOCH_SECONDS", 0.0)  # these epochs are short
    monkeypatch.setattr(loop, "drifted", lambda ms, baseline: compared.append((ms, baseline)))
    run, _ = train(tmp_path, TABULAR, "probe", "train.epochs=3")
    if usable_cores() == 1:
        return  # nothing was timed
    chosen = start_event(run)
    measured = chosen["step_ms_by_threads"][str(chosen["threads"])]
    assert len(compared) == 3
    assert compared[0][1] == pytest.approx(measured, abs=1e-3)  # events.jsonl rounds it
    assert compared[1][1] == compared[2][1] == compared[0][0]


def test_epochs_too_short_to_judge_are_not_compared(tmp_path, monkeypatch, no_thread_variable):
    """Epochs of a few steps: their time is noise, and timing again would cost more than it
    could save — no comparison, no re-timing."""
    import dltrain.training.loop as loop

    monkeypatch.setattr(loop, "drifted", lambda ms, baseline: pytest.fail("compared"))
    run, _ = train(tmp_path, TABULAR, "short", "train.epochs=3")
    events = (run.root / "events.jsonl").read_text()
    assert '"event": "threads"' not in events


def test_eval_and_predict_choose_threads_as_fit_does(
    tmp_path, invoke, monkeypatch, no_thread_variable
):
    """--threads N is used as given; auto does not time a job too short to repay it, and times
    one that is long enough (here: made so by lowering the bar) as fit does."""
    import numpy as np

    import dltrain.system.threads as threads

    run, _ = train(tmp_path, TABULAR, "used")
    best = run.best_path
    np.save(tmp_path / "rows.npy", np.random.default_rng(0).normal(size=(5, 8)).astype("float32"))

    given = invoke("eval", best, "--threads", "1", "--output", tmp_path / "one")
    assert given.exit_code == 0 and "threads 1 (as set)" in given.output, given.output
    short = invoke("eval", best, "--output", tmp_path / "short")
    assert "too little work to time" in short.output, short.output
    wrong = invoke("predict", best, "rows.npy", "--threads", "0")
    assert wrong.exit_code == 2 and "'0' is not a thread count" in wrong.output, wrong.output

    monkeypatch.setattr(threads, "MIN_WORK_STEPS", 1)
    timed_eval = invoke("eval", best, "--output", tmp_path / "timed")
    timed_predict = invoke("predict", best, "rows.npy")
    assert timed_eval.exit_code == timed_predict.exit_code == 0, timed_predict.output
    if usable_cores() > 1:
        assert "(auto: 1 → " in timed_eval.output and "(auto: 1 → " in timed_predict.output
    torch.set_num_threads(1)
