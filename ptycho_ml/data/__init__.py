"""Data layer: readers/writers per format, validation, grouping, datasets."""

from .readers import IntensityWarning, load_scan
from .scan import ScanData

__all__ = ["IntensityWarning", "ScanData", "load_scan"]
