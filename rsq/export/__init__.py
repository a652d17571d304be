"""Integer-only export: ``export_checkpoint(checkpoint, fmt, out)`` writes an export folder.

Lower once (rsq.export.lower.lower: BN folding, fixed-point requantization), write many (onnx, packed).
An export folder holds export.json, a copy of the checkpoint (so ``rsq.verify`` can rebuild
the fake-quant model) and one sub-folder per format; exporting a second format of the same
checkpoint into the same folder adds it.
"""
from .folder import (CHECKPOINT_COPY, ECOSYSTEM_FORMATS, EXECUTORCH_FILE, FORMATS, INTEGER_FORMATS, MARKER,
                     export_checkpoint, formats_for, lower_checkpoint_model, pt2e_file, qonnx_file, read_export_info)

# rsq.export.lower is the submodule (lower.lower the function): a function of that name here would
# be replaced by the module as soon as the submodule is imported.
__all__ = ["CHECKPOINT_COPY", "ECOSYSTEM_FORMATS", "EXECUTORCH_FILE", "FORMATS", "INTEGER_FORMATS", "MARKER",
           "export_checkpoint", "formats_for", "lower_checkpoint_model", "pt2e_file", "qonnx_file", "read_export_info"]
