"""Parallelism: device mesh, data/tensor parallel application, ZeRO-1, precision."""
