"""The learning-rate schedule: warm-up, a stable phase, then an optional linear decay (stage=ldm)."""

from __future__ import annotations

import pytest
import torch

from ldm.train.optim import adamw_with_warmup, lr_factor
from tests.ldm_factory import tiny_ldm


def test_warmup_then_constant_without_decay():
    f = lr_factor(warmup=4)
    assert [round(f(s), 3) for s in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert f(10_000) == 1.0


def test_linear_decay_to_the_floor_and_stays_there():
    f = lr_factor(warmup=0, decay_start=10, decay_end=20, min_lr_factor=0.1)
    assert f(9) == 1.0
    assert f(10) == 1.0
    assert f(15) == pytest.approx(0.55)
    assert f(20) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 21)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_decay_inside_the_warmup_multiplies_both():
    f = lr_factor(warmup=9, decay_start=0, decay_end=10)
    assert f(4) == pytest.approx(0.5 * 0.6)


@pytest.mark.parametrize("start,end,floor,match", [
    (10, None, 0.0, "both"),
    (None, 10, 0.0, "both"),
    (10, 10, 0.0, "lr_decay_start < lr_decay_end"),
    (-1, 10, 0.0, "lr_decay_start < lr_decay_end"),
    (0, 10, 1.5, "min_lr_factor"),
])
def test_bad_decay_windows_are_refused(start, end, floor, match):
    with pytest.raises(ValueError, match=match):
        lr_factor(0, start, end, floor)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr_decay_fraction=1.5), "lr_decay_fraction"),
    (dict(lr_decay_fraction=-0.1), "lr_decay_fraction"),
    (dict(lr_decay_fraction=0.5, lr_decay_end=0), "lr_decay_end"),
    (dict(lr_decay_fraction=0.5, min_lr_factor=2.0), "min_lr_factor"),
])
def test_bad_module_decay_settings_stop_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_ldm(**kwargs)


def test_a_decay_without_a_step_budget_is_refused():
    with pytest.raises(ValueError, match="trainer.max_steps"):
        tiny_ldm(lr_decay_fraction=0.5).configure_optimizers()


def _lrs(module, steps: int) -> list[float]:
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_the_module_decays_over_the_last_fraction_of_its_budget():
    module = tiny_ldm(lr=1e-3, warmup_steps=0, lr_decay_fraction=0.5, lr_decay_end=4)
    assert _lrs(module, 6) == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 0.0, 0.0])
    assert _lrs(tiny_ldm(lr=1e-3, warmup_steps=0), 6) == pytest.approx([1e-3] * 6)


def test_the_budget_defaults_to_the_trainers_max_steps():
    import pytorch_lightning as pl

    module = tiny_ldm(lr=1e-3, warmup_steps=0, lr_decay_fraction=0.5, min_lr_factor=0.5)
    trainer = pl.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer
    assert _lrs(module, 10) == pytest.approx([1e-3] * 5 + [0.875e-3, 0.75e-3, 0.625e-3, 0.5e-3, 0.5e-3])


def test_groups_keep_their_own_peak_under_decay():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    cfg = adamw_with_warmup([{"params": [a]}, {"params": [b], "lr": 1e-4}], 1e-3, 0, decay_start=0, decay_end=2)
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 5e-5])
