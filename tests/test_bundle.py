"""wts.h5.zip: exact round trips, manifest, atomic writes, and a clear error for every bad archive."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

import ptycho_ml
from ptycho_ml.model import bundle as bundle_mod
from ptycho_ml.model.bundle import FORMAT_VERSION, REQUIRED_MODELS, inspect_bundle, read_bundle, write_bundle
from ptycho_ml.errors import PtychoInputError


# ----------------------------------------------------------------------------- fixtures and helpers


@contextlib.contextmanager
def _raises(match: str):
    """pytest.raises(PtychoInputError, match=...) that also checks the message is one line."""
    with pytest.raises(PtychoInputError, match=match) as info:
        yield info
    assert "\n" not in str(info.value)


def _state(seed: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    generator = {
        "generator.enc.0.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "generator.enc.0.bias": rng.standard_normal(4).astype(np.float32),
        "generator.enc.1.running_mean": rng.standard_normal(4),  # float64
        "generator.enc.1.num_batches_tracked": np.array(7, dtype=np.int64),  # 0-d
        "generator.head.phase_offset": (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
        "generator.mask": rng.random(5) > 0.5,
        "generator.empty": np.zeros((0, 2), np.float32),
    }
    return {"diffraction_to_obj": {**generator, "log_scale": np.array([0.5], np.float32)},
            "autoencoder": {k: v.copy() for k, v in generator.items()}}


def _probe(k: int | None = 2, n: int = 8) -> np.ndarray:
    rng = np.random.default_rng(1)
    shape = (n, n) if k is None else (k, n, n)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


CONFIG = {"model": {"n_filters": 4, "probe_big": True}, "physics": {"N": 8, "energy_eV": 8800.0}, "seed": 3}


def _write(path: Path, **overrides) -> Path:
    kwargs = dict(models=_state(0), probe=_probe(), amplitude_scale=123.5, config=CONFIG,
                  extra={"val_loss": 0.25, "epochs": 2})
    kwargs.update(overrides)
    return write_bundle(path, **kwargs)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return _write(tmp_path / "model.wts.h5.zip")


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _repack(src: Path, dst: Path, *, h5: bytes | None = None, manifest: dict | None = None,
            fix_sha: bool = True) -> Path:
    """Rebuild ``src`` as ``dst`` with a replaced wts.h5 and/or manifest (checksum updated unless told not)."""
    members = _members(src)
    man = manifest if manifest is not None else json.loads(members["manifest.json"])
    if h5 is not None:
        members["wts.h5"] = h5
        if fix_sha:
            man["members"]["wts.h5"] = {"sha256": hashlib.sha256(h5).hexdigest(), "size": len(h5)}
    return _zip(dst, [("manifest.json", json.dumps(man).encode()), ("wts.h5", members["wts.h5"])])


def _edit_h5(src: Path, tmp_path: Path, edit) -> bytes:
    """Return the bytes of src's wts.h5 after ``edit(h5py.File)``."""
    scratch = tmp_path / "scratch.h5"
    scratch.write_bytes(_members(src)["wts.h5"])
    with h5py.File(scratch, "r+") as f:
        edit(f)
    return scratch.read_bytes()


class _Payload:
    """Unpickling this runs ``Path(marker).touch()``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ----------------------------------------------------------------------------- round trip and layout


@pytest.mark.parametrize("k", [None, 3])
def test_round_trip_is_bit_identical(tmp_path: Path, k: int | None) -> None:
    models, probe = _state(0), _probe(k)
    path = _write(tmp_path / "m.wts.h5.zip", models=models, probe=probe)
    loaded = read_bundle(path)
    assert list(loaded.models) == list(models)
    for name, state in models.items():
        assert list(loaded.models[name]) == list(state)  # order kept
        for key, array in state.items():
            got = loaded.models[name][key]
            assert isinstance(got, np.ndarray) and got.dtype == array.dtype and got.shape == array.shape, key
            assert np.array_equal(got, array), key
    assert loaded.probe.dtype == np.complex64 and np.array_equal(loaded.probe, probe)
    assert loaded.amplitude_scale == 123.5
    assert loaded.config == CONFIG and loaded.extra == {"val_loss": 0.25, "epochs": 2}


def test_probe_is_stored_complex64_and_extra_defaults_to_empty(tmp_path: Path) -> None:
    probe128 = _probe().astype(np.complex128)
    loaded = read_bundle(_write(tmp_path / "m.zip", probe=probe128, extra=None))
    assert loaded.probe.dtype == np.complex64 and np.array_equal(loaded.probe, probe128.astype(np.complex64))
    assert loaded.extra == {}


def test_manifest_contents(good: Path) -> None:
    members = _members(good)
    assert list(members) == ["manifest.json", "wts.h5"]
    man = json.loads(members["manifest.json"])
    assert man["format"] == "ptycho_ml.wts.h5.zip" and man["format_version"] == FORMAT_VERSION == 1
    assert man["backend"] == "torch" and man["package_version"] == ptycho_ml.__version__
    assert man["created_utc"].endswith("Z")
    assert man["members"] == {"wts.h5": {"sha256": hashlib.sha256(members["wts.h5"]).hexdigest(),
                                         "size": len(members["wts.h5"])}}
    state = _state(0)
    assert man["models"] == {n: {"n_arrays": len(s), "n_values": sum(a.size for a in s.values())}
                             for n, s in state.items()}
    assert man["shapes"] == {n: {k: list(a.shape) for k, a in s.items()} for n, s in state.items()}
    assert read_bundle(good).manifest == man


def test_wts_h5_is_plain_hdf5(good: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(good) as zf:
        zf.extractall(tmp_path / "out")
    with h5py.File(tmp_path / "out" / "wts.h5", "r") as f:
        assert set(f) == {*REQUIRED_MODELS, "probe"}
        assert "generator.enc.0.weight" in f["autoencoder"]
        assert f["diffraction_to_obj/generator.enc.0.weight"].dtype == np.float32
        assert f["probe"].dtype == np.complex64 and f["probe"].shape == (2, 8, 8)
        assert f.attrs["amplitude_scale"] == 123.5 and int(f.attrs["format_version"]) == 1
        assert json.loads(f.attrs["config_json"]) == CONFIG and json.loads(f.attrs["extra_json"])["epochs"] == 2


def test_weights_member_is_deterministic(tmp_path: Path) -> None:
    a, b = _write(tmp_path / "a.zip"), _write(tmp_path / "b.zip")
    assert _members(a)["wts.h5"] == _members(b)["wts.h5"]


def test_inspect_summarises_without_loading(good: Path) -> None:
    info = inspect_bundle(good)
    json.dumps(info)  # JSON-safe
    assert set(info["members"]) == {"manifest.json", "wts.h5"}
    assert info["manifest"]["format_version"] == 1 and info["amplitude_scale"] == 123.5
    assert info["probe"] == {"shape": [2, 8, 8], "dtype": "complex64"}
    dto = info["models"]["diffraction_to_obj"]
    assert dto["n_arrays"] == 8 and dto["n_values"] == 36 + 4 + 4 + 1 + 3 + 5 + 0 + 1
    assert dto["arrays"]["generator.enc.0.weight"] == {"shape": [4, 1, 3, 3], "dtype": "float32"}
    assert info["config"] == CONFIG


# ----------------------------------------------------------------------------- atomic writes


def _fail_second_writestr(monkeypatch: pytest.MonkeyPatch) -> None:
    original, calls = zipfile.ZipFile.writestr, []

    def writestr(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", writestr)


def _fail_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd):
        raise OSError("I/O error (simulated)")

    monkeypatch.setattr(bundle_mod.os, "fsync", fsync)


@pytest.mark.parametrize("fail", [_fail_second_writestr, _fail_fsync])
def test_failed_write_leaves_existing_file_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail) -> None:
    path = _write(tmp_path / "m.wts.h5.zip")
    before = path.read_bytes()
    fail(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        _write(path, models=_state(1))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.wts.h5.zip"]
    monkeypatch.undo()
    read_bundle(path)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_second_writestr(monkeypatch)
    with pytest.raises(OSError):
        _write(tmp_path / "new.zip")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- write validation


@pytest.mark.parametrize("overrides, match", [
    ({"models": {"diffraction_to_obj": {"w": np.ones(2)}}}, r"field 'models'.*missing \['autoencoder'\]"),
    ({"models": {**_state(0), "autoencoder": {"w": np.array([object()])}}}, r"'w'\]': found dtype object"),
    ({"models": {**_state(0), "autoencoder": {"w": np.array(["a"])}}}, r"expected a numeric array"),
    ({"models": {**_state(0), "autoencoder": {"a/b": np.ones(2)}}}, r"array name 'a/b'"),
    ({"models": {**_state(0), "autoencoder": {}}}, r"expected a non-empty dict"),
    ({"amplitude_scale": float("nan")}, r"amplitude_scale': found nan, expected a finite float > 0"),
    ({"amplitude_scale": 0.0}, r"amplitude_scale': found 0.0"),
    ({"amplitude_scale": -2}, r"amplitude_scale': found -2.0"),
    ({"amplitude_scale": True}, r"amplitude_scale': found True"),
    ({"probe": np.ones((2, 3), np.complex64)}, r"probe': found shape \(2, 3\)"),
    ({"probe": np.full((4, 4), np.nan, np.complex64)}, r"probe': found non-finite"),
    ({"config": {"x": object()}}, r"config': found non-JSON content"),
    ({"config": {"x": float("inf")}}, r"config': found non-JSON content"),
])
def test_write_rejects_bad_input(tmp_path: Path, overrides: dict, match: str) -> None:
    with _raises(match):
        _write(tmp_path / "m.zip", **overrides)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- bad archives


def test_missing_path(tmp_path: Path) -> None:
    with _raises(r"nope\.zip: file not found, expected a wts\.h5\.zip"):
        read_bundle(tmp_path / "nope.zip")


def test_directory(tmp_path: Path) -> None:
    with _raises("found a directory"):
        read_bundle(tmp_path)


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "m.zip"
    path.write_text("hello world")
    with _raises(r"m\.zip: not a zip archive: found leading bytes b'hello wo'"):
        read_bundle(path)


def test_bare_hdf5_is_not_a_zip(good: Path, tmp_path: Path) -> None:
    path = tmp_path / "wts.h5"
    path.write_bytes(_members(good)["wts.h5"])
    with _raises("not a zip archive: found a bare HDF5 file"):
        inspect_bundle(path)


def test_truncated_zip(good: Path) -> None:
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with _raises(r"model\.wts\.h5\.zip: truncated or corrupt zip archive"):
        read_bundle(good)


def test_corrupt_member_bytes(good: Path) -> None:
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo("wts.h5")
    data = bytearray(good.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.file_size // 2] ^= 0xFF
    good.write_bytes(bytes(data))
    with _raises(r"member 'wts\.h5' is truncated or corrupt \(Bad CRC-32"):
        read_bundle(good)


def test_checksum_mismatch(good: Path, tmp_path: Path) -> None:
    h5 = _edit_h5(good, tmp_path, lambda f: f["autoencoder/generator.enc.0.bias"].__setitem__(0, 42.0))
    bad = _repack(good, tmp_path / "bad.zip", h5=h5, fix_sha=False)
    with _raises(r"bad\.zip: member 'wts\.h5' fails its sha256 checksum: found [0-9a-f]{64}"):
        read_bundle(bad)


def test_manifest_missing(good: Path, tmp_path: Path) -> None:
    bad = _zip(tmp_path / "bad.zip", [("wts.h5", _members(good)["wts.h5"])])
    with _raises(r"bad\.zip: member 'manifest\.json' is missing \(found \['wts\.h5'\]\)"):
        read_bundle(bad)


def test_weights_missing(good: Path, tmp_path: Path) -> None:
    bad = _zip(tmp_path / "bad.zip", [("manifest.json", _members(good)["manifest.json"])])
    with _raises(r"member 'wts\.h5' is missing"):
        read_bundle(bad)


def test_manifest_invalid_json(good: Path, tmp_path: Path) -> None:
    bad = _zip(tmp_path / "bad.zip", [("manifest.json", b"{not json"), ("wts.h5", _members(good)["wts.h5"])])
    with _raises(r"bad\.zip: member 'manifest\.json' is not valid JSON \(.*line 1"):
        read_bundle(bad)


def _manifest(good: Path, **changes) -> dict:
    man = json.loads(_members(good)["manifest.json"])
    man.update(changes)
    return man


@pytest.mark.parametrize("changes, match", [
    ({"format_version": 2}, r"field 'manifest\.json:format_version': found 2, expected 1 \(the only version supported"),
    ({"format_version": "1"}, r"format_version': found '1', expected 1"),
    ({"format": "keras"}, r"field 'manifest\.json:format': found 'keras', expected 'ptycho_ml\.wts\.h5\.zip'"),
    ({"backend": "tensorflow"}, r"manifest\.json:backend': found 'tensorflow', expected 'torch'"),
    ({"members": {"wts.h5": {"sha256": "abc", "size": 1}}}, r"manifest\.json:members'"),
    ({"models": {"autoencoder": {"n_arrays": 1, "n_values": 2}, "diffraction_to_obj": {"n_arrays": 8, "n_values": 54}}},
     r"field 'manifest\.json:models\.autoencoder': found \{\"n_arrays\": 1, .*expected .*as found in wts\.h5"),
])
def test_manifest_fields(good: Path, tmp_path: Path, changes: dict, match: str) -> None:
    bad = _repack(good, tmp_path / "bad.zip", manifest=_manifest(good, **changes))
    with _raises(match):
        read_bundle(bad)


def test_manifest_not_an_object(good: Path, tmp_path: Path) -> None:
    bad = _zip(tmp_path / "bad.zip", [("manifest.json", b"[1, 2]"), ("wts.h5", _members(good)["wts.h5"])])
    with _raises(r"field 'manifest\.json': found a JSON list, expected a JSON object"):
        read_bundle(bad)


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil", "/etc/evil", "..\\evil", "C:/evil"])
def test_zip_slip_rejected_before_reading(good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          name: str) -> None:
    members = _members(good)
    bad = _zip(tmp_path / "bad.zip", [*members.items(), (name, b"x")])

    def no_reads(*args, **kwargs):
        raise AssertionError("a member was read")

    monkeypatch.setattr(zipfile.ZipFile, "open", no_reads)
    with _raises(r"bad\.zip: unsafe member name .*path traversal or absolute path.*"
                                               r"nothing was read"):
        read_bundle(bad)


def test_unexpected_member(good: Path, tmp_path: Path) -> None:
    bad = _zip(tmp_path / "bad.zip", [*_members(good).items(), ("notes.txt", b"hi")])
    with _raises(r"unexpected member 'notes\.txt', expected only members "
                                               r"'manifest\.json' and 'wts\.h5'"):
        read_bundle(bad)


def test_duplicate_member(good: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        bad = _zip(tmp_path / "bad.zip", [*_members(good).items(), ("wts.h5", b"other")])
    with _raises(r"member 'wts\.h5' appears 2 times, expected once"):
        read_bundle(bad)


@pytest.mark.parametrize("name", ["model.pkl", "data.pt", "archive/data.pkl"])
def test_pickle_member_rejected_and_never_executed(good: Path, tmp_path: Path, name: str) -> None:
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Payload(marker))
    probe_marker = tmp_path / "sanity"  # the payload really does run when unpickled
    pickle.loads(pickle.dumps(_Payload(probe_marker)))
    assert probe_marker.exists()
    bad = _zip(tmp_path / "bad.zip", [*_members(good).items(), (name, payload)])
    for load in (read_bundle, inspect_bundle):
        with _raises(rf"unexpected member '{name}' \(a pickle\).*"
                                                   r"pickles are never loaded"):
            load(bad)
    assert not marker.exists()


def test_pickle_posing_as_weights_is_not_unpickled(good: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    bad = _repack(good, tmp_path / "bad.zip", h5=pickle.dumps(_Payload(marker)))  # checksum made to match
    with _raises(r"member 'wts\.h5' is not a readable HDF5 file"):
        read_bundle(bad)
    assert not marker.exists()


def test_missing_model_group(good: Path, tmp_path: Path) -> None:
    h5 = _edit_h5(good, tmp_path, lambda f: f.__delitem__("autoencoder"))
    man = _manifest(good)
    del man["models"]["autoencoder"]
    bad = _repack(good, tmp_path / "bad.zip", h5=h5, manifest=man)
    with _raises(r"field 'wts\.h5:/autoencoder': found no such group "
                                               r"\(groups: \['diffraction_to_obj'\]\), expected a group"):
        read_bundle(bad)


def _set_attr(name, value):
    def edit(f):
        f.attrs[name] = value
    return edit


def _del_attr(name):
    def edit(f):
        del f.attrs[name]
    return edit


@pytest.mark.parametrize("edit, match", [
    (_del_attr("amplitude_scale"), r"field 'wts\.h5:/@amplitude_scale': found no such attribute, expected a finite"),
    (_set_attr("amplitude_scale", -1.0), r"wts\.h5:/@amplitude_scale': found -1\.0 .*expected a finite float > 0"),
    (_set_attr("amplitude_scale", "big"), r"wts\.h5:/@amplitude_scale': found 'big' \(str\)"),
    (_del_attr("format_version"), r"wts\.h5:/@format_version': found no such attribute, expected 1"),
    (_set_attr("format_version", 3), r"wts\.h5:/@format_version': found 3 .*expected 1"),
    (_set_attr("config_json", "{oops"), r"wts\.h5:/@config_json': found '\{oops' \(str\), expected a JSON object"),
    (_del_attr("extra_json"), r"wts\.h5:/@extra_json': found no such attribute"),
])
def test_bad_root_attributes(good: Path, tmp_path: Path, edit, match: str) -> None:
    bad = _repack(good, tmp_path / "bad.zip", h5=_edit_h5(good, tmp_path, edit))
    with _raises(match):
        read_bundle(bad)


def _replace_weight(data, **kwargs):
    def edit(f):
        del f["autoencoder/generator.enc.0.bias"]
        f["autoencoder"].create_dataset("generator.enc.0.bias", data=data, **kwargs)
    return edit


@pytest.mark.parametrize("edit, match", [
    (_replace_weight(["a", "b", "c", "d"], dtype=h5py.string_dtype()), r"found dtype object, expected a numeric"),
    (_replace_weight(np.array([b"abcd"] * 4)), r"found dtype \|S4, expected a numeric"),
    (_replace_weight(np.zeros(4, dtype=[("a", "f4"), ("b", "i4")])), r"found dtype .*expected a numeric"),
])
def test_unsupported_weight_dtype(good: Path, tmp_path: Path, edit, match: str) -> None:
    bad = _repack(good, tmp_path / "bad.zip", h5=_edit_h5(good, tmp_path, edit))
    with _raises(r"field 'wts\.h5:/autoencoder/generator\.enc\.0\.bias': " + match):
        read_bundle(bad)


def test_links_and_bad_probe_rejected(good: Path, tmp_path: Path) -> None:
    def link(f):
        f["autoencoder/alias"] = h5py.ExternalLink("/etc/passwd", "/")

    bad = _repack(good, tmp_path / "bad.zip", h5=_edit_h5(good, tmp_path, link))
    with _raises(r"wts\.h5:/autoencoder/alias': found a ExternalLink"):
        read_bundle(bad)

    def real_probe(f):
        del f["probe"]
        f["probe"] = np.ones((8, 8), np.float32)

    bad = _repack(good, tmp_path / "bad2.zip", h5=_edit_h5(good, tmp_path, real_probe))
    with _raises(r"wts\.h5:/probe': found float32 \(8, 8\), expected .*complex64"):
        read_bundle(bad)


def _first_weight(f: h5py.File) -> tuple[str, tuple[int, ...]]:
    key = next(iter(f["autoencoder"]))
    return key, f["autoencoder"][key].shape


def test_removed_weight_is_named(good: Path, tmp_path: Path) -> None:
    """A weight deleted from wts.h5 (checksum re-signed) is refused by name, not by a count."""
    names = []
    h5 = _edit_h5(good, tmp_path, lambda f: (names.append(_first_weight(f)[0]), f["autoencoder"].__delitem__(names[0])))
    bad = _repack(good, tmp_path / "bad.zip", h5=h5)
    with _raises(rf"field 'wts\.h5:/autoencoder': found no weight '{re.escape(names[0])}', expected "
                 rf"'{re.escape(names[0])}' of shape \[.*\] as listed in manifest\.json"):
        read_bundle(bad)


def test_reshaped_weight_is_named(good: Path, tmp_path: Path) -> None:
    seen = []

    def reshape(f: h5py.File) -> None:
        key, shape = _first_weight(f)
        seen.append((key, shape))
        data = f["autoencoder"][key][()]
        del f["autoencoder"][key]
        f["autoencoder"].create_dataset(key, data=data.reshape(-1)[:-1] if data.size > 1 else np.zeros(2, data.dtype))

    bad = _repack(good, tmp_path / "bad.zip", h5=_edit_h5(good, tmp_path, reshape))
    key, shape = seen[0]
    with _raises(rf"found weight '{re.escape(key)}' of shape \[\d+\], expected shape {re.escape(str(list(shape)))}"):
        read_bundle(bad)


def test_imports_neither_torch_nor_mlflow() -> None:
    code = "import sys, ptycho_ml.model.bundle; print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(Path(ptycho_ml.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    source = Path(bundle_mod.__file__).read_text()
    assert "torch.load" not in source and "allow_pickle" not in source
