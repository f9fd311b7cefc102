"""Physical invariants of the forward model on tiny seeded tensors."""

import math

import numpy as np
import pytest
import torch

from ptycho_ml.physics import losses
from ptycho_ml.physics import forward as physics
from ptycho_ml.physics import simulate
from ptycho_ml.physics.stitching import stitch

from simdata import tiny_config


def _complex(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))


def test_far_field_conserves_energy():
    exit_wave = _complex(5, 16, 16)
    far = physics.propagate_far_field(exit_wave)
    assert torch.allclose(far.abs().square().sum((-2, -1)), exit_wave.abs().square().sum((-2, -1)), rtol=1e-5)
    assert torch.allclose(physics.propagate_back(far), exit_wave, atol=1e-5)


def test_zero_frequency_is_at_the_centre():
    far = physics.propagate_far_field(torch.ones(1, 16, 16, dtype=torch.complex64))
    peak = np.unravel_index(int(far.abs().argmax()), (16, 16))
    assert peak == (8, 8)


def test_amplitude_is_invariant_to_a_global_phase_and_non_negative():
    probe, obj = _complex(16, 16, seed=1), _complex(3, 16, 16, seed=2)
    a = physics.far_field_amplitude(probe, obj)
    b = physics.far_field_amplitude(probe, obj * complex(math.cos(1.1), math.sin(1.1)))
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert (a >= 0).all()


def test_multimode_probe_adds_intensities_incoherently():
    modes, obj = _complex(2, 16, 16, seed=3), _complex(4, 16, 16, seed=4)
    total = physics.far_field_amplitude(modes, obj).square()
    separate = sum(physics.far_field_amplitude(modes[k], obj).square() for k in range(2))
    assert torch.allclose(total, separate, rtol=1e-4, atol=1e-3)


def test_extract_is_exact_at_integer_positions_and_follows_the_convention():
    obj = _complex(40, 50)
    pos = torch.tensor([[20.0, 16.0], [30.0, 25.0]])  # (x, y)
    patches = physics.extract_patches(obj, pos, 8)
    assert torch.equal(patches[0], obj[16 - 4:16 + 4, 20 - 4:20 + 4])
    assert torch.equal(patches[1], obj[25 - 4:25 + 4, 30 - 4:30 + 4])


def test_extract_then_stitch_round_trip_is_exact_at_integer_positions():
    obj = _complex(40, 40)
    ys, xs = np.meshgrid(np.arange(8, 33, 3), np.arange(8, 33, 3), indexing="ij")
    pos = torch.tensor(np.stack([xs.ravel(), ys.ravel()], 1), dtype=torch.float32)
    weight = torch.ones(16, 16)
    out = stitch(physics.extract_patches(obj, pos, 16), pos, (40, 40), weight)
    covered = physics.insert_patches(torch.ones(len(pos), 16, 16), pos, (40, 40)) > 0
    assert torch.allclose(out[covered], obj[covered], atol=1e-6)


def test_subpixel_extraction_error_is_bounded_for_smooth_objects():
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    smooth = lambda y, x: torch.polar(1 + 0.3 * torch.sin(x / 6) * torch.cos(y / 7), 0.5 * torch.sin((x + y) / 9))
    obj = smooth(yy, xx)
    shift = torch.tensor([[32.3, 30.7]])
    patch = physics.extract_patches(obj, shift, 16)[0]
    r, c = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    exact = smooth(30.7 - 8 + r, 32.3 - 8 + c)
    assert float((patch - exact).abs().max()) < 5e-3


@pytest.mark.parametrize("batched", [False, True])
def test_insert_is_the_adjoint_of_extract(batched):
    g = torch.Generator().manual_seed(5)
    if batched:
        x, pos, y = _complex(3, 30, 30), torch.rand(3, 4, 2, generator=g) * 12 + 9, _complex(3, 4, 10, 10, seed=6)
        shape = (30, 30)
    else:
        x, pos, y = _complex(30, 30), torch.rand(6, 2, generator=g) * 12 + 9, _complex(6, 10, 10, seed=6)
        shape = (30, 30)
    lhs = (physics.extract_patches(x, pos, 10) * y.conj()).sum()
    rhs = (x * physics.insert_patches(y, pos, shape).conj()).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-4)


def test_the_propagator_is_unitary_so_its_adjoint_is_its_inverse():
    x, y = _complex(16, 16, seed=7), _complex(16, 16, seed=8)
    lhs = (physics.propagate_far_field(x) * y.conj()).sum()
    rhs = (x * physics.propagate_back(y).conj()).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-4)


def test_gradients_reach_the_object_patch():
    probe = _complex(16, 16, seed=9)
    obj = _complex(2, 16, 16, seed=10).requires_grad_(True)
    measured = physics.far_field_amplitude(probe, _complex(2, 16, 16, seed=11)).detach()
    loss = losses.poisson_nll(physics.far_field_amplitude(probe, obj), measured)
    loss.backward()
    assert obj.grad is not None and torch.isfinite(obj.grad).all() and obj.grad.abs().sum() > 0


def test_poisson_nll_is_zero_at_the_truth_and_positive_elsewhere():
    amp = torch.rand(4, 8, 8) * 5
    assert abs(float(losses.poisson_nll(amp, amp))) < 1e-4
    assert float(losses.poisson_nll(amp * 1.2, amp)) > 0
    assert float(losses.mae_amplitude(amp, amp)) == 0


def test_a_counts_term_made_once_changes_the_loss_by_rounding_and_the_gradient_not_at_all():
    """refine_joint makes k log k - k once per refinement: the same loss, and bit for bit the same gradient."""
    generator = torch.Generator().manual_seed(4)
    measured = torch.poisson(torch.rand(3, 8, 8, generator=generator) * 1e4, generator=generator).sqrt()
    terms = losses.count_term(measured.square())
    grads = []
    for counts_term in (None, terms):
        pred = (measured * 1.1 + 0.3).requires_grad_(True)
        loss = losses.poisson_nll(pred, measured, None, 0.5, reduction="sum", counts_term=counts_term)
        grads.append((float(loss.detach()), torch.autograd.grad(loss, pred)[0]))
    assert grads[0][1].abs().sum() > 0 and torch.equal(grads[0][1], grads[1][1])
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-5) and grads[0][0] > 0


def test_masked_loss_ignores_bad_pixels():
    amp = torch.rand(2, 8, 8) + 1
    wrong = amp.clone()
    wrong[:, 0, 0] = 100
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[0, 0] = False
    assert abs(float(losses.poisson_nll(wrong, amp, mask))) < 1e-4
    assert float(losses.poisson_nll(wrong, amp)) > 1


def test_simulator_diffraction_matches_the_physics_module():
    cfg = tiny_config(nphotons=1e4)
    rng = np.random.default_rng(0)
    obj, probe, pos = simulate.make_object(cfg, rng), simulate.make_probe(cfg), simulate.make_positions(cfg, rng)
    noise_free = simulate.simulate_diffraction(obj, probe, pos, rng=None)
    direct = physics.forward_amplitude(torch.from_numpy(obj), torch.from_numpy(probe), torch.from_numpy(pos)).numpy()
    assert np.allclose(noise_free, direct, rtol=1e-4, atol=1e-3)
    # Photon budget: the probe carries nphotons, the object only absorbs.
    counts = (noise_free.astype(np.float64) ** 2).sum(axis=(1, 2))
    assert (counts <= cfg.nphotons * 1.0001).all() and counts.mean() > 0.05 * cfg.nphotons


def test_overlap_merge_makes_group_patches_agree():
    probe_intensity = torch.ones(8, 8)
    offsets = torch.tensor([[[-2.0, 0.0], [2.0, 0.0]]])
    patches = _complex(1, 2, 8, 8, seed=12)
    merged = physics.merge_group(patches, offsets, probe_intensity)
    # Patch 0 column c+4 and patch 1 column c see the same canvas pixel.
    assert torch.allclose(merged[0, 0, :, 4:], merged[0, 1, :, :4], atol=1e-5)
    # Already-consistent patches are left unchanged.
    canvas = _complex(1, 20, 20, seed=13)
    consistent = physics.extract_from_canvas(canvas, offsets, 8)
    assert torch.allclose(physics.merge_group(consistent, offsets, probe_intensity), consistent, atol=1e-5)


def test_angular_spectrum_conserves_energy_and_reverses():
    field = _complex(32, 32, seed=14).to(torch.complex128)
    out = physics.angular_spectrum_propagate(field, 1e-4, 1.4e-10, 2e-8)
    back = physics.angular_spectrum_propagate(out, -1e-4, 1.4e-10, 2e-8)
    assert torch.allclose(out.abs().square().sum(), field.abs().square().sum(), rtol=1e-6)
    assert torch.allclose(back, field, atol=1e-8)


def test_bad_pixels_do_not_enter_the_single_pattern_estimate():
    probe = _complex(16, 16, seed=15)
    amplitude = physics.far_field_amplitude(probe, _complex(2, 16, 16, seed=16))
    good = torch.ones(16, 16, dtype=torch.bool)
    good[3:6, 4:9] = False
    corrupted = amplitude.clone()
    corrupted[:, 3:6, 4:9] = 1e4  # hot pixels
    masked = physics.single_pattern_estimate(corrupted, probe, 3, good)
    clean = physics.single_pattern_estimate(amplitude, probe, 3, good)
    assert torch.allclose(masked, clean, atol=1e-4)
    assert not torch.allclose(physics.single_pattern_estimate(corrupted, probe, 3), clean, atol=1e-2)
