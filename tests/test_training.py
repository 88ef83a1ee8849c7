"""Training loop: it learns, early stopping restores the best weights, callbacks, non-finite loss,
every optimizer and schedule, deterministic mode, device selection, and no host read per step."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from harness.config import ConfigError
from harness.data import load_dataset, make_normalize, make_splits
from harness.evaluation import predict
from harness.host_reads import HostReads
from harness.models import build_model
from harness.training import (
    EpochMetrics,
    NonFiniteLoss,
    build_optimizer,
    build_scheduler,
    fit,
    seed_everything,
    select_device,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _restore_determinism():
    """seed_everything(deterministic=True) is process-wide: put torch back as it was."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def setup(cfg):
    """(model, splits) for `cfg`, seeded the way train_run seeds them."""
    ds = load_dataset(cfg.data)
    seed_everything(cfg.seed, cfg.deterministic)
    splits = make_splits(ds, cfg.data)
    return build_model(cfg.model, len(ds.classes)), splits


def val_accuracy(model, splits, cfg) -> float:
    pred = predict(model, splits.val_x, make_normalize(CPU, cfg.channels_last), bf16=False)
    return (pred.logits.argmax(1) == splits.val_y).float().mean().item()


def test_fit_learns_far_above_chance(cifar10_root, tiny_config):
    cfg = tiny_config(cifar10_root, epochs=2)
    model, splits = setup(cfg)
    result = fit(model, splits, cfg, CPU, progress=False)
    assert [m.epoch for m in result.history] == [1, 2]
    assert result.best_val_accuracy >= 0.35  # chance is 0.10; this data reaches 0.6-0.8
    assert result.history[-1].train_loss < math.log(10)
    assert not result.stopped_early
    assert val_accuracy(model, splits, cfg) == pytest.approx(result.best_val_accuracy)


def test_early_stopping_stops_and_restores_the_best_weights(cifar10_root, tiny_config):
    # 4 validation images: accuracy takes at most 5 values, so with patience 1 training must stop
    # within 6 epochs (each epoch either improves, at most 4 times, or stops)
    cfg = tiny_config(cifar10_root, epochs=30, patience=1, lr=0.03, data={"val_subset": 4, "train_subset": 160})
    model, splits = setup(cfg)
    states = {}

    def snapshot(m: EpochMetrics):
        states[m.epoch] = copy.deepcopy(model.state_dict())

    result = fit(model, splits, cfg, CPU, callbacks=[snapshot], progress=False)
    accs = [m.val_accuracy for m in result.history]
    assert result.stopped_early and 2 <= len(result.history) <= 6
    assert result.best_epoch == 1 + accs.index(max(accs))
    assert result.best_val_accuracy == max(accs)
    assert result.best_epoch < len(result.history)  # the last epoch did not improve
    assert all(a <= result.best_val_accuracy for a in accs[result.best_epoch :])
    final = model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in states[result.best_epoch].items())
    assert not all(torch.equal(final[k], v) for k, v in states[len(result.history)].items())
    assert val_accuracy(model, splits, cfg) == result.best_val_accuracy


def test_patience_zero_runs_every_epoch(cifar10_root, tiny_config):
    cfg = tiny_config(cifar10_root, epochs=3, patience=0, data={"val_subset": 4, "train_subset": 64})
    model, splits = setup(cfg)
    result = fit(model, splits, cfg, CPU, progress=False)
    assert len(result.history) == 3 and not result.stopped_early


def test_prune_subset_watches_a_few_images_and_scores_the_kept_weights_on_all(cifar10_root, tiny_config):
    """Epochs are validated (for early stopping and the pruner) on the first `prune_subset` images;
    the weights kept are scored on the whole validation part, what a study selects on."""
    cfg = tiny_config(
        cifar10_root, epochs=3, patience=0, data={"train_subset": 128, "val_subset": 40, "prune_subset": 8}
    )
    model, splits = setup(cfg)
    watched = []
    result = fit(model, splits, cfg, CPU, callbacks=[watched.append], progress=False)
    assert len(splits.val_y) == 40
    assert all((m.val_accuracy * 8).is_integer() for m in watched)  # 8 images: multiples of 1/8
    assert result.best_val_accuracy == pytest.approx(val_accuracy(model, splits, cfg))
    small = dataclasses.replace(splits, val_x=splits.val_x[:8], val_y=splits.val_y[:8])
    assert result.history[result.best_epoch - 1].val_accuracy == pytest.approx(val_accuracy(model, small, cfg))


def test_callbacks_get_each_epochs_metrics(cifar10_root, tiny_config):
    cfg = tiny_config(cifar10_root, epochs=3, data={"train_subset": 128, "val_subset": 40})
    model, splits = setup(cfg)
    first, second = [], []
    result = fit(model, splits, cfg, CPU, callbacks=[first.append, second.append], progress=False)
    assert [m.epoch for m in first] == [1, 2, 3] and first == second == result.history
    for m in first:
        d = m.as_dict()
        assert set(d) == {
            "train_loss",
            "train_accuracy",
            "val_loss",
            "val_accuracy",
            "lr",
            "images_per_s",
            "epoch_seconds",
        }
        assert all(math.isfinite(v) for v in d.values())
        assert 0 <= m.train_accuracy <= 1 and 0 <= m.val_accuracy <= 1
        assert m.lr == cfg.lr and m.images_per_s > 0 and m.epoch_seconds > 0


def test_a_raising_callback_stops_training(cifar10_root, tiny_config):
    class Stop(Exception):
        pass

    cfg = tiny_config(cifar10_root, epochs=5, data={"train_subset": 64, "val_subset": 20})
    model, splits = setup(cfg)
    seen = []

    def stop_at_two(m: EpochMetrics):
        seen.append(m.epoch)
        if m.epoch == 2:
            raise Stop("pruned")

    with pytest.raises(Stop):
        fit(model, splits, cfg, CPU, callbacks=[stop_at_two], progress=False)
    assert seen == [1, 2]


def test_non_finite_loss_raises_naming_the_learning_rate(cifar10_root, tiny_config):
    # plain SGD at 1e30 overflows the weights within a few batches, whatever the seed
    cfg = tiny_config(cifar10_root, optimizer="sgd", lr=1e30, epochs=3)
    model, splits = setup(cfg)
    with pytest.raises(NonFiniteLoss) as e:
        fit(model, splits, cfg, CPU, progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert "non-finite training loss" in msg and "epoch 1" in msg and "lr=1e+30" in msg
    assert "lower the learning rate" in msg


@pytest.mark.parametrize(
    "settings",
    [
        {"optimizer": "sgd", "schedule": "onecycle"},
        {"optimizer": "sgd", "schedule": "cosine", "nesterov": False},
        {"optimizer": "sgd", "schedule": "step", "momentum": 0.0},  # nesterov needs momentum: turned off
        {"optimizer": "adam", "schedule": "plateau"},
        {"optimizer": "adamw", "schedule": "none", "label_smoothing": 0.1},
        {"optimizer": "adamw", "schedule": "onecycle", "precision": "bf16", "channels_last": False},
    ],
    ids=lambda s: "-".join(str(v) for v in s.values()),
)
def test_each_optimizer_and_schedule_trains_an_epoch(cifar10_root, tiny_config, settings):
    cfg = tiny_config(cifar10_root, lr=0.01, data={"train_subset": 96, "val_subset": 32}, **settings)
    model, splits = setup(cfg)
    before = copy.deepcopy(model.state_dict())
    result = fit(model, splits, cfg, CPU, progress=False)
    m = result.history[0]
    assert math.isfinite(m.train_loss) and math.isfinite(m.val_loss)
    after = model.state_dict()
    assert not all(torch.equal(after[k], v) for k, v in before.items())  # it trained


def test_schedules_change_the_learning_rate_as_configured():
    model = torch.nn.Linear(2, 2)

    def lrs(schedule, epochs=4, steps=5, **kw):
        from harness.config import Config

        cfg = Config(schedule=schedule, epochs=epochs, lr=0.1, **kw)
        opt = build_optimizer([{"params": model.parameters()}], cfg)
        sched, per_batch = build_scheduler(opt, cfg, steps)
        out = []
        for _ in range(epochs):
            out.append(opt.param_groups[0]["lr"])
            for _ in range(steps):
                opt.step()
                if per_batch:
                    sched.step()
            if sched is not None and not per_batch:
                sched.step(0.5) if schedule == "plateau" else sched.step()
        return out, per_batch

    step, per_batch = lrs("step", step_size=2, gamma=0.1)
    assert not per_batch and step == pytest.approx([0.1, 0.1, 0.01, 0.01])
    cosine, per_batch = lrs("cosine")
    assert per_batch and cosine[0] == 0.1 and cosine == sorted(cosine, reverse=True)
    onecycle, per_batch = lrs("onecycle")
    assert per_batch and onecycle[0] < onecycle[1] and max(onecycle) <= 0.1 + 1e-9
    linear, per_batch = lrs("linear", warmup=0.25)  # airbench's triangle: lr/5 up to lr, down to lr/15
    assert per_batch and linear[0] == pytest.approx(0.02) and linear[0] < linear[1] > linear[2] > linear[3]
    plateau, _ = lrs("plateau", lr_patience=1, gamma=0.5)  # validation accuracy never improves
    assert plateau[0] == 0.1 and plateau[-1] == pytest.approx(0.05)
    # the plateau's patience is its own: early stopping off (patience=0) does not make it 1
    assert lrs("plateau", patience=0, lr_patience=3, gamma=0.5)[0] == [0.1] * 4
    assert lrs("none")[0] == [0.1] * 4


def test_optimizer_and_schedule_tables_are_the_configs_choices_and_refuse_other_names():
    from harness.config import CHOICES, Config
    from harness.training import OPTIMIZERS, SCHEDULES

    assert tuple(OPTIMIZERS) == CHOICES["optimizer"] and tuple(SCHEDULES) == CHOICES["schedule"]
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=r"^unknown optimizer 'rmsprop': choose one of sgd, adam, adamw$"):
        build_optimizer([{"params": model.parameters()}], Config(optimizer="rmsprop"))  # (unchecked: no from_dict)
    opt = build_optimizer([{"params": model.parameters()}], Config())
    with pytest.raises(ConfigError, match=r"^unknown schedule 'triangle': choose one of onecycle, linear, "):
        build_scheduler(opt, Config(schedule="triangle"), 5)
    assert isinstance(opt, torch.optim.SGD)


def test_param_groups_scale_the_learning_rate():
    from harness.config import Config

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = build_optimizer(
        [{"params": a.parameters(), "lr_scale": 0.1}, {"params": b.parameters()}], Config(lr=0.2, optimizer="adamw")
    )
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.2])


def test_deterministic_mode_gives_identical_weights(cifar10_root, tiny_config):
    cfg = tiny_config(
        cifar10_root, epochs=2, deterministic=True, model={"dropout": 0.2}, data={"train_subset": 128, "val_subset": 32}
    )
    states, histories = [], []
    for _ in range(2):
        model, splits = setup(cfg)
        result = fit(model, splits, cfg, CPU, progress=False)
        states.append(model.state_dict())
        histories.append([(m.train_loss, m.val_loss, m.val_accuracy) for m in result.history])
    assert torch.are_deterministic_algorithms_enabled()
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert histories[0] == histories[1]
    # another seed gives other weights
    other = tiny_config(
        cifar10_root,
        epochs=2,
        deterministic=True,
        seed=1,
        model={"dropout": 0.2},
        data={"train_subset": 128, "val_subset": 32},
    )
    model, splits = setup(other)
    fit(model, splits, other, CPU, progress=False)
    assert not all(torch.equal(states[0][k], model.state_dict()[k]) for k in states[0])


def test_select_device_gives_the_device_asked_for_and_refuses_what_is_not_there():
    assert select_device("cpu") == CPU
    with pytest.raises(ConfigError) as e:
        select_device("gpu")
    assert "choose one of auto, cpu, cuda" in str(e.value)
    # one CUDA index past the last device is refused on every machine (index 0 where CUDA is absent),
    # with the reason: no CUDA at all, or how many devices there are
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError) as e:
        select_device(f"cuda:{count}")
    msg = str(e.value)
    assert "\n" not in msg
    if count:
        assert f"only {count} CUDA device(s) exist" in msg and "--set device=cuda:0" in msg
        assert select_device("cuda:0") == torch.device("cuda:0")
        assert select_device(f"cuda:{count - 1}") == torch.device(f"cuda:{count - 1}")
    else:
        assert "CUDA is not available" in msg and "--set device=cpu" in msg
        with pytest.raises(ConfigError, match="CUDA is not available"):
            select_device("cuda")


def test_select_device_auto_prefers_cuda_then_mps_then_cpu():
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    expected = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    assert select_device("auto").type == expected
    assert select_device() == select_device("auto")  # auto is the default
    if not mps:
        with pytest.raises(ConfigError, match="MPS is not available"):
            select_device("mps")


def test_host_reads_counts_what_makes_the_host_wait():
    x = torch.ones(3)
    with HostReads() as reads:
        x.sum().item()
        bool(x.sum() > 0)
        x.tolist()
        x.cpu()
        x.numpy()
        x.to("cpu")
        x.to(torch.float64)  # no copy to a device
        x.to("cpu", non_blocking=True)
    assert reads.counts == {"item": 1, "__bool__": 1, "tolist": 1, "cpu": 1, "numpy": 1, "to": 1}


@pytest.mark.slow
@pytest.mark.parametrize("progress, per_epoch", [(False, 2), (True, 4)])
def test_an_epoch_reads_back_from_the_device_twice_not_per_step(cifar10_root, tiny_config, progress, per_epoch):
    # 110 steps an epoch: the training sums and the validation sums are read once each (progress
    # bars: two more); the augmentation's randomness is drawn where the data is. (SGD: Adam keeps
    # its step count in a host tensor and reads it every step, which waits for nothing.)
    cfg = tiny_config(
        cifar10_root,
        epochs=2,
        batch_size=4,
        lookahead=True,
        eval={"tta": True},
        optimizer="sgd",
        schedule="onecycle",
        data={"train_subset": 440, "val_subset": 40},
    )
    model, splits = setup(cfg)
    with HostReads() as reads:
        fit(model, splits, cfg, CPU, progress=progress)
    assert reads.total == per_epoch * cfg.epochs, dict(reads.counts)


class Killed(Exception):
    """Stands for the process dying right after a checkpoint was written."""


@pytest.mark.parametrize("schedule, lookahead", [("onecycle", True), ("plateau", False)])
def test_a_resumed_fit_ends_where_an_uninterrupted_one_does(cifar10_root, tiny_config, tmp_path, schedule, lookahead):
    from harness import resume

    cfg = tiny_config(
        cifar10_root,
        epochs=4,
        deterministic=True,
        optimizer="sgd",
        schedule=schedule,
        lookahead=lookahead,
        lr_patience=0,
        patience=3,
        model={"dropout": 0.2},
        data={"train_subset": 128, "val_subset": 32},
    )
    model, splits = setup(cfg)
    whole = fit(model, splits, cfg, CPU, progress=False)
    expected = model.state_dict()

    path = tmp_path / "run.pt"

    def save_then_die(state):
        resume.save(path, state)
        if state["epoch"] == 2:
            raise Killed

    model, splits = setup(cfg)
    with pytest.raises(Killed):
        fit(model, splits, cfg, CPU, progress=False, checkpoint=save_then_die)
    seen = []
    model, splits = setup(cfg)
    torch.manual_seed(123)  # the global generator (dropout) must come back from the checkpoint
    resumed = fit(model, splits, cfg, CPU, progress=False, resume=resume.load(path), callbacks=[seen.append])
    assert [m.epoch for m in seen] == [1, 2, 3, 4]  # the held epochs replayed to the callbacks first
    assert [vars(m) | {"epoch_seconds": 0, "images_per_s": 0} for m in resumed.history] == [
        vars(m) | {"epoch_seconds": 0, "images_per_s": 0} for m in whole.history
    ]
    assert (resumed.best_epoch, resumed.best_val_accuracy) == (whole.best_epoch, whole.best_val_accuracy)
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
