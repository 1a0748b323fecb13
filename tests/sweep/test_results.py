import math

import pytest

from patronus.sweep.results import RobustnessRatio, StepsToUnsafe, ratio_summary, robustness_ratios, steps_to_unsafe


def test_steps_to_unsafe_interpolates_on_a_log_scale():
    s = steps_to_unsafe({100: 0.0, 1000: 1.0})
    assert s.lo == s.hi == pytest.approx(math.sqrt(100 * 1000))  # halfway in log steps
    exact = steps_to_unsafe({100: 0.2, 500: 0.5, 2000: 0.9})  # reached exactly at a checkpoint
    assert exact.lo == exact.hi == pytest.approx(500.0)


def test_steps_to_unsafe_is_censored_at_both_ends():
    assert steps_to_unsafe({100: 0.7, 500: 1.0}) == StepsToUnsafe(0.0, 100.0)  # already there at the first checkpoint
    assert steps_to_unsafe({100: 0.0, 500: 0.49}) == StepsToUnsafe(500.0, math.inf)  # never reached
    assert str(steps_to_unsafe({100: 0.7})) == "<= 100" and str(steps_to_unsafe({100: 0.1})) == "> 100"
    with pytest.raises(ValueError):
        steps_to_unsafe({})


@pytest.mark.parametrize("protected,scratch,verdict,text", [
    ({100: 0.0, 1000: 1.0}, {100: 0.0, 1000: 1.0}, ">= 1", "1.00"),  # the same curve: ratio 1
    ({100: 0.0, 2000: 0.1}, {100: 0.2, 500: 0.8}, ">= 1", "> "),  # protected never restored, scratch was
    ({100: 0.9, 2000: 1.0}, {100: 0.0, 500: 0.2, 2000: 0.6}, "< 1", "<= "),  # restored at once, scratch late
    ({100: 0.0, 2000: 0.1}, {100: 0.0, 2000: 0.2}, "both held", "?"),
    ({100: 0.9}, {100: 0.9}, "unknown", "?"),  # both by the first checkpoint: the budgets cannot tell
])
def test_robustness_ratio_verdicts(protected, scratch, verdict, text):
    r = RobustnessRatio(steps_to_unsafe(protected), steps_to_unsafe(scratch))
    assert r.verdict == verdict and str(r).startswith(text)


def test_ratios_need_protected_and_scratch_and_summarise_the_worst():
    rates = {("decoder-full", "adam", 1e-4, 0): {"protected": {100: 1.0}, "scratch": {100: 0.1, 500: 0.9}},
             ("unet-full", "adam", 1e-4, 0): {"protected": {100: 0.0}, "scratch": {100: 0.0}},
             ("joint", "sgd", 1e-5, 0): {"protected": {100: 0.0}}}
    ratios = robustness_ratios(rates)
    assert set(ratios) == {("decoder-full", "adam", 1e-4, 0), ("unet-full", "adam", 1e-4, 0)}
    line = ratio_summary(ratios)
    assert ">= 1 in 0 of 2 cells, < 1 in 1" in line and "both held within the budget in 1" in line
    assert "smallest: <= 0.45 (decoder-full adam 0.0001 0)" in line  # 100 / 224 (scratch: 50% at sqrt(100 x 500))


def test_smallest_ratio_is_the_one_known_to_be_smallest():
    rates = {("a",): {"protected": {10: 0.9}, "scratch": {10: 0.0, 30: 0.9}},  # <= 10 / 17: <= 0.57 or so
             ("b",): {"protected": {10: 0.4, 30: 0.6}, "scratch": {10: 0.0, 100: 0.2, 500: 0.8}}}  # 20 / 223
    ratios = robustness_ratios(rates)
    assert ratios[("b",)].hi < ratios[("a",)].hi and ratios[("a",)].lo == 0
    assert ratio_summary(ratios).endswith(f"smallest: {ratios[('b',)]} (b).")
    assert "(attacker steps to 50% unsafe, original-vae / scratch)" in ratio_summary(ratios, "original-vae")
