#!/usr/bin/env python
"""Reconstruction quality and time, side by side in one run, against pty-chi LSQ-ML.

Trains the CPU preset on the default simulated training scan (or uses
``--bundle``), then reconstructs held-out scans of objects the model never saw
with: the network alone; the network plus the default refinement; the
network fine-tuned on the scan (the other refinement variant); our refinement
from a flat start (an iterative solver with no network); and pty-chi LSQ-ML
(about 200 epochs, same probe and positions, probe fixed; see
``benchmarks/ptychi_baseline.py`` for how it is installed and run). Every
method runs on one thread, one after the other, on the same machine.

Besides the default test scan, ``--variants`` adds held-out scans that differ
from training in object family, probe, dose, scan pattern and N.

Usage::

    python benchmarks/quality.py                       # train + evaluate + pty-chi (about 20 min)
    python benchmarks/quality.py --bundle B --no-ptychi --variants
    python benchmarks/quality.py --N 128 --epochs 4 --max-patterns 1500 --no-ptychi
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ptycho_ml.inference import metrics
from ptycho_ml.physics import simulate
from ptycho_ml.config import InferenceConfig, TrainingConfig
from ptycho_ml.data import load_scan
from ptycho_ml.model.bundle_io import load_model_bundle
from ptycho_ml.inference.reconstruct import inference_probe, reconstruct
from ptycho_ml.physics.refine import refine_object
from ptycho_ml.lifecycle.training import train

HERE = Path(__file__).resolve().parent


def variant_configs(N: int) -> dict[str, simulate.SimulationConfig]:
    """Held-out scans unlike the training scan (different seeds throughout)."""
    test = simulate.default_configs(N=N)["test"]
    return {
        "default test": test,
        "siemens star only": test.replace(object_families=("siemens",), seed=2001),
        "gaussian probe": test.replace(probe_kind="gaussian", seed=2002),
        "low dose 1e4": test.replace(nphotons=1e4, seed=2003),
        "fermat spiral": test.replace(scan="spiral", seed=2004),
        "strong phase 3 rad": test.replace(phase_range_rad=3.0, seed=2005),
    }


def score(obj: np.ndarray, scan) -> dict[str, float]:
    return metrics.evaluate_object(obj, scan.obj, scan.positions_px, scan.N, scan.probe)


def row(name: str, m: dict[str, float], seconds: float, ref_seconds: float | None) -> dict:
    return {"method": name, "seconds": seconds, "vs_ptychi_time": (seconds / ref_seconds) if ref_seconds else None, **m}


def run_ptychi(data: Path, out: Path, epochs: int, reuse: bool = False, extra: tuple[str, ...] = ()) -> tuple[np.ndarray, float]:
    """pty-chi LSQ-ML on ``data``, one thread, in its own venv (``ptychi_baseline.py``): ``(obj, wall_s)``.

    ``reuse``: take an earlier result at ``out`` of the same (unchanged) scan and epochs instead.
    ``extra``: more ``ptychi_baseline.py`` flags (e.g. ``--refine-probe``); the rest of its output stays in ``out``.
    """
    if reuse and out.is_file() and data.stat().st_mtime <= out.stat().st_mtime:
        with np.load(out) as f:
            if int(f["epochs"]) == epochs:
                print(f"reusing {out} (pty-chi, {epochs} epochs, {float(f['wall_s']):.1f} s)", flush=True)
                return f["obj"], float(f["wall_s"])
    cmd = [sys.executable, str(HERE / "ptychi_baseline.py"), "--data", str(data), "--out", str(out),
           "--algorithm", "lsqml", "--epochs", str(epochs), "--threads", "1", "--quiet", *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with np.load(out) as f:
        return f["obj"], float(f["wall_s"])


def evaluate_scan(model, path: Path, refine_steps: int, ptychi_epochs: int | None, workdir: Path) -> list[dict]:
    scan = load_scan(path)
    rows: list[dict] = []
    ref_s = None
    if ptychi_epochs:
        obj, ref_s = run_ptychi(path, workdir / f"{path.stem}_ptychi.npz", ptychi_epochs)
        rows.append(row(f"pty-chi LSQ-ML {ptychi_epochs} epochs", score(obj, scan), ref_s, ref_s))
    net = reconstruct(model, scan, InferenceConfig(refine_steps=0, progress=False, threads=1))
    rows.append(row("network alone", score(net.obj, scan), net.timings_s["total_s"], ref_s))
    full = reconstruct(model, scan, InferenceConfig(refine_steps=refine_steps, progress=False, threads=1))
    rows.append(row(f"network + refine {refine_steps}", score(full.obj, scan), full.timings_s["total_s"], ref_s))
    tuned = reconstruct(model, scan, InferenceConfig(refine_steps=1, refine_method="finetune", finetune_epochs=2,
                                                     progress=False, threads=1))
    rows.append(row("network fine-tuned on scan (2 epochs)", score(tuned.obj, scan), tuned.timings_s["total_s"], ref_s))
    probe = inference_probe(model, scan)
    t0 = time.perf_counter()
    flat = refine_object(torch.ones(scan.obj_shape, dtype=torch.complex64), scan, probe, refine_steps)
    rows.append(row(f"flat start + refine {refine_steps} (no network)", score(flat.obj.numpy(), scan),
                    time.perf_counter() - t0, ref_s))
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n== {title}")
    print(f"{'method':44s} {'amp SSIM':>8s} {'ph SSIM':>8s} {'amp PSNR':>8s} {'ph PSNR':>8s} "
          f"{'amp FRC':>7s} {'ph FRC':>7s} {'time s':>8s} {'/pty-chi':>8s}")
    for r in rows:
        ratio = f"{r['vs_ptychi_time']:.3f}" if r["vs_ptychi_time"] else "-"
        print(f"{r['method']:44s} {r['amplitude_ssim']:8.4f} {r['phase_ssim']:8.4f} {r['amplitude_psnr']:8.2f} "
              f"{r['phase_psnr']:8.2f} {r['amplitude_frc_px']:7.2f} {r['phase_frc_px']:7.2f} {r['seconds']:8.2f} {ratio:>8s}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=HERE / "out" / "quality")
    p.add_argument("--bundle", type=Path, default=None, help="use this model instead of training one")
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--epochs", type=int, default=TrainingConfig().epochs)
    p.add_argument("--max-patterns", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="training threads")
    p.add_argument("--refine-steps", type=int, default=InferenceConfig().refine_steps)
    p.add_argument("--ptychi-epochs", type=int, default=200)
    p.add_argument("--no-ptychi", action="store_true")
    p.add_argument("--variants", action="store_true", help="also evaluate the held-out variant scans")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    bundle = args.bundle
    if bundle is None:
        cfg = TrainingConfig(output_dir=str(args.workdir / f"train_N{args.N}"), epochs=args.epochs, threads=args.threads,
                             quiet=True, max_patterns=args.max_patterns, model=TrainingConfig().model.replace(N=args.N))
        data = simulate.default_configs(N=args.N)
        train_path = args.workdir / f"train_N{args.N}.npz"
        if not train_path.exists():
            simulate.write_simulated(simulate.simulate_scan(data["train"]), train_path)
        cfg = cfg.replace(data=str(train_path))
        t0 = time.perf_counter()
        result = train(cfg, evaluate_refine_steps=0)
        seconds = time.perf_counter() - t0
        n_seen = result.n_train * len(result.history)
        print(f"trained {len(result.history)} epochs on {result.n_train} patterns in {seconds:.0f} s "
              f"({n_seen / seconds:.0f} patterns/s incl. validation), {result.model_summary['n_parameters']} parameters, "
              f"{result.model_summary['flops_per_pattern'] / 1e6:.1f} MFLOP/pattern")
        bundle = result.bundle_path
    model, _ = load_model_bundle(bundle)
    torch.set_num_threads(1)

    configs = variant_configs(args.N) if args.variants else {"default test": variant_configs(args.N)["default test"]}
    results = {}
    for name, sim_cfg in configs.items():
        path = args.workdir / f"{name.replace(' ', '_')}_N{args.N}.npz"
        if not path.exists():
            simulate.write_simulated(simulate.simulate_scan(sim_cfg), path)
        rows = evaluate_scan(model, path, args.refine_steps, None if args.no_ptychi or name != "default test" else args.ptychi_epochs,
                             args.workdir)
        print_table(f"{name} (N={args.N}, {len(load_scan(path))} patterns)", rows)
        results[name] = rows
    out = args.workdir / f"quality_N{args.N}.json"
    out.write_text(json.dumps({"bundle": str(bundle), "results": results}, indent=2))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
