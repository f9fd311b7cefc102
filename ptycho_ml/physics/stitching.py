"""Vectorised, probe-intensity-weighted assembly of patches into an object."""

from __future__ import annotations

import torch

from ptycho_ml.physics import forward as physics


class Stitcher:
    """Accumulates patches batch by batch; memory is the object plus one batch.

    ``obj = Σ w·patch / max(Σ w, floor)`` at each object pixel, where ``w`` is
    the probe intensity at the patch pixel: well-lit pixels dominate, the
    probe's dark edges (where a patch is unconstrained by the data) barely
    count. Sub-pixel positions use the adjoint of bilinear extraction, so an
    extract-then-stitch round trip is exact at integer positions.
    """

    def __init__(self, obj_shape: tuple[int, int], weight: torch.Tensor, floor_fraction: float = 1e-3):
        """weight ``(N, N)`` float32 (e.g. probe intensity)."""
        self.obj_shape = obj_shape
        self.weight = weight
        self.numerator = torch.zeros(obj_shape, dtype=torch.complex64, device=weight.device)
        self.denominator = torch.zeros(obj_shape, dtype=weight.dtype, device=weight.device)
        self.floor_fraction = floor_fraction

    def add(self, patches: torch.Tensor, positions_px: torch.Tensor) -> None:
        """Add patches ``(B, N, N)`` complex64 at positions ``(B, 2)`` (x, y)."""
        w = self.weight.expand(patches.shape)
        physics.insert_patches(patches.to(torch.complex64) * w, positions_px, self.obj_shape, out=self.numerator)
        physics.insert_patches(w, positions_px, self.obj_shape, out=self.denominator)

    def result(self, fill: complex = 1.0) -> torch.Tensor:
        """The stitched object ``(H, W)`` complex64; pixels no patch reached are ``fill``.

        Computed in place in the numerator's memory (large objects: no extra
        canvas); call it once, after the last :meth:`add`.
        """
        floor = self.floor_fraction * float(self.denominator.max()) if self.denominator.numel() else 0.0
        unlit = self.denominator <= floor
        # Clamp, not add: wherever the weight exceeds the floor the average is exact.
        obj = self.numerator.div_(self.denominator.clamp(min=max(floor, 1e-30)))
        return obj.masked_fill_(unlit, fill)

    def illumination(self) -> torch.Tensor:
        """``(H, W)`` summed weight: how much each object pixel was seen."""
        return self.denominator


def stitch(patches: torch.Tensor, positions_px: torch.Tensor, obj_shape: tuple[int, int], weight: torch.Tensor) -> torch.Tensor:
    """One-shot stitching of ``(M, N, N)`` patches at ``(M, 2)`` positions -> ``(H, W)`` complex64."""
    s = Stitcher(obj_shape, weight)
    s.add(patches, positions_px)
    return s.result()
