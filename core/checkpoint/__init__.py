"""Sharded, asynchronous, verifiable checkpoints on local disk or S3, and their HF export.

Modules, one concept each: ``store`` (where bytes live: local paths or s3:// through fsspec),
``names`` (the ``filename`` template, its validation, the names a run owns), ``layout``
(completion markers, ownership, listing, retention), ``safe_read`` (DCP readers that never
unpickle objects from a checkpoint), ``portable`` (model and optimizer state in a form any parallel
layout loads), ``dcp_io`` (what is saved and how: torch.distributed.checkpoint save, async save,
load, verification), ``hf_export`` (a checkpoint to a transformers directory).
"""
