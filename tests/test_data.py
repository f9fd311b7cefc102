"""Data layer: readers, intensity detection, validation messages, grouping, splits, streaming."""

import hashlib
import warnings
import zipfile

import h5py
import numpy as np
import pytest

from ptycho_ml import config
from ptycho_ml.physics import simulate
from ptycho_ml.data import IntensityWarning, load_scan
from ptycho_ml.data.grouping import make_groups, partition_groups, split_indices
from ptycho_ml.data.npz import write_npz
from ptycho_ml.errors import PtychoInputError

from simdata import tiny_config


def _arrays(scan):
    return {"diffraction": scan.amplitude, "probeGuess": scan.probe, "xcoords": scan.positions_px[:, 0],
            "ycoords": scan.positions_px[:, 1], "objectGuess": scan.obj}


def _write(tmp_path, arrays, name="scan.npz"):
    path = tmp_path / name
    write_npz(path, arrays)
    return path


def test_large_npz_members_are_read_on_demand(tiny_npz, tiny_scan, monkeypatch):
    from ptycho_ml.data import npz

    monkeypatch.setattr(config, "NPZ_STREAM_MIN_BYTES", 1024)
    scan = load_scan(tiny_npz)
    assert isinstance(scan.patterns, npz.StoredArray)
    assert len(scan) == len(tiny_scan.positions_px) and scan.N == 32
    assert np.array_equal(scan.amplitude(slice(0, 5)), tiny_scan.amplitude[:5])
    idx = np.array([7, 2, 5])
    assert np.array_equal(scan.amplitude(idx), tiny_scan.amplitude[idx])
    assert scan.metadata["seed"] == 3 and scan.metadata["nphotons"] == 1e5
    assert scan.obj_shape == (72, 72)


def test_same_seed_gives_byte_identical_files(tmp_path):
    digests = []
    for i in range(2):
        path = simulate.write_simulated(simulate.simulate_scan(tiny_config()), tmp_path / f"s{i}.npz")
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    other = simulate.write_simulated(simulate.simulate_scan(tiny_config(seed=4)), tmp_path / "other.npz")
    assert hashlib.sha256(other.read_bytes()).hexdigest() != digests[0]


@pytest.mark.parametrize("family", ["lines", "grf", "siemens"])
def test_object_families_have_amplitude_in_range(family):
    cfg = tiny_config(object_families=(family,), amplitude_min=0.4, phase_range_rad=1.5)
    obj = simulate.make_object(cfg, np.random.default_rng(1))
    amp = np.abs(obj)
    assert amp.min() >= 0.4 - 1e-5 and amp.max() <= 1 + 1e-5 and amp.std() > 0.01
    assert np.ptp(np.angle(obj)) <= 1.5 + 1e-4


@pytest.mark.parametrize("kind", ["focused", "gaussian"])
def test_probes_carry_the_photon_budget(kind):
    cfg = tiny_config(probe_kind=kind, nphotons=5e4)
    probe = simulate.make_probe(cfg)
    assert probe.shape == (32, 32) and probe.dtype == np.complex64
    assert np.isclose((np.abs(probe) ** 2).sum(), 5e4, rtol=1e-4)


def test_probe_from_file(tmp_path, tiny_scan):
    np.save(tmp_path / "probe.npy", tiny_scan.probe)
    probe = simulate.make_probe(tiny_config(probe_kind="file", probe_file=str(tmp_path / "probe.npy")))
    assert np.allclose(np.abs(probe), np.abs(tiny_scan.probe), rtol=1e-4)


@pytest.mark.parametrize("scan_kind", ["raster", "spiral"])
def test_scans_stay_inside_the_object(scan_kind):
    cfg = tiny_config(scan=scan_kind, jitter_px=1.0)
    pos = simulate.make_positions(cfg, np.random.default_rng(0))
    assert len(pos) > 20
    assert (pos >= cfg.N / 2).all() and (pos <= cfg.object_size_px - cfg.N / 2 - 1).all()


def test_ptychodus_export_intensity_is_detected_and_converted(tmp_path, tiny_scan):
    arrays = _arrays(tiny_scan)
    del arrays["diffraction"]
    arrays["diff3d"] = np.round(tiny_scan.amplitude.astype(np.float64) ** 2).astype(np.uint32)
    arrays["probeGuess"] = tiny_scan.probe[None]
    path = _write(tmp_path, arrays)
    with pytest.warns(IntensityWarning, match="photon counts"):
        scan = load_scan(path)
    assert scan.probe.shape == (32, 32)
    assert np.allclose(scan.amplitude(slice(0, 3)), tiny_scan.amplitude[:3], atol=0.51)


def test_float_counts_are_detected(tmp_path, tiny_scan):
    arrays = _arrays(tiny_scan)
    arrays["diffraction"] = np.round(tiny_scan.amplitude.astype(np.float64) ** 2).astype(np.float32)
    with pytest.warns(IntensityWarning):
        load_scan(_write(tmp_path, arrays))


def test_legacy_diff3d_amplitude_loads_without_warning(tmp_path, tiny_scan):
    arrays = _arrays(tiny_scan)
    arrays["diff3d"] = arrays.pop("diffraction")
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntensityWarning)
        scan = load_scan(_write(tmp_path, arrays))
    assert scan.patterns_field == "diff3d"


def test_hdf5_scan_streams(tmp_path, tiny_scan):
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as h5:
        for k, v in _arrays(tiny_scan).items():
            h5[k] = v
    scan = load_scan(path)
    assert isinstance(scan.patterns, h5py.Dataset)
    assert np.array_equal(scan.amplitude(np.array([9, 1])), tiny_scan.amplitude[[9, 1]])


def _bad(tiny_scan, change):
    arrays = _arrays(tiny_scan)
    change(arrays)
    return arrays


BAD_CASES = {
    "missing diffraction": (lambda a: a.pop("diffraction"), r"field 'diffraction': found no such key .* expected 'diffraction' or legacy 'diff3d'"),
    "missing probe": (lambda a: a.pop("probeGuess"), r"field 'probeGuess': found no such key"),
    "missing xcoords": (lambda a: a.pop("xcoords"), r"field 'xcoords': found no such key"),
    "wrong ndim": (lambda a: a.update(diffraction=a["diffraction"][0]), r"field 'diffraction': found ndim 2 .* expected 3 dimensions"),
    "non-square": (lambda a: a.update(diffraction=a["diffraction"][:, :, :30]), r"non-square patterns 32x30"),
    "probe size": (lambda a: a.update(probeGuess=a["probeGuess"][:16, :16]), r"field 'probeGuess': found shape \(16, 16\), expected \(32, 32\)"),
    "nan": (lambda a: a["diffraction"].__setitem__((0, 0, 0), np.nan), r"field 'diffraction': found NaN values, expected finite"),
    "inf": (lambda a: a["diffraction"].__setitem__((1, 2, 3), np.inf), r"field 'diffraction': found Inf values"),
    "negative": (lambda a: a["diffraction"].__setitem__((1, 2, 3), -1.0), r"found negative values .* expected amplitudes >= 0"),
    "position count": (lambda a: a.update(xcoords=a["xcoords"][:-2]), r"field 'xcoords': found \d+ positions, expected \d+ \(one per diffraction pattern\)"),
    "outside": (lambda a: a["xcoords"].__setitem__(4, 500.0), r"position\(s\) outside the object \(first: index 4"),
    "empty": (lambda a: a.update(diffraction=np.zeros((0, 32, 32), np.float32)), r"found an empty array"),
    "nan positions": (lambda a: a["ycoords"].__setitem__(0, np.nan), r"field 'ycoords': found NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_gets_a_one_line_error_naming_file_and_field(tmp_path, tiny_scan, case):
    change, pattern = BAD_CASES[case]
    arrays = {k: np.array(v, copy=True) for k, v in _arrays(tiny_scan).items()}
    change(arrays)
    path = _write(tmp_path, arrays)
    with pytest.raises(PtychoInputError, match=pattern) as info:
        load_scan(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_not_npz_or_hdf5(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(PtychoInputError, match=r"notes.txt: not an NPZ or HDF5 file"):
        load_scan(path)


def test_missing_file(tmp_path):
    with pytest.raises(PtychoInputError, match=r"file not found"):
        load_scan(tmp_path / "nope.npz")


def test_truncated_npz(tmp_path, tiny_npz):
    data = tiny_npz.read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PtychoInputError, match=r"cut.npz: .*truncated"):
        load_scan(path)


def test_truncated_hdf5(tmp_path, tiny_scan):
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as h5:
        for k, v in _arrays(tiny_scan).items():
            h5[k] = v
    data = path.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(PtychoInputError, match=r"cut.h5: unreadable HDF5 file"):
        load_scan(tmp_path / "cut.h5")


def test_pickled_member_is_refused(tmp_path, tiny_scan):
    path = tmp_path / "pickled.npz"
    arrays = _arrays(tiny_scan)
    np.savez(path, **arrays, metadata=np.array([{"a": 1}], dtype=object))
    with zipfile.ZipFile(path) as zf:
        assert "metadata.npy" in zf.namelist()
    scan = load_scan(path)  # metadata is optional: an unreadable one is ignored, never unpickled
    assert scan.metadata == {}


def test_groups_are_local_seeded_and_centred(tiny_scan):
    pos = tiny_scan.positions_px
    idx, offsets = make_groups(pos, gridsize=2, seed=0)
    assert idx.shape == (len(pos), 4) and offsets.shape == (len(pos), 4, 2)
    assert (idx[:, 0] == np.arange(len(pos))).all()
    assert np.allclose(offsets.mean(axis=1), 0, atol=1e-4)
    assert np.abs(offsets).max() < 3 * 5.0 + 2
    again, _ = make_groups(pos, gridsize=2, seed=0)
    other, _ = make_groups(pos, gridsize=2, seed=1)
    assert np.array_equal(idx, again) and not np.array_equal(idx, other)
    single, off1 = make_groups(pos, gridsize=1, seed=0)
    assert single.shape == (len(pos), 1) and not off1.any()


@pytest.mark.parametrize("mode", ["random", "spatial"])
def test_split_is_seeded_and_disjoint(tiny_scan, mode):
    pos = tiny_scan.positions_px
    tr, va = split_indices(pos, 0.2, seed=0, mode=mode)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(pos)
    tr2, va2 = split_indices(pos, 0.2, seed=0, mode=mode)
    assert np.array_equal(va, va2)
    if mode == "spatial":  # a band along one axis: validation lies beyond a threshold
        axis_sep = [pos[va, a].max() <= pos[tr, a].min() or pos[va, a].min() >= pos[tr, a].max() for a in (0, 1)]
        assert any(axis_sep)


@pytest.mark.parametrize("gridsize", [1, 2, 3])
def test_partition_owns_every_position_exactly_once(tiny_scan, gridsize):
    pos = tiny_scan.positions_px
    groups, owned = partition_groups(pos, gridsize)
    assert groups.shape[1] == gridsize**2
    assert np.array_equal(np.sort(groups[owned]), np.arange(len(pos)))
    spread = np.ptp(pos[groups], axis=1).max()
    assert spread < 6 * gridsize * 5.0


def test_partition_handles_fewer_patterns_than_a_group():
    groups, owned = partition_groups(np.array([[40.0, 40.0], [45.0, 41.0]]), 2)
    assert groups.shape == (1, 4) and owned.sum() == 2
    assert sorted(groups[owned].tolist()) == [0, 1]
