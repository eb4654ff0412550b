"""The learning rate of each optimizer step of a stage (``learning_rate(stage, step)``, step 0-based) against
the schedules' formulas: linear warmup to the peak over ``warmup_steps`` (step s has lr * (s + 1) / warmup),
then cosine, linear or constant from the peak towards ``lr * min_lr_ratio`` over the remaining steps."""
import math

import pytest

from t2r.train.config import FinetuneStage
from t2r.train.loop import learning_rate

LR = 3e-4


def stage(**kw):
    return FinetuneStage(name="finetune", lr=LR, **{"steps": 100, **kw})


def decay(schedule, progress, floor):
    shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[schedule]
    return LR * (floor + (1 - floor) * shape)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_rises_linearly_to_the_peak(schedule):
    s = stage(warmup_steps=10, schedule=schedule)
    for step in range(10):
        assert learning_rate(s, step) == pytest.approx(LR * (step + 1) / 10)
    assert learning_rate(s, 9) == pytest.approx(LR)  # the last warmup step is at the peak
    assert learning_rate(s, 10) == pytest.approx(LR)  # and the decay starts from it


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("floor", [0.0, 0.1, 1.0])
def test_decay_after_warmup_follows_the_formula(schedule, floor):
    s = stage(warmup_steps=20, schedule=schedule, min_lr_ratio=floor)
    span = 100 - 20
    for step in (20, 30, 40, 60, 80, 99):
        want = decay(schedule, (step - 20) / span, floor)
        assert learning_rate(s, step) == pytest.approx(want, rel=1e-12), step
    # the midpoint of the decay is halfway between the peak and the floor for both shapes
    assert learning_rate(s, 60) == pytest.approx(LR * (1 + floor) / 2)
    # past the stage's steps (a resumed stage with fewer steps) the lr stays at the floor
    assert learning_rate(s, 100) == pytest.approx(LR * floor)
    assert learning_rate(s, 500) == pytest.approx(LR * floor)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_never_rises_after_warmup_nor_leaves_its_bounds(schedule):
    s = stage(warmup_steps=7, schedule=schedule, min_lr_ratio=0.25)
    lrs = [learning_rate(s, step) for step in range(100)]
    assert all(a < b for a, b in zip(lrs[:7], lrs[1:7]))
    assert all(a >= b for a, b in zip(lrs[6:], lrs[7:]))
    assert all(LR * 0.25 <= x <= LR * (1 + 1e-12) for x in lrs[6:])


def test_constant_stays_at_the_peak_whatever_the_floor():
    s = stage(schedule="constant", min_lr_ratio=0.1)
    assert {learning_rate(s, step) for step in range(100)} == {LR}


def test_without_warmup_the_first_step_is_at_the_peak():
    for schedule in ("cosine", "linear"):
        s = stage(schedule=schedule, min_lr_ratio=0.0)
        assert learning_rate(s, 0) == LR
        assert learning_rate(s, 50) == pytest.approx(LR / 2)
        assert learning_rate(s, 99) == pytest.approx(decay(schedule, 99 / 100, 0.0))


def test_defaults_are_cosine_to_a_tenth():
    s = stage()
    assert (s.schedule, s.min_lr_ratio, s.warmup_steps) == ("cosine", 0.1, 0)
    assert learning_rate(s, 50) == pytest.approx(LR * (0.1 + 0.9 * 0.5))
