"""Phase synchronisation of object patches before stitching.

A diffraction pattern fixes its object patch only up to a constant phase
factor, so patches predicted one pattern (or one group) at a time carry
offsets that disagree with their neighbours'. Stitched as they are, those
offsets become low-spatial-frequency phase errors, exactly what the
refinement is slowest to remove. Here every pair of overlapping neighbours
is compared on its overlap, and the offsets are found all at once as the
leading eigenvector of the Hermitian "synchronisation" matrix
``H_ij = <w P_i, w P_j>_overlap / sqrt(E_i E_j)`` (angular synchronisation:
for patches ``P_i = O e^{-i phi_i}``, ``H ≈ z z^H`` with ``z_i = e^{-i phi_i}``).
A sparse Lanczos solve (ARPACK) handles the wrap-around of phases and the
slow, long-range modes of a large scan that a local, iterative alignment would not.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from scipy.spatial import cKDTree

from ptycho_ml.physics import forward as physics

#: Neighbours each patch is compared with (the nearest ones; farther pairs barely overlap).
SYNC_NEIGHBOURS = 8
#: Pairs whose overlap is resampled at once: memory ~ pairs * (2N / bin)^2 * 8 bytes.
SYNC_PAIR_BATCH = 2048
#: Overlaps are compared on patches binned to about this many pixels a side: a constant phase offset is
#: the lowest spatial frequency there is, and binning makes the comparison ~bin² times cheaper.
SYNC_BINNED_SIDE_PX = 16


def neighbour_pairs(positions_px: np.ndarray, N: int, neighbours: int = SYNC_NEIGHBOURS) -> np.ndarray:
    """``(P, 2) int64`` pairs ``i < j`` of positions closer than N px among each one's nearest ``neighbours``."""
    M = len(positions_px)
    if M < 2:
        return np.zeros((0, 2), np.int64)
    k = min(M, neighbours + 1)
    dist, nn = cKDTree(positions_px).query(positions_px, k=k)
    i = np.repeat(np.arange(M), k - 1)
    j = np.asarray(nn)[:, 1:].reshape(-1)
    close = np.asarray(dist)[:, 1:].reshape(-1) < N
    pairs = np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1)[close]
    return np.unique(pairs, axis=0)


def overlap_products(weighted: torch.Tensor, positions_px: torch.Tensor, pairs: np.ndarray) -> torch.Tensor:
    """``<Q_i, Q_j>`` over each pair's overlap: ``(P,) complex128``.

    weighted ``(M, N, N)`` complex64: probe-weighted patches ``Q = w P``;
    positions_px ``(M, 2)`` float32 (x, y). Patch j is resampled onto patch
    i's pixel grid (bilinear, the forward model's own extraction) from a
    zero-padded ``2N x 2N`` canvas, so pixels outside it count as zero.
    """
    N = weighted.shape[-1]
    out = torch.empty(len(pairs), dtype=torch.complex128)
    centre = torch.tensor([float(N), float(N)])
    for start in range(0, len(pairs), SYNC_PAIR_BATCH):
        batch = torch.from_numpy(pairs[start:start + SYNC_PAIR_BATCH])
        i, j = batch[:, 0], batch[:, 1]
        canvas = torch.zeros(len(batch), 2 * N, 2 * N, dtype=weighted.dtype)
        canvas[:, N // 2:N // 2 + N, N // 2:N // 2 + N] = weighted[j]
        shift = positions_px[j] - positions_px[i]  # where patch j's centre sits in patch i's frame
        # Canvas pixel (centre + v - shift) holds Q_j(v - shift): patch j seen on patch i's grid.
        resampled = physics.extract_patches(canvas, (centre - shift)[:, None, :], N)[:, 0]
        out[start:start + len(batch)] = (weighted[i] * resampled.conj()).sum(dim=(-2, -1)).to(torch.complex128)
    return out


def synchronise_phases(patches: torch.Tensor, positions_px: torch.Tensor, weight: torch.Tensor,
                       anchor: float = 0.0) -> torch.Tensor:
    """Remove each patch's constant phase offset relative to its neighbours.

    patches ``(M, N, N)`` complex64, positions_px ``(M, 2)`` float32 (x, y),
    weight ``(N, N)`` float32 (the probe intensity: where the data constrain a
    patch). ``anchor`` >= 0 ties each patch to the phase it came with, with
    that fraction of its summed neighbour weight (a virtual reference node
    joined to every patch): pairwise agreement fixes local jumps, the anchor
    stops long-range drift when the patches' own phase is already absolute
    (0: synchronisation alone, up to one global phase per connected piece).
    Returns ``(M, N, N)`` complex64: the patches times unit phase factors;
    amplitudes are untouched. Patches with no overlapping neighbour keep their
    phase; so does everything when the solver does not converge.
    """
    M, N, _ = patches.shape
    pairs = neighbour_pairs(positions_px.numpy().astype(np.float64), N)
    if len(pairs) == 0:
        return patches
    binning = max(1, N // SYNC_BINNED_SIDE_PX)
    weighted = patches * weight
    if binning > 1:  # average pooling of the real and imaginary parts; positions in binned pixels
        pooled = torch.nn.functional.avg_pool2d(torch.view_as_real(weighted).permute(0, 3, 1, 2), binning)
        weighted = torch.view_as_complex(pooled.permute(0, 2, 3, 1).contiguous())
    energy = (weighted.abs().square().sum(dim=(-2, -1)).double() + 1e-30).numpy()
    c = overlap_products(weighted, positions_px / binning, pairs).numpy() / np.sqrt(energy[pairs[:, 0]] * energy[pairs[:, 1]])
    rows, cols, values = [pairs[:, 0], pairs[:, 1]], [pairs[:, 1], pairs[:, 0]], [c, c.conj()]
    size = M
    if anchor > 0:  # node M: the reference every patch's own phase is measured against
        degree = np.bincount(pairs.reshape(-1), weights=np.abs(np.concatenate([c, c])), minlength=M)
        link = anchor * degree
        rows += [np.arange(M), np.full(M, M)]
        cols += [np.full(M, M), np.arange(M)]
        values += [link.astype(np.complex128), link.astype(np.complex128)]
        size = M + 1
    H = sparse.coo_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(size, size)).tocsr()
    factor = np.ones(size, np.complex128)
    # Offsets are only defined relative to overlapping neighbours: each connected piece of the scan on its own.
    n_parts, part = connected_components(abs(H), directed=False)
    for k in range(n_parts):
        members = np.flatnonzero(part == k)
        if len(members) > 1:
            factor[members] = _leading_phases(H[members][:, members])
    if anchor > 0:
        factor = factor[:M] / factor[M]  # the reference node's own phase is the global one: remove it
    return patches * torch.from_numpy(factor[:M].astype(np.complex64))[:, None, None]


def _leading_phases(H: sparse.csr_matrix) -> np.ndarray:
    """Unit factors ``conj(z) / |z|`` of the leading eigenvector z of Hermitian ``H`` (ones if ARPACK fails)."""
    M = H.shape[0]
    if M <= 64:  # ARPACK needs more rows than vectors; small pieces are cheap dense
        _, vectors = np.linalg.eigh(H.toarray())
        z = vectors[:, -1]
    else:
        # The identity shift makes the wanted eigenvalue the largest in magnitude as well.
        shifted = H + sparse.identity(M, format="csr") * float(np.abs(H).sum(axis=1).max())
        try:
            _, vectors = eigsh(shifted, k=1, which="LA", v0=np.ones(M, np.complex128), tol=1e-6, maxiter=20 * M)
        except ArpackNoConvergence:
            return np.ones(M, np.complex128)
        z = vectors[:, 0]
    magnitude = np.abs(z)
    return np.where(magnitude > 1e-12, z.conj() / np.maximum(magnitude, 1e-30), 1.0)
