"""Sharded, asynchronous, verifiable checkpoints on local disk or S3, and their HF export.

Modules, one concept each: ``store`` (where bytes live: local paths or s3:// through fsspec),
``layout`` (names, completion markers, listing, retention), ``portable`` (model and optimizer
state in a form any parallel layout loads), ``dcp_io`` (what is saved and how:
torch.distributed.checkpoint save, async save, load, verification), ``hf_export`` (a checkpoint
to a transformers directory).
"""
