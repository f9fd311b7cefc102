"""Data layer: readers/writers per format, validation, grouping, datasets."""

from ptycho_ml.data.ptychopinn import IntensityWarning
from ptycho_ml.data.readers import load_scan
from ptycho_ml.data.scan import ScanData

__all__ = ["IntensityWarning", "ScanData", "load_scan"]
