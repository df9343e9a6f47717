"""LR schedule (pure function of the step, re-targeting without jumps) and data order."""

from __future__ import annotations

import math

import pytest

from sftrun.errors import CheckpointError
from sftrun.resume import plan_schedule
from sftrun.sampler import epoch_permutation, step_indices, total_steps
from sftrun.schedule import Schedule, build_schedule


def test_warmup_then_cosine_and_linear() -> None:
    cos = build_schedule("cosine", 1.0, total_steps=12, warmup_steps=2, warmup_ratio=0)
    assert [cos.lr(0), cos.lr(1)] == [0.5, 1.0]
    assert cos.lr(7) == pytest.approx(0.5)  # half-way through the 10 decay steps
    assert cos.lr(12) == pytest.approx(0.0)
    lin = build_schedule("linear", 2.0, total_steps=10, warmup_steps=0, warmup_ratio=0.2)
    assert lin.warmup_steps == 2
    assert lin.lr(6) == pytest.approx(1.0)
    const = build_schedule("constant", 3.0, total_steps=10, warmup_steps=0, warmup_ratio=0)
    assert {const.lr(s) for s in range(10)} == {3.0}


def test_unchanged_config_keeps_the_exact_schedule() -> None:
    old = build_schedule("cosine", 1e-3, 100, 10, 0)
    plan = plan_schedule(old, 40, 1e-3, 100)
    assert plan.schedule == old and not plan.changed


def test_new_peak_lr_scales_the_curve_from_the_resume_step() -> None:
    old = build_schedule("cosine", 2e-4, 100, 10, 0)
    plan = plan_schedule(old, 40, 1e-4, 100)
    assert plan.lr_after == pytest.approx(old.lr(40) / 2)
    assert all(plan.schedule.lr(s) == pytest.approx(old.lr(s) / 2) for s in range(40, 100))


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("new_total", [60, 200])
def test_new_length_retargets_the_decay_without_a_jump(kind: str, new_total: int) -> None:
    old = build_schedule(kind, 1e-3, 100, 10, 0)
    new = plan_schedule(old, 40, 1e-3, new_total).schedule
    assert new.lr(40) == pytest.approx(old.lr(40))
    assert new.lr(new_total) == pytest.approx(0.0, abs=1e-12)
    lrs = [new.lr(s) for s in range(40, new_total + 1)]
    assert all(b <= a + 1e-15 for a, b in zip(lrs, lrs[1:], strict=False))  # still decaying
    steps_per_change = max(abs(b - a) for a, b in zip(lrs, lrs[1:], strict=False))
    assert steps_per_change < 1e-3 * math.pi / (new_total - 40)  # smooth: no jump anywhere


def test_length_change_inside_warmup_keeps_the_warmup() -> None:
    old = build_schedule("cosine", 1.0, 100, 10, 0)
    new = plan_schedule(old, 4, 1.0, 200).schedule
    assert [new.lr(s) for s in range(4, 10)] == [old.lr(s) for s in range(4, 10)]
    assert new.lr(9) == 1.0 and new.lr(105) == pytest.approx(0.5)


def test_resuming_past_the_new_end_is_refused() -> None:
    old = build_schedule("cosine", 1.0, 100, 0, 0)
    with pytest.raises(CheckpointError, match="raise num_train_epochs or max_steps"):
        plan_schedule(old, 80, 1.0, 80)


def test_schedule_round_trips_through_plain_data() -> None:
    s = Schedule("cosine", 1e-3, 5, 50, decay_from_step=20, decay_from_progress=0.3)
    assert Schedule.from_dict(s.to_dict()) == s


def test_each_epoch_is_a_seeded_permutation() -> None:
    p0, p1 = epoch_permutation(1, 0, 10), epoch_permutation(1, 1, 10)
    assert sorted(p0) == list(range(10)) and sorted(p1) == list(range(10))
    assert p0 != p1
    assert epoch_permutation(2, 0, 10) != p0


def test_position_is_samples_seen_whatever_the_split() -> None:
    stream = step_indices(3, 10, 0, 30)  # three epochs in one go
    assert stream[10:20] == list(epoch_permutation(3, 1, 10))
    # Resuming at any position gives the same continuation, in any chunking.
    for pos in (0, 4, 10, 17):
        assert step_indices(3, 10, pos, 8) == stream[pos : pos + 8]
    assert step_indices(3, 10, 6, 2) + step_indices(3, 10, 8, 2) == step_indices(3, 10, 6, 4)


def test_total_steps() -> None:
    assert total_steps(24, 4, 2, -1) == 12
    assert total_steps(25, 4, 1, -1) == 7
    assert total_steps(25, 4, 1, 3) == 3
