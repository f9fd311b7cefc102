#!/usr/bin/env python
"""Scans larger than memory: does `ptycho-ml reconstruct` stream (docs/architecture.md, memory limits)?

Generates two simulated raster scans with :func:`ptycho_ml.physics.simulate.simulate_large_scan`
(``--small`` and ``--large`` patterns, written chunk by chunk so generation is
bounded too; skipped when the files already exist), then reconstructs each in a
fresh process (network only: ``--refine-steps 0 --no-metrics``) and measures

* peak RSS of that process (``os.wait4`` on the child: its own ``ru_maxrss``,
  not the maximum over all children);
* wall time of the whole command and the network phase alone
  (``timings_s.network_s`` from its ``summary.json``: read + network + stitch),
  as patterns/s;
* the same reconstruction of the small scan held fully in RAM (a fresh process
  that copies every pattern into an ndarray first, then calls
  :func:`ptycho_ml.inference.reconstruct.reconstruct`): the in-memory reference.

Goals: peak RSS large/small <= 1.2 (memory bounded by the batch, not the scan)
and streaming/in-memory throughput >= 0.9.

Usage::

    python benchmarks/large_scan.py [--small 20000] [--large 200000] [--N 64] \\
        [--workdir /tmp/ptycho_large] [--bundle wts.h5.zip] [--threads 1] [--batch-size 256]

Without ``--bundle`` a model is trained for one epoch on the embedded default
data (``ptycho-ml train --preset tiny --gridsize 2 --epochs 1``, see ``--preset``/``--gridsize``)
into WORKDIR/model_PRESET_gGRIDSIZE (reused when present).
Every command run is printed. Disk: 4·N²·M bytes per scan (200,000 × 64² ≈ 3.3 GB).
The page cache is left alone (other users share the machine), so reads are
usually warm: the scans were just written.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

IN_MEMORY_SNIPPET = r'''
"""In-memory reference: every pattern copied into RAM first, then the same reconstruct()."""
import json, sys, time
import numpy as np

bundle, data, threads, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from ptycho_ml.config import InferenceConfig
from ptycho_ml.data.readers import load_scan
from ptycho_ml.data.scan import ScanData
from ptycho_ml.model.bundle_io import load_model_bundle
from ptycho_ml.inference.reconstruct import reconstruct

t0 = time.perf_counter()
disk = load_scan(data)
patterns = np.array(disk.patterns, dtype=np.float32)  # a private in-RAM copy of the whole scan
scan = ScanData(patterns, disk.probe, np.array(disk.positions_px), disk.obj_shape, disk.obj, disk.bad_pixels,
                dict(disk.metadata), "<memory>", disk.patterns_are_counts, disk.patterns_field)
del disk
load_s = time.perf_counter() - t0
model = load_model_bundle(bundle)[0]
t1 = time.perf_counter()
result = reconstruct(model, scan, InferenceConfig(refine_steps=0, progress=False, threads=threads, batch_size=batch_size))
print("RESULT " + json.dumps({"n_patterns": len(scan), "load_s": load_s, "reconstruct_s": time.perf_counter() - t1,
                              "network_s": result.timings_s["network_s"], "in_ram_mb": patterns.nbytes / 2**20}))
'''


def cli_command() -> list[str]:
    """``ptycho-ml`` beside this interpreter, else on PATH, else ``python -m ptycho_ml.cli``."""
    beside = Path(sys.executable).parent / "ptycho-ml"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ptycho-ml")
    return [found] if found else [sys.executable, "-m", "ptycho_ml.cli"]


def _sample_rss(pid: int, peaks: dict, stop: threading.Event, every_s: float = 0.2) -> None:
    """Track the largest RssAnon (private memory) and RssFile (mapped file pages, e.g. a memory-mapped
    scan; the kernel can drop them, but ru_maxrss counts them) seen in /proc/PID/status."""
    while not stop.is_set():
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    key, _, value = line.partition(":")
                    if key in ("RssAnon", "RssFile"):
                        peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) / 1024)
        except (OSError, ValueError):
            return
        stop.wait(every_s)


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` in a fresh process; return wall time, its own peak RSS (MB), sampled peaks of its
    anonymous and file-backed RSS (MB) and its stdout."""
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    peaks: dict = {}
    stop = threading.Event()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, env=env)
        sampler = threading.Thread(target=_sample_rss, args=(proc.pid, peaks, stop), daemon=True)
        sampler.start()
        stdout = proc.stdout.read()
        stop.set()
        sampler.join()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}); stderr in {log}:\n{log.read_text()[-2000:]}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": stdout,  # Linux: ru_maxrss in KiB
            "peak_anon_mb": peaks.get("RssAnon", float("nan")), "peak_file_mb": peaks.get("RssFile", float("nan"))}


def make_scan(path: Path, n: int, N: int, seed: int, log: Path) -> None:
    if path.exists():
        print(f"# {path} exists, not regenerated", flush=True)
        return
    code = ("import sys, torch; torch.set_num_threads(1); from ptycho_ml import simulate; "
            "cfg = simulate.default_configs(N=int(sys.argv[2]), seed=int(sys.argv[4]))['test']; "
            "print(simulate.simulate_large_scan(sys.argv[1], cfg, int(sys.argv[3])))")
    r = run_measured([sys.executable, "-c", code, str(path), str(N), str(n), str(seed)], log)
    size = path.stat().st_size / 2**30
    print(f"# generated {n} patterns -> {path} ({size:.2f} GiB) in {r['wall_s']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=20000, help="patterns in the small scan")
    ap.add_argument("--large", type=int, default=200000, help="patterns in the large scan")
    ap.add_argument("--N", type=int, default=64, help="pattern size")
    ap.add_argument("--workdir", default="/tmp/ptycho_large")
    ap.add_argument("--bundle", default="", help="wts.h5.zip (default: train a tiny model for 1 epoch)")
    ap.add_argument("--preset", default="tiny", help="model preset when training the default model")
    ap.add_argument("--gridsize", type=int, default=2, help="gridsize when training the default model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=2, help="alternating small streaming/in-memory pairs; the fastest of each is kept")
    args = ap.parse_args(argv)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cli = cli_command()
    need_gb = 4 * args.N**2 * (args.small + args.large) / 1e9
    free_gb = shutil.disk_usage(work).free / 1e9
    print(f"# workdir {work}: {free_gb:.1f} GB free, scans need {need_gb:.1f} GB", flush=True)
    scans = {label: work / f"scan_{n}_N{args.N}.npz" for label, n in (("small", args.small), ("large", args.large))}
    if free_gb < need_gb * 1.05 and not all(p.exists() for p in scans.values()):
        raise SystemExit(f"not enough disk in {work}: {free_gb:.1f} GB free, {need_gb:.1f} GB needed")

    bundle = args.bundle
    if not bundle:
        model_dir = work / f"model_{args.preset}_g{args.gridsize}"
        bundle = str(model_dir / "wts.h5.zip")
        if not Path(bundle).exists():
            run_measured(cli + ["train", "--preset", args.preset, "--gridsize", str(args.gridsize), "--epochs", "1",
                                "--quiet", "--threads", str(args.threads), "--out", str(model_dir)], work / "train.log")
    print(f"# model: {bundle}", flush=True)

    for label, n in (("small", args.small), ("large", args.large)):
        make_scan(scans[label], n, args.N, args.seed, work / f"simulate_{label}.log")

    snippet = work / "inmemory.py"
    snippet.write_text(IN_MEMORY_SNIPPET)

    def streaming(label: str) -> dict:
        out = work / f"out_{label}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_measured(cli + ["reconstruct", "--bundle", bundle, "--data", str(scans[label]), "--out", str(out),
                                "--refine-steps", "0", "--no-metrics", "--quiet", "--threads", str(args.threads),
                                "--batch-size", str(args.batch_size)], work / f"reconstruct_{label}.log")
        summary = json.loads((out / "summary.json").read_text())
        return {"run": f"streaming {label}", "n": summary["n_patterns"], "wall_s": r["wall_s"],
                "network_s": summary["timings_s"]["network_s"], "peak_rss_mb": r["peak_rss_mb"],
                "peak_anon_mb": r["peak_anon_mb"], "peak_file_mb": r["peak_file_mb"]}

    def in_memory() -> dict:
        r = run_measured([sys.executable, str(snippet), bundle, str(scans["small"]), str(args.threads), str(args.batch_size)],
                         work / "inmemory.log")
        res = json.loads([ln for ln in r["stdout"].splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
        return {"run": "in-memory small", "n": res["n_patterns"], "wall_s": r["wall_s"], "network_s": res["network_s"],
                "peak_rss_mb": r["peak_rss_mb"], "peak_anon_mb": r["peak_anon_mb"], "peak_file_mb": r["peak_file_mb"],
                "note": f"load into RAM {res['load_s']:.1f} s, {res['in_ram_mb']:.0f} MB"}

    # The small runs alternate (streaming, in-memory) --repeats times and the fastest of each is kept:
    # on a shared machine a single pair is at the mercy of whatever else runs at that moment.
    small_runs, memory_runs = [], []
    for _ in range(max(1, args.repeats)):
        small_runs.append(streaming("small"))
        memory_runs.append(in_memory())
    rows = [min(small_runs, key=lambda r: r["network_s"]), streaming("large"), min(memory_runs, key=lambda r: r["network_s"])]
    for best, runs in ((rows[0], small_runs), (rows[2], memory_runs)):
        if len(runs) > 1:
            best["note"] = (best.get("note", "") + "; " if best.get("note") else "") + \
                "best of net s " + "/".join(f"{r['network_s']:.1f}" for r in runs)

    print()
    print(f"{'run':<18}{'patterns':>10}{'wall s':>9}{'net s':>9}{'pat/s net':>11}{'pat/s wall':>12}{'peak RSS MB':>13}"
          f"{'anon MB':>9}{'file MB':>9}")
    for row in rows:
        print(f"{row['run']:<18}{row['n']:>10}{row['wall_s']:>9.1f}{row['network_s']:>9.1f}"
              f"{row['n'] / row['network_s']:>11.0f}{row['n'] / row['wall_s']:>12.0f}{row['peak_rss_mb']:>13.0f}"
              f"{row['peak_anon_mb']:>9.0f}{row['peak_file_mb']:>9.0f}"
              + (f"   ({row['note']})" if row.get("note") else ""))
    print("peak RSS = ru_maxrss of the process; anon/file = sampled peaks of RssAnon (private memory) and "
          "RssFile (mapped file pages, reclaimable) from /proc/PID/status")
    small, large, mem = rows
    rss_ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    thr_small = (small["n"] / small["network_s"]) / (mem["n"] / mem["network_s"])
    thr_large = (large["n"] / large["network_s"]) / (mem["n"] / mem["network_s"])
    print()
    print(f"peak RSS large/small: {rss_ratio:.2f}  (goal <= 1.2: {'met' if rss_ratio <= 1.2 else 'NOT met'}); "
          f"private (anon) only: {large['peak_anon_mb'] / small['peak_anon_mb']:.2f}")
    print(f"throughput streaming/in-memory (network phase): small {thr_small:.2f}, large {thr_large:.2f}  "
          f"(goal >= 0.9: {'met' if min(thr_small, thr_large) >= 0.9 else 'NOT met'})")
    (work / "results.json").write_text(json.dumps({"rows": rows, "rss_ratio": rss_ratio, "throughput_ratio_small": thr_small,
                                                   "throughput_ratio_large": thr_large, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
