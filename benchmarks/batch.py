#!/usr/bin/env python
"""Batch reconstruction throughput, side by side in one run: scans/s of the local engine and of Spark.

Simulates ``--scans`` small scans, saves an (untrained, tiny-preset) model
bundle, and reconstructs them all with :func:`ptycho_ml.lifecycle.batch.run_batch`:
the local engine (one scan after another, ``--cores`` threads) and Spark on
``local[--cores]`` (one scan per task, one thread each: the same cores).
The Spark time includes starting the session (the JVM), as a user's command
does; the time per scan inside the tasks is printed too. Each engine runs
``--repeats`` times; medians are printed, and the ratio spark / local.

Usage::

    python benchmarks/batch.py [--scans 8] [--cores 2] [--refine-steps 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ptycho_ml.config import InferenceConfig, ModelConfig, SimulationConfig
from ptycho_ml.data.readers import load_scan
from ptycho_ml.lifecycle.batch import run_batch
from ptycho_ml.lifecycle.registry import load_model_with_provenance
from ptycho_ml.model.bundle_io import save_model_bundle
from ptycho_ml.model.datamodule import compute_amplitude_scale
from ptycho_ml.model.network import DiffractionToObject
from ptycho_ml.physics import simulate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scans", type=int, default=8)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--refine-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(args.scans):
            sim = SimulationConfig(N=32, object_size_px=72, step_px=5.0, aperture_radius_px=5.0, defocus_m=150e-6,
                                   nphotons=1e5, seed=100 + i)
            simulate.write_simulated(simulate.simulate_scan(sim), root / "scans" / f"scan{i:03d}.npz")
        scan = load_scan(str(root / "scans" / "scan000.npz"))
        torch.manual_seed(0)
        model = DiffractionToObject(ModelConfig(preset="tiny", N=scan.N), torch.from_numpy(scan.probe),
                                    compute_amplitude_scale(scan))
        bundle = save_model_bundle(model, root / "wts.h5.zip")
        model, provenance = load_model_with_provenance(str(bundle), is_bundle=True)
        glob = str(root / "scans" / "*.npz")
        timings: dict[str, list[float]] = {"local": [], "spark": []}
        task_s: list[float] = []
        for repeat in range(args.repeats):
            for engine in ("local", "spark"):
                threads = args.cores if engine == "local" else 1
                cfg = InferenceConfig(refine_steps=args.refine_steps, threads=threads, progress=False)
                t0 = time.perf_counter()
                rows, _ = run_batch(model, provenance, glob, str(root / f"out_{engine}_{repeat}"), cfg, engine=engine,
                                    master=f"local[{args.cores}]")
                timings[engine].append(time.perf_counter() - t0)
                assert all(r["status"] == "ok" for r in rows), rows
                if engine == "spark":
                    task_s.extend(float(r["seconds"]) for r in rows)
    local, spark = statistics.median(timings["local"]), statistics.median(timings["spark"])
    print(f"{args.scans} scans of {len(scan)} patterns ({scan.N}x{scan.N}), {args.refine_steps} refinement passes, "
          f"{args.cores} cores, median of {args.repeats}")
    print(f"local engine ({args.cores} threads): {args.scans / local:.2f} scans/s ({local:.1f} s)")
    print(f"spark local[{args.cores}] (1 thread per task, session start included): {args.scans / spark:.2f} scans/s "
          f"({spark:.1f} s; median {statistics.median(task_s):.2f} s per scan inside a task)")
    print(f"ratio spark / local: {local / spark:.2f}")


if __name__ == "__main__":
    main()
