"""Multi-objective figures for the preference sweep: simplex grid, normalisation, hypervolume, MIP, monotonicity.

Definitions (all objectives are maximised):

* **Normalisation**: for attribute i, ``n_k,i = (a_k,i - min_j a_j,i) / (max_j a_j,i - min_j a_j,i)`` over the
  achieved mean rewards ``a_k`` of all grid points k (0 when an attribute does not vary).
* **Hypervolume**: the exact volume dominated by the normalised points with reference point
  ``(-0.1, ..., -0.1)``, divided by ``1.1 ** d`` so that a single point at ``(1, ..., 1)`` scores 1.
  The margin keeps points that are worst on one attribute from contributing zero volume.
* **MIP** (mean inner product): ``mean_k <w_k, n_k / |n_k|_1>``, the requested preference vector against the
  L1-normalised achieved vector. A response whose attribute scores ignore the request gets about ``1/d``
  (``<w, u> = 1/d`` for the uniform ``u``), so ``mip_over_chance = MIP - 1/d`` is the informative part.
* **Monotonicity**: per attribute, the least-squares slope of the achieved raw reward against its own weight
  over the grid, and the mean reward at the largest and smallest weight; "rises" means both: slope > 0 and the
  mean at the largest weight above the mean at the smallest.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

HV_REFERENCE_MARGIN = 0.1


def simplex_grid(dimensions: int, kind: str = "coarse") -> list[tuple[float, ...]]:
    """``coarse``: the d vertices, the d(d-1)/2 pair midpoints and the centre (16 points for d = 5)."""
    if dimensions < 1:
        raise ValueError("dimensions must be >= 1")
    if kind != "coarse":
        raise ValueError(f"unknown grid {kind!r}; known: coarse")
    points: list[tuple[float, ...]] = []
    for i in range(dimensions):
        points.append(tuple(1.0 if j == i else 0.0 for j in range(dimensions)))
    for i, k in combinations(range(dimensions), 2):
        points.append(tuple(0.5 if j in (i, k) else 0.0 for j in range(dimensions)))
    if dimensions > 2:
        points.append(tuple(1.0 / dimensions for _ in range(dimensions)))
    return points


def minmax_normalise(achieved: np.ndarray) -> np.ndarray:
    """Per-attribute min-max scaling to [0, 1] over the rows; constant columns become 0."""
    achieved = np.asarray(achieved, dtype=float)
    low = achieved.min(axis=0)
    span = achieved.max(axis=0) - low
    safe_span = np.where(span > 0, span, 1.0)
    return np.where(span > 0, (achieved - low) / safe_span, 0.0)


def _non_dominated(points: np.ndarray) -> np.ndarray:
    keep = []
    for i, point in enumerate(points):
        dominated = any(
            np.all(other >= point) and np.any(other > point) for j, other in enumerate(points) if j != i
        )
        duplicate_before = any(np.array_equal(points[j], point) for j in keep)
        if not dominated and not duplicate_before:
            keep.append(i)
    return points[keep]


def _hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Exact dominated volume by slicing along the last axis (fine for tens of points in 5-D)."""
    points = points[np.all(points > reference, axis=1)]
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(points[:, 0].max() - reference[0])
    points = _non_dominated(points)
    levels = np.unique(points[:, -1])[::-1]
    volume = 0.0
    for index, level in enumerate(levels):
        lower = levels[index + 1] if index + 1 < len(levels) else reference[-1]
        slab = points[points[:, -1] >= level][:, :-1]
        volume += (level - lower) * _hypervolume(slab, reference[:-1])
    return volume


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Exact hypervolume dominated by ``points`` (maximisation) with respect to ``reference``."""
    points = np.atleast_2d(np.asarray(points, dtype=float))
    reference = np.asarray(reference, dtype=float)
    if points.shape[1] != reference.shape[0]:
        raise ValueError("points and reference have different dimensions")
    return _hypervolume(points, reference)


def normalised_hypervolume(achieved: np.ndarray) -> float:
    """Hypervolume of the min-max normalised points, reference ``-margin``, scaled to [0, 1]."""
    normalised = minmax_normalise(achieved)
    dimensions = normalised.shape[1]
    reference = np.full(dimensions, -HV_REFERENCE_MARGIN)
    return hypervolume(normalised, reference) / (1.0 + HV_REFERENCE_MARGIN) ** dimensions


def mean_inner_product(preferences: np.ndarray, achieved: np.ndarray) -> float:
    """MIP: mean over grid points of <w, L1-normalised min-max-normalised achieved vector>."""
    preferences = np.asarray(preferences, dtype=float)
    normalised = minmax_normalise(achieved)
    totals = normalised.sum(axis=1, keepdims=True)
    dimensions = normalised.shape[1]
    directions = np.where(totals > 0, normalised / np.where(totals > 0, totals, 1.0), 1.0 / dimensions)
    return float(np.mean(np.sum(preferences * directions, axis=1)))


def monotonicity(
    preferences: np.ndarray, achieved: np.ndarray, attributes: tuple[str, ...]
) -> dict[str, dict]:
    """Per attribute: slope of raw reward against its own weight, and the means at max and min weight."""
    preferences = np.asarray(preferences, dtype=float)
    achieved = np.asarray(achieved, dtype=float)
    report = {}
    for index, attribute in enumerate(attributes):
        weights = preferences[:, index]
        scores = achieved[:, index]
        centred = weights - weights.mean()
        denominator = float((centred**2).sum())
        slope = float((centred * (scores - scores.mean())).sum() / denominator) if denominator > 0 else 0.0
        at_max = float(scores[weights == weights.max()].mean())
        at_min = float(scores[weights == weights.min()].mean())
        report[attribute] = {
            "slope": slope,
            "mean_at_max_weight": at_max,
            "mean_at_min_weight": at_min,
            "rises": slope > 0 and at_max > at_min,
        }
    return report
