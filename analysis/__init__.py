"""quantplan.analysis: measure how much error each candidate format would cause in each module.

Data flows one way: model -> probes -> :class:`SensitivityTable`. Nothing here decides.
"""

from .analyze import analyze
from .calibration import CalibrationSet, load_calibration, load_texts, pack_calibration
from .formats import FP4, INT8, NF4, FourBit, Int8, parse_formats
from .models import DEFAULT_MODEL, ModelSource, load_model, load_processor, resolve_source
from .table import SensitivityTable, TableMismatch

__all__ = [
    "analyze", "CalibrationSet", "load_calibration", "load_texts", "pack_calibration",
    "FP4", "INT8", "NF4", "FourBit", "Int8", "parse_formats",
    "DEFAULT_MODEL", "ModelSource", "load_model", "load_processor", "resolve_source",
    "SensitivityTable", "TableMismatch",
]
