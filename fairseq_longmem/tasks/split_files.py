"""Checks of a binarized split's ``.idx``/``.bin`` files before fairseq memory-maps them: fairseq
reports an empty or truncated file as an mmap or buffer error that names no file.

fairseq's ``mmap`` index (``MMapIndexedDataset.Index``) is a 26-byte header (9-byte magic, version
``<Q`` = 1, dtype code ``<B``, item count ``<Q``), then the item sizes (int32) and byte offsets
into ``.bin`` (int64); ``.bin`` holds the items back to back. Other index formats (fairseq's
legacy ``cached``/``lazy``, raw text) are left to fairseq.
"""

import os
import struct
from typing import List

import numpy as np
from fairseq.data.indexed_dataset import MMapIndexedDataset, _code_to_dtype

MMAP_MAGIC = MMapIndexedDataset.Index._HDR_MAGIC
HEADER_BYTES = len(MMAP_MAGIC) + 8 + 1 + 8
# first 8 bytes of the other index formats fairseq reads (legacy IndexedDataset, huffman)
OTHER_MAGICS = (b"TNTIDX\x00\x00", b"HUFFIDX\x00")
REBUILD = "re-run fairseq-preprocess for this split"


def split_shards(split_path: str, combine: bool) -> List[str]:
    """The paths fairseq's ``load_indexed_dataset`` reads: ``split``, then ``split1``, ``split2``
    ... while they exist when ``combine``."""
    shards = [split_path]
    while combine and os.path.exists(f"{split_path}{len(shards)}.idx"):
        shards.append(f"{split_path}{len(shards)}")
    return shards


def check_mmap_split(path: str) -> int:
    """Check ``path``.idx and ``path``.bin against each other; return the number of items.
    Refuses, naming the file: an empty or truncated index, an index that is not fairseq's, a
    missing, empty or truncated ``.bin``. Returns -1 for index formats it does not check, and
    when there is no ``.idx`` at all (fairseq then says which dataset it did not find)."""
    idx, bin_ = path + ".idx", path + ".bin"
    if not os.path.exists(idx):
        if os.path.exists(bin_):
            raise FileNotFoundError(f"{bin_} has no index: {idx} is missing; {REBUILD}")
        return -1
    idx_size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        header = f.read(HEADER_BYTES)
    if idx_size == 0:
        raise ValueError(f"{idx} is empty (0 bytes): {REBUILD}")
    if header[:8] in OTHER_MAGICS:
        return -1
    if not header.startswith(MMAP_MAGIC[:len(header)]):
        raise ValueError(
            f"{idx} is not a fairseq index (it starts with {header[:9]!r}, expected "
            f"{MMAP_MAGIC!r}): {REBUILD}"
        )
    if len(header) < HEADER_BYTES:
        raise ValueError(
            f"{idx} is truncated ({idx_size} bytes, shorter than its header): {REBUILD}"
        )
    (version,) = struct.unpack("<Q", header[9:17])
    code = header[17]
    (count,) = struct.unpack("<Q", header[18:26])
    if version != 1 or code not in _code_to_dtype:
        raise ValueError(
            f"{idx} has index version {version} and dtype code {code}, expected version 1 and "
            f"one of {sorted(_code_to_dtype)}: {REBUILD}"
        )
    expected = HEADER_BYTES + count * (4 + 8)
    if idx_size < expected:
        raise ValueError(
            f"{idx} is truncated: {idx_size} bytes, but its header lists {count} items, which "
            f"take {expected} bytes: {REBUILD}"
        )
    if not os.path.exists(bin_):
        raise FileNotFoundError(f"{idx} has no data: {bin_} is missing; {REBUILD}")
    bin_size = os.path.getsize(bin_)
    itemsize = np.dtype(_code_to_dtype[code]).itemsize
    needed = 0
    if count:
        sizes = np.fromfile(idx, dtype=np.int32, count=count, offset=HEADER_BYTES)
        pointers = np.fromfile(idx, dtype=np.int64, count=count, offset=HEADER_BYTES + 4 * count)
        needed = int((pointers + sizes.astype(np.int64) * itemsize).max())
    if bin_size < needed or (bin_size == 0 and count):
        raise ValueError(
            f"{bin_} is truncated: {bin_size} bytes, but {idx} indexes {needed} bytes "
            f"({count} items): {REBUILD}"
        )
    return count
