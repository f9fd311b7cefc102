#!/usr/bin/env python
"""pty-chi iterative-reconstruction baseline (LSQ-ML or ePIE) on a PtychoPINN NPZ scan.

Runs pty-chi (PyPI package ``ptychi``, https://github.com/AdvancedPhotonSource/pty-chi)
with the known probe held fixed, positions fixed (``--refine-probe`` and
``--refine-positions`` optimise them too), a flat start object (ones) and no regularisers, and writes the reconstructed object on the same pixel
grid as the scan's ``objectGuess``.

Usage
-----
::

    # one-off: build the private virtual env (also done automatically)
    python benchmarks/ptychi_baseline.py --make-venv            # -> benchmarks/.venv-ptychi
    # reconstruct (re-executes itself with the venv's python when needed)
    python benchmarks/ptychi_baseline.py --data scan.npz --out result.npz \\
        [--algorithm lsqml|epie] [--epochs 200] [--threads 1]
    # convention self-check: noise-free simulated scan, known probe (needs ptycho_ml)
    python benchmarks/ptychi_baseline.py --check-noise-free

Input NPZ (PtychoPINN layout): ``diffraction`` (or legacy ``diff3d``) ``(M, N, N)``
amplitude = sqrt(counts) with the zero frequency at the centre (fftshifted);
``probeGuess`` ``(N, N)`` (or ``(K, N, N)`` incoherent modes) complex; ``xcoords``,
``ycoords`` ``(M,)`` patch centres in object pixels (x = column, y = row);
``objectGuess`` ``(H, W)`` complex, which sets the object size (and, when it
is the ground truth, gives the quick metrics below). Without ``objectGuess``
pass ``--object-shape H W``.

Output NPZ: ``obj`` ``(H, W)`` complex64, ``wall_s`` (``task.run()`` only, no
set-up), ``setup_s``, ``epochs``, ``algorithm``, ``ptychi_version``,
``threads``, ``batch_size``, ``loss`` (per-epoch pty-chi loss), ``shim``
(whether the torchvision shim below was used), ``shim_calls``, ``probe``
``(K, N, N)`` (after the run, on our scale) and ``positions_px`` ``(M, 2)``
(x, y; corrected with ``--refine-positions``). One JSON
line with the scalars (plus ``probe_drift``, the largest change of the probe
during the run relative to its peak, 0 when it stayed fixed, and quick metrics
when ``objectGuess`` is present) is printed last on stdout, prefixed ``RESULT``.

Conventions (pty-chi 2.2.0, measured here)
--------------------------------------
* pty-chi's far field is the unnormalised FFT; our data use ``norm="ortho"``,
  so the probe passed to it is ``probeGuess / N``.
* Data: pty-chi wants intensities with the zero frequency in the corner; we
  pass ``diffraction**2`` with ``fft_shift=True`` (pty-chi shifts it).
* Positions: our patch centres unchanged, as (y, x), with
  ``determine_position_origin_coords_by=SPECIFIED`` and
  ``position_origin_coords=(-0.5, -0.5)`` (pty-chi's patch starts at
  ``pos - (N-1)/2``, ours at ``pos - N/2``).
* The probe is fixed, so the pieces that would rescale it are switched off:
  LSQ-ML's ``rescale_probe_intensity_in_first_epoch`` and the object's
  ``remove_object_probe_ambiguity`` (on by default every 10 epochs; it
  rescales the object to unit mean transmission and multiplies the *probe*
  by the inverse, even for a non-optimisable probe).
* One thread by default (``torch.set_num_threads`` and OMP/MKL variables).

Virtual env and the torchvision shim
------------------------------------
pty-chi imports torchvision (``from torchvision.transforms import
GaussianBlur`` in ``ptychi/utils.py``), and the only torchvision wheel
available here is CUDA-linked and fails to import next to the CPU torch
2.13.0. The script therefore runs pty-chi in its own virtual env (default
``benchmarks/.venv-ptychi``, git-ignored): created with
``--system-site-packages`` (torch, numpy, scipy, ... come from the system;
``torch==2.13.0`` is pip-installed into the env only if torch is not
importable there), ``pip install --no-deps ptychi==2.2.0``, then those of
ptychi's ``Requires-Dist`` (non-extra) that are missing or too old, installed
with plain pip -- never torchvision, and not the development tools ptychi
lists as run-time requirements (mypy, pytest, ruff), which it never imports.

Before importing ptychi the runner tries ``import torchvision``. If that
fails (for any reason), it writes a small package named ``torchvision`` into a
temporary directory, prepends that directory to ``sys.path`` of this process
only (nothing is installed anywhere), and says so on stderr. The shim provides
exactly what pty-chi 2.2.0 uses -- ``torchvision.transforms.GaussianBlur``
(and the ``torchvision.transforms.functional.gaussian_blur`` it wraps) --
with torchvision's semantics: a separable normalised Gaussian kernel sampled
at integer offsets, reflect padding, a depthwise ``torch.nn.functional.conv2d``,
sigma drawn uniformly from ``(min, max)`` per call. It counts its calls.

Is the blur on our code path? No. In pty-chi 2.2.0 ``GaussianBlur`` is used
only by ``utils.generate_gaussian_random_image`` with ``smoothing > 0``, which
only ``utils.generate_initial_object(method="random")`` calls; we pass our own
flat initial object, and the other caller (``add_additional_opr_probe_modes_
to_probe``) uses ``smoothing=0``. The shim's call counter is reported
(``shim_calls``) and is 0 on LSQ-ML and ePIE runs; it is there so pty-chi can
be imported at all.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
DEFAULT_VENV = HERE / ".venv-ptychi"
PTYCHI_SPEC = "ptychi==2.2.0"
# The project's one torch pin (python_env.yaml), for a venv that has no torch yet.
TORCH_SPEC = next(line.strip().lstrip("- ").strip() for line in (REPO_ROOT / "python_env.yaml").read_text().splitlines()
                  if line.strip().startswith("- torch=="))
# ptychi's Requires-Dist that we never install: torchvision (see docstring)
# and development tools that ptychi lists but never imports at run time.
NEVER_INSTALL = {"torchvision", "mypy", "pytest", "ruff"}
READY_MARKER = "ptychi_baseline_ready.json"
IN_VENV_ENV = "PTYCHI_BASELINE_IN_VENV"


def log(msg: str) -> None:
    """Progress and notes go to stderr; stdout keeps the RESULT line."""
    print(f"[ptychi_baseline] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Virtual env


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _venv_ok(py: Path, code: str) -> bool:
    """True if ``code`` runs without error in the venv's python."""
    return subprocess.run([str(py), "-c", code], capture_output=True).returncode == 0


def _pip(py: Path, *args: str) -> None:
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", *args]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


_REQ_PROBE = r"""
import json, re, importlib.metadata as md
try:
    from packaging.requirements import Requirement
except ImportError:
    Requirement = None
rows = []
for text in md.requires("ptychi") or []:
    if Requirement is not None:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name, spec = req.name, req.specifier
    else:
        if "extra ==" in text:
            continue
        name, spec = re.split(r"[ ;<>=!~\[(]", text, maxsplit=1)[0], None
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    ok = have is not None and (spec is None or spec.contains(have, prereleases=True))
    rows.append({"name": name, "req": text.split(";")[0].strip(), "have": have, "ok": ok})
print(json.dumps(rows))
"""


def make_venv(venv: Path, ptychi_spec: str = PTYCHI_SPEC) -> dict:
    """Create (or refresh) the venv with ptychi and its missing run-time deps.

    Returns the description written to ``venv/ptychi_baseline_ready.json``.
    """
    venv = venv.resolve()
    py = venv_python(venv)
    if not py.exists():
        log(f"creating virtual env {venv} (--system-site-packages)")
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    if not _venv_ok(py, "import torch"):
        log(f"torch is not importable in the venv: installing {TORCH_SPEC} into it")
        _pip(py, TORCH_SPEC)
    _pip(py, "--no-deps", ptychi_spec)
    rows = json.loads(subprocess.run([str(py), "-c", _REQ_PROBE], check=True,
                                     capture_output=True, text=True).stdout)
    todo = [r["req"] for r in rows if not r["ok"] and r["name"].lower() not in NEVER_INSTALL]
    skipped = [r["req"] for r in rows if not r["ok"] and r["name"].lower() in NEVER_INSTALL]
    if todo:
        log("installing ptychi requirements missing from the venv: " + ", ".join(todo))
        _pip(py, *todo)
    if skipped:
        log("not installing (see module docstring): " + ", ".join(skipped))
    info = json.loads(subprocess.run(
        [str(py), "-c", "import json, importlib.metadata as md; "
         "print(json.dumps({'ptychi': md.version('ptychi'), 'torch': md.version('torch')}))"],
        check=True, capture_output=True, text=True).stdout)
    info.update(requirements=rows, installed=todo, not_installed=skipped)
    (venv / READY_MARKER).write_text(json.dumps(info, indent=1))
    log(f"venv ready: ptychi {info['ptychi']}, torch {info['torch']}")
    return info


def running_in(venv: Path) -> bool:
    return os.environ.get(IN_VENV_ENV) == str(venv.resolve()) or \
        Path(sys.prefix).resolve() == venv.resolve()


def _strip_make_venv(argv: list[str]) -> list[str]:
    """argv without ``--make-venv [DIR]`` / ``--make-venv=DIR`` (the venv is built by then)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith("--make-venv="):
            continue
        if a == "--make-venv":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        out.append(a)
    return out


def reexec_in_venv(venv: Path, argv: list[str], threads: int) -> None:
    """Replace this process by the same script under the venv's python."""
    venv = venv.resolve()
    py = venv_python(venv)
    env = dict(os.environ)
    env[IN_VENV_ENV] = str(venv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    log(f"re-executing with {py}")
    sys.stdout.flush()
    os.execve(str(py), [str(py), str(Path(__file__).resolve()), *argv], env)


# --------------------------------------------------------------------------
# torchvision shim (see module docstring)

_SHIM_FILES = {
    "torchvision/__init__.py": '''
        """NOT torchvision: a stand-in written by benchmarks/ptychi_baseline.py.

        Provides only transforms.GaussianBlur and transforms.functional.gaussian_blur,
        which is all pty-chi 2.2.0 imports from torchvision.
        """
        __version__ = "0.0.0+ptychi-baseline-shim"
        IS_PTYCHI_BASELINE_SHIM = True
        CALLS = {"gaussian_blur": 0}
        from . import transforms  # noqa: E402,F401
    ''',
    "torchvision/transforms/__init__.py": '''
        import torch

        from . import functional  # noqa: F401


        class GaussianBlur(torch.nn.Module):
            """torchvision.transforms.GaussianBlur: sigma drawn uniformly from (min, max) per call."""

            def __init__(self, kernel_size, sigma=(0.1, 2.0)):
                super().__init__()
                ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
                if len(ks) != 2 or any(k <= 0 or k % 2 == 0 for k in ks):
                    raise ValueError("Kernel size value should be an odd and positive number.")
                if isinstance(sigma, (int, float)):
                    sigma = (float(sigma), float(sigma))
                sigma = tuple(float(s) for s in sigma)
                if len(sigma) != 2 or not 0.0 < sigma[0] <= sigma[1]:
                    raise ValueError("sigma should be a positive number or a (min, max) pair with 0 < min <= max.")
                self.kernel_size, self.sigma = ks, sigma

            @staticmethod
            def get_params(sigma_min, sigma_max):
                return torch.empty(1).uniform_(sigma_min, sigma_max).item()

            def forward(self, img):
                s = self.get_params(*self.sigma)
                return functional.gaussian_blur(img, list(self.kernel_size), [s, s])
    ''',
    "torchvision/transforms/functional.py": '''
        import torch
        import torch.nn.functional as F


        def _kernel1d(k, sigma, dtype, device):
            x = torch.linspace(-(k // 2), k // 2, steps=k, dtype=dtype, device=device)
            pdf = torch.exp(-0.5 * (x / sigma) ** 2)
            return pdf / pdf.sum()


        def gaussian_blur(img, kernel_size, sigma=None):
            """torchvision.transforms.functional.gaussian_blur for tensors (..., C, H, W).

            kernel_size and sigma are (x, y) pairs (or scalars); reflect padding;
            depthwise conv2d with a separable normalised Gaussian.
            """
            import torchvision

            torchvision.CALLS["gaussian_blur"] += 1
            ks = [kernel_size, kernel_size] if isinstance(kernel_size, int) else list(kernel_size)
            if sigma is None:
                sigma = [0.3 * ((k - 1) * 0.5 - 1) + 0.8 for k in ks]
            elif isinstance(sigma, (int, float)):
                sigma = [float(sigma), float(sigma)]
            else:
                sigma = [float(s) for s in sigma]
                if len(sigma) == 1:
                    sigma = sigma * 2
            if img.ndim < 2:
                raise TypeError(f"gaussian_blur: expected a tensor with >= 2 dims, got {img.ndim}")
            shape = img.shape
            x = img.reshape(-1, 1, shape[-2], shape[-1]) if img.ndim < 4 else img.reshape(-1, shape[-3], shape[-2], shape[-1])
            out_dtype = x.dtype
            work = x if x.is_floating_point() else x.to(torch.float32)
            C = work.shape[1]
            kx = _kernel1d(ks[0], sigma[0], work.dtype, work.device)
            ky = _kernel1d(ks[1], sigma[1], work.dtype, work.device)
            kernel = (ky[:, None] * kx[None, :]).expand(C, 1, ks[1], ks[0])
            work = F.pad(work, [ks[0] // 2, ks[0] // 2, ks[1] // 2, ks[1] // 2], mode="reflect")
            work = F.conv2d(work, kernel, groups=C)
            if not out_dtype.is_floating_point:
                work = torch.round(work).to(out_dtype)
            return work.reshape(shape)
    ''',
}


def ensure_torchvision() -> object | None:
    """Import torchvision, or install the shim for this process. Returns the shim module or None."""
    try:
        import torchvision  # noqa: F401

        if getattr(torchvision, "IS_PTYCHI_BASELINE_SHIM", False):
            return torchvision  # installed earlier in this process
        log(f"real torchvision {torchvision.__version__} imports; no shim")
        return None
    except Exception as exc:  # a CUDA-linked wheel fails with OSError/RuntimeError, absence with ImportError
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    root = Path(tempfile.mkdtemp(prefix="ptychi_tv_shim_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    for rel, src in _SHIM_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(src).lstrip())
    sys.path.insert(0, str(root))
    import importlib

    importlib.invalidate_caches()
    import torchvision

    assert getattr(torchvision, "IS_PTYCHI_BASELINE_SHIM", False), torchvision.__file__
    log(f"torchvision SHIM in use ({reason}): {root}/torchvision implements only "
        "transforms.GaussianBlur / transforms.functional.gaussian_blur (torch conv2d, reflect padding); "
        "pty-chi uses it only for random initial objects, which this baseline does not request")
    return torchvision


# --------------------------------------------------------------------------
# Data


def load_scan(path: str | Path, object_shape: tuple[int, int] | None = None) -> dict:
    """Read a PtychoPINN NPZ with numpy. Returns amplitude, probe, x, y, obj_shape, truth (or None)."""
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        amp_key = "diffraction" if "diffraction" in keys else "diff3d" if "diff3d" in keys else None
        missing = [k for k in ("probeGuess", "xcoords", "ycoords") if k not in keys]
        if amp_key is None or missing:
            raise SystemExit(f"{path}: missing {missing + ([] if amp_key else ['diffraction'])}; "
                             f"found {sorted(keys)}")
        amp = np.asarray(z[amp_key], dtype=np.float32)
        probe = np.asarray(z["probeGuess"]).astype(np.complex64)
        x = np.asarray(z["xcoords"], dtype=np.float64).ravel()
        y = np.asarray(z["ycoords"], dtype=np.float64).ravel()
        truth = np.asarray(z["objectGuess"]).astype(np.complex64) if "objectGuess" in keys else None
    if amp.ndim != 3 or amp.shape[1] != amp.shape[2]:
        raise SystemExit(f"{path}: {amp_key}: found shape {amp.shape}, expected (M, N, N)")
    M, N = amp.shape[0], amp.shape[1]
    if probe.shape[-2:] != (N, N) or probe.ndim not in (2, 3):
        raise SystemExit(f"{path}: probeGuess: found shape {probe.shape}, expected ({N}, {N}) or (K, {N}, {N})")
    if x.shape != (M,) or y.shape != (M,):
        raise SystemExit(f"{path}: xcoords/ycoords: found {x.shape}/{y.shape}, expected ({M},)")
    if object_shape is None:
        if truth is None or truth.ndim != 2:
            raise SystemExit(f"{path}: no 2-D objectGuess; pass --object-shape H W")
        object_shape = truth.shape
    return {"amplitude": amp, "probe": probe, "x": x, "y": y, "N": N,
            "obj_shape": tuple(int(s) for s in object_shape), "truth": truth}


# --------------------------------------------------------------------------
# Reconstruction


def build_options(api, algorithm: str, epochs: int, batch_size: int, seed: int,
                  device: str, noise_model: str, epie_alpha: float,
                  refine_probe: bool = False, refine_positions: bool = False, probe_start_epoch: int = 0):
    """pty-chi options: fixed probe and positions, no regularisers (see module docstring).

    ``refine_probe``: the probe is optimised from the first epoch (pty-chi's
    defaults: SGD step 1, incoherent modes orthogonalised). The object/probe
    scale is free during the run (measured: the probe 20x too strong after
    200 epochs; pty-chi's own power constraint left the object 30x too strong),
    so :func:`reconstruct` fixes it afterwards: probe power back to the given
    probe's, object scaled inversely (the data see only their product).
    ``refine_positions``: gradient position correction (pty-chi's defaults:
    step 0.3, updates clipped at 0.1 px) from epoch 10, mean position held.
    """
    if algorithm == "lsqml":
        opts = api.LSQMLOptions()
        opts.reconstructor_options.noise_model = api.NoiseModels(noise_model)
        opts.reconstructor_options.rescale_probe_intensity_in_first_epoch = False
    elif algorithm == "epie":
        opts = api.EPIEOptions()
        opts.object_options.alpha = epie_alpha
    else:
        raise SystemExit(f"--algorithm: found {algorithm!r}, expected lsqml or epie")
    opts.data_options.fft_shift = True  # our patterns have the zero frequency at the centre
    opts.data_options.save_data_on_device = device == "gpu"
    oo = opts.object_options
    oo.optimizable = True
    oo.determine_position_origin_coords_by = api.ObjectPosOriginCoordsMethods.SPECIFIED
    oo.position_origin_coords = (-0.5, -0.5)
    oo.remove_object_probe_ambiguity.enabled = False
    opts.probe_options.optimizable = refine_probe
    if refine_probe:
        opts.probe_options.optimization_plan.start = probe_start_epoch
    opts.probe_position_options.optimizable = refine_positions
    if refine_positions:
        opts.probe_position_options.optimization_plan.start = 10  # once the object has settled
        opts.probe_position_options.constrain_position_mean = True
    opts.opr_mode_weight_options.optimizable = False
    ro = opts.reconstructor_options
    ro.num_epochs = epochs
    ro.batch_size = batch_size
    ro.random_seed = seed
    ro.default_device = api.Devices.GPU if device == "gpu" else api.Devices.CPU
    return opts


def reconstruct(scan: dict, args) -> dict:
    """Run pty-chi on a loaded scan; returns the output record (obj, timings, loss, ...)."""
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:
        pass
    shim = ensure_torchvision()
    import importlib.metadata

    import ptychi.api as api
    from ptychi.api.task import PtychographyTask

    version = importlib.metadata.version("ptychi")
    t0 = time.perf_counter()
    N = scan["N"]
    probe = scan["probe"] if scan["probe"].ndim == 3 else scan["probe"][None]
    probe = (probe / N).astype(np.complex64)[None]  # (1 OPR mode, K, N, N); unnormalised FFT
    intensity = np.square(scan["amplitude"], dtype=np.float32)
    obj0 = np.ones((1, *scan["obj_shape"]), np.complex64)
    opts = build_options(api, args.algorithm, args.epochs, args.batch_size, args.seed,
                         args.device, args.noise_model, args.epie_alpha, args.refine_probe, args.refine_positions,
                         args.probe_start_epoch)
    task = PtychographyTask(opts, diffraction_data=intensity, object_data=obj0, probe_data=probe,
                            probe_position_x_px=scan["x"], probe_position_y_px=scan["y"])
    setup_s = time.perf_counter() - t0
    positions_before = task.get_data_to_cpu("probe_positions", as_numpy=True).astype(np.float64)  # (M, 2) (y, x)
    t1 = time.perf_counter()
    task.run()
    if args.device == "gpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    wall_s = time.perf_counter() - t1
    obj = task.get_data_to_cpu("object", as_numpy=True)[0].astype(np.complex64)
    probe_after = task.get_data_to_cpu("probe", as_numpy=True)
    if args.refine_probe:  # the object/probe scale gauge: the given probe's power, the object inversely
        gauge = np.sqrt(np.sum(np.abs(probe_after[0]) ** 2) / np.sum(np.abs(probe[0]) ** 2))
        probe_after, obj = probe_after / gauge, (obj * gauge).astype(np.complex64)
    probe_drift = float(np.abs(probe_after - probe).max() / np.abs(probe).max())
    loss = np.asarray(task.reconstructor.loss_tracker.table["loss"], dtype=np.float64)
    moved = task.get_data_to_cpu("probe_positions", as_numpy=True).astype(np.float64) - positions_before
    positions_px = np.stack([scan["x"] + moved[:, 1], scan["y"] + moved[:, 0]], axis=1)  # ours: (x, y)
    return {"obj": obj, "wall_s": wall_s, "setup_s": setup_s, "epochs": args.epochs,
            "algorithm": args.algorithm, "ptychi_version": version, "threads": args.threads,
            "batch_size": args.batch_size, "loss": loss, "shim": shim is not None,
            "shim_calls": int(shim.CALLS["gaussian_blur"]) if shim is not None else 0,
            "probe_drift": probe_drift, "probe": (probe_after[0] * N).astype(np.complex64),  # our scale
            "positions_px": positions_px}


# --------------------------------------------------------------------------
# Quick metrics (self-contained; the project's ptycho_ml.inference.metrics is the reference)


def quick_metrics(obj: np.ndarray, truth: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict:
    """Agreement with the truth on the box of (rounded) scan centres, which the scan covers fully.

    The global phase is removed first (least-squares constant phase). Returns
    the normalised complex error ``||p - t|| / ||t||``, the amplitude error
    ``|| |p| - |t| || / || |t| ||``, the RMS phase error (rad, after removing its
    mean) and amplitude / phase SSIM (skimage, data range of the truth).
    """
    r0, r1 = int(np.floor(y.min() + 0.5)), int(np.floor(y.max() + 0.5)) + 1
    c0, c1 = int(np.floor(x.min() + 0.5)), int(np.floor(x.max() + 0.5)) + 1
    p, t = obj[r0:r1, c0:c1].astype(np.complex128), truth[r0:r1, c0:c1].astype(np.complex128)
    p = p * np.exp(-1j * np.angle(np.sum(p * np.conj(t))))
    dphi = np.angle(p * np.conj(t))
    dphi = dphi - dphi.mean()
    out = {"region": [r0, r1, c0, c1],
           "complex_error": float(np.linalg.norm(p - t) / np.linalg.norm(t)),
           "amplitude_error": float(np.linalg.norm(np.abs(p) - np.abs(t)) / np.linalg.norm(np.abs(t))),
           "phase_rms_rad": float(np.sqrt(np.mean(dphi ** 2)))}
    try:
        from skimage.metrics import structural_similarity as ssim
    except ImportError:
        return out
    at, ap = np.abs(t), np.abs(p)
    pt = np.angle(t)
    pp = pt + dphi
    out["amplitude_ssim"] = float(ssim(ap, at, data_range=float(at.max() - at.min()) or 1.0))
    out["phase_ssim"] = float(ssim(pp, pt, data_range=float(pt.max() - pt.min()) or 1.0))
    return out


def write_result(path: str | Path, rec: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, obj=rec["obj"], wall_s=np.float64(rec["wall_s"]), setup_s=np.float64(rec["setup_s"]),
             epochs=np.int64(rec["epochs"]), algorithm=np.array(rec["algorithm"]),
             ptychi_version=np.array(rec["ptychi_version"]), threads=np.int64(rec["threads"]),
             batch_size=np.int64(rec["batch_size"]), loss=rec["loss"], shim=np.bool_(rec["shim"]),
             shim_calls=np.int64(rec["shim_calls"]), probe=rec["probe"], positions_px=rec["positions_px"])


def summary(rec: dict, scan: dict) -> dict:
    s = {k: rec[k] for k in ("algorithm", "epochs", "wall_s", "setup_s", "threads", "batch_size",
                             "ptychi_version", "shim", "shim_calls", "probe_drift")}
    s["n_patterns"], s["N"] = int(scan["amplitude"].shape[0]), int(scan["N"])
    s["loss_first"] = float(rec["loss"][0]) if len(rec["loss"]) else None
    s["loss_last"] = float(rec["loss"][-1]) if len(rec["loss"]) else None
    if scan["truth"] is not None and scan["truth"].shape == rec["obj"].shape:
        s["metrics"] = quick_metrics(rec["obj"], scan["truth"], scan["x"], scan["y"])
    return s


# --------------------------------------------------------------------------
# Noise-free convention check


def make_noise_free(path: Path, integer_positions: bool) -> None:
    """Write the default test scan without noise (ptycho_ml must be importable)."""
    sys.path.insert(0, str(REPO_ROOT))
    from ptycho_ml.physics import simulate as sim

    cfg = sim.default_configs()["test"]
    if integer_positions:
        cfg = cfg.replace(jitter_px=0.0)
    scan = sim.simulate_scan(cfg)
    pos = np.round(scan.positions_px) if integer_positions else scan.positions_px
    scan.amplitude = sim.simulate_diffraction(scan.obj, scan.probe, pos, rng=None)
    scan.positions_px = pos
    sim.write_simulated(scan, path)


def check_noise_free(args) -> int:
    """LSQ-ML with the known probe on noise-free data must reach a few per cent error."""
    worst = 0.0
    for integer in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "noise_free.npz"
            make_noise_free(path, integer)
            scan = load_scan(path)
            rec = reconstruct(scan, args)
        s = summary(rec, scan)
        s["check"] = "noise-free, " + ("integer positions" if integer else "sub-pixel (jittered) positions")
        print("CHECK " + json.dumps(s), flush=True)
        worst = max(worst, s["metrics"]["complex_error"])
    ok = worst < args.check_tolerance
    log(f"noise-free check {'PASSED' if ok else 'FAILED'}: worst complex error {worst:.4f} "
        f"(tolerance {args.check_tolerance})")
    return 0 if ok else 1


# --------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="input PtychoPINN NPZ")
    p.add_argument("--out", default="result.npz", help="output NPZ (default result.npz)")
    p.add_argument("--algorithm", choices=("lsqml", "epie"), default="lsqml")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=100, help="pty-chi minibatch size (default 100)")
    p.add_argument("--noise-model", choices=("gaussian", "poisson"), default="gaussian",
                   help="LSQ-ML noise model (default gaussian, pty-chi's default)")
    p.add_argument("--epie-alpha", type=float, default=1.0,
                   help="ePIE object step alpha (Maiden 2017; pty-chi's default is 0.1)")
    p.add_argument("--seed", type=int, default=0, help="pty-chi random seed (minibatch order)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--object-shape", type=int, nargs=2, metavar=("H", "W"),
                   help="object size when the NPZ has no objectGuess")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV,
                   help=f"virtual env to run pty-chi in (default {DEFAULT_VENV.relative_to(REPO_ROOT)})")
    p.add_argument("--make-venv", nargs="?", type=Path, const=True, default=None, metavar="DIR",
                   help="create/refresh the venv (at DIR, else --venv); exits unless --data/--check-noise-free")
    p.add_argument("--no-venv", action="store_true",
                   help="run in the current interpreter (e.g. where torchvision works)")
    p.add_argument("--check-noise-free", action="store_true",
                   help="convention check on noise-free simulated data (needs ptycho_ml importable)")
    p.add_argument("--check-tolerance", type=float, default=0.05)
    p.add_argument("--quiet", action="store_true", help="hide pty-chi's per-epoch log")
    p.add_argument("--refine-probe", action="store_true", help="optimise the probe too (default: held fixed)")
    p.add_argument("--refine-positions", action="store_true", help="correct the positions too (from epoch 10)")
    p.add_argument("--probe-start-epoch", type=int, default=0,
                   help="with --refine-probe: the first epoch the probe is optimised (pty-chi's optimization_plan.start)")
    args = p.parse_args(argv)
    if isinstance(args.make_venv, Path):
        args.venv = args.make_venv
    if args.threads < 1 or args.epochs < 1 or args.batch_size < 1:
        p.error("--threads, --epochs and --batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    want_run = args.data is not None or args.check_noise_free
    if not want_run and args.make_venv is None:
        log("nothing to do: give --data PATH.npz, --check-noise-free or --make-venv")
        return 2
    if not args.no_venv and not running_in(args.venv):
        ready = (args.venv / READY_MARKER).exists() and venv_python(args.venv).exists()
        if args.make_venv is not None or not ready:
            make_venv(args.venv)
        if not want_run:
            return 0
        reexec_in_venv(args.venv, _strip_make_venv(argv) + ["--venv", str(args.venv)], args.threads)
    if not want_run:
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.check_noise_free:
        return check_noise_free(args)
    scan = load_scan(args.data, tuple(args.object_shape) if args.object_shape else None)
    log(f"{args.data}: {scan['amplitude'].shape[0]} patterns of {scan['N']}x{scan['N']}, "
        f"object {scan['obj_shape']}; {args.algorithm}, {args.epochs} epochs, {args.threads} thread(s)")
    rec = reconstruct(scan, args)
    write_result(args.out, rec)
    s = summary(rec, scan)
    s["out"] = str(args.out)
    print("RESULT " + json.dumps(s), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
