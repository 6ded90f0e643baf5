"""The real-world corpus: production ONNX models that pip packages ship, run through every pass."""
