"""Neighbour groups of C = gridsize² scan positions, and train/validation splits."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from ptycho_ml.errors import PtychoInputError


def make_groups(positions_px: np.ndarray, gridsize: int, seed: int, n_neighbours: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One group per scan position: the position itself plus C-1 of its nearest neighbours.

    positions_px: ``(M, 2)`` float (x, y).
    Returns ``indices (M, C) int64`` (first column is the anchor) and
    ``offsets_px (M, C, 2) float32``: each member's position minus the group's
    mean position. Neighbours are drawn at random (seeded) from the
    ``n_neighbours`` nearest (default ``2 C``), so groups vary but stay local.
    """
    C = gridsize * gridsize
    M = len(positions_px)
    if gridsize < 1:
        raise PtychoInputError(f"gridsize: found {gridsize}, expected >= 1")
    if C == 1:
        return np.arange(M, dtype=np.int64)[:, None], np.zeros((M, 1, 2), np.float32)
    if M < C:
        raise PtychoInputError(f"gridsize={gridsize}: found {M} positions, expected at least C={C} to form a group")
    k = min(M, max(C, n_neighbours or 2 * C))
    _, nn = cKDTree(positions_px).query(positions_px, k=k)
    nn = np.asarray(nn).reshape(M, k)
    rng = np.random.default_rng(seed)
    # Random choice of C-1 among the k-1 nearest (excluding self), vectorised with argsort of random keys.
    pick = np.argsort(rng.random((M, k - 1)), axis=1)[:, : C - 1] + 1
    indices = np.concatenate([nn[:, :1], np.take_along_axis(nn, pick, axis=1)], axis=1).astype(np.int64)
    members = positions_px[indices]  # (M, C, 2)
    offsets = (members - members.mean(axis=1, keepdims=True)).astype(np.float32)
    return indices, offsets


def split_indices(positions_px: np.ndarray, val_fraction: float, seed: int, mode: str = "spatial") -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of scan positions.

    ``random``: a random subset. ``spatial``: a contiguous band of the scan
    (a random side, the given fraction of positions), so validation patches
    do not overlap the training ones much and measure generalisation.
    Returns sorted ``(train_idx, val_idx)``.
    """
    M = len(positions_px)
    if not 0 <= val_fraction < 1:
        raise PtychoInputError(f"val_fraction: found {val_fraction}, expected in [0, 1)")
    n_val = int(round(M * val_fraction))
    if n_val == 0:
        return np.arange(M), np.arange(0)
    rng = np.random.default_rng(seed)
    if mode == "random":
        val = rng.choice(M, n_val, replace=False)
    elif mode == "spatial":
        axis = int(rng.integers(2))
        key = positions_px[:, axis] * (1 if rng.random() < 0.5 else -1)
        val = np.argsort(key, kind="stable")[:n_val]
    else:
        raise PtychoInputError(f"split mode: found {mode!r}, expected 'random' or 'spatial'")
    mask = np.zeros(M, bool)
    mask[val] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def partition_groups(positions_px: np.ndarray, gridsize: int) -> tuple[np.ndarray, np.ndarray]:
    """Cover every position once with groups of C = gridsize² near neighbours (for inference).

    Greedy, in scan order: each not-yet-covered position takes its nearest
    not-yet-covered neighbours; where too few are left nearby, already
    covered neighbours fill the group without being owned by it. Returns
    ``groups (G, C) int64`` and ``owned (G, C) bool`` (True where this group's
    prediction is the one used for that position); every position is owned
    exactly once, so the network runs about once per pattern. A scan with
    fewer than C patterns (e.g. a one-frame request) repeats them to fill its group.
    """
    C = gridsize * gridsize
    M = len(positions_px)
    if C == 1:
        return np.arange(M, dtype=np.int64)[:, None], np.ones((M, 1), bool)
    k = min(M, 4 * C)
    _, nn = cKDTree(positions_px).query(positions_px, k=k)
    nn = np.asarray(nn).reshape(M, k)
    covered = np.zeros(M, bool)
    groups, owned = [], []
    for i in range(M):
        if covered[i]:
            continue
        free = [j for j in nn[i] if not covered[j]][:C]
        members = free + [j for j in nn[i] if j not in free][: C - len(free)]
        members += [i] * (C - len(members))  # fewer than C patterns in all: repeat the anchor
        covered[free] = True
        groups.append(members)
        owned.append([True] * len(free) + [False] * (C - len(free)))
    return np.asarray(groups, np.int64), np.asarray(owned, bool)
