"""The generator network and the full diffraction-to-object model. No Lightning, no I/O.

* :class:`Generator` (the "autoencoder" of the bundle): C normalised
  diffraction amplitudes ``(B, C, N, N)`` -> C complex object patches
  ``(B, C, N, N)``, an encoder-decoder CNN with separate amplitude and phase
  heads.
* :class:`DiffractionToObject` (the bundle's ``diffraction_to_obj``): the
  generator plus what inference needs — the amplitude scale that normalises
  measured amplitudes and the probe — as buffers, so one state dict holds
  the whole inference model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig


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
    """Encoder-decoder CNN: ``(B, C, N, N)`` float32 normalised amplitudes -> ``(B, C, N, N)`` complex64 patches.

    The encoder works in detector space and halves the size per level; a
    fully connected bottleneck mixes all detector positions (diffraction to
    real space is a global transform, which convolutions alone cannot
    express); the decoder rebuilds real space with skip connections from the
    bottleneck's spatial map. The amplitude head outputs
    ``amplitude_max * sigmoid`` (positive, bounded), the phase head
    ``pi * tanh`` (no wrapping discontinuity in the loss).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.C = cfg.gridsize**2
        self.N = cfg.N
        widths = cfg.resolved_widths()
        blocks = cfg.resolved_blocks()
        self.amplitude_max = float(cfg.amplitude_max)
        # Stride-2 stem: full-resolution convolutions would dominate the cost on CPUs.
        self.stem = nn.Conv2d(self.C, widths[0], 4, stride=2, padding=1)
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
                "stage": _stage(widths[i], widths[i - 1], blocks),
            }))
        # Heads predict 2x2 sub-pixels per position (pixel shuffle) back to N x N.
        self.amplitude_head = nn.Sequential(nn.Conv2d(widths[0], 4 * self.C, 3, padding=1), nn.PixelShuffle(2))
        self.phase_head = nn.Sequential(nn.Conv2d(widths[0], 4 * self.C, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Compress the diffraction's dynamic range: amplitude -> its square root (counts^(1/4)).
        h = self.stem(torch.sqrt(x.clamp(min=0) + 1e-6))
        for stage in self.down:
            h = stage(h)
        B = h.shape[0]
        z = self.squeeze(h)
        z = self.mix(z.flatten(1)).view(B, self.bottleneck_ch, self.bottom_side, self.bottom_side)
        h = self.unsqueeze(z)
        for level in self.up:
            h = level["stage"](level["upsample"](h))
        amplitude = self.amplitude_max * torch.sigmoid(self.amplitude_head(h) + 2.0)
        phase = math.pi * torch.tanh(self.phase_head(h))
        return torch.polar(amplitude, phase)


class DiffractionToObject(nn.Module):
    """Inference model: measured amplitudes (counts scale) -> complex object patches.

    forward(amplitude ``(B, C, N, N)`` float32) -> ``(B, C, N, N)`` complex64.
    Buffers: ``amplitude_scale`` (scalar) and ``probe`` (``(N, N)`` or
    ``(K, N, N)`` complex64), both persisted in the bundle.
    """

    def __init__(self, cfg: ModelConfig, probe: torch.Tensor, amplitude_scale: float):
        super().__init__()
        self.cfg = cfg
        self.generator = Generator(cfg)
        self.register_buffer("amplitude_scale", torch.tensor(float(amplitude_scale), dtype=torch.float32))
        self.register_buffer("probe", probe.to(torch.complex64).clone())

    def forward(self, amplitude: torch.Tensor) -> torch.Tensor:
        return self.generator(amplitude / self.amplitude_scale)

    def probe_intensity(self) -> torch.Tensor:
        """``(N, N)`` float32 probe intensity (modes summed): the stitching and overlap weight."""
        intensity = self.probe.real.square() + self.probe.imag.square()
        return intensity.sum(0) if intensity.ndim == 3 else intensity


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_per_pattern(model: nn.Module, C: int, N: int) -> float:
    """Forward FLOPs per pattern (multiply-add = 2 FLOPs), counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, C, N, N)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / C
