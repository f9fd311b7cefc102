#!/usr/bin/env python
"""Speed, measured side by side in one run: network forward vs the whole reconstruct path, training, memory, FLOP/s.

(a) patterns/s of the bare model (batches already in memory): the generator
    forward and, for models with learned stages, those stages on the stitched
    object (each reported on its own too);
(b) patterns/s of the whole reconstruct path without refinement: reading the
    scan from its NPZ file, the model, and vectorised stitching;
(b)/(a) is the stitching-and-I/O overhead ratio (goal >= 0.8; the reference
implementation's stitching cut it to about 0.04). Also training patterns/s
(forward + backward + optimiser), peak resident memory, and the network's
achieved GFLOP/s as a fraction of torch's float32 matmul GFLOP/s measured now.
Each figure is the median of ``--repeats`` runs; quote ratios, not absolutes.

Usage::

    python benchmarks/speed.py [--bundle B] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

from ptycho_ml.physics import simulate
from ptycho_ml.config import InferenceConfig, ModelConfig
from ptycho_ml.data import load_scan
from ptycho_ml.data.grouping import partition_groups
from ptycho_ml.model.module import physics_step
from ptycho_ml.model.bundle_io import load_model_bundle
from ptycho_ml.model.network import DiffractionToObject, flops_per_pattern
from ptycho_ml.inference.reconstruct import inference_probe, network_object, reconstruct

HERE = Path(__file__).resolve().parent


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(repeats: int) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    seconds = median_time(lambda: a @ b, repeats)
    return 2 * 1024**3 / seconds / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=None, help="model to time (default: an untrained CPU-preset model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workdir", type=Path, default=HERE / "out" / "speed")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)

    path = args.workdir / "test.npz"
    if not path.exists():
        simulate.write_simulated(simulate.simulate_scan(simulate.default_configs()["test"]), path)
    scan = load_scan(path)
    if args.bundle:
        model, _ = load_model_bundle(args.bundle)
    else:  # speed does not depend on the weights
        model = DiffractionToObject(ModelConfig(preset="cpu"), torch.from_numpy(scan.probe), 1.0).eval()
    M = len(scan)
    C = model.cfg.gridsize**2
    # The same grouping reconstruct uses, prepared in memory: (a) times the network alone.
    groups, _ = partition_groups(scan.positions_px, model.cfg.gridsize)
    amplitudes = torch.from_numpy(scan.amplitude(slice(0, M)))[torch.from_numpy(groups)]  # (G, C, N, N)
    probe = inference_probe(model, scan)
    group_batch = max(1, args.batch_size // C)

    def network_only():
        with torch.inference_mode():
            for start in range(0, len(amplitudes), group_batch):
                model(amplitudes[start:start + group_batch], probe)

    good = None if scan.good_pixels is None else torch.from_numpy(scan.good_pixels)
    positions = torch.from_numpy(scan.positions_px.astype("float32"))
    all_amplitudes = torch.from_numpy(scan.amplitude(slice(0, M)))
    start_obj = network_object(model, scan, probe=probe, learned_refinement=False)[0]

    def stages_only():  # the learned stages over the stitched object (nothing for a model without them)
        with torch.no_grad():
            model.refine_stitched(start_obj, probe, positions, all_amplitudes, good)

    def whole_path():
        reconstruct(model, load_scan(path), InferenceConfig(refine_steps=0, batch_size=args.batch_size,
                                                            progress=False, threads=args.threads))

    # Interleaved, so that both see the same load from whatever else runs on the machine.
    network_only(), stages_only(), whole_path()
    runs = [(median_time(network_only, 1), median_time(stages_only, 1), median_time(whole_path, 1))
            for _ in range(args.repeats)]
    t_net = statistics.median(r[0] for r in runs)
    t_stages = statistics.median(r[1] for r in runs)
    t_model = statistics.median(r[0] + r[1] for r in runs)
    t_all = statistics.median(r[2] for r in runs)

    train_model = DiffractionToObject(model.cfg, model.probe, float(model.amplitude_scale)).train()
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-3)
    batch = amplitudes[:32]
    offsets = torch.zeros(32, C, 2)

    def train_step():
        loss, _ = physics_step(train_model, batch, offsets, "poisson")
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_train = median_time(train_step, args.repeats) / C  # per pattern: each group holds C patterns
    flops = flops_per_pattern(model)
    net_rate = M / t_net
    gflops = flops * net_rate / 1e9
    peak = matmul_gflops(args.repeats)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"scan: {M} patterns of {scan.N}x{scan.N}, {args.threads} thread(s), median of {args.repeats}")
    stages = model.refiner.stages if model.refiner is not None else 0
    print(f"    generator forward             {net_rate:9.1f} patterns/s")
    print(f"    {stages} learned stages             {t_stages:9.3f} s per scan")
    print(f"(a) model (generator + stages)    {M / t_model:9.1f} patterns/s")
    print(f"(b) reconstruct path, no refine   {M / t_all:9.1f} patterns/s   (b)/(a) = {t_model / t_all:.3f}  (goal >= 0.8)")
    print(f"training step (fwd+bwd+AdamW)     {32 / t_train:9.1f} patterns/s")
    print(f"generator {flops / 1e6:.1f} MFLOP/pattern -> {gflops:.2f} GFLOP/s; torch matmul {peak:.1f} GFLOP/s; "
          f"fraction {gflops / peak:.3f}")
    print(f"peak resident memory              {rss_mb:9.0f} MB")


if __name__ == "__main__":
    main()
