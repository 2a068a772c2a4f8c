"""Beam PTransforms of the batch jobs (pair mining, validation, quantization, writing)."""
