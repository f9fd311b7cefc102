#!/usr/bin/env python
"""Data-parallel training throughput, side by side in one run: 1 process against K processes (Lightning DDP).

Trains the same scan with the same global batch (``--batch-size`` groups per
optimiser step, split over the processes) and times only the training
batches of the epochs after the first (forward, backward, gradient
all-reduce, optimiser; no validation), on rank 0. Prints training patterns/s
(groups x gridsize^2 per second) per setting and the ratio K-process /
1-process. Rows: 1 process with 1 thread (or 1 GPU with ``--accelerator gpu``), K
processes with 1 thread (K GPUs) each, and on a CPU also 1 process with K
threads (the same cores used by threads instead of processes). Workers are spawned (``ddp_spawn``) so the
benchmark runs in one command.

Usage::

    python benchmarks/distributed.py [--processes 2] [--patterns-side 24] [--epochs 3] [--preset tiny]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L

from ptycho_ml.config import ModelConfig, SimulationConfig, TrainingConfig
from ptycho_ml.data.readers import load_scan
from ptycho_ml.model.training import fit, quiet_lightning
from ptycho_ml.physics import simulate


class TrainTimer(L.Callback):
    """Seconds spent in training batches, from the second epoch on, written by rank 0 to ``path`` (JSON)."""

    def __init__(self, path: str):
        self.path, self.seconds, self.batches, self.groups = path, 0.0, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch >= 1:  # the first epoch warms up (allocations, gloo buffers)
            self.seconds += time.perf_counter() - self.t0
            self.batches += 1
            self.groups += int(batch[0].shape[0]) * trainer.world_size  # every process trains a batch this long

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps({"seconds": self.seconds, "groups": self.groups,
                                                   "batches": self.batches}))


def measure(scan, out: Path, processes: int, threads: int, args) -> dict:
    cfg = TrainingConfig(output_dir=str(out), epochs=args.epochs, batch_size=args.batch_size // processes,
                         model=ModelConfig(preset=args.preset, gridsize=args.gridsize), accelerator=args.accelerator,
                         devices=processes, strategy="ddp_spawn" if processes > 1 else "auto", threads=threads,
                         quiet=True, early_stopping_patience=args.epochs, seed=0)
    import torch

    torch.set_num_threads(threads)
    timing = out / "timing.json"
    fit(cfg, scan, callbacks=[TrainTimer(str(timing))])
    t = json.loads(timing.read_text())
    patterns = t["groups"] * args.gridsize**2
    return {"processes": processes, "threads_per_process": threads, "patterns": patterns,
            "seconds": t["seconds"], "patterns_per_s": patterns / t["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--patterns-side", type=int, default=24, help="the raster scan is this many positions a side")
    p.add_argument("--N", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (groups per optimiser step)")
    p.add_argument("--gridsize", type=int, default=2)
    p.add_argument("--preset", default="tiny", choices=["tiny", "cpu", "gpu"])
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    args = p.parse_args()
    quiet_lightning()
    with tempfile.TemporaryDirectory() as tmp:
        step = 4.0
        size = int(args.patterns_side * step + args.N + 8)
        sim = SimulationConfig(N=args.N, object_size_px=size, step_px=step, aperture_radius_px=args.N / 6,
                               defocus_m=150e-6, nphotons=1e5, seed=3)
        path = Path(tmp) / "scan.npz"
        simulate.write_simulated(simulate.simulate_scan(sim), path)
        scan = load_scan(str(path))
        rows = [measure(scan, Path(tmp) / "one", 1, 1, args),
                measure(scan, Path(tmp) / "many", args.processes, 1, args)]
        if args.accelerator == "cpu":  # the same cores as threads of one process
            rows.append(measure(scan, Path(tmp) / "threads", 1, args.processes, args))
    print(f"scan: {len(scan)} patterns of {args.N}x{args.N}, gridsize {args.gridsize}, preset {args.preset}, "
          f"global batch {args.batch_size}, epochs 2..{args.epochs} timed, {args.accelerator}")
    for r in rows:
        print(f"{r['processes']} process(es) x {r['threads_per_process']} thread(s): "
              f"{r['patterns_per_s']:.0f} training patterns/s ({r['patterns']} patterns in {r['seconds']:.1f} s)")
    print(f"ratio {args.processes} processes / 1 process: {rows[1]['patterns_per_s'] / rows[0]['patterns_per_s']:.2f}")
    if len(rows) > 2:
        print(f"ratio {args.processes} processes / 1 process with {args.processes} threads: "
              f"{rows[1]['patterns_per_s'] / rows[2]['patterns_per_s']:.2f}")


if __name__ == "__main__":
    main()
