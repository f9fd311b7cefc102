"""Writing reconstructions: the object as HDF5 and PNG previews of amplitude and phase."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ptycho_ml.data.atomic import atomic_path


def write_object_h5(path: str | Path, obj: np.ndarray, attrs: dict | None = None,
                    illumination: np.ndarray | None = None) -> Path:
    """Atomically write ``obj (H, W) complex64`` with its amplitude and phase as datasets.

    Datasets: ``object`` (complex64), ``amplitude`` and ``phase`` (float32,
    radians), optional ``illumination``; ``attrs`` go to the root as JSON-safe
    attributes (dicts are stored as JSON strings).
    """
    import h5py

    path = Path(path)
    obj = np.asarray(obj, dtype=np.complex64)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("object", data=obj)
        amplitude = h5.create_dataset("amplitude", shape=obj.shape, dtype=np.float32)
        phase = h5.create_dataset("phase", shape=obj.shape, dtype=np.float32)
        for start in range(0, obj.shape[0], 512):  # row blocks: no object-sized temporaries
            rows = obj[start:start + 512]
            amplitude[start:start + 512] = np.abs(rows)
            phase[start:start + 512] = np.angle(rows)
        if illumination is not None:
            h5.create_dataset("illumination", data=np.asarray(illumination, dtype=np.float32))
        for key, value in (attrs or {}).items():
            h5.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return path


def write_previews(out_dir: str | Path, obj: np.ndarray, prefix: str = "", title: str = "",
                   region: tuple[slice, slice] | None = None) -> list[Path]:
    """PNG previews ``{prefix}amplitude.png`` and ``{prefix}phase.png`` with colour bars.

    ``region`` crops to the scanned area (unscanned pixels carry no information).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    view = obj[region] if region is not None else obj
    # A preview needs no more pixels than a screen: subsample very large objects.
    step = max(1, int(np.ceil(max(view.shape) / 1024)))
    view = view[::step, ::step]
    paths = []
    for name, data, cmap, label in (("amplitude", np.abs(view), "gray", "amplitude"),
                                    ("phase", np.angle(view), "twilight", "phase (rad)")):
        fig, ax = plt.subplots(figsize=(5, 4.2))
        im = ax.imshow(data, cmap=cmap)
        ax.set_title(f"{title} {name}".strip())
        ax.set_xlabel("x (px)")
        ax.set_ylabel("y (px)")
        fig.colorbar(im, ax=ax, label=label)
        fig.tight_layout()
        path = out_dir / f"{prefix}{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
