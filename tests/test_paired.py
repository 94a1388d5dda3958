"""The comparison's statistics against hand computations on fixed per-point arrays."""
import math

import numpy as np
import pytest

from pyro_vae.analysis.paired import mean_interval, nll_summary, paired_difference, t_quantile

# Student-t 0.975 quantiles from printed tables
T975 = {1: 12.7062, 2: 4.3027, 4: 2.7764}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantiles_match_the_tables(df):
    assert t_quantile(df) == pytest.approx(T975[df], abs=1e-4)
    assert t_quantile(10**7) == pytest.approx(1.95996, abs=1e-4)


def test_one_seed_paired_interval_excludes_zero_while_the_unpaired_ones_overlap():
    # five test points of very different difficulty; the estimator is better on every one by 0.4..0.8 nats
    base = np.array([-10.0, -20.0, -30.0, -40.0, -50.0])
    gain = np.array([0.5, 0.7, 0.4, 0.6, 0.8])
    est = base + gain
    # by hand: the per-point NLL differences are -gain, mean -0.6; the gains' deviations from 0.6 are
    # -0.1, 0.1, -0.2, 0, 0.2: squares sum to 0.1, variance 0.1/4, sd 0.158114, se = sd/sqrt(5) = 0.0707107
    d = paired_difference([est], [base])
    assert d.over == "points" and d.n == 5
    assert d.mean == pytest.approx(-0.6)
    assert d.se == pytest.approx(0.0707107, abs=1e-6)
    assert d.low == pytest.approx(-0.6 - 2.7764 * 0.0707107, abs=1e-4)
    assert d.high == pytest.approx(-0.6 + 2.7764 * 0.0707107, abs=1e-4)
    assert d.excludes_zero and d.high < -0.39
    # unpaired: NLL 30 with sd 15.8114 over points (se 7.07107); NLL 29.4, whose deviations 19.9, 10.1,
    # -0.2, -10, -19.8 square to 990.1: variance 247.525, se sqrt(247.525 / 5) = 7.03598
    b, e = nll_summary([base]), nll_summary([est])
    assert b.mean == pytest.approx(30.0) and e.mean == pytest.approx(29.4)
    assert b.point_se == pytest.approx(7.07107, abs=1e-5) and e.point_se == pytest.approx(7.03598, abs=1e-5)
    assert b.interval.low == pytest.approx(30.0 - 2.7764 * 7.07107, abs=1e-3)
    assert math.isnan(b.seed_se), "one seed has no spread across seeds"
    assert e.interval.high > b.interval.low and b.interval.high > e.interval.low, "the unpaired intervals overlap"


def test_several_seeds_combine_the_per_seed_mean_differences_with_a_t_interval():
    offsets = np.array([-0.1, 0.0, 0.1])
    seed_means = [-0.3, -0.5, -0.4]   # the per-seed mean NLL differences built in below
    base = [np.array([-10.0, -20.0, -30.0]) + s for s in range(3)]
    est = [b - (m + offsets) for b, m in zip(base, seed_means)]  # d = b - e = m + offsets
    d = paired_difference(est, base)
    # by hand: mean -0.4, sd of (-0.3, -0.5, -0.4) = 0.1, se 0.1/sqrt(3) = 0.057735, t_{0.975,2} = 4.3027
    assert d.over == "seeds" and d.n == 3
    assert d.mean == pytest.approx(-0.4)
    assert d.se == pytest.approx(0.057735, abs=1e-6)
    assert (d.low, d.high) == pytest.approx((-0.4 - 4.3027 * 0.057735, -0.4 + 4.3027 * 0.057735), abs=1e-4)
    assert d.excludes_zero
    # the baseline's NLL per seed is 20, 19, 18: mean 19, se across seeds 1/sqrt(3); over points, each
    # seed's sd is 10 and se 10/sqrt(3)
    b = nll_summary(base)
    assert b.per_seed == pytest.approx((20.0, 19.0, 18.0))
    assert b.mean == pytest.approx(19.0) and b.seed_se == pytest.approx(1 / math.sqrt(3))
    assert b.point_se == pytest.approx(10 / math.sqrt(3))
    assert b.interval.over == "seeds" and b.interval.high == pytest.approx(19.0 + 4.3027 / math.sqrt(3), abs=1e-3)


def test_an_interval_that_spans_zero_is_not_marked():
    d = paired_difference([np.array([1.0, -1.0, 2.0, -2.0])], [np.zeros(4)])
    assert d.mean == pytest.approx(0.0) and d.low < 0 < d.high and not d.excludes_zero


def test_pairing_needs_the_same_seeds_and_points():
    with pytest.raises(ValueError, match="same seeds and points"):
        paired_difference([np.zeros(3)], [np.zeros(4)])
    with pytest.raises(ValueError, match="same seeds and points"):
        paired_difference([np.zeros(3), np.zeros(3)], [np.zeros(3)])
    with pytest.raises(ValueError, match="same length"):
        nll_summary([np.zeros(3), np.zeros(2)])
    one = mean_interval([2.5], "seeds")
    assert one.mean == 2.5 and math.isnan(one.low) and not one.excludes_zero
