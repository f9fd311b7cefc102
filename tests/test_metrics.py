"""Invariants of ptycho_ml.inference.metrics on small seeded images (no golden numbers)."""

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from ptycho_ml.inference import metrics as M
from ptycho_ml.errors import PtychoInputError


def smooth(seed, shape=(64, 64), sigma=2.0):
    """Seeded ``(H, W)`` float64 smooth random image scaled to [0, 1]."""
    x = gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return (x - x.min()) / (x.max() - x.min())


def complex_obj(seed, shape=(64, 64)):
    """Seeded ``(H, W)`` complex128 object: amplitude in [0.5, 1], phase in [-1, 1] rad."""
    return (0.5 + 0.5 * smooth(seed, shape)) * np.exp(1j * (2 * smooth(seed + 100, shape) - 1))


def test_identical_images():
    a = smooth(0)
    assert M.ssim(a, a) == pytest.approx(1.0)
    assert M.psnr(a, a) == math.inf
    assert M.mae(a, a) == 0.0
    assert M.frc(a, a)["resolution_px"] == 2.0
    obj = complex_obj(1)
    out = M.evaluate_object(obj, obj)
    assert set(out) == set(M.METRIC_KEYS)
    for name in ("amplitude", "phase"):
        assert out[f"{name}_ssim"] == pytest.approx(1.0)
        assert out[f"{name}_psnr"] > 100 or out[f"{name}_psnr"] == math.inf
        assert out[f"{name}_mae"] == pytest.approx(0.0, abs=1e-12)
        assert out[f"{name}_frc_px"] == 2.0


def test_global_phase_offset_is_ignored():
    truth = complex_obj(2)
    rng = np.random.default_rng(3)
    pred = truth + 0.05 * (rng.standard_normal(truth.shape) + 1j * rng.standard_normal(truth.shape))
    base = M.evaluate_object(pred, truth)
    shifted = M.evaluate_object(pred * np.exp(1j * 1.3), truth)
    for k in M.METRIC_KEYS:
        assert shifted[k] == pytest.approx(base[k], rel=1e-6, abs=1e-9), k
    # an offset large enough to wrap the phase (|phase| + 3 > pi) is also ignored
    wrapped = M.evaluate_object(pred * np.exp(1j * 3.0), truth)
    assert wrapped["phase_ssim"] == pytest.approx(base["phase_ssim"], rel=1e-6)


def test_align_phase_recovers_offset():
    truth = complex_obj(4)
    aligned = M.align_phase(truth * np.exp(-1j * 0.7), truth)
    np.testing.assert_allclose(aligned, truth, atol=1e-12)


def test_noise_lowers_ssim_and_psnr_monotonically():
    a = smooth(5)
    noise = np.random.default_rng(6).standard_normal(a.shape)
    levels = [0.01, 0.05, 0.2]
    s = [M.ssim(a + lv * noise, a) for lv in levels]
    p = [M.psnr(a + lv * noise, a) for lv in levels]
    e = [M.mae(a + lv * noise, a) for lv in levels]
    assert s[0] > s[1] > s[2]
    assert p[0] > p[1] > p[2]
    assert e[0] < e[1] < e[2]


def test_psnr_and_ssim_use_data_range():
    a = smooth(7)
    b = a + 0.05 * np.random.default_rng(8).standard_normal(a.shape)
    assert M.psnr(0.01 * b, 0.01 * a) == pytest.approx(M.psnr(b, a), rel=1e-9)
    assert M.ssim(0.01 * b, 0.01 * a) == pytest.approx(M.ssim(b, a), rel=1e-6)
    # peak is the reference range, not 255: explicit data_range agrees
    assert M.psnr(b, a, data_range=a.max() - a.min()) == pytest.approx(M.psnr(b, a))


def test_frc_blur_gives_coarser_resolution():
    sharp = smooth(9, sigma=0.7)
    noise = 0.1 * np.random.default_rng(10).standard_normal(sharp.shape)
    res_sharp = M.frc(sharp + noise, sharp)["resolution_px"]
    res_blur = M.frc(gaussian_filter(sharp, 2.0) + noise, sharp)["resolution_px"]
    assert res_blur > res_sharp >= 2.0
    half = M.frc(gaussian_filter(sharp, 2.0), sharp, threshold="halfbit")
    assert len(half["curve"]) == len(half["freq"]) == 33
    assert half["freq"][-1] == pytest.approx(0.5)
    assert half["resolution_px"] > 2.0


def test_scanned_region_covers_centres_excludes_corners():
    N, shape = 16, (96, 96)
    g = np.arange(32, 65, 8, dtype=float)
    pos = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2) + 0.3  # (25, 2) (x, y)
    yy, xx = np.mgrid[:N, :N] - N / 2
    probe = np.exp(-(xx ** 2 + yy ** 2) / (2 * 3.0 ** 2)).astype(np.complex64)
    for p in (None, probe, probe[None].repeat(2, 0)):
        mask = M.scanned_region(pos, N, shape, probe=p)
        assert mask.shape == shape and mask.dtype == bool
        r, c = np.rint(pos[:, 1]).astype(int), np.rint(pos[:, 0]).astype(int)
        assert mask[r, c].all()
        assert not mask[:8, :8].any() and not mask[-8:, -8:].any()
        rows, cols = M.region_box(mask)
        assert mask[rows, cols].all()
        assert rows.start <= 33 and rows.stop >= 64


def test_region_box_is_inside_mask():
    yy, xx = np.mgrid[:64, :64]
    disk = (yy - 30) ** 2 + (xx - 34) ** 2 < 20 ** 2
    rows, cols = M.region_box(disk)
    assert disk[rows, cols].all()
    assert (rows.stop - rows.start) * (cols.stop - cols.start) > 0.5 * disk.sum()
    with pytest.raises(PtychoInputError):
        M.region_box(np.zeros((8, 8), bool))


def test_evaluate_object_crops_to_scanned_region():
    truth = complex_obj(11, (96, 96))
    pred = truth.copy()
    pred[:10, :] = 0  # garbage outside the scanned region does not count
    g = np.arange(32, 65, 8, dtype=float)
    pos = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    out = M.evaluate_object(pred * np.exp(0.4j), truth, positions_px=pos, N=16)
    assert out["amplitude_ssim"] == pytest.approx(1.0)
    assert out["phase_mae"] == pytest.approx(0.0, abs=1e-9)
    assert M.evaluate_object(pred, truth)["amplitude_ssim"] < 0.99
    table = M.format_table(out)
    assert "SSIM" in table and "FRC (px)" in table and len(table.splitlines()) == 3


def test_mismatch_errors():
    a = complex_obj(12)
    with pytest.raises(PtychoInputError, match="found shape"):
        M.evaluate_object(a[:32], a)
    with pytest.raises(PtychoInputError):
        M.ssim(np.zeros((8, 9)), np.zeros((8, 8)))
    with pytest.raises(PtychoInputError):
        M.psnr(np.zeros((8, 8)), np.zeros((8, 8, 1)))
    with pytest.raises(PtychoInputError):
        M.align_phase(a, a[:, :10])
    with pytest.raises(PtychoInputError):
        M.scanned_region(np.zeros((5, 3)), 16, (64, 64))
    with pytest.raises(PtychoInputError):
        M.scanned_region(np.zeros((5, 2)), 16, (64, 64), probe=np.ones((8, 8)))
    with pytest.raises(PtychoInputError):
        M.evaluate_object(a, a, positions_px=np.zeros((4, 2)))
    with pytest.raises(PtychoInputError):
        M.frc(a.real, a.real, threshold="bogus")
    msg = str(pytest.raises(PtychoInputError, M.mae, np.zeros((4, 4)), np.zeros((5, 5))).value)
    assert "\n" not in msg


def test_pure_phase_object_amplitude_metrics_are_finite():
    # |truth| == 1 up to round-off: the data range falls back to max|truth|
    truth = np.exp(1j * (2 * smooth(13) - 1))
    out = M.evaluate_object(0.9 * truth, truth)
    assert -1.0 <= out["amplitude_ssim"] <= 1.0
    assert out["amplitude_psnr"] == pytest.approx(20.0, rel=1e-6)  # peak 1, error 0.1
    assert out["amplitude_mae"] == pytest.approx(0.1)


def test_centres_box_matches_the_probe_free_scanned_region():
    from ptycho_ml.data.scan import centres_box
    from ptycho_ml.inference.metrics import region_box, scanned_region

    rng = np.random.default_rng(3)
    pos = rng.uniform(20, 80, size=(50, 2))
    assert centres_box(pos, (100, 120)) == region_box(scanned_region(pos, 16, (100, 120)))


def test_region_box_is_the_largest_rectangle_inside_ragged_masks():
    """Against brute force on small random masks: holes and ragged edges cannot shrink the box away."""
    rng = np.random.default_rng(3)
    for _ in range(60):
        mask = rng.random((9, 8)) < 0.75
        if not mask.any():
            continue
        rows, cols = M.region_box(mask)
        assert mask[rows, cols].all()
        best = max((r1 - r0) * (c1 - c0) for r0 in range(9) for r1 in range(r0 + 1, 10)
                   for c0 in range(8) for c1 in range(c0 + 1, 9) if mask[r0:r1, c0:c1].all())
        assert (rows.stop - rows.start) * (cols.stop - cols.start) == best


def test_region_box_of_a_huge_mask_is_searched_coarsely_and_stays_inside():
    yy, xx = np.mgrid[:1500, :1400]
    mask = ((yy - 700) / 650) ** 2 + ((xx - 720) / 600) ** 2 < 1
    mask[700, 100:1300:7] = False  # a dotted line of holes
    rows, cols = M.region_box(mask)
    assert mask[rows, cols].all()
    assert (rows.stop - rows.start) * (cols.stop - cols.start) > 0.25 * mask.sum()
