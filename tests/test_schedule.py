"""Run time: the short-run LR rule, --time-budget's choice of epochs, the whole-run ETA."""
import re
import time

import pytest
import torch

import cifar
import schedule
import utils


def random_data(n=64):
    return {"train": (torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8), torch.arange(n) % 10),
            "test": (torch.randint(0, 256, (20, 32, 32, 3), dtype=torch.uint8), torch.arange(20) % 10)}


def clock_for(*argv, n_train=50000, n_test=10000):
    return schedule.RunClock(cifar.parse_args(["--model", "resnet18", *argv]), n_train, n_test, time.time())


@pytest.mark.parametrize("pace", [dict(fp32=200, qat=100, eval=800), dict(fp32=750, qat=450, eval=3000)])
@pytest.mark.parametrize("minutes", [45, 60])
def test_chosen_epochs_fit_the_budget_and_one_more_would_not(pace, minutes):
    clock = clock_for("--time-budget", str(minutes))
    epochs, projected = schedule.choose_epochs(clock, pace, minutes * 60, used_s=30)
    assert epochs >= 1 and projected <= minutes * 60
    assert projected == pytest.approx(30 + clock.remaining(pace, epochs, clock.args.qat_epochs))
    margin = {k: v * schedule.PACE_MARGIN for k, v in pace.items()}  # planned for a slower pace than measured
    assert 30 + clock.remaining(margin, epochs, clock.args.qat_epochs) <= minutes * 60
    assert 30 + clock.remaining(margin, epochs + 1, clock.args.qat_epochs) > minutes * 60
    slower, _ = schedule.choose_epochs(clock, {k: v / 2 for k, v in pace.items()}, minutes * 60, used_s=30)
    assert slower < epochs


def test_a_budget_below_one_epoch_names_the_minimum():
    clock, pace = clock_for("--time-budget", "1"), dict(fp32=200, qat=100, eval=800)
    margin = {k: v * schedule.PACE_MARGIN for k, v in pace.items()}
    need = (30 + clock.remaining(margin, 1, clock.args.qat_epochs)) / 60
    with pytest.raises(utils.UserError, match=f"need about {need:.1f} minutes"):
        schedule.choose_epochs(clock, pace, 60, used_s=30)


def test_measuring_the_pace_changes_no_weights(tmp_path):
    """--epochs N with the epochs chosen after measure_pace trains the same weights as without it."""
    data = random_data()
    args = cifar.parse_args(["--model", "mobilenet_v2", "--epochs", "1", "--batch-size", "16"])
    plain, _ = cifar.train_float(args, data, torch.device("cpu"), tmp_path)
    rng = torch.get_rng_state()
    pace = schedule.measure_pace(args, data, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng) and min(pace.values()) > 0
    after, _ = cifar.train_float(args, data, torch.device("cpu"), tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), after.state_dict().values()))


def test_short_runs_scale_the_peak_lr(tmp_path, capsys):
    args = cifar.parse_args(["--model", "resnet18", "--epochs", "1", "--batch-size", "16"])  # 4 steps
    cifar.train_float(args, random_data(), torch.device("cpu"), tmp_path)
    assert f"peak LR {0.1 * 4 / schedule.SHORT_RUN_STEPS:.3g} instead of 0.1" in capsys.readouterr().out


@pytest.mark.slow
def test_the_eta_line_follows_the_first_epoch(smoke):
    lines = smoke["resnet18"][1].stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("fp32 epoch 1/"))
    assert lines[first + 1].startswith("ETA: the whole run should take about")
    assert sum(line.startswith("ETA:") for line in lines) == 1
    epochs = [line for line in lines if re.match(r"(fp32|qat) epoch \d+/\d+:", line)]
    assert epochs and all(re.search(r"ETA \d\d:\d\d$", line) for line in epochs)
