"""The generator network and the full diffraction-to-object model. No Lightning, no I/O.

* :class:`Generator` (the "autoencoder" of the bundle): C normalised
  diffraction amplitudes ``(B, C, N, N)`` -> C complex object patches
  ``(B, C, N, N)``, an encoder-decoder CNN with separate amplitude and phase
  heads.
* :class:`DiffractionToObject` (the bundle's ``diffraction_to_obj``): the
  generator plus what inference needs — the amplitude scale that normalises
  measured amplitudes and the probe — as buffers, and the learned refinement
  over the stitched object (:class:`~ptycho_ml.model.refiner.LearnedRefiner`,
  the bundle's ``refiner``, when ``refiner_stages`` > 0), so one state dict
  holds the whole inference model.
"""

from __future__ import annotations

import torch
from torch import nn

from ptycho_ml.physics import forward as physics
from ptycho_ml.config import ModelConfig
from ptycho_ml.model.refiner import LearnedRefiner


class ConvBlock(nn.Module):
    """Two 3×3 convolutions with GroupNorm and SiLU, and a residual connection."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        groups = max(1, min(8, c_out // 4))
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


def _stage(c_in: int, c_out: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(ConvBlock(c_in, c_out), *[ConvBlock(c_out, c_out) for _ in range(blocks - 1)])


class Generator(nn.Module):
    """U-Net correcting per-pattern physics estimates: ``(B, 2C+1, N, N)`` -> amplitude/phase corrections.

    Input channels are the real and imaginary parts of the C single-pattern
    object estimates (:func:`ptycho_ml.physics.forward.single_pattern_estimate`) and
    the normalised probe intensity (where the data say anything). A stride-2
    stem and pixel-shuffle heads keep full-resolution work small; a fully
    connected bottleneck gives every output pixel a view of the whole patch
    (low-frequency phase is a global property); skip connections carry detail.
    Heads are zero-initialised, so an untrained generator returns its input
    estimate unchanged. Output: ``(log_amplitude_gain, phase_shift)``, each
    ``(B, C, N, N)`` float32.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.C = cfg.gridsize**2
        self.N = cfg.N
        widths = cfg.resolved_widths()
        blocks = cfg.resolved_blocks()
        # Stride-2 stem: full-resolution convolutions would dominate the cost on CPUs.
        self.stem = nn.Conv2d(2 * self.C + 1, widths[0], 4, stride=2, padding=1)
        self.down = nn.ModuleList()
        c = widths[0]
        for i, w in enumerate(widths):
            self.down.append(nn.Sequential(nn.AvgPool2d(2) if i else nn.Identity(), _stage(c, w, blocks)))
            c = w
        side = cfg.N // 2 ** len(widths)
        self.bottom_side = side
        self.bottleneck_ch = max(4, widths[-1] // 4)
        flat = self.bottleneck_ch * side * side
        self.squeeze = nn.Conv2d(widths[-1], self.bottleneck_ch, 1)
        self.mix = nn.Sequential(nn.Linear(flat, flat), nn.SiLU())
        self.unsqueeze = nn.Conv2d(self.bottleneck_ch, widths[-1], 1)
        self.up = nn.ModuleList()
        for i in range(len(widths) - 1, 0, -1):
            self.up.append(nn.ModuleDict({
                "upsample": nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                "stage": _stage(widths[i] + widths[i - 1], widths[i - 1], blocks),
            }))
        # Heads predict 2x2 sub-pixels per position (pixel shuffle) back to N x N.
        self.amplitude_head = nn.Sequential(nn.Conv2d(widths[0], 4 * self.C, 3, padding=1), nn.PixelShuffle(2))
        self.phase_head = nn.Sequential(nn.Conv2d(widths[0], 4 * self.C, 3, padding=1), nn.PixelShuffle(2))
        for head in (self.amplitude_head, self.phase_head):
            nn.init.zeros_(head[0].weight)
            nn.init.zeros_(head[0].bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stem(x)
        skips = []
        for stage in self.down:
            h = stage(h)
            skips.append(h)
        B = h.shape[0]
        z = self.mix(self.squeeze(h).flatten(1)).view(B, self.bottleneck_ch, self.bottom_side, self.bottom_side)
        h = h + self.unsqueeze(z)
        for level, skip in zip(self.up, reversed(skips[:-1])):
            h = level["stage"](torch.cat([level["upsample"](h), skip], dim=1))
        return self.amplitude_head(h), self.phase_head(h)


class DiffractionToObject(nn.Module):
    """Inference model: measured amplitudes (counts scale) -> complex object patches.

    Per-pattern physics estimates (a few error-reduction steps with the
    probe) feed the :class:`Generator`, which corrects their amplitude and
    phase. Buffers: ``amplitude_scale`` (RMS training amplitude) and
    ``probe`` (``(N, N)`` or ``(K, N, N)`` complex64), both persisted in the
    bundle; together they fix the training data's counts-per-probe-photon
    ratio, against which an inference probe's scale is checked.
    """

    def __init__(self, cfg: ModelConfig, probe: torch.Tensor, amplitude_scale: float):
        super().__init__()
        self.cfg = cfg
        self.generator = Generator(cfg)
        # After the generator's patches are stitched: unrolled stages over the whole scan (None: none).
        self.refiner = LearnedRefiner(cfg.refiner_stages, cfg.refiner_width) if cfg.refiner_stages else None
        self.register_buffer("amplitude_scale", torch.tensor(float(amplitude_scale), dtype=torch.float32))
        self.register_buffer("probe", probe.to(torch.complex64).clone())

    def forward(self, amplitude: torch.Tensor, probe: torch.Tensor | None = None,
                good_pixels: torch.Tensor | None = None) -> torch.Tensor:
        """amplitude ``(B, C, N, N)`` float32 (counts scale) -> object patches ``(B, C, N, N)`` complex64.

        ``probe`` ``(N, N)``/``(K, N, N)``: the scan's own probe when it has
        one (the estimate is then in object units whatever the dose), or
        ``(B, 1, N, N)``, one per item (training on several scans);
        default: the training probe. ``good_pixels (N, N)`` bool masks bad
        detector pixels out of the physics estimate.
        """
        probe = self.probe if probe is None else probe
        with torch.no_grad():  # physics features: no learnable parameters, no gradient needed
            estimate = physics.single_pattern_estimate(amplitude, probe, self.cfg.input_iterations, good_pixels)
        intensity = physics.intensity_of(probe)  # (N, N), or (B, 1, N, N) for per-item probes
        weight = intensity / intensity.amax(dim=(-2, -1), keepdim=True)
        features = torch.cat([estimate.real, estimate.imag, weight.expand(amplitude.shape[0], 1, *amplitude.shape[-2:])],
                             dim=1)
        log_gain, phase_shift = self.generator(features)
        # Residual output: the network corrects the physics estimate.
        amplitude_out = (estimate.abs().clamp(min=1e-3) * torch.exp(log_gain)).clamp(max=self.cfg.amplitude_max)
        return torch.polar(amplitude_out, torch.angle(estimate) + phase_shift)

    def refine_stitched(self, obj: torch.Tensor, probe: torch.Tensor, positions_px: torch.Tensor, amplitudes,
                        good_pixels: torch.Tensor | None = None) -> torch.Tensor:
        """The learned refinement of the stitched object ``(H, W)`` complex64 over the whole scan
        (positions ``(M, 2)`` float32, amplitudes ``(M, N, N)`` or a reader of indices); the object itself
        when the model has none."""
        if self.refiner is None:
            return obj
        return self.refiner(obj, probe, positions_px, amplitudes, good_pixels)

    def probe_intensity(self) -> torch.Tensor:
        """``(N, N)`` float32 training-probe intensity (modes summed): the stitching and overlap weight."""
        return physics.intensity_of(self.probe)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_per_pattern(model: "DiffractionToObject") -> float:
    """Forward FLOPs per pattern of the network (multiply-add = 2 FLOPs), counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    C, N = model.cfg.gridsize**2, model.cfg.N
    x = torch.rand(1, C, N, N)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / C
