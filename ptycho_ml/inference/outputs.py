"""Every output of a reconstruction: object.h5, PNG previews, a ptychodus product.h5 and summary.json.

:func:`run_reconstruction` (shared by ``ptycho-ml reconstruct``, its MLflow
entry point and the tracking layer) reconstructs a scan and writes them all,
locally or to an ``s3://`` prefix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ptycho_ml.config import InferenceConfig
from ptycho_ml.data.object_h5 import write_object_h5
from ptycho_ml.data.ptychodus import geometry_from_scan, write_product
from ptycho_ml.data.scan import ScanData, centres_box
from ptycho_ml.data.storage import OutputLocation
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.inference import metrics as metrics_mod
from ptycho_ml.inference.reconstruct import ReconstructionResult, check_compatible, check_refinement, reconstruct
from ptycho_ml.model.network import DiffractionToObject

#: The files a reconstruction writes, in the order they are reported.
OUTPUT_FILES = ("object.h5", "amplitude.png", "phase.png", "probe.png", "product.h5", "summary.json")
#: The error panels' diverging colour map (drawn centred on zero).
ERROR_CMAP = "RdBu_r"


def preview_panels(obj: np.ndarray, truth: np.ndarray | None = None) -> dict[str, list[tuple[str, np.ndarray, str, str]]]:
    """What each preview shows: ``{"amplitude": [(title, image, cmap, colour-bar label), ...], "phase": [...]}``.

    obj, truth: ``(H, W)`` complex, the same (already cropped) view. Without
    ``truth`` one panel each; with it three: the reconstruction, its ground
    truth and the error (reconstruction - truth), the reconstruction's global
    phase aligned to the truth first (:func:`~ptycho_ml.inference.metrics.align_phase`,
    as the metrics do), the phase error wrapped to (-π, π].
    """
    if truth is None:
        return {"amplitude": [("amplitude", np.abs(obj), "gray", "amplitude")],
                "phase": [("phase", np.angle(obj), "twilight", "phase (rad)")]}
    aligned = metrics_mod.align_phase(obj, truth)
    return {"amplitude": [("reconstruction amplitude", np.abs(aligned), "gray", "amplitude"),
                          ("ground truth amplitude", np.abs(truth), "gray", "amplitude"),
                          ("error amplitude", np.abs(aligned) - np.abs(truth), ERROR_CMAP, "amplitude error")],
            "phase": [("reconstruction phase", np.angle(aligned), "twilight", "phase (rad)"),
                      ("ground truth phase", np.angle(truth), "twilight", "phase (rad)"),
                      ("error phase", np.angle(aligned * np.conj(truth)), ERROR_CMAP, "phase error (rad)")]}


def write_previews(out_dir: str | Path, obj: np.ndarray, prefix: str = "", title: str = "",
                   region: tuple[slice, slice] | None = None, truth: np.ndarray | None = None) -> list[Path]:
    """PNG previews ``{prefix}amplitude.png`` and ``{prefix}phase.png`` with colour bars.

    ``region`` crops to the scanned area (unscanned pixels carry no information).
    ``truth`` ``(H, W)`` complex, the object's ground truth (same shape as
    ``obj``): each preview then shows the reconstruction, the truth and the
    error side by side (:func:`preview_panels`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if truth is not None and np.shape(truth) != np.shape(obj):
        raise PtychoInputError(f"previews: ground truth: found shape {tuple(np.shape(truth))}, "
                               f"expected the object's {tuple(np.shape(obj))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    region = region or (slice(None), slice(None))
    # A preview needs no more pixels than a screen: subsample very large objects.
    step = max(1, int(np.ceil(max(obj[region].shape) / 1024)))
    panels = preview_panels(obj[region][::step, ::step], None if truth is None else np.asarray(truth)[region][::step, ::step])
    paths = []
    for name, row in panels.items():
        fig, axes = plt.subplots(1, len(row), figsize=(5 * len(row), 4.2), squeeze=False)
        # Reconstruction and truth share one colour scale (compared by eye); the error is centred on zero.
        compared = [data for _, data, cmap, _ in row if cmap != ERROR_CMAP]
        shared = {"vmin": min(float(d.min()) for d in compared), "vmax": max(float(d.max()) for d in compared)}
        for ax, (label_title, data, cmap, label) in zip(axes[0], row):
            limit = float(np.abs(data).max()) or 1.0
            im = ax.imshow(data, cmap=cmap, **({"vmin": -limit, "vmax": limit} if cmap == ERROR_CMAP else shared))
            ax.set_title(f"{title} {label_title}".strip())
            ax.set_xlabel("x (px)")
            ax.set_ylabel("y (px)")
            fig.colorbar(im, ax=ax, label=label)
        fig.tight_layout()
        path = out_dir / f"{prefix}{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def write_probe_preview(out_dir: str | Path, probe: np.ndarray, title: str = "probe") -> Path:
    """``probe.png``: amplitude (top) and phase (bottom) of each incoherent mode ``(K, N, N)``, with its power share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probe = np.asarray(probe)
    probe = probe if probe.ndim == 3 else probe[None]
    K = len(probe)
    power = np.sum(np.abs(probe) ** 2, axis=(-2, -1))
    fig, axes = plt.subplots(2, K, figsize=(2.6 * K + 0.6, 5), squeeze=False)
    for k in range(K):
        for row, data, cmap in ((0, np.abs(probe[k]), "gray"), (1, np.angle(probe[k]), "twilight")):
            im = axes[row, k].imshow(data, cmap=cmap)
            axes[row, k].set_xticks([])
            axes[row, k].set_yticks([])
            fig.colorbar(im, ax=axes[row, k], fraction=0.046)
        axes[0, k].set_title(f"mode {k} ({power[k] / power.sum():.0%})")
    axes[0, 0].set_ylabel("amplitude")
    axes[1, 0].set_ylabel("phase (rad)")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(out_dir) / "probe.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def refinement_summary(scan: ScanData, result: ReconstructionResult) -> dict[str, Any]:
    """What the refinement changed beyond the object: the probe (modes, power shares, relative change of
    the summed intensity and of the first mode after aligning its global phase) and the positions
    (correction RMS and maximum, px); empty without refinement."""
    if result.probe is None or result.positions_px is None:
        return {}
    start = np.asarray(scan.probe)
    start = start if start.ndim == 3 else start[None]
    probe = np.asarray(result.probe)
    power = np.sum(np.abs(probe) ** 2, axis=(-2, -1))
    first, ref = probe[0], start[0]
    overlap = np.vdot(first, ref)
    aligned = first * (overlap / abs(overlap) if abs(overlap) > 0 else 1.0)
    intensity, ref_intensity = np.sum(np.abs(probe) ** 2, 0), np.sum(np.abs(start) ** 2, 0)
    shift = np.linalg.norm(np.asarray(result.positions_px) - np.asarray(scan.positions_px), axis=1)
    out = {"probe": {"modes": int(len(probe)), "power_fractions": [float(p) for p in power / power.sum()],
                     "first_mode_change": float(np.linalg.norm(aligned - ref) / np.linalg.norm(ref)),
                     "intensity_change": float(np.linalg.norm(intensity - ref_intensity) / np.linalg.norm(ref_intensity))},
           "positions": {"rms_correction_px": float(np.sqrt(np.mean(shift**2))), "max_correction_px": float(shift.max())}}
    if result.intensity_scale is not None:
        scale = np.asarray(result.intensity_scale)
        out["intensity_scale"] = {"min": float(scale.min()), "max": float(scale.max()), "std": float(scale.std())}
    return out


def describe_auto_refinement(report: dict[str, Any]) -> str:
    """One line on what the automatic refinement found and kept (``summary.json``'s ``auto_refinement``)."""
    if report.get("skipped"):
        return f"refinement: object only ({report['skipped']})"
    ratios = report["fit_ratios"]
    if "object" not in ratios:
        return "refinement: object only"
    first = f"data/noise deviance {ratios['object']:.2f} with the object alone (limit {report['limit']:.2f})"
    if report["chosen"] == "object":
        return f"refinement: object only; {first}"
    return f"refinement: {report['chosen']} refined too; {first}, {ratios[report['chosen']]:.2f} after"


def run_reconstruction(model: DiffractionToObject, scan: ScanData, cfg: InferenceConfig, out: str,
                       provenance: dict[str, Any] | None = None, with_metrics: bool = True) -> dict[str, Any]:
    """Reconstruct ``scan`` and write to ``out`` (a directory or ``s3://`` prefix):

    * ``object.h5``: complex object, amplitude, phase, illumination;
    * ``amplitude.png``, ``phase.png`` (scanned region, colour bars), ``probe.png`` (the probe modes);
    * ``product.h5``: a ptychodus 1.7.0 product (object, probe, positions, loss history);
    * ``summary.json``: timings, settings and, when the scan has ground truth
      (and ``with_metrics``), metrics.

    ``provenance`` (from :func:`ptycho_ml.lifecycle.registry.load_model_with_provenance`:
    the URI given, the registered name and resolved version, the run id, the
    bundle's sha256) is recorded in object.h5, product.h5 and summary.json.

    Nothing is written (or uploaded) unless the reconstruction succeeded.
    """
    check_compatible(model, scan)  # refuse before the output directory is made
    check_refinement(scan, cfg)
    provenance = dict(provenance or {})
    model_source = str(provenance.get("uri", ""))
    with OutputLocation(out) as loc:  # checks an S3 destination before the work, uploads after it
        result = reconstruct(model, scan, cfg)
        summary: dict[str, Any] = {"source": scan.source, "model": model_source, "provenance": provenance,
                                   "n_patterns": result.n_patterns, "timings_s": result.timings_s,
                                   "inference": cfg.to_dict(), **refinement_summary(scan, result)}
        if result.auto_refinement is not None:
            summary["auto_refinement"] = result.auto_refinement
        # Preview crop: the box the scan centres cover (cheap for any object size).
        region = centres_box(scan.positions_px, scan.obj_shape)
        if with_metrics and scan.obj is not None and scan.obj.shape == result.obj.shape:
            summary["metrics"] = metrics_mod.evaluate_object(result.obj, scan.obj, scan.positions_px, scan.N, scan.probe)
        write_object_h5(loc.path / "object.h5", result.obj, {"source": scan.source, "model": model_source,
                                                              "provenance": provenance,
                                                              "refine_steps": cfg.refine_steps},
                        result.illumination, probe=result.probe, positions_px=result.positions_px,
                        intensity_scale=result.intensity_scale)
        write_previews(loc.path, result.obj, title="reconstructed", region=region)
        write_probe_preview(loc.path, scan.probe if result.probe is None else result.probe,
                            title="refined probe" if "probe" in result.refined else "probe")
        write_product_for(loc.path / "product.h5", scan, result, provenance)
        (loc.path / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        summary["lines"] = [loc.describe(n) for n in OUTPUT_FILES]
    t = result.timings_s
    summary["lines"].append(f"{result.n_patterns} patterns: network {t.get('network_s', 0):.2f} s, "
                            f"refinement {t.get('refine_s', t.get('finetune_s', 0)):.2f} s ({cfg.refine_steps} steps)")
    if result.auto_refinement is not None:
        summary["lines"].append(describe_auto_refinement(result.auto_refinement))
    if "probe" in result.refined and "probe" in summary:
        p = summary["probe"]
        summary["lines"].append(f"probe: {p['modes']} mode(s), power shares "
                                + ", ".join(f"{f:.0%}" for f in p["power_fractions"])
                                + f"; intensity changed by {p['intensity_change']:.1%}")
    if "positions" in result.refined and "positions" in summary:
        q = summary["positions"]
        summary["lines"].append(f"positions corrected: RMS {q['rms_correction_px']:.3f} px, max {q['max_correction_px']:.3f} px")
    if "metrics" in summary:
        summary["lines"].append(metrics_mod.format_table(summary["metrics"]))
    return summary


def write_product_for(path, scan: ScanData, result: ReconstructionResult, provenance: dict[str, Any]) -> None:
    """Write the reconstruction as a ptychodus product.h5, geometry from the input (or stated defaults).

    Its ``comments`` name the scan and, as JSON, the model's provenance (ptychodus shows comments as they are).
    """
    epochs = list(range(len(result.loss_history)))
    comments = f"ptycho_ml reconstruction of {scan.source}; model: {json.dumps(provenance, sort_keys=True)}"
    probe = scan.probe if result.probe is None else result.probe  # refined probe and positions when refined
    positions = scan.positions_px if result.positions_px is None else result.positions_px
    write_product(path, obj=result.obj, probe=probe, positions_px=positions, position_indexes=None,
                  geometry=geometry_from_scan(scan), loss_epochs=epochs, loss_values=result.loss_history,
                  name="ptycho_ml", comments=comments)
