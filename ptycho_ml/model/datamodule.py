"""The training data, the Lightning way: scale, neighbour groups, split and loaders of one or more scans.

:class:`ScanDataModule` turns a :class:`~ptycho_ml.data.scan.ScanData` into
what :class:`~ptycho_ml.model.module.PtychoLitModule` trains on: the
amplitude scale the network normalises by, groups of C = gridsize² neighbours
with their offsets, a seeded train/validation split (validation groups never
borrow training patterns) and the two data loaders. Scans larger than
:data:`~ptycho_ml.config.TRAIN_IN_MEMORY_MAX_VALUES` stream from disk, so
memory stays bounded by the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ptycho_ml import config as limits
from ptycho_ml.config import TrainingConfig
from ptycho_ml.data.grouping import make_groups, split_indices
from ptycho_ml.data.scan import ScanData
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.physics.forward import extract_patches


class GroupDataset(Dataset):
    """Items ``(amplitude (C, N, N) float32, offsets_px (C, 2) float32, probe_index int64[, target (C, N, N) complex64])``.

    Amplitudes come from an in-memory array when given, else straight from
    the (on-disk NPZ / HDF5) scan, so memory stays bounded by the batch.
    ``probe_index`` names the scan's probe in the training module's probe bank
    (training on several scans, each with its own probe).
    """

    def __init__(self, scan: ScanData, groups: np.ndarray, offsets: np.ndarray,
                 amplitudes: np.ndarray | None, targets: np.ndarray | None = None, probe_index: int = 0):
        self.scan, self.groups, self.offsets = scan, groups, offsets
        self.amplitudes, self.targets = amplitudes, targets
        self.probe_index = torch.tensor(probe_index, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int):
        members = self.groups[i]
        amp = self.amplitudes[members] if self.amplitudes is not None else self.scan.amplitude(members)
        item = (torch.from_numpy(np.ascontiguousarray(amp)), torch.from_numpy(self.offsets[i]), self.probe_index)
        if self.targets is not None:
            item = item + (torch.from_numpy(self.targets[members]),)
        return item


def compute_amplitude_scale(scan: ScanData, max_patterns: int = 4096, seed: int = 0) -> float:
    """RMS measured amplitude over (a seeded sample of) the training patterns.

    The network sees ``amplitude / amplitude_scale``; the scale is persisted in
    the bundle and reused at inference.
    """
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(scan), min(len(scan), max_patterns), replace=False))
    amp = scan.amplitude(idx).astype(np.float64)
    scale = float(np.sqrt(np.mean(amp**2)))
    if not scale > 0:
        raise PtychoInputError(f"{scan.source}: field '{scan.patterns_field}': all-zero diffraction, expected measured photons")
    return scale


def _whole_groups(candidates: np.ndarray, groups: np.ndarray) -> list[int]:
    """Groups anchored in ``candidates`` whose members all lie in ``candidates`` (all of them if none does)."""
    inside = set(candidates.tolist())
    return [i for i in candidates if all(m in inside for m in groups[i])] or list(candidates)


def single_mode_probe(scan: ScanData) -> np.ndarray:
    """The scan's probe as ``(N, N) complex64``; a multi-mode probe is refused (one mode per scan in a probe bank)."""
    probe = np.asarray(scan.probe, dtype=np.complex64)
    if probe.ndim == 3 and probe.shape[0] == 1:
        probe = probe[0]
    if probe.ndim != 2:
        raise PtychoInputError(f"{scan.source}: field 'probeGuess': found {probe.shape[0]} probe modes, expected one "
                               "when training on several scans")
    return probe


def resolve_loss(loss: str, scans: Sequence[ScanData]) -> str:
    """The loss ``auto`` stands for: ``hybrid`` (the physics loss plus the ground truth) when every
    training scan carries its ground-truth object, as simulated scans do; else ``poisson`` (the
    measurements alone). Any other loss is returned as given."""
    if loss != "auto":
        return loss
    return "hybrid" if all(s.obj is not None for s in scans) else "poisson"


class ScanDataModule(L.LightningDataModule):
    """Groups, split and loaders of one or more training scans (see the module docstring).

    Each scan is grouped and split on its own (groups never mix scans, each
    has one probe); the items of all scans are shuffled together and carry
    their scan's index into :attr:`probes`. After :meth:`setup`:
    ``amplitude_scale`` (float, of the first scan, the reference the bundle
    keeps with its probe), ``n_train`` and ``n_val`` (groups), ``good_pixels``
    (``(N, N)`` bool tensor or None), ``loss`` (the loss to train with, ``auto`` resolved), ``probes`` (``(S, N, N)`` complex64
    tensor for S > 1 scans, else None: the one scan's probe, modes and all, is the model's).
    """

    def __init__(self, scan: ScanData | Sequence[ScanData], config: TrainingConfig, gridsize: int):
        super().__init__()
        self.scans = [scan] if isinstance(scan, ScanData) else list(scan)
        self.scan = self.scans[0]
        self.config, self.gridsize = config, gridsize
        self.amplitude_scale = 0.0
        self.n_train = self.n_val = 0
        for other in self.scans[1:]:
            if other.N != self.scan.N:
                raise PtychoInputError(f"{other.source}: field '{other.patterns_field}': found {other.N}x{other.N} "
                                       f"patterns, expected {self.scan.N}x{self.scan.N} like {self.scan.source}")
        masks = [s.good_pixels for s in self.scans if s.good_pixels is not None]
        self.good_pixels = torch.from_numpy(np.logical_and.reduce(masks)) if masks else None
        self.probes = (torch.from_numpy(np.stack([single_mode_probe(s) for s in self.scans]))
                       if len(self.scans) > 1 else None)
        self.loss = resolve_loss(config.loss, self.scans)
        self._train: Dataset | None = None
        self._val: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        cfg = self.config
        self.amplitude_scale = compute_amplitude_scale(self.scan, seed=cfg.seed)
        train_sets, val_sets = [], []
        for index, scan in enumerate(self.scans):
            groups, offsets = make_groups(scan.positions_px, self.gridsize, seed=cfg.seed + index)
            train_idx, val_idx = split_indices(scan.positions_px, cfg.val_fraction, cfg.seed + index, cfg.split)
            if len(val_idx) == 0:
                val_idx = train_idx[: max(1, len(train_idx) // 20)]
            in_memory = len(scan) * scan.N * scan.N <= limits.TRAIN_IN_MEMORY_MAX_VALUES
            amplitudes = scan.amplitude(slice(0, len(scan))) if in_memory else None
            targets = self._supervised_targets(scan) if self.loss in ("supervised", "hybrid") else None
            train_groups, val_groups = _whole_groups(train_idx, groups), _whole_groups(val_idx, groups)
            train_sets.append(GroupDataset(scan, groups[train_groups], offsets[train_groups], amplitudes, targets, index))
            val_sets.append(GroupDataset(scan, groups[val_groups], offsets[val_groups], amplitudes, targets, index))
        self._train = train_sets[0] if len(train_sets) == 1 else ConcatDataset(train_sets)
        self._val = val_sets[0] if len(val_sets) == 1 else ConcatDataset(val_sets)
        self.n_train, self.n_val = len(self._train), len(self._val)

    def _supervised_targets(self, scan: ScanData) -> np.ndarray:
        """Ground-truth patches ``(M, N, N) complex64`` for the supervised and hybrid losses."""
        if scan.obj is None:
            raise PtychoInputError(f"{scan.source}: field 'objectGuess': missing, expected ground truth for loss='{self.loss}'")
        with torch.no_grad():
            return extract_patches(torch.from_numpy(np.asarray(scan.obj)),
                                   torch.from_numpy(scan.positions_px.astype(np.float32)), scan.N).numpy()

    def train_dataloader(self) -> DataLoader:
        batch = self.config.batch_size
        # Under DDP Lightning swaps in a DistributedSampler: each process sees only its shard of the groups.
        world = self.trainer.world_size if self.trainer is not None else 1
        return DataLoader(self._train, batch_size=batch, shuffle=True, num_workers=0,
                          generator=torch.Generator().manual_seed(self.config.seed),
                          drop_last=len(self._train) // world > batch)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._val, batch_size=max(self.config.batch_size, 64), shuffle=False, num_workers=0)
