"""quantplan.analysis: measure how much error each candidate format would cause in each module.

Data flows one way: model -> probes -> :class:`SensitivityTable`. Nothing here decides.
"""

from quantplan.common.lazy import lazy_room

_PUBLIC = {
    "analyze": "quantplan.analysis.analyze",
    "CalibrationSet": "quantplan.analysis.calibration",
    "load_calibration": "quantplan.analysis.calibration",
    "load_texts": "quantplan.analysis.calibration",
    "pack_calibration": "quantplan.analysis.calibration",
    "FP4": "quantplan.analysis.formats",
    "INT8": "quantplan.analysis.formats",
    "NF4": "quantplan.analysis.formats",
    "FourBit": "quantplan.analysis.formats",
    "Int8": "quantplan.analysis.formats",
    "parse_formats": "quantplan.analysis.formats",
    "DEFAULT_MODEL": "quantplan.analysis.models",
    "ModelSource": "quantplan.analysis.models",
    "load_model": "quantplan.analysis.models",
    "load_processor": "quantplan.analysis.models",
    "resolve_source": "quantplan.analysis.models",
    "SensitivityTable": "quantplan.analysis.table",
    "TableMismatch": "quantplan.analysis.table",
}

lazy_room(__name__, _PUBLIC)
