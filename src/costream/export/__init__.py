"""Export continual models for deployment (ONNX with a state manifest) and run them."""

from ._onnx import export_onnx
from ._runner import OnnxStreamRunner

__all__ = ["OnnxStreamRunner", "export_onnx"]
