"""ptychodus 1.7.0 interop: our own round trips (fast) and ptychodus itself as the oracle (interop, slow).

The interop tests build a virtual environment with ``ptychodus==1.7.0`` (path from
``PTYCHODUS_VENV``, default ``<repo>/.venv-ptychodus``, reused when it already has
1.7.0) and run ``tests/ptychodus_oracle.py`` in it. A failed install fails the
tests; ``PTYCHO_ML_SKIP_INTEROP=1`` skips them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from ptycho_ml.physics import simulate
from ptycho_ml.data import IntensityWarning, ScanData, load_scan
from ptycho_ml.data.ptychodus import (
    DEFAULT_GEOMETRY,
    PtychodusWarning,
    geometry_from_scan,
    load_ptychodus_pair,
    npz_to_ptychodus,
    ptychodus_to_npz,
    scan_indexes,
    write_diffraction,
    write_product,
)
from ptycho_ml.errors import PtychoInputError

REPO = Path(__file__).resolve().parents[1]
ORACLE = Path(__file__).with_name("ptychodus_oracle.py")
PTYCHODUS_VERSION = "1.7.0"

# A geometry unlike the defaults, with width != height everywhere, to catch x/y swaps.
GEOMETRY = {
    "object_pixel_width_m": 20e-9, "object_pixel_height_m": 25e-9,
    "object_center_x_m": 1.5e-6, "object_center_y_m": -2.25e-6,
    "detector_object_distance_m": 1.7, "photon_energy_eV": 9100.0,
    "probe_photon_count": 1.0e6, "exposure_time_s": 0.1,
    "detector_pixel_width_m": 75e-6, "detector_pixel_height_m": 80e-6,
}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sim() -> simulate.SimulatedScan:
    cfg = simulate.default_configs()["test"].replace(object_size_px=100, step_px=8)
    return simulate.simulate_scan(cfg)


@pytest.fixture(scope="module")
def sim_npz(sim, tmp_path_factory) -> Path:
    return simulate.write_simulated(sim, tmp_path_factory.mktemp("sim") / "scan.npz")


def rich_scan(sim: simulate.SimulatedScan) -> ScanData:
    """A scan with everything non-trivial: 2 probe modes, non-square object, bad pixels, strided indexes."""
    H, W = sim.obj.shape
    obj = np.ones((H, W + 10), np.complex64)  # H != W
    obj[:, :W] = sim.obj
    probe = np.stack([sim.probe, 0.3 * np.roll(sim.probe, 3, axis=-1)]).astype(np.complex64)
    bad = np.zeros(sim.amplitude.shape[1:], bool)
    bad[5, 7] = bad[40, 2] = True
    meta = {"ptychodus": {**GEOMETRY, "name": "rich scan", "comments": "ptycho_ml test", "index_start": 100, "index_step": 3}}
    return ScanData(sim.amplitude, probe, sim.positions_px, obj.shape, obj, bad, meta, "<rich>")


def amplitudes(scan: ScanData) -> np.ndarray:
    return scan.amplitude(slice(None))


def as_counts(amplitude: np.ndarray) -> np.ndarray:
    return np.round(amplitude.astype(np.float64) ** 2)


def write_pair(tmp_path: Path, scan: ScanData) -> tuple[Path, Path]:
    return npz_to_ptychodus(scan, tmp_path / "pty")


# ----------------------------------------------------------------------------- fast round trips


def test_npz_to_ptychodus_and_back_keeps_everything(sim_npz, tmp_path):
    scan = load_scan(sim_npz)
    diffraction, product = npz_to_ptychodus(scan, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffraction.h5", "product.h5"]  # no temp files left

    back = load_scan(diffraction)  # load_scan dispatches to load_ptychodus_pair, product.h5 found beside it
    assert isinstance(back.patterns, h5py.Dataset) and back.patterns_are_counts  # streamed, not loaded
    assert back.patterns.dtype == np.uint32
    np.testing.assert_array_equal(back.patterns[()], as_counts(amplitudes(scan)))
    np.testing.assert_allclose(back.amplitude(slice(None)), amplitudes(scan), rtol=1e-6, atol=0)
    np.testing.assert_allclose(back.positions_px, scan.positions_px, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(back.probe, scan.probe)
    np.testing.assert_array_equal(back.obj, scan.obj)
    assert back.obj_shape == scan.obj_shape and back.bad_pixels is None
    meta = back.metadata["ptychodus"]
    cfg = scan.metadata["config"]
    assert meta["object_pixel_width_m"] == meta["object_pixel_height_m"] == cfg["pixel_size_m"]
    assert meta["photon_energy_eV"] == cfg["energy_eV"]
    assert meta["detector_object_distance_m"] == DEFAULT_GEOMETRY["detector_object_distance_m"]
    np.testing.assert_array_equal(scan_indexes(back), np.arange(len(scan)))
    # random batch access through the open file
    idx = np.array([7, 2, 19])  # unsorted (duplicates trip ScanData.amplitude on a raw h5py dataset)
    np.testing.assert_array_equal(as_counts(back.amplitude(idx)), as_counts(amplitudes(scan)[idx]))


def test_rich_scan_round_trips_through_files_and_npz(sim, tmp_path):
    scan = rich_scan(sim)
    diffraction, product = write_pair(tmp_path, scan)
    back = load_ptychodus_pair(str(diffraction), None)
    np.testing.assert_array_equal(as_counts(back.amplitude(slice(None))), as_counts(sim.amplitude))
    np.testing.assert_allclose(back.positions_px, scan.positions_px, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(back.probe, scan.probe)
    np.testing.assert_array_equal(back.obj, scan.obj)
    np.testing.assert_array_equal(back.bad_pixels, scan.bad_pixels)
    np.testing.assert_array_equal(scan_indexes(back), 100 + 3 * np.arange(len(scan)))
    meta = back.metadata["ptychodus"]
    assert {k: meta[k] for k in GEOMETRY} == GEOMETRY
    assert (meta["name"], meta["comments"]) == ("rich scan", "ptycho_ml test")

    # the metres on disk follow the documented formula (independent of our reader)
    with h5py.File(product) as h5:
        H, W = scan.obj_shape
        x_m = (scan.positions_px[:, 0] - (W - 1) / 2) * GEOMETRY["object_pixel_width_m"] + GEOMETRY["object_center_x_m"]
        y_m = (scan.positions_px[:, 1] - (H - 1) / 2) * GEOMETRY["object_pixel_height_m"] + GEOMETRY["object_center_y_m"]
        np.testing.assert_allclose(h5["probe_position_x_m"][()], x_m, rtol=1e-15, atol=0)
        np.testing.assert_allclose(h5["probe_position_y_m"][()], y_m, rtol=1e-15, atol=0)
        assert h5["probe"].shape == (1, 2, 64, 64) and h5["object"].shape == (1, H, W)
        assert h5["object_layer_spacing_m"].shape == (0,) and h5["loss_epochs"].shape == h5["loss_values"].shape == (0,)

    # ptychodus -> NPZ -> ptychodus keeps amplitudes, positions and the geometry
    npz = ptychodus_to_npz(back, tmp_path / "back.npz")
    again = load_scan(npz)
    np.testing.assert_array_equal(amplitudes(again), amplitudes(back))
    np.testing.assert_allclose(again.positions_px, scan.positions_px, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(again.probe, scan.probe)
    np.testing.assert_array_equal(again.obj, scan.obj)
    assert {k: geometry_from_scan(again)[k] for k in GEOMETRY} == GEOMETRY
    d2, p2 = npz_to_ptychodus(again, tmp_path / "again")
    with h5py.File(product) as a, h5py.File(p2) as b:
        for key in ("probe_position_indexes", "probe_position_x_m", "probe_position_y_m", "probe", "object"):
            np.testing.assert_array_equal(a[key][()], b[key][()])
        assert dict(a.attrs) == dict(b.attrs)


def test_geometry_defaults_for_a_plain_npz(sim):
    scan = ScanData(sim.amplitude, sim.probe, sim.positions_px, sim.obj.shape, sim.obj)
    geometry = geometry_from_scan(scan)
    assert {k: geometry[k] for k in DEFAULT_GEOMETRY} == DEFAULT_GEOMETRY
    wavelength_m = 1.239841984e-6 / 8800.0
    assert geometry["detector_pixel_width_m"] == pytest.approx(wavelength_m * 2.0 / (64 * 20e-9), rel=1e-9)


def test_patterns_pair_with_positions_by_index(sim, tmp_path):
    scan = rich_scan(sim)
    M = len(scan)
    write_diffraction(tmp_path / "diffraction.h5", scan)  # indexes 100, 103, ...
    indexes = scan_indexes(scan)
    keep = np.arange(2, M)  # the first two patterns have no position
    order = np.random.default_rng(0).permutation(keep)  # positions in another order...
    order = np.concatenate([order, order[:3]])  # ...with two duplicated indexes (averaged)...
    position_indexes = np.append(indexes[order][:-1], 9999)  # ...and one index without a pattern
    write_product(tmp_path / "product.h5", obj=scan.obj, probe=scan.probe, positions_px=scan.positions_px[order],
                  position_indexes=position_indexes, geometry=GEOMETRY)
    with pytest.warns(PtychodusWarning, match="2 of 25 patterns have no probe position"):
        back = load_ptychodus_pair(str(tmp_path / "diffraction.h5"), str(tmp_path / "product.h5"))
    assert len(back) == M - 2
    np.testing.assert_allclose(back.positions_px, scan.positions_px[keep], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(scan_indexes(back), indexes[keep])
    np.testing.assert_array_equal(as_counts(back.amplitude(slice(None))), as_counts(sim.amplitude[keep]))
    np.testing.assert_array_equal(as_counts(back.amplitude(np.array([5, 0, 5]))), as_counts(sim.amplitude[keep][[5, 0, 5]]))
    subset = back.subset(np.array([1, 3]))
    np.testing.assert_array_equal(as_counts(subset.amplitude(slice(None))), as_counts(sim.amplitude[keep][[1, 3]]))


def test_probe_coherent_modes_and_object_layers(sim, tmp_path):
    diffraction, product = write_pair(tmp_path, rich_scan(sim))
    with h5py.File(product, "a") as h5:
        probe = h5["probe"][()]
        del h5["probe"]
        h5.create_dataset("probe", data=np.concatenate([probe, 2 * probe]))  # [C=2, I=2, N, N]
        obj = h5["object"][()]
        attrs = dict(h5["object"].attrs)
        del h5["object"]
        h5.create_dataset("object", data=np.concatenate([obj, 0.5 * obj])).attrs.update(attrs)
    with pytest.warns(PtychodusWarning) as record:
        back = load_ptychodus_pair(str(diffraction), str(product))
    messages = " ".join(str(w.message) for w in record)
    assert "coherent (OPR) modes" in messages and "2 layers" in messages
    np.testing.assert_array_equal(back.probe, probe[0])
    np.testing.assert_array_equal(back.obj, obj[0])


def test_legacy_energy_attribute_and_single_mode_probe(sim, tmp_path):
    scan = ScanData(sim.amplitude, sim.probe, sim.positions_px, sim.obj.shape, sim.obj)
    diffraction, product = write_pair(tmp_path, scan)
    with h5py.File(product, "a") as h5:
        h5.attrs["probe_energy_eV"] = h5.attrs.pop("photon_energy_eV") + 1
    back = load_ptychodus_pair(str(diffraction), str(product))
    assert back.metadata["ptychodus"]["photon_energy_eV"] == 8801.0
    assert back.probe.shape == (64, 64)


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture
def pair(sim, tmp_path) -> tuple[Path, Path]:
    return write_pair(tmp_path, ScanData(sim.amplitude, sim.probe, sim.positions_px, sim.obj.shape, sim.obj))


def _edit(path: Path, fn) -> None:
    with h5py.File(path, "a") as h5:
        fn(h5)


def test_missing_product_file(pair):
    diffraction, product = pair
    product.unlink()
    with pytest.raises(PtychoInputError, match=r"diffraction\.h5: no product\.h5 beside it"):
        load_scan(diffraction)
    with pytest.raises(PtychoInputError, match=r"elsewhere\.h5: file not found, expected the ptychodus product\.h5"):
        load_ptychodus_pair(str(diffraction), str(product.with_name("elsewhere.h5")))


@pytest.mark.parametrize("which, name, message", [
    ("product", "probe_position_x_m", r"product\.h5: field 'probe_position_x_m': found no such dataset"),
    ("product", "object", r"product\.h5: field 'object': found no such dataset"),
    ("product", "probe", r"product\.h5: field 'probe': found no such dataset"),
    ("diffraction", "indexes", r"diffraction\.h5: field 'indexes': found no such dataset"),
])
def test_missing_dataset(pair, which, name, message):
    diffraction, product = pair
    _edit(product if which == "product" else diffraction, lambda h5: h5.__delitem__(name))
    with pytest.raises(PtychoInputError, match=message):
        load_ptychodus_pair(str(diffraction), str(product))


def test_missing_attributes(pair):
    diffraction, product = pair
    _edit(product, lambda h5: h5["object"].attrs.__delitem__("center_y_m"))
    with pytest.raises(PtychoInputError, match=r"field 'object\.center_y_m': found no such attribute"):
        load_ptychodus_pair(str(diffraction), str(product))
    _edit(product, lambda h5: h5.attrs.__delitem__("photon_energy_eV"))
    with pytest.raises(PtychoInputError, match=r"field 'photon_energy_eV'.*legacy 'probe_energy_eV'"):
        load_ptychodus_pair(str(diffraction), str(product))


def test_pattern_probe_size_mismatch(pair, sim):
    diffraction, product = pair

    def shrink(h5):
        probe = h5["probe"][()][..., 16:48, 16:48]
        attrs = dict(h5["probe"].attrs)
        del h5["probe"]
        h5.create_dataset("probe", data=probe).attrs.update(attrs)
    _edit(product, shrink)
    with pytest.raises(PtychoInputError, match=r"field 'probe': found 32x32 pixels, expected the 64x64 pattern size"):
        load_ptychodus_pair(str(diffraction), str(product))


def test_no_matching_indexes(pair):
    diffraction, product = pair
    _edit(product, lambda h5: h5["probe_position_indexes"].__setitem__(slice(None), h5["probe_position_indexes"][()] + 1000))
    with pytest.raises(PtychoInputError, match=r"field 'probe_position_indexes': found no index matching the 25 pattern "
                                               r"indexes .*patterns \[0, 24\], positions \[1000, 1024\]"):
        load_ptychodus_pair(str(diffraction), str(product))


def test_positions_outside_object(pair):
    diffraction, product = pair
    _edit(product, lambda h5: h5["probe_position_x_m"].__setitem__(0, 1e-3))
    with pytest.raises(PtychoInputError, match=r"product\.h5: .*1 position\(s\) outside the object"):
        load_ptychodus_pair(str(diffraction), str(product))


def test_probe_pixel_size_must_match_object(pair):
    diffraction, product = pair
    _edit(product, lambda h5: h5["probe"].attrs.__setitem__("pixel_width_m", 40e-9))
    with pytest.raises(PtychoInputError, match=r"field 'probe\.pixel_width_m': found 4e-08 m, expected the object pixel width"):
        load_ptychodus_pair(str(diffraction), str(product))


def test_write_product_rejects_missing_geometry(sim, tmp_path):
    with pytest.raises(PtychoInputError, match=r"geometry: found no \['photon_energy_eV'\]"):
        write_product(tmp_path / "product.h5", obj=sim.obj, probe=sim.probe, positions_px=sim.positions_px,
                      position_indexes=None, geometry={k: v for k, v in GEOMETRY.items() if k != "photon_energy_eV"})
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- ptychodus itself as the oracle


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _has_ptychodus(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "from importlib.metadata import version; print(version('ptychodus'))"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == PTYCHODUS_VERSION


@pytest.fixture(scope="session")
def ptychodus_python() -> Path:
    """Python of a venv with ptychodus 1.7.0 (created once, ~1 GB, about a minute)."""
    if os.environ.get("PTYCHO_ML_SKIP_INTEROP") == "1":
        pytest.skip("PTYCHO_ML_SKIP_INTEROP=1")
    venv = Path(os.environ.get("PTYCHODUS_VENV", REPO / ".venv-ptychodus"))
    python = _venv_python(venv)
    if not _has_ptychodus(python):
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "--disable-pip-version-check", f"ptychodus=={PTYCHODUS_VERSION}"]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                pytest.fail(f"{' '.join(step)} failed (rc {done.returncode}); set PTYCHO_ML_SKIP_INTEROP=1 to skip the "
                            f"ptychodus interop tests:\n{(done.stdout + done.stderr)[-3000:]}")
        assert _has_ptychodus(python), f"{venv}: ptychodus {PTYCHODUS_VERSION} not importable after installing it"
    return python


def run_oracle(python: Path, *args: str | Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([str(python), str(ORACLE), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"ptychodus oracle failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.interop
@pytest.mark.slow
def test_ptychodus_opens_our_files(ptychodus_python, sim, tmp_path):
    scan = rich_scan(sim)
    diffraction = write_diffraction(tmp_path / "diffraction.h5", scan)
    product = write_product(tmp_path / "product.h5", obj=scan.obj, probe=scan.probe, positions_px=scan.positions_px,
                            position_indexes=scan_indexes(scan), geometry=geometry_from_scan(scan),
                            loss_epochs=[1, 2, 3], loss_values=[3.0, 2.0, 1.5], name="ours", comments="written by ptycho_ml")
    got = run_oracle(ptychodus_python, "read", diffraction, product, tmp_path / "oracle.npz")
    arrays = np.load(tmp_path / "oracle.npz")

    assert got["ptychodus_version"] == PTYCHODUS_VERSION
    H, W = scan.obj_shape
    assert (got["object_height_px"], got["object_width_px"], got["object_num_layers"]) == (H, W, 1)
    np.testing.assert_array_equal(arrays["object"][0], scan.obj)
    np.testing.assert_array_equal(arrays["probe"], scan.probe[None])  # [C=1, I=2, N, N]
    assert (got["probe_num_coherent_modes"], got["probe_num_incoherent_modes"]) == (1, 2)
    for key in ("object_pixel_width_m", "object_pixel_height_m", "object_center_x_m", "object_center_y_m",
                "detector_object_distance_m", "photon_energy_eV", "probe_photon_count", "exposure_time_s",
                "detector_pixel_width_m", "detector_pixel_height_m"):
        assert got[key] == GEOMETRY[key], key
    assert got["probe_pixel_width_m"] == GEOMETRY["object_pixel_width_m"]
    assert got["probe_pixel_height_m"] == GEOMETRY["object_pixel_height_m"]
    assert (got["name"], got["comments"], got["far_field"]) == ("ours", "written by ptycho_ml", True)
    np.testing.assert_array_equal(arrays["loss_epochs"], [1, 2, 3])
    np.testing.assert_array_equal(arrays["loss_values"], [3.0, 2.0, 1.5])

    # positions: metres by the documented formula, and ptychodus maps them back to our pixels
    x_m = (scan.positions_px[:, 0] - (W - 1) / 2) * GEOMETRY["object_pixel_width_m"] + GEOMETRY["object_center_x_m"]
    y_m = (scan.positions_px[:, 1] - (H - 1) / 2) * GEOMETRY["object_pixel_height_m"] + GEOMETRY["object_center_y_m"]
    np.testing.assert_allclose(arrays["x_m"], x_m, rtol=1e-15, atol=0)
    np.testing.assert_allclose(arrays["y_m"], y_m, rtol=1e-15, atol=0)
    np.testing.assert_allclose(arrays["x_px"], scan.positions_px[:, 0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(arrays["y_px"], scan.positions_px[:, 1], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(arrays["position_indexes"], scan_indexes(scan))

    # diffraction: ptychodus pairs every pattern with its position, counts as written
    assert got["patterns_dtype"] == "uint32" and got["num_paired"] == len(scan)
    np.testing.assert_array_equal(arrays["pattern_indexes"], scan_indexes(scan))
    np.testing.assert_array_equal(arrays["patterns"], as_counts(sim.amplitude))
    np.testing.assert_array_equal(arrays["bad_pixels"], scan.bad_pixels)
    np.testing.assert_array_equal(arrays["paired_indexes"], scan_indexes(scan))
    np.testing.assert_allclose(arrays["paired_x_px"], scan.positions_px[:, 0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(arrays["paired_y_px"], scan.positions_px[:, 1], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(arrays["paired_patterns"], as_counts(sim.amplitude))


@pytest.mark.interop
@pytest.mark.slow
def test_we_read_files_ptychodus_writes(ptychodus_python, sim, tmp_path):
    M, N = sim.amplitude.shape[:2]
    H, W = sim.obj.shape
    obj = np.stack([sim.obj, np.ones_like(sim.obj)])  # 2 layers; we use layer 0
    probe = np.stack([sim.probe, 0.2 * sim.probe.conj()])  # 2 incoherent modes
    counts = as_counts(sim.amplitude).astype(np.uint16)
    extra = np.random.default_rng(1).poisson(3.0, (1, N, N)).astype(np.uint16)
    patterns = np.concatenate([extra, counts])  # a pattern (index 2) outside the scanned index range
    pattern_indexes = np.concatenate([[2], 5 + np.arange(M)])
    position_indexes = np.concatenate([5 + np.arange(M), [500]])  # a position without pattern
    positions_px = np.concatenate([sim.positions_px, [[H / 2, W / 2]]])
    x_m = (positions_px[:, 0] - (W - 1) / 2) * GEOMETRY["object_pixel_width_m"] + GEOMETRY["object_center_x_m"]
    y_m = (positions_px[:, 1] - (H - 1) / 2) * GEOMETRY["object_pixel_height_m"] + GEOMETRY["object_center_y_m"]
    bad = np.zeros((N, N), bool)
    bad[3, 60] = True
    meta = {**GEOMETRY, "name": "from ptychodus", "comments": "oracle", "object_layer_spacing_m": [1e-6]}
    np.savez(tmp_path / "in.npz", meta=np.array(json.dumps(meta)), patterns=patterns, pattern_indexes=pattern_indexes,
             bad_pixels=bad, probe=probe, object=obj, position_indexes=position_indexes, x_m=x_m, y_m=y_m,
             loss_epochs=np.array([0, 1]), loss_values=np.array([0.5, 0.25]))
    out = tmp_path / "written"
    got = run_oracle(ptychodus_python, "write", tmp_path / "in.npz", out)
    assert got["num_paired"] == M
    expected = np.load(out / "expected.npz")

    with pytest.warns(PtychodusWarning) as record:
        scan = load_scan(out / "diffraction.h5")
    messages = " ".join(str(w.message) for w in record)
    assert "1 of 26 patterns have no probe position" in messages and "2 layers" in messages
    assert len(scan) == M and scan.patterns_are_counts
    np.testing.assert_array_equal(scan_indexes(scan), expected["indexes"])
    np.testing.assert_allclose(scan.positions_px[:, 0], expected["x_px"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(scan.positions_px[:, 1], expected["y_px"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(scan.positions_px, sim.positions_px, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(scan.amplitude(slice(None)), np.sqrt(expected["patterns"].astype(np.float32)))
    np.testing.assert_array_equal(as_counts(scan.amplitude(slice(None))), counts)
    np.testing.assert_array_equal(scan.probe, probe.astype(np.complex64))
    np.testing.assert_array_equal(scan.obj, sim.obj)
    np.testing.assert_array_equal(scan.bad_pixels, bad)
    recorded = scan.metadata["ptychodus"]
    for key in ("object_pixel_width_m", "object_pixel_height_m", "object_center_x_m", "object_center_y_m",
                "detector_object_distance_m", "photon_energy_eV", "probe_photon_count", "exposure_time_s",
                "detector_pixel_width_m", "detector_pixel_height_m"):
        assert recorded[key] == GEOMETRY[key], key
    assert (recorded["name"], recorded["comments"]) == ("from ptychodus", "oracle")
    assert recorded["loss_values"] == [0.5, 0.25]

    # ptychodus's own PtychoPINN NPZ export of the same scan agrees with our reading of its files
    with pytest.warns(IntensityWarning):  # diff3d holds uint16 counts
        exported = load_scan(out / "ptychopinn.npz")
    np.testing.assert_allclose(exported.positions_px, scan.positions_px, rtol=0, atol=1e-9)
    good = ~bad  # the export zeroes bad pixels
    np.testing.assert_array_equal(exported.amplitude(slice(None))[:, good], scan.amplitude(slice(None))[:, good])
    np.testing.assert_array_equal(exported.probe, scan.probe)
    np.testing.assert_array_equal(exported.obj, scan.obj)
