"""onnxopt.factorization: truncated (whitened) SVD, the conv decompositions, rank choice."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.factorization.conv import ChannelSVD, Dense, Separable, SpatialSVD, Tucker2, kernel_bias_correction
from onnxopt.factorization.ranks import Option, allocate, ranks_below, round_rank
from onnxopt.factorization.svd import Factorization, bias_correction, whitening

R = np.random.default_rng(0)


def correlated(rows: int, width: int, seed: int = 1) -> np.ndarray:
    """Inputs whose channels are strongly correlated (a few directions dominate)."""
    r = np.random.default_rng(seed)
    mix = r.standard_normal((width, width)) * np.logspace(0, -3, width)[:, None]
    return r.standard_normal((rows, width)) @ mix


def output_error(x, w, approx) -> float:
    return float(np.linalg.norm(x @ (w - approx)) ** 2 / np.linalg.norm(x @ w) ** 2)


# -- svd --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("whiten", [False, True])
def test_full_rank_reconstructs_the_weight_exactly(whiten):
    w = R.standard_normal((12, 7))
    x = correlated(200, 12)
    f = Factorization(w, x.T @ x / 200 if whiten else None)
    a, b = f.factors(f.max_rank)
    assert a.shape == (12, 7) and b.shape == (7, 7)
    np.testing.assert_allclose(a @ b, w, atol=1e-9)
    assert f.error(f.max_rank) == pytest.approx(0.0, abs=1e-12)


def test_error_decreases_with_rank_and_matches_the_output_error():
    w = R.standard_normal((16, 10))
    x = correlated(400, 16)
    f = Factorization(w, x.T @ x / 400, damp=1e-9)
    errors = [f.error(r) for r in range(0, 11)]
    assert errors[0] == pytest.approx(1.0)
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:]))
    for r in (1, 3, 6):
        a, b = f.factors(r)
        # the whitened tail is exactly the relative output error on the data it came from
        assert output_error(x, w, a @ b) == pytest.approx(f.error(r), rel=1e-6)


def test_data_aware_svd_beats_plain_svd_on_output_error():
    w = R.standard_normal((24, 16))
    x = correlated(500, 24, seed=2)
    held_out = correlated(500, 24, seed=2)[::-1] + 0.01 * R.standard_normal((500, 24))
    plain, aware = Factorization(w), Factorization(w, x.T @ x / 500)
    for r in (2, 4, 8):
        assert output_error(held_out, w, np.matmul(*aware.factors(r))) < \
            0.8 * output_error(held_out, w, np.matmul(*plain.factors(r)))


def test_singular_values_are_split_evenly():
    w = R.standard_normal((8, 8))
    f = Factorization(w)
    a, b = f.factors(3)
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-9)


def test_stacked_weights_share_one_rank():
    w = R.standard_normal((3, 10, 6))
    f = Factorization(w)
    assert f.slices == 3 and f.max_rank == 6
    a, b = f.factors(6)
    np.testing.assert_allclose(a @ b, w, atol=1e-9)
    assert 0 < f.error(2) < 1


def test_rank_for_energy():
    w = np.diag([10.0, 3.0, 1.0, 0.1])
    f = Factorization(w)
    assert f.rank_for_energy(0.5) == 1
    assert f.rank_for_energy(100 / 110.01 + 1e-6) == 2
    assert f.rank_for_energy(1.0) == 4


def test_whitening_handles_singular_and_dead_inputs():
    h = np.zeros((5, 5))
    h[:2, :2] = [[2.0, 2.0], [2.0, 2.0]]  # rank 1, three dead inputs
    s, s_inv = whitening(h, damp=0.01)
    np.testing.assert_allclose(s_inv @ s, np.eye(5), atol=1e-9)
    np.testing.assert_allclose(s.T @ s, h + 0.01 * np.trace(h) / 5 * np.eye(5), atol=1e-9)
    s, _ = whitening(np.zeros((3, 3)))
    np.testing.assert_allclose(s.T @ s, np.eye(3) * 1.01, atol=1e-9)


def test_bias_correction_keeps_the_mean_input_exact():
    w = R.standard_normal((6, 4))
    mean = R.standard_normal(6)
    a, b = Factorization(w).factors(2)
    corr = bias_correction(w, a, b, mean)
    np.testing.assert_allclose(mean @ (a @ b) + corr, mean @ w, atol=1e-12)


# -- conv -------------------------------------------------------------------------------------------
KERNEL = R.standard_normal((8, 6, 3, 3))


@pytest.mark.parametrize("make", [lambda k, c: ChannelSVD(k, 1, c), lambda k, c: SpatialSVD(k, None),
                                  lambda k, c: Tucker2(k, None), lambda k, c: Separable(k, None),
                                  lambda k, c: ChannelSVD(R.standard_normal((8, 3, 3, 3)), 2, None)],
                         ids=["channel", "spatial", "tucker2", "separable", "channel-grouped"])
def test_conv_decompositions_reconstruct_at_full_rank_and_lose_less_with_rank(make):
    d = make(KERNEL, None)
    np.testing.assert_allclose(d.reconstruct(d.max_rank), d.kernel, atol=1e-9)
    errors = [d.error(r) for r in range(1, d.max_rank + 1)]
    assert errors[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b - 1e-9 for a, b in zip(errors, errors[1:]))
    # the weights have the layouts the rewritten Convs expect
    for w in d.weights(2):
        assert w.ndim == 4


def test_conv_parameter_counts():
    m, c, k = 8, 6, 3
    assert ChannelSVD(KERNEL).params(2) == 2 * c * k * k + m * 2
    assert SpatialSVD(KERNEL).params(2) == 2 * c * k + m * 2 * k
    t = Tucker2(KERNEL)
    assert t.params(3) == c * 3 + t.out_rank(3) * 3 * k * k + m * t.out_rank(3)
    assert Separable(KERNEL).params(2) == c * 2 * k * k + m * c * 2
    first, second = ChannelSVD(KERNEL).weights(2)
    assert first.size + second.size == ChannelSVD(KERNEL).params(2)


def test_whitened_tucker_error_matches_the_channel_output_error():
    x = correlated(300, 6, seed=3)
    t = Tucker2(KERNEL, x.T @ x / 300, damp=1e-9, sweeps=0)
    for r in (2, 4):
        delta = KERNEL - t.reconstruct(r)
        num = sum(np.linalg.norm(x @ delta[:, :, i, j].T) ** 2 for i in range(3) for j in range(3))
        den = sum(np.linalg.norm(x @ KERNEL[:, :, i, j].T) ** 2 for i in range(3) for j in range(3))
        assert num / den == pytest.approx(t.error(r), rel=1e-6)
    # the HOOI sweeps that make the weights never do worse than the HOSVD the error is read from
    swept = Tucker2(KERNEL, x.T @ x / 300, damp=1e-9, sweeps=3)
    d1, d2 = KERNEL - swept.reconstruct(3), KERNEL - t.reconstruct(3)
    err = [sum(np.linalg.norm(x @ d[:, :, i, j].T) ** 2 for i in range(3) for j in range(3)) for d in (d1, d2)]
    assert err[0] <= err[1] * (1 + 1e-9)


def test_kernel_bias_correction_grouped_and_plain():
    delta = R.standard_normal((4, 2, 3, 3))
    mean = R.standard_normal(4)  # 4 input channels in 2 groups of 2
    corr = kernel_bias_correction(delta, mean)
    expected = [mean[(n // 2) * 2:(n // 2) * 2 + 2] @ delta[n].sum((1, 2)) for n in range(4)]
    np.testing.assert_allclose(corr, expected)
    full = R.standard_normal((4, 4, 1, 1))
    np.testing.assert_allclose(kernel_bias_correction(full, mean), full[:, :, 0, 0] @ mean)


def test_dense_decomposition_params():
    d = Dense(R.standard_normal((2, 10, 6)))
    assert d.params(3) == 2 * 3 * (10 + 6)
    assert d.reconstruct(6).shape == (2, 10, 6)


# -- ranks ------------------------------------------------------------------------------------------
def test_round_rank_and_candidate_ranks():
    assert round_rank(13, 8) == 16 and round_rank(3, 8) == 8 and round_rank(20, 8, limit=18) == 18
    assert round_rank(7.0, 1) == 7
    assert ranks_below(40, 8) == [8, 16, 24, 32, 40]
    thinned = ranks_below(1000, 1, count=10)
    assert len(thinned) <= 12 and thinned[0] == 1 and thinned[-1] == 1000


def _layer(full: float, spectrum_errors: dict) -> list[Option]:
    return [Option(None, full, 0.0)] + [Option(r, c, e) for r, (c, e) in spectrum_errors.items()]


def test_allocate_meets_the_budget_with_the_least_error():
    # layer A compresses cheaply (small error for a big saving), layer B does not
    a = _layer(100, {1: (20, 0.05), 2: (40, 0.01), 3: (60, 0.001)})
    b = _layer(100, {1: (20, 0.6), 2: (40, 0.3), 3: (60, 0.1)})
    result = allocate([a, b], 140)
    picked = result.chosen([a, b])
    assert result.met and result.cost <= 140
    assert picked[0].rank is not None and picked[0].cost < 100  # A gives the savings
    assert picked[1].rank is None or picked[1].error <= 0.1
    assert sum(p.error for p in picked) <= 0.05 + 1e-12


def test_allocate_spends_the_budget_and_says_when_it_cannot_be_met():
    a = _layer(100, {1: (30, 0.2), 2: (60, 0.05)})
    assert allocate([a], 100).chosen([a])[0].rank is None  # everything fits: nothing is lost
    assert allocate([a], 70).chosen([a])[0].rank == 2  # the best option within the budget
    unmet = allocate([a], 10)
    assert not unmet.met and unmet.chosen([a])[0].rank == 1
