"""Typed, validated configuration.

Every config is a frozen dataclass. ``from_dict`` rejects unknown keys and
wrong types with a one-line :class:`~ptycho_ml.errors.PtychoInputError`;
``to_dict`` gives a JSON-safe dict (used for MLflow params and the bundle).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin

from ptycho_ml.errors import PtychoInputError

T = TypeVar("T")


def _check_type(cls_name: str, name: str, value: Any, annotation: Any) -> Any:
    """Check (and gently coerce int->float) one field value against its annotation."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    where = f"{cls_name}.{name}"
    if origin is Literal:
        if value not in args:
            raise PtychoInputError(f"config: {where}: found {value!r}, expected one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(cls_name, name, value, inner[0])
    if origin in (tuple,):
        if not isinstance(value, (list, tuple)):
            raise PtychoInputError(f"config: {where}: found {value!r}, expected a list")
        elem = args[0] if args else Any
        return tuple(_check_type(cls_name, name, v, elem) for v in value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PtychoInputError(f"config: {where}: found {value!r}, expected a number")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise PtychoInputError(f"config: {where}: found {value!r}, expected an integer")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise PtychoInputError(f"config: {where}: found {value!r}, expected true/false")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise PtychoInputError(f"config: {where}: found {value!r}, expected a string")
        return value
    return value


class ConfigBase:
    """Mixin: strict ``from_dict``/``to_dict`` and a ``validate`` hook."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                continue
            object.__setattr__(self, f.name, _check_type(type(self).__name__, f.name, value, hints[f.name]))
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden where needed
        """Raise PtychoInputError on values that are individually typed right but wrong."""

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
        data = dict(data or {})
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise PtychoInputError(
                f"config: {cls.__name__}: unknown key(s) {unknown}, expected some of {sorted(known)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in data.items():
            sub = hints[name]
            if isinstance(sub, type) and dataclasses.is_dataclass(sub) and isinstance(value, dict):
                value = sub.from_dict(value)  # type: ignore[attr-defined]
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        return json.loads(json.dumps(out))  # tuples -> lists, JSON-safe

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _positive(cls: str, name: str, value: float) -> None:
    if not value > 0:
        raise PtychoInputError(f"config: {cls}.{name}: found {value!r}, expected a positive value")


@dataclass(frozen=True)
class SimulationConfig(ConfigBase):
    """Parameters of one simulated scan (see :mod:`ptycho_ml.physics.simulate`)."""

    N: int = 64
    object_size_px: int = 256
    object_families: tuple[str, ...] = ("lines", "grf", "siemens")
    amplitude_min: float = 0.3
    phase_range_rad: float = 2.0
    probe_kind: Literal["focused", "aberrated", "gaussian", "file"] = "focused"
    probe_file: str = ""
    aperture_radius_px: float = 8.0
    defocus_m: float = 300e-6
    gaussian_sigma_px: float = 7.0
    energy_eV: float = 8800.0
    pixel_size_m: float = 20e-9
    scan: Literal["raster", "spiral"] = "raster"
    step_px: float = 6.0
    jitter_px: float = 0.5
    nphotons: float = 1e6
    seed: int = 0

    def validate(self) -> None:
        name = type(self).__name__
        if self.N < 8 or self.N % 2:
            raise PtychoInputError(f"config: {name}.N: found {self.N}, expected an even size >= 8")
        if self.object_size_px < self.N + 2:
            raise PtychoInputError(
                f"config: {name}.object_size_px: found {self.object_size_px}, expected >= N + 2 = {self.N + 2}"
            )
        known = {"lines", "grf", "siemens", "dead_leaves", "fractal"}
        bad = [f for f in self.object_families if f not in known]
        if bad or not self.object_families:
            raise PtychoInputError(
                f"config: {name}.object_families: found {list(self.object_families)}, expected a non-empty subset of {sorted(known)}"
            )
        if not 0 < self.amplitude_min <= 1:
            raise PtychoInputError(f"config: {name}.amplitude_min: found {self.amplitude_min}, expected in (0, 1]")
        for key in ("step_px", "nphotons", "energy_eV", "pixel_size_m", "aperture_radius_px", "gaussian_sigma_px"):
            _positive(name, key, getattr(self, key))
        if self.jitter_px < 0:
            raise PtychoInputError(f"config: {name}.jitter_px: found {self.jitter_px}, expected >= 0")
        if self.probe_kind == "file" and not self.probe_file:
            raise PtychoInputError(f"config: {name}.probe_file: found '', expected a path when probe_kind='file'")


# ---------------------------------------------------------------- memory limits
# Named thresholds deciding what is held in memory and what streams from disk.
# "values" count float32 elements (4 bytes each); "bytes" count bytes.

#: Training scans up to this many values (~1 GiB) are read into memory once; larger ones stream.
TRAIN_IN_MEMORY_MAX_VALUES = 256 * 1024 * 1024
#: Refinement reads scans up to this many values (~256 MiB) once instead of every pass.
REFINE_IN_MEMORY_MAX_VALUES = 64 * 1024 * 1024
#: Scans up to this many values are checked for NaN/Inf/negative values on load; larger ones batch by batch.
EAGER_CHECK_MAX_VALUES = 64 * 1024 * 1024
#: NPZ files below this size get a full CRC check on load.
NPZ_CRC_CHECK_MAX_BYTES = 256 * 1024 * 1024
#: NPZ members at least this large are read on demand instead of loaded.
NPZ_STREAM_MIN_BYTES = 1 << 20
#: The largest object canvas a reconstruction allocates, in pixels (2^29, about 23,000 x 23,000;
#: stitching and refinement hold about 36 bytes per pixel, the model's learned stages about 60 while they run).
#: ``$PTYCHO_ML_MAX_CANVAS_PIXELS`` overrides it.
MAX_CANVAS_PIXELS = 1 << 29
MAX_CANVAS_PIXELS_ENV = "PTYCHO_ML_MAX_CANVAS_PIXELS"
#: The most incoherent probe modes a refinement learns: beyond a few, extra modes carry noise, not beam.
MAX_PROBE_MODES = 8


def max_canvas_pixels() -> int:
    """:data:`MAX_CANVAS_PIXELS`, or ``$PTYCHO_ML_MAX_CANVAS_PIXELS`` when set (a positive integer)."""
    raw = os.environ.get(MAX_CANVAS_PIXELS_ENV, "")
    if not raw:
        return MAX_CANVAS_PIXELS
    if not raw.isdigit() or int(raw) < 1:
        raise PtychoInputError(f"${MAX_CANVAS_PIXELS_ENV}: found {raw!r}, expected a positive whole number of pixels")
    return int(raw)


def available_cpu_threads() -> int:
    """Cores this process may use (affinity-aware), never more than the machine has."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU default: trains on the default simulated scan in minutes on 2 cores.
    "cpu": {"widths": (16, 32, 64, 128), "blocks_per_level": 1, "refiner_stages": 4},
    # Published PtychoPINN-like widths, for GPUs.
    "gpu": {"widths": (32, 64, 128, 256), "blocks_per_level": 2, "refiner_stages": 4},
    # Tests and smoke runs only.
    "tiny": {"widths": (4, 8, 8), "blocks_per_level": 1, "refiner_stages": 1},
}

#: Most unrolled stages of the learned refinement: each costs about one refinement pass at inference.
MAX_REFINER_STAGES = 16


@dataclass(frozen=True)
class ModelConfig(ConfigBase):
    """Generator architecture and physics it is tied to.

    ``widths`` are the encoder channel counts per resolution level (each level
    halves the size); the decoder mirrors them. ``gridsize``² patterns are
    reconstructed together with the overlap constraint when gridsize > 1.
    ``refiner_stages`` unrolled data-consistency stages over the stitched
    object follow the generator (:mod:`ptycho_ml.model.refiner`; -1: the
    preset's, 0: none); ``refiner_width`` is their correction network's width.
    """

    preset: Literal["cpu", "gpu", "tiny", "custom"] = "cpu"
    N: int = 64
    gridsize: int = 2
    widths: tuple[int, ...] = ()
    blocks_per_level: int = 0
    amplitude_max: float = 1.5
    input_iterations: int = 4
    refiner_stages: int = -1
    refiner_width: int = 16

    def validate(self) -> None:
        name = type(self).__name__
        if self.refiner_stages == -1:  # the preset's, fixed here so that the bundle records the number
            object.__setattr__(self, "refiner_stages", int(PRESETS.get(self.preset, PRESETS["cpu"])["refiner_stages"]))
        if not 0 <= self.refiner_stages <= MAX_REFINER_STAGES:
            raise PtychoInputError(f"config: {name}.refiner_stages: found {self.refiner_stages}, "
                                   f"expected 0..{MAX_REFINER_STAGES} (or -1: the preset's)")
        if self.refiner_width < 1:
            raise PtychoInputError(f"config: {name}.refiner_width: found {self.refiner_width}, expected >= 1")
        if self.gridsize < 1 or self.gridsize > 4:
            raise PtychoInputError(f"config: {name}.gridsize: found {self.gridsize}, expected 1..4")
        widths = self.resolved_widths()
        if not widths or any(w < 1 for w in widths):
            raise PtychoInputError(f"config: {name}.widths: found {list(widths)}, expected positive channel counts")
        if self.N % (2 ** len(widths)):
            raise PtychoInputError(f"config: {name}.N: found {self.N}, expected a multiple of {2 ** len(widths)} for {len(widths)} levels")
        _positive(name, "amplitude_max", self.amplitude_max)

    def resolved_widths(self) -> tuple[int, ...]:
        if self.widths:
            return tuple(self.widths)
        return tuple(PRESETS.get(self.preset, PRESETS["cpu"])["widths"])

    def resolved_blocks(self) -> int:
        if self.blocks_per_level:
            return self.blocks_per_level
        return int(PRESETS.get(self.preset, PRESETS["cpu"])["blocks_per_level"])


@dataclass(frozen=True)
class TrainingConfig(ConfigBase):
    """Everything `train()` needs. ``data`` empty means: simulate the embedded default."""

    data: str = ""
    test_data: str = ""
    output_dir: str = "outputs/train"
    model: ModelConfig = field(default_factory=ModelConfig)
    # auto: hybrid when every training scan carries its ground truth (simulated data), else poisson.
    loss: Literal["auto", "poisson", "mae", "supervised", "hybrid"] = "auto"
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    lr_schedule: Literal["cosine", "plateau", "constant"] = "cosine"
    val_fraction: float = 0.1
    split: Literal["spatial", "random"] = "spatial"
    early_stopping_patience: int = 8
    seed: int = 0
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int = 1
    num_nodes: int = 1
    # Lightning's strategy: "ddp" relaunches this command once per device (torchrun/SLURM set the ranks
    # across nodes); "ddp_spawn" spawns workers from this process; "auto" is Lightning's choice.
    strategy: Literal["auto", "ddp", "ddp_spawn"] = "auto"
    threads: int = 0
    quiet: bool = False
    resume: str = ""
    max_patterns: int = 0
    time_limit_s: float = 0.0
    preview_every_n_epochs: int = 5
    # Training windows the learned refinement (model.refiner_stages > 0) sees after the generator is trained.
    refiner_iterations: int = 600

    def validate(self) -> None:
        name = type(self).__name__
        if self.refiner_iterations < 0:
            raise PtychoInputError(f"config: {name}.refiner_iterations: found {self.refiner_iterations}, expected >= 0")
        if self.epochs < 1:
            raise PtychoInputError(f"config: {name}.epochs: found {self.epochs}, expected >= 1")
        if self.batch_size < 1:
            raise PtychoInputError(f"config: {name}.batch_size: found {self.batch_size}, expected >= 1")
        _positive(name, "learning_rate", self.learning_rate)
        if not 0 <= self.val_fraction < 1:
            raise PtychoInputError(f"config: {name}.val_fraction: found {self.val_fraction}, expected in [0, 1)")
        for key in ("devices", "num_nodes"):
            if getattr(self, key) < 1:
                raise PtychoInputError(f"config: {name}.{key}: found {getattr(self, key)}, expected >= 1")
        if self.threads < 0:
            raise PtychoInputError(f"config: {name}.threads: found {self.threads}, expected >= 0 (0 = all available cores)")

    def resolved_threads(self) -> int:
        """Threads to use: the configured count, capped at the cores this process may use."""
        cores = available_cpu_threads()
        return min(self.threads, cores) if self.threads else cores


#: A sanity bound on ``phase_gain``, not a tuned value: at 30 passes a gain of 8 was nowhere better than 4
#: on the six suite scans measured (docs/benchmarks.md, "Wide phase").
MAX_PHASE_GAIN = 16.0

#: A sanity bound on ``misfit_step_gain``, not a tuned value: at 8 the object step is 3.2 times the
#: illumination-preconditioned (Newton-like) step, which overshoots even noise-free data.
MAX_MISFIT_STEP_GAIN = 8.0

#: The refinement settings of :class:`InferenceConfig` the CLI flags, the pyfunc params and the MLproject
#: ``reconstruct`` parameters carry under the same names.
REFINEMENT_FIELDS = ("refine_probe", "refine_positions", "refine_intensity", "probe_modes", "probe_support_px",
                     "refine_auto", "phase_gain", "variance_reduction", "misfit_step_gain")


@dataclass(frozen=True)
class InferenceConfig(ConfigBase):
    """Reconstruction settings shared by the batch CLI and the pyfunc model."""

    batch_size: int = 256
    refine_steps: int = 45
    refine_method: Literal["object", "finetune"] = "object"
    finetune_epochs: int = 3
    threads: int = 0
    progress: bool = True
    # Joint refinement (ptycho_ml.physics.refine.refine_joint): what else is refined with the object.
    refine_probe: bool = False
    refine_positions: bool = False
    refine_intensity: bool = False
    probe_modes: int = 1
    probe_support_px: float = 0.0  # radius of a circular probe support (0 = none)
    # With no switch above on: refine the probe and/or the positions only where the fit says the scan
    # needs it (ptycho_ml.physics.refine.refine_auto); off = the object alone, as before.
    refine_auto: bool = True
    # Extra gain of the object steps' wide phase (ptycho_ml.physics.refine.wide_phase; 0 = none, 4 measured);
    # with variance_reduction on, only the variance-reduced steps take it (docs/benchmarks.md, "Wide phase").
    phase_gain: float = 4.0
    # Once the data are explained to their noise, variance-reduced object steps (SAGA) with momentum 0.7
    # (ptycho_ml.physics.refine.refine_joint): low-dose scans no longer keep the mini-batches' noise
    # (docs/benchmarks.md, "Variance-reduced passes").
    variance_reduction: bool = True
    # Object steps this many times larger while the data are misfit far above their noise (deviance ratio
    # above 2) and the fit still falls (ptycho_ml.physics.refine.refine_joint; 1 = none, 3 measured): a scan far
    # from its fit, e.g. at high dose, converges in fewer passes (docs/benchmarks.md, "Larger steps while the
    # misfit is far above the noise").
    misfit_step_gain: float = 3.0

    @property
    def explicit_refinement(self) -> bool:
        """Whether a switch (probe, positions, intensity) says what to refine, which overrides ``refine_auto``."""
        return self.refine_probe or self.refine_positions or self.refine_intensity

    def validate(self) -> None:
        name = type(self).__name__
        if self.batch_size < 1:
            raise PtychoInputError(f"config: {name}.batch_size: found {self.batch_size}, expected >= 1")
        if self.refine_steps < 0:
            raise PtychoInputError(f"config: {name}.refine_steps: found {self.refine_steps}, expected >= 0")
        if not 1 <= self.probe_modes <= MAX_PROBE_MODES:
            raise PtychoInputError(f"config: {name}.probe_modes: found {self.probe_modes}, expected 1..{MAX_PROBE_MODES} incoherent modes")
        if self.probe_modes > 1 and not self.refine_probe:
            raise PtychoInputError(f"config: {name}.probe_modes: found {self.probe_modes} without refine_probe, "
                                   "expected 1 unless the probe is refined (extra modes are learnt from the data)")
        if self.probe_support_px < 0:
            raise PtychoInputError(f"config: {name}.probe_support_px: found {self.probe_support_px}, expected >= 0 (0 = no support)")
        if not 0 <= self.phase_gain <= MAX_PHASE_GAIN:
            raise PtychoInputError(f"config: {name}.phase_gain: found {self.phase_gain}, expected 0..{MAX_PHASE_GAIN:g} "
                                   "(0 = none; 4 measured, docs/benchmarks.md)")
        if not 1 <= self.misfit_step_gain <= MAX_MISFIT_STEP_GAIN:
            raise PtychoInputError(f"config: {name}.misfit_step_gain: found {self.misfit_step_gain}, expected "
                                   f"1..{MAX_MISFIT_STEP_GAIN:g} (1 = none; 3 measured, docs/benchmarks.md)")


@dataclass(frozen=True)
class ScanErrorConfig(ConfigBase):
    """How a simulated scan's file probe and positions differ from the truth (:mod:`ptycho_ml.physics.scan_errors`).

    The diffraction is simulated with the true probe and positions; the file
    holds the nominal ones. ``defocus_error`` and ``astigmatism`` are fractions
    of the nominal defocus (the truth has ``(1 + defocus_error)`` of it, and
    ``± astigmatism`` of it more along x and less along y); ``missing_mode``
    (0..0.5) is the power fraction of a second incoherent mode the file omits;
    ``position_noise_px`` the RMS of per-axis Gaussian errors and
    ``position_drift_px`` the end-to-end length of a linear drift over the scan.
    """

    defocus_error: float = 0.0
    astigmatism: float = 0.0
    missing_mode: float = 0.0
    position_noise_px: float = 0.0
    position_drift_px: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        name = type(self).__name__
        if not -0.9 <= self.defocus_error <= 10:
            raise PtychoInputError(f"config: {name}.defocus_error: found {self.defocus_error}, expected a fraction in [-0.9, 10]")
        if not 0 <= self.astigmatism <= 10:
            raise PtychoInputError(f"config: {name}.astigmatism: found {self.astigmatism}, expected a fraction in [0, 10]")
        if not 0 <= self.missing_mode <= 0.5:
            raise PtychoInputError(f"config: {name}.missing_mode: found {self.missing_mode}, expected a power fraction in [0, 0.5]")
        for key in ("position_noise_px", "position_drift_px"):
            if getattr(self, key) < 0:
                raise PtychoInputError(f"config: {name}.{key}: found {getattr(self, key)}, expected >= 0")

    def any(self) -> bool:
        """True when the file will differ from the truth."""
        return any((self.defocus_error, self.astigmatism, self.missing_mode, self.position_noise_px, self.position_drift_px))
