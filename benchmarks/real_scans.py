#!/usr/bin/env python
"""Real scans: the file's probe and positions are estimates (issue 10), side by side in one run.

Each scan is the default held-out test scan (``simulate.default_configs``)
simulated with a true probe and true positions that differ from the ones
written in the file (:mod:`ptycho_ml.physics.scan_errors`): defocus error
±20 %, astigmatism, two true incoherent modes written as one, position noise
0.5 and 1 px plus a slow drift, and an exact scan (no error: the regression
check). On each, the same model reconstructs with the default settings (the
automatic choice of :func:`ptycho_ml.physics.refine.refine_auto`, whose choice is
shown), with the object alone (``refine_auto=False``, the default before it)
and with each refinement switch, and pty-chi LSQ-ML (``ptychi_baseline.py``, one
thread, same data) runs with probe and position refinement on; its object's
amplitude scale, which it leaves free, is fitted to the truth before scoring
(:func:`fit_amplitude_scale`).

Reported per method: object amplitude/phase SSIM, PSNR and FRC
(:func:`ptycho_ml.inference.metrics.evaluate_object`, on the region the true
positions cover), the probe error after alignment (first mode, global phase
aligned, relative L2; and the summed intensity's relative L2), the position
RMS error before/after (a common shift removed: it only moves the object),
and the non-affine part of it (a linear drift over a raster scan is nearly a
stretch of the whole grid, which the data hardly constrain), and the wall time
(ours: the whole reconstruction; pty-chi: ``task.run()``).

Usage::

    python benchmarks/real_scans.py --bundle RUN/wts.h5.zip            # full: 200 pty-chi epochs
    python benchmarks/real_scans.py --bundle B --no-ptychi --scans exact,defocus-20
    python benchmarks/real_scans.py --bundle B --reuse-ptychi          # keep earlier pty-chi results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ptycho_ml.config import InferenceConfig, ScanErrorConfig
from ptycho_ml.data.ptychopinn import read_true_probe_positions
from ptycho_ml.data.readers import load_scan
from ptycho_ml.inference import metrics
from ptycho_ml.inference.reconstruct import reconstruct
from ptycho_ml.model.bundle_io import load_model_bundle
from ptycho_ml.physics import simulate
from ptycho_ml.physics.scan_errors import simulate_with_errors

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality import run_ptychi  # noqa: E402  (the benchmarks share one way of running pty-chi)

#: The benchmark scans: name -> how the file differs from the truth.
SCANS: dict[str, ScanErrorConfig] = {
    "exact": ScanErrorConfig(),
    "defocus+20": ScanErrorConfig(defocus_error=0.2),
    "defocus-20+astig": ScanErrorConfig(defocus_error=-0.2, astigmatism=0.2),
    "2 modes as 1": ScanErrorConfig(missing_mode=0.2),
    "pos 0.5px+drift": ScanErrorConfig(position_noise_px=0.5, position_drift_px=1.0),
    "pos 1px+drift": ScanErrorConfig(position_noise_px=1.0, position_drift_px=1.0),
    "all (issue)": ScanErrorConfig(defocus_error=-0.2, astigmatism=0.2, position_noise_px=0.5, position_drift_px=1.0),
}

#: Our methods: name -> InferenceConfig changes over the default.
METHODS: dict[str, dict] = {
    "object only": {"refine_auto": False},
    "default": {},
    "plain steps": {"misfit_step_gain": 1.0},  # the default without its larger steps far from the fit (the ablation)
    "+probe": {"refine_probe": True},
    "+probe 2 modes": {"refine_probe": True, "probe_modes": 2},
    "+positions": {"refine_positions": True},
    "+intensity": {"refine_intensity": True},
    "+probe+positions": {"refine_probe": True, "refine_positions": True},
}


def position_rms_px(positions: np.ndarray, truth: np.ndarray) -> float:
    """RMS distance (px) of ``positions`` from ``truth`` ``(M, 2)``, a common shift removed."""
    error = positions - truth
    error = error - error.mean(0)
    return float(np.sqrt((error**2).sum(1).mean()))


def position_rms_nonaffine_px(positions: np.ndarray, truth: np.ndarray) -> float:
    """RMS distance (px) once the best affine map of the truth is removed: a linear drift over a raster
    scan is close to a stretch of the whole grid (and of the object), which the data hardly constrain."""
    design = np.c_[truth, np.ones(len(truth))]
    coef, *_ = np.linalg.lstsq(design, positions - truth, rcond=None)
    residual = positions - truth - design @ coef
    return float(np.sqrt((residual**2).sum(1).mean()))


def probe_errors(probe: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """First-mode relative L2 error after aligning the global phase; summed-intensity relative L2 error."""
    p = probe.reshape(-1, *probe.shape[-2:])
    t = truth.reshape(-1, *truth.shape[-2:])
    overlap = np.vdot(p[0], t[0])
    first = np.linalg.norm(p[0] * overlap / abs(overlap) - t[0]) / np.linalg.norm(t[0])
    ip, it = (np.abs(p) ** 2).sum(0), (np.abs(t) ** 2).sum(0)
    return {"probe_error": float(first), "probe_intensity_error": float(np.linalg.norm(ip - it) / np.linalg.norm(it))}


def score(obj: np.ndarray, probe: np.ndarray, positions: np.ndarray, scan, truth_probe, truth_positions,
          seconds: float) -> dict:
    m = metrics.evaluate_object(obj, np.asarray(scan.obj), truth_positions, scan.N, truth_probe)
    return {"seconds": seconds, **{k: float(v) for k, v in m.items()}, **probe_errors(probe, truth_probe),
            "position_rms_before_px": position_rms_px(scan.positions_px, truth_positions),
            "position_rms_after_px": position_rms_px(positions, truth_positions),
            "position_rms_nonaffine_before_px": position_rms_nonaffine_px(scan.positions_px, truth_positions),
            "position_rms_nonaffine_after_px": position_rms_nonaffine_px(positions, truth_positions)}


def fit_amplitude_scale(obj: np.ndarray, scan, truth_positions: np.ndarray, truth_probe: np.ndarray) -> np.ndarray:
    """``obj`` times the real scale that best fits its amplitude to the truth's on the scored region.

    Only for pty-chi: with its probe refined it leaves the object/probe scale
    free (measured here: amplitude tens of times off), a gauge the data do not
    fix; ptycho_ml holds the probe power, so its objects are scored as they are.
    """
    box = metrics.region_box(metrics.scanned_region(truth_positions, scan.N, np.asarray(scan.obj).shape, probe=truth_probe))
    a, t = np.abs(obj[box]), np.abs(np.asarray(scan.obj)[box])
    return (obj * (np.sum(a * t) / np.sum(a * a))).astype(np.complex64)


def make_scan(name: str, errors: ScanErrorConfig, N: int, workdir: Path) -> Path:
    path = workdir / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}_N{N}.npz"
    if not path.exists():
        simulate.write_simulated(simulate_with_errors(simulate.default_configs(N=N)["test"], errors), path)
    return path


def evaluate(model, name: str, path: Path, refine_steps: int, ptychi_epochs: int | None, reuse: bool,
             methods: dict[str, dict]) -> dict:
    scan = load_scan(str(path))
    truth_probe, truth_positions = read_true_probe_positions(str(path))
    truth_probe = scan.probe if truth_probe is None else truth_probe
    truth_positions = scan.positions_px if truth_positions is None else truth_positions
    rows = {}
    if ptychi_epochs:
        out = path.with_suffix(".ptychi_probe_positions.npz")
        obj, wall_s = run_ptychi(path, out, ptychi_epochs, reuse, extra=("--refine-probe", "--refine-positions"))
        obj = fit_amplitude_scale(obj, scan, truth_positions, truth_probe)
        with np.load(out) as f:
            rows[f"pty-chi LSQ-ML {ptychi_epochs} ep, probe+positions"] = score(
                obj, f["probe"], f["positions_px"], scan, truth_probe, truth_positions, wall_s)
    for method, changes in methods.items():
        if changes.get("refine_intensity") and name != "exact":
            continue  # no scan here has flux errors: the intensity switch is measured for harm on the exact scan only
        cfg = InferenceConfig(refine_steps=refine_steps, progress=False, threads=1, **changes)
        t0 = time.perf_counter()
        result = reconstruct(model, scan, cfg)
        seconds = time.perf_counter() - t0
        rows[method] = score(result.obj, result.probe, result.positions_px, scan, truth_probe, truth_positions, seconds)
        if result.auto_refinement is not None:
            rows[method]["auto_refinement"] = result.auto_refinement
    return {"scan": name, "path": str(path), "n_patterns": len(scan), "rows": rows}


def label(method: str, row: dict) -> str:
    """The method's name, with what the automatic refinement chose when it ran."""
    auto = row.get("auto_refinement")
    return f"{method} (auto: {auto['chosen']})" if auto and auto.get("fit_ratios") else method


def print_table(result: dict) -> None:
    rows = result["rows"]
    ref = next((r["seconds"] for k, r in rows.items() if k.startswith("pty-chi")), None)
    print(f"\n{result['scan']} ({result['n_patterns']} patterns)")
    print(f"{'method':38s} {'amp SSIM':>8s} {'ph SSIM':>8s} {'amp PSNR':>8s} {'ph PSNR':>8s} {'amp FRC':>8s} "
          f"{'probe err':>9s} {'pos RMS px':>12s} {'non-affine':>12s} {'s':>6s} {'time/pty-chi':>12s}")
    for method, r in rows.items():
        ratio = f"{r['seconds'] / ref:.3f}" if ref else "-"
        print(f"{label(method, r):38s} {r['amplitude_ssim']:8.4f} {r['phase_ssim']:8.4f} {r['amplitude_psnr']:8.2f} "
              f"{r['phase_psnr']:8.2f} {r['amplitude_frc_px']:8.2f} {r['probe_error']:9.3f} "
              f"{r['position_rms_before_px']:5.2f}->{r['position_rms_after_px']:5.2f} "
              f"{r['position_rms_nonaffine_before_px']:5.2f}->{r['position_rms_nonaffine_after_px']:5.2f} "
              f"{r['seconds']:6.1f} {ratio:>12s}",
              flush=True)


def markdown(results: list[dict]) -> str:
    """The tables of docs/benchmarks.md, one row per scan and method."""
    lines = ["| scan | method | amp SSIM | phase SSIM | amp PSNR | phase PSNR | amp FRC px | probe error | "
             "position RMS px (non-affine) before → after | time s | time / pty-chi |", "|" + "---|" * 11]
    for result in results:
        rows = result["rows"]
        ref = next((r["seconds"] for k, r in rows.items() if k.startswith("pty-chi")), None)
        for method, r in rows.items():
            ratio = f"{r['seconds'] / ref:.3f}" if ref else "-"
            lines.append(f"| {result['scan']} | {label(method, r)} | {r['amplitude_ssim']:.4f} | {r['phase_ssim']:.4f} | "
                         f"{r['amplitude_psnr']:.2f} | {r['phase_psnr']:.2f} | {r['amplitude_frc_px']:.2f} | "
                         f"{r['probe_error']:.3f} | {r['position_rms_before_px']:.2f} ({r['position_rms_nonaffine_before_px']:.2f}) → "
                         f"{r['position_rms_after_px']:.2f} ({r['position_rms_nonaffine_after_px']:.2f}) | "
                         f"{r['seconds']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="the model (wts.h5.zip) every method starts from")
    p.add_argument("--workdir", type=Path, default=HERE / "out" / "real_scans")
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--scans", default=",".join(SCANS), help=f"comma-separated subset of: {', '.join(SCANS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--refine-steps", type=int, default=InferenceConfig().refine_steps)
    p.add_argument("--ptychi-epochs", type=int, default=200)
    p.add_argument("--no-ptychi", action="store_true")
    p.add_argument("--ptychi-scans", default="", help="comma-separated scans to run pty-chi on (default: every scan)")
    p.add_argument("--reuse-ptychi", action="store_true", help="reuse earlier pty-chi results of unchanged scans")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.scans.split(",") if s.strip()]
    methods = {m.strip(): METHODS[m.strip()] for m in args.methods.split(",") if m.strip()}
    ptychi_scans = [s.strip() for s in args.ptychi_scans.split(",") if s.strip()]
    unknown = [n for n in names + ptychi_scans if n not in SCANS]
    if unknown:
        p.error(f"--scans: unknown {unknown}, expected some of {list(SCANS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model, _ = load_model_bundle(args.bundle)
    results = []
    for name in names:
        path = make_scan(name, SCANS[name], args.N, args.workdir)
        with_ptychi = not args.no_ptychi and (not ptychi_scans or name in ptychi_scans)
        result = evaluate(model, name, path, args.refine_steps, args.ptychi_epochs if with_ptychi else None,
                          args.reuse_ptychi, methods)
        print_table(result)
        results.append(result)
    out = args.workdir / f"real_scans_N{args.N}.json"
    out.write_text(json.dumps({"bundle": str(args.bundle), "refine_steps": args.refine_steps,
                               "ptychi_epochs": None if args.no_ptychi else args.ptychi_epochs,
                               "command": " ".join(sys.argv), "results": results}, indent=2))
    (args.workdir / f"real_scans_N{args.N}.md").write_text(markdown(results))
    print(f"\nresults: {out} (tables: real_scans_N{args.N}.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
