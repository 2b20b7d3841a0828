"""Kiln: export once, compile per target, measure everything.

This package must stay cheap to import: the probe stage imports it on every
`dvc repro`, so frameworks (torch, onnxruntime, openvino) are imported only
inside the modules that need them.
"""

__version__ = "0.1.0"
