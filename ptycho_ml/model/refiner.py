"""A learned refinement: unrolled data-consistency stages over the stitched object. No Lightning, no I/O.

The generator sees one group of patterns at a time; the physics that ties
the whole scan together (every pattern's overlap with all its neighbours)
only acts in the refinement passes afterwards. :class:`LearnedRefiner`
carries it into the model: S stages, each a Poisson-gradient step through
the forward model over **every** pattern of the scan (preconditioned by the
illumination, as the refinement's steps are), then a learned correction, a
small two-level U-Net over the whole object that sees the object and the
step just taken. Trained end to end (``lifecycle.training`` calls
:func:`ptycho_ml.model.refiner_training.fit_refiner`), it learns how far to
trust each step and what a step leaves undone (the slow low-frequency phase,
most of all).

Zero-initialised correction heads: an untrained refiner is S plain
preconditioned gradient steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ptycho_ml.physics import forward as physics
from ptycho_ml.physics.refine import ILLUMINATION_FLOOR, coverage, object_gradient, object_nll

#: Outside training, objects with more pixels than this run the correction network tile by tile
#: (its activations are ~100 floats per pixel); each tile carries a border wider than its receptive field.
TILE_PX = 512
TILE_BORDER_PX = 32


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.SiLU())


class CorrectionNet(nn.Module):
    """``(1, 5, H, W)`` features -> ``(1, 2, H, W)`` (real, imaginary) object correction.

    Two-level U-Net (full, 1/2 and 1/4 resolution) of ``width`` channels: the
    coarse levels give each pixel a view of a few probe widths, where the
    phase errors a gradient step leaves are. Any H, W (padded to a multiple of 4).
    """

    def __init__(self, width: int):
        super().__init__()
        w = width
        self.enc0 = nn.Sequential(_conv(5, w), _conv(w, w))
        self.enc1 = nn.Sequential(_conv(w, 2 * w), _conv(2 * w, 2 * w))
        self.enc2 = nn.Sequential(_conv(2 * w, 2 * w), _conv(2 * w, 2 * w))
        self.dec1 = _conv(4 * w, 2 * w)
        self.dec0 = _conv(3 * w, w)
        self.head = nn.Conv2d(w, 2, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        x = F.pad(x, (0, (-W) % 4, 0, (-H) % 4))
        e0 = self.enc0(x)
        e1 = self.enc1(F.avg_pool2d(e0, 2))
        e2 = self.enc2(F.avg_pool2d(e1, 2))
        d1 = self.dec1(torch.cat([F.interpolate(e2, scale_factor=2.0, mode="bilinear", align_corners=False), e1], 1))
        d0 = self.dec0(torch.cat([F.interpolate(d1, scale_factor=2.0, mode="bilinear", align_corners=False), e0], 1))
        return self.head(d0)[..., :H, :W]


class LearnedRefiner(nn.Module):
    """S unrolled stages: preconditioned Poisson-gradient step over the whole scan, then a learned correction.

    ``stages`` = 0 is no refiner (the model is the generator alone).
    """

    def __init__(self, stages: int, width: int = 16):
        super().__init__()
        self.stages = stages
        # Step length of each stage's gradient step (log scale, starts at 1: a full preconditioned step).
        self.log_step = nn.Parameter(torch.zeros(stages))
        self.corrections = nn.ModuleList(CorrectionNet(width) for _ in range(stages))
        self.tile_px = TILE_PX  # outside training, larger objects are corrected tile by tile

    def forward(self, obj: torch.Tensor, probe: torch.Tensor, positions_px: torch.Tensor,
                amplitudes: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                good_pixels: torch.Tensor | None = None, batch_size: int = 256,
                every_stage: bool = False, report: dict | None = None) -> torch.Tensor | list[torch.Tensor]:
        """obj ``(H, W)`` complex64 (the stitched network object) -> refined ``(H, W)`` complex64.

        probe ``(N, N)``/``(K, N, N)``; positions ``(M, 2)`` float32 (x, y,
        px); amplitudes ``(M, N, N)`` float32 (counts scale), or a function
        reading the amplitudes of given pattern indices (scans that stream
        from disk). Differentiable when grad is enabled (training on small
        scans); under ``torch.no_grad`` each batch's gradient is taken and
        freed in turn. ``every_stage``: the list of each stage's output.

        Outside training the data referee the corrections: the next stage's
        gradient comes with the scan's Poisson NLL, and a correction after
        which the data fit worse than before its stage (a scan unlike any
        the corrections were trained on) is undone, its stage's plain step
        kept, and the remaining stages are plain steps. ``report`` (a dict)
        receives ``corrections_kept`` and the NLL before and after.
        """
        guard = not torch.is_grad_enabled()
        # The illumination does not change from stage to stage: one preconditioner for all of them.
        illumination = coverage(positions_px, physics.intensity_of(probe), obj.shape)
        denominator = illumination + ILLUMINATION_FLOOR * illumination.max()
        outputs = []
        correcting = True
        kept = 0
        before = None  # (NLL at the last stage's start, its object after the plain step)
        nll0 = None
        for s in range(self.stages):
            grad, nll = object_gradient(obj, probe, positions_px, amplitudes, good_pixels,
                                        batch_size=batch_size, create_graph=not guard)
            if guard and before is not None and nll > before[0]:  # the last correction made the fit worse
                obj, correcting, kept = before[1], False, kept - 1
                outputs[-1] = obj
                grad, nll = object_gradient(obj, probe, positions_px, amplitudes, good_pixels, batch_size=batch_size)
            nll0 = nll if nll0 is None else nll0
            # torch's complex gradient is 2 dL/d(conj z); the Poisson gradient is about twice the amplitude one: /4.
            step = grad / (4 * denominator)
            del grad
            plain = obj - torch.exp(self.log_step[s]) * step
            obj = plain + self._correction(self.corrections[s], plain, step, illumination, denominator) if correcting else plain
            kept += int(correcting)
            before = (nll, plain) if guard and correcting else None
            outputs.append(obj)
        if before is not None:  # the last stage's correction, judged by one more forward pass
            nll = object_nll(obj, probe, positions_px, amplitudes, good_pixels, batch_size=batch_size)
            if nll > before[0]:
                obj, kept = before[1], kept - 1
                outputs[-1] = obj
                nll = object_nll(obj, probe, positions_px, amplitudes, good_pixels, batch_size=batch_size)
            if report is not None:
                report.update(corrections_kept=kept, nll_start=nll0, nll_end=nll)
        elif report is not None and guard and self.stages:
            report.update(corrections_kept=kept, nll_start=nll0,
                          nll_end=object_nll(obj, probe, positions_px, amplitudes, good_pixels, batch_size=batch_size))
        return outputs if every_stage else obj

    def _correction(self, net: CorrectionNet, obj: torch.Tensor, step: torch.Tensor, illumination: torch.Tensor,
                    denominator: torch.Tensor) -> torch.Tensor:
        """The learned correction ``(H, W)`` complex64, zero where nothing was seen.

        Features: the object, the step just taken and ``lit`` (~1 where the
        data say something, -> 0 outside). Outside training, objects larger
        than ``tile_px``² go tile by tile: each tile starts on the pooling
        grid (a multiple of 4) with a border of ``TILE_BORDER_PX`` (wider than
        the network's receptive field), so the result is the untiled one and
        memory is one tile's activations.
        """
        H, W = obj.shape
        tile = self.tile_px if not torch.is_grad_enabled() and H * W > self.tile_px**2 else max(H, W)
        border = TILE_BORDER_PX if tile < max(H, W) else 0
        out = torch.empty_like(obj) if tile < max(H, W) else None
        for y in range(0, H, tile):
            for x in range(0, W, tile):
                ya, xa = max(0, y - border), max(0, x - border)
                yb, xb = min(H, y + tile + border), min(W, x + tile + border)
                window = (slice(ya, yb), slice(xa, xb))
                lit = illumination[window] / denominator[window]
                o, st = obj[window], step[window]
                delta = net(torch.stack([o.real, o.imag, st.real, st.imag, lit])[None])[0] * lit
                delta = torch.complex(delta[0], delta[1])
                if out is None:
                    return delta
                out[y:y + tile, x:x + tile] = delta[y - ya:y - ya + tile, x - xa:x - xa + tile]
        return out

