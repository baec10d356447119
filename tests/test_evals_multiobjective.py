"""Hypervolume, MIP, normalisation and monotonicity on hand-computed cases."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from evals.multiobjective import (
    hypervolume,
    mean_inner_product,
    minmax_normalise,
    monotonicity,
    normalised_hypervolume,
    simplex_grid,
)


def test_coarse_grid_over_the_five_simplex() -> None:
    grid = simplex_grid(5)
    assert len(grid) == 5 + 10 + 1
    assert all(abs(sum(point) - 1.0) < 1e-12 and min(point) >= 0 for point in grid)
    assert (1.0, 0.0, 0.0, 0.0, 0.0) in grid and (0.5, 0.5, 0.0, 0.0, 0.0) in grid and (0.2,) * 5 in grid
    assert len(set(grid)) == len(grid)


def test_hypervolume_hand_computed() -> None:
    assert hypervolume(np.array([[3.0]]), np.array([1.0])) == 2.0
    # Two staircase points in 2-D: 1x2 + 2x1 - 1x1 overlap = 3.
    assert hypervolume(np.array([[1.0, 2.0], [2.0, 1.0]]), np.zeros(2)) == pytest.approx(3.0)
    # A dominated point adds nothing; a point not beyond the reference adds nothing.
    points = np.array([[1.0, 2.0], [2.0, 1.0], [0.5, 0.5], [-1.0, 5.0]])
    assert hypervolume(points, np.zeros(2)) == pytest.approx(3.0)
    # 3-D: two boxes 1 x 0.5 x 1 and 0.5 x 1 x 1 overlap in 0.5 x 0.5 x 1: 0.5 + 0.5 - 0.25.
    assert hypervolume(np.array([[1.0, 0.5, 1.0], [0.5, 1.0, 1.0]]), np.zeros(3)) == pytest.approx(0.75)
    assert hypervolume(np.ones((1, 5)), np.zeros(5)) == pytest.approx(1.0)


def _inclusion_exclusion(points: np.ndarray, reference: np.ndarray) -> float:
    total = 0.0
    for size in range(1, len(points) + 1):
        for subset in combinations(points, size):
            corner = np.min(np.array(subset), axis=0)
            total += (-1) ** (size + 1) * float(np.prod(np.clip(corner - reference, 0, None)))
    return total


def test_hypervolume_matches_inclusion_exclusion_in_five_dimensions() -> None:
    rng = np.random.default_rng(7)
    for _ in range(5):
        points = rng.random((7, 5))
        reference = np.full(5, -0.1)
        assert hypervolume(points, reference) == pytest.approx(
            _inclusion_exclusion(points, reference), rel=1e-10
        )


def test_normalisation_and_normalised_hypervolume() -> None:
    achieved = np.array([[2.0, 10.0], [4.0, 10.0], [3.0, 10.0]])
    assert minmax_normalise(achieved).tolist() == [[0.0, 0.0], [1.0, 0.0], [0.5, 0.0]]
    # One point at (1, 1) after normalisation scores exactly 1.
    assert normalised_hypervolume(np.array([[0.0, 0.0], [1.0, 1.0]])) == pytest.approx(1.0)
    # (1, 0) and (0, 1): two 1.1 x 0.1 strips plus the 0.1 x 0.1 corner counted once, over 1.1^2.
    expected = (1.1 * 0.1 + 1.1 * 0.1 - 0.1 * 0.1) / 1.1**2
    assert normalised_hypervolume(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(expected)


def test_mip_hand_computed() -> None:
    preferences = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    # Achieved rewards follow the request exactly: normalised (1,0), (0,1), (0.5,0.5) -> L1 the same.
    achieved = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    assert mean_inner_product(preferences, achieved) == pytest.approx((1.0 + 1.0 + 0.5) / 3)
    # Achieved rewards against the request: (0,1), (1,0), (0.5,0.5) -> inner products 0, 0, 0.5.
    reversed_rewards = np.array([[0.0, 2.0], [2.0, 0.0], [1.0, 1.0]])
    assert mean_inner_product(preferences, reversed_rewards) == pytest.approx(0.5 / 3)
    # Rewards that do not vary carry no direction: uniform, so MIP = 1/d whatever was asked.
    assert mean_inner_product(preferences, np.ones((3, 2))) == pytest.approx(0.5)


def test_monotonicity_check() -> None:
    preferences = np.array(simplex_grid(3))
    achieved = preferences * np.array([1.0, 2.0, -1.0]) + np.array([0.0, 5.0, 3.0])
    checks = monotonicity(preferences, achieved, ("a", "b", "c"))
    assert checks["a"]["rises"] and checks["b"]["rises"] and not checks["c"]["rises"]
    assert checks["b"]["slope"] == pytest.approx(2.0)
    assert checks["a"]["mean_at_max_weight"] == pytest.approx(1.0)
    assert checks["a"]["mean_at_min_weight"] == pytest.approx(0.0)
