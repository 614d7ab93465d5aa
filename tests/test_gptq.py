"""GPTQ rounding (onnxopt/quantization/gptq.py) and the Gram sums refit relies on."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.data.obs import hessian, output_error
from onnxopt.data.statistics import Gram, Patches
from onnxopt.quantization.gptq import Grid, gptq


def correlated_inputs(rows=4000, cols=48, seed=0):
    r = np.random.default_rng(seed)
    return r.standard_normal((rows, cols)) @ r.standard_normal((cols, cols)) * 0.5 + r.standard_normal((rows, cols))


def per_row_grid(w, bits=4):
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(1, keepdims=True) / qmax
    return Grid(scale, np.zeros_like(scale), w.shape[1], -qmax, qmax)


def test_gptq_beats_round_to_nearest_on_the_output_error():
    x = correlated_inputs()
    w = np.random.default_rng(1).standard_normal((32, 48))
    h = x.T @ x / len(x)
    grid = per_row_grid(w)
    rtn = grid.values(grid.codes(w))
    result = gptq(w, hessian(h), grid)
    assert result.proxy_error < 0.85 * output_error(w - rtn, h)
    assert result.codes.min() >= -7 and result.codes.max() <= 7  # on the grid
    np.testing.assert_allclose(result.weight, grid.values(result.codes.astype(float)))


def test_blocked_grid_and_act_order_off():
    x = correlated_inputs(cols=64, seed=2)
    w = np.random.default_rng(3).standard_normal((8, 64))
    blocks = w.reshape(8, 4, 16)
    scale = np.abs(blocks).max(-1) / 7  # [rows, 4 blocks of 16 columns]
    grid = Grid(scale, np.zeros_like(scale), 16, -7, 7)
    h = x.T @ x / len(x)
    plain = gptq(w, hessian(h, act_order=False), grid)
    rtn = grid.values(grid.codes(w))
    assert plain.proxy_error < output_error(w - rtn, h)


def test_dead_inputs_and_a_singular_hessian_are_handled():
    x = correlated_inputs(rows=20, cols=48)  # fewer rows than columns: H is singular
    x[:, 5] = 0.0  # an input never seen nonzero
    w = np.random.default_rng(4).standard_normal((6, 48))
    h = x.T @ x / len(x)
    factor = hessian(h, damp=0.0)
    assert factor.damp > 0  # raised until the factorization held
    result = gptq(w, factor, per_row_grid(w))
    assert np.isfinite(result.proxy_error)


def test_gram_blocks_of_a_grouped_conv_match_the_full_gram():
    r = np.random.default_rng(5)
    x = r.standard_normal((2, 4, 6, 6))
    y = r.standard_normal((2, 6, 6, 6))
    patches = Patches((3, 3), pads=(1, 1, 1, 1))
    full, grouped = Gram("x", y="y", y_axis=1, patches=patches), Gram("x", y="y", y_axis=1, patches=patches, groups=2)
    full.add(x, y)
    grouped.add(x, y)
    for i in range(2):
        block = grouped.block(i)
        cols, outs = slice(i * 18, (i + 1) * 18), slice(i * 3, (i + 1) * 3)
        np.testing.assert_allclose(block.xtx, full.xtx[cols, cols])
        np.testing.assert_allclose(block.xty, full.xty[cols, outs])
        np.testing.assert_allclose(block.y_sq, float((y[:, outs] ** 2).sum()))
    with pytest.raises(ValueError, match="block"):
        grouped.solve()


def test_residual_is_the_squared_error_computed_from_the_sums():
    r = np.random.default_rng(6)
    x, w, b = r.standard_normal((300, 5)), r.standard_normal((5, 3)), r.standard_normal(3)
    y = x @ w + b + 0.1 * r.standard_normal((300, 3))
    g = Gram("x", y="y")
    g.add(x, y)
    cand_w, cand_b = w + 0.05, b - 0.2
    expected = float(np.sum((y - x @ cand_w - cand_b) ** 2))
    assert g.residual(cand_w, cand_b) == pytest.approx(expected, rel=1e-9)
    assert g.residual(cand_w) == pytest.approx(float(np.sum((y - x @ cand_w) ** 2)), rel=1e-9)


def test_solve_with_a_prior_stays_near_it_on_few_samples():
    r = np.random.default_rng(7)
    prior = r.standard_normal((20, 4))
    x = r.standard_normal((5, 20))  # 5 samples, 20 unknowns per output: underdetermined
    y = x @ (prior + 0.01 * r.standard_normal((20, 4)))
    g = Gram("x", y="y")
    g.add(x, y)
    near, _ = g.solve(ridge=0.1, prior=prior)
    far, _ = g.solve(ridge=0.1)
    assert np.abs(near - prior).max() < 0.1 < np.abs(far - prior).max()
