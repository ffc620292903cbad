"""Reading a checkpoint without running code from it.

DCP stores its ``.metadata`` as a pickle, and torch's readers unpickle it with ``pickle.load``;
items saved as bytes are read back with ``torch.load(weights_only=False)``. Both run whatever a
crafted file asks for, and the SHA-256 marker does not help: whoever writes a checkpoint writes
its marker too. So nxdt reads checkpoints through the readers here:

- ``.metadata`` goes through an unpickler that builds only DCP's metadata classes, ``torch.Size``,
  dtypes, layouts and paths (``ALLOWED``); any other global is refused before it is imported,
  and the result is checked for shape: every entry a tensor, every storage file a plain name
  inside the checkpoint directory.
- A bytes (pickled-object) item is refused: nxdt saves tensors only.
- Tensor shards are read by torch with ``weights_only=True``; a shard it refuses is reported with
  its file name.
"""

from __future__ import annotations

import io
import pickle
from collections import defaultdict
from dataclasses import replace
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType

from nxdt.errors import NxdtError

_DCP_META = "torch.distributed.checkpoint.metadata"
_DCP_FS = "torch.distributed.checkpoint.filesystem"
#: (module, name) of every global a DCP ``.metadata`` file may name; torch dtypes are allowed too
ALLOWED: frozenset[tuple[str, str]] = frozenset({
    (_DCP_META, "Metadata"), (_DCP_META, "TensorStorageMetadata"), (_DCP_META, "BytesStorageMetadata"),
    (_DCP_META, "ChunkStorageMetadata"), (_DCP_META, "TensorProperties"), (_DCP_META, "MetadataIndex"),
    (_DCP_META, "StorageMeta"), (_DCP_META, "_MEM_FORMAT_ENCODING"),
    (_DCP_FS, "_StorageInfo"), (_DCP_FS, "_StoragePrefix"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
})
_MAX_METADATA_BYTES = 1 << 30


class _RefusedGlobal(Exception):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ALLOWED (and torch dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        """The global ``module.name`` if allowed; anything else raises before it is imported."""
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _RefusedGlobal(module, name)

    def persistent_load(self, pid: Any) -> Any:
        """Refused: DCP metadata has no persistent ids (torch uses them for storages)."""
        raise pickle.UnpicklingError("persistent ids are not used by DCP metadata")


def parse_metadata(data: bytes, where: str) -> Metadata:
    """DCP metadata from the bytes of a ``.metadata`` file, refusing anything but metadata; ``where`` names it."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except _RefusedGlobal as exc:
        raise NxdtError(f"refusing checkpoint metadata {where}: it asks to load {exc}, which DCP metadata never "
                        "holds (nothing from it was run)") from None
    except Exception as exc:
        raise NxdtError(f"cannot read checkpoint metadata {where}: not DCP metadata ({type(exc).__name__}: "
                        f"{_first_line(exc)})") from None
    problem = _metadata_problem(metadata)
    if problem:
        raise NxdtError(f"refusing checkpoint metadata {where}: {problem}")
    return metadata


def _metadata_problem(md: Any) -> str | None:
    """What is wrong with an unpickled ``.metadata`` object, or None."""
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        return f"it holds a {type(md).__name__}, not DCP metadata"
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(key, str):
            return f"a key is a {type(key).__name__}"
        if isinstance(entry, BytesStorageMetadata):
            return f"{key!r} is a pickled object, and nxdt checkpoints hold tensors only"
        if not isinstance(entry, TensorStorageMetadata):
            return f"{key!r} is a {type(entry).__name__}, not a tensor entry"
        if not isinstance(entry.size, torch.Size) or not isinstance(entry.properties, TensorProperties):
            return f"{key!r} has a malformed size or properties"
        if not isinstance(entry.properties.dtype, torch.dtype) or not isinstance(entry.chunks, list):
            return f"{key!r} has a malformed dtype or chunk list"
        for chunk in entry.chunks:
            if not (isinstance(chunk, ChunkStorageMetadata) and isinstance(chunk.offsets, torch.Size)
                    and isinstance(chunk.sizes, torch.Size)):
                return f"{key!r} has a malformed chunk"
    storage = md.storage_data
    if not isinstance(storage, dict):
        return "its storage table is malformed"
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            return "its storage table is malformed"
        path = info.relative_path
        if not isinstance(path, str) or not is_plain_file_name(path):
            return f"it points at {path!r}, outside the checkpoint directory"
        if not (_is_count(info.offset) and _is_count(info.length)):
            return f"its entry for {path!r} has a malformed offset or length"
        if info.transform_descriptors:
            return f"its entry for {path!r} asks for storage transforms nxdt does not write"
    if md.storage_meta is not None and not isinstance(md.storage_meta, StorageMeta):
        return "its storage_meta is malformed"
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_plain_file_name(name: str) -> bool:
    """Whether ``name`` is a file directly inside a checkpoint directory (no path, no '..')."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and "\x00" not in name


def metadata_files(md: Metadata) -> set[str]:
    """The shard files ``md``'s tensors are stored in."""
    return {info.relative_path for info in md.storage_data.values()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _SafeReading:
    """What both safe readers change: metadata through parse_metadata, shards named when refused."""

    #: the checkpoint directory's path or URL, for messages
    where: str = ""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's ``.metadata``, through :func:`parse_metadata` (DCP's StorageReader interface)."""
        path = self._get_metadata_path(kwargs.get("rank"))  # type: ignore[attr-defined]
        with self.fs.create_stream(path, "rb") as stream:  # type: ignore[attr-defined]
            data = stream.read(_MAX_METADATA_BYTES + 1)
        if len(data) > _MAX_METADATA_BYTES:
            raise NxdtError(f"refusing checkpoint metadata {self.where}/.metadata: larger than 1 GiB")
        metadata = parse_metadata(data, f"{self.where}/{str(path).rsplit('/', 1)[-1]}")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[attr-defined]
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        """Read ``plan``'s tensors file by file, so that a shard torch refuses is named (bytes items refused)."""
        storage = self.storage_data  # type: ignore[attr-defined]
        per_file: dict[str, list[Any]] = defaultdict(list)
        for item in plan.items:
            rel = storage[item.storage_index].relative_path
            if item.type == LoadItemType.BYTE_IO:
                raise NxdtError(f"refusing checkpoint file {self.where}/{rel}: {item.dest_index.fqn!r} is a pickled "
                                "object, and nxdt checkpoints hold tensors only")
            per_file[rel].append(item)
        future = None
        for rel, items in per_file.items():
            try:
                future = super().read_data(replace(plan, items=items), planner)  # type: ignore[misc]
            except NxdtError:
                raise
            except pickle.UnpicklingError as exc:
                raise NxdtError(f"refusing checkpoint file {self.where}/{rel}: not a plain tensor file "
                                f"(the weights-only loader refused it: {_first_line(exc)})") from None
            except Exception as exc:
                raise NxdtError(f"cannot read checkpoint file {self.where}/{rel}: {type(exc).__name__}: "
                                f"{_first_line(exc)}") from None
        if future is None:
            future = super().read_data(plan, planner)  # type: ignore[misc]
        return future


class SafeFileSystemReader(_SafeReading, FileSystemReader):
    """DCP's local reader, reading metadata and shards as described in this module."""

    def __init__(self, path: str, where: str | None = None):
        super().__init__(path)
        self.where = where or str(path)


class SafeFsspecReader(_SafeReading, FsspecReader):
    """DCP's fsspec (s3://) reader, reading metadata and shards as described in this module."""

    def __init__(self, path: str, where: str | None = None, **options: Any):
        super().__init__(path, **options)
        self.where = where or str(path)
