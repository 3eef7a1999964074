"""The memory-bank file format: one safetensors file plus a JSON header, no pickle; writing (atomic,
never over an existing file unless asked) and reading (validated before anything is used).

Tensors ``row{i}.keys``, ``row{i}.values`` (heads, count, csz, hd), ``row{i}.summaries``
(heads, count, hd), ``row{i}.staging_keys`` / ``row{i}.staging_values`` (heads, staged, hd), in the
storage dtype. The safetensors metadata key ``"longmem_memory_bank"`` holds a JSON header: format
version, num_heads, head_dim, chunk_size, memory_size, dtype, fingerprint, and per saved row its
source row, write pointer, chunk count, staged token count, plus a CRC-32 per tensor (catches
corruption that keeps the file's structure intact). A bank with a fingerprint refuses a file with
another fingerprint or with none; a bank without one accepts any file.
"""

import json
import os
import zlib
from dataclasses import dataclass
from typing import Dict, List

import torch

from ..fileio import atomic_write

FORMAT_NAME = "fairseq_longmem.memory_bank"
FORMAT_VERSION = 1
HEADER_KEY = "longmem_memory_bank"
PARTS = ("keys", "values", "summaries", "staging_keys", "staging_values")


@dataclass
class SavedRow:
    """One bank row as saved: its pointers and its tensors (``PARTS``, valid part only)."""

    write_pointer: int
    count: int  # searchable chunks, in slots [0, count)
    staged: int  # tokens of the trailing partial chunk
    tensors: Dict[str, torch.Tensor]
    source_row: int = -1


def save(path, config: dict, dtype: torch.dtype, fingerprint: str, rows: List[SavedRow],
         overwrite: bool = False):
    """Write ``rows`` to ``path`` atomically (:func:`fairseq_longmem.fileio.atomic_write`).

    ``config``: num_heads, head_dim, chunk_size, memory_size. The file gets the usual permissions
    of a new file (0666 less the umask), like any file the user writes.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    from safetensors.torch import save as safetensors_bytes

    tensors, row_meta = {}, []
    for i, row in enumerate(rows):
        for part in PARTS:
            tensors[f"row{i}.{part}"] = row.tensors[part].detach().to("cpu").contiguous()
        row_meta.append(dict(source_row=row.source_row, write_pointer=row.write_pointer,
                             count=row.count, staging=row.staged))
    header = dict(format=FORMAT_NAME, version=FORMAT_VERSION, **config,
                  dtype=str(dtype).replace("torch.", ""), fingerprint=fingerprint,
                  rows=row_meta, crc32={n: crc32(t) for n, t in tensors.items()})
    data = safetensors_bytes(tensors, metadata={HEADER_KEY: json.dumps(header)})
    atomic_write(path, lambda f: f.write(data))


def load(path, config: dict, fingerprint: str, num_rows: int) -> List[SavedRow]:
    """Read and validate a file against a bank's ``config`` and ``fingerprint``; ``num_rows`` rows
    are expected. Any mismatch or damage raises a one-line ValueError naming the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Memory bank file not found: {path}")
    header, tensors = _read(path)

    def refuse(what, expected, found):
        raise ValueError(f"{path}: refused, {what}: expected {expected}, found {found}")

    if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
        refuse("format", f"{FORMAT_NAME} v{FORMAT_VERSION}",
               f"{header.get('format')} v{header.get('version')}")
    for key, want in config.items():
        if header.get(key) != want:
            refuse(f"configuration {key}", want, header.get(key))
    fp = header.get("fingerprint", "")
    if fingerprint and fp != fingerprint:
        refuse("fingerprint", repr(fingerprint),
               repr(fp) if fp else "none (a file saved by a bank without a fingerprint)")
    row_meta = header.get("rows")
    if not isinstance(row_meta, list) or len(row_meta) != num_rows:
        found = len(row_meta) if isinstance(row_meta, list) else row_meta
        refuse("number of rows", num_rows, found)
    crc = header.get("crc32")
    if not isinstance(crc, dict):
        refuse("header crc32 table", "a dict", type(crc).__name__)
    H, D, S = config["num_heads"], config["head_dim"], config["chunk_size"]
    C = config["memory_size"] // S
    names, rows = set(), []
    for i, meta in enumerate(row_meta):
        try:
            ptr, cnt, s = (int(meta[k]) for k in ("write_pointer", "count", "staging"))
        except (KeyError, TypeError, ValueError):
            refuse(f"row {i} header", "write_pointer/count/staging ints", meta)
        if not (0 <= cnt <= C and 0 <= ptr < C and 0 <= s < S and (cnt == C or ptr == cnt)):
            refuse(f"row {i} pointers", f"0<=count<={C}, write_pointer=count unless full, "
                   f"staging<{S}", f"count={cnt}, write_pointer={ptr}, staging={s}")
        shapes = {"keys": (H, cnt, S, D), "values": (H, cnt, S, D), "summaries": (H, cnt, D),
                  "staging_keys": (H, s, D), "staging_values": (H, s, D)}
        row = SavedRow(write_pointer=ptr, count=cnt, staged=s, tensors={},
                       source_row=meta.get("source_row", -1))
        for part, shape in shapes.items():
            name = f"row{i}.{part}"
            names.add(name)
            t = tensors.get(name)
            if t is None:
                refuse("tensors", name, "it missing")
            if tuple(t.shape) != shape or not t.is_floating_point():
                refuse(f"tensor {name}", f"float {shape}", f"{t.dtype} {tuple(t.shape)}")
            if crc.get(name) != crc32(t):
                refuse(f"tensor {name} checksum", crc.get(name), f"{crc32(t)} (corrupt data)")
            row.tensors[part] = t
        rows.append(row)
    if set(tensors) != names:
        refuse("tensor names", sorted(names), sorted(tensors))
    return rows


def crc32(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(-1).view(torch.uint8).numpy())


def read_header(path) -> dict:
    """The JSON header of a saved bank (e.g. its ``fingerprint``) without reading its tensors."""
    header, _ = _read(path, tensors=False)
    return header


def read_identity(path, kind: str) -> dict:
    """The identity a saved bank carries as its fingerprint (a JSON object whose ``kind`` names
    what wrote it, e.g. a prompt memory), when that kind is ``kind``. A one-line ValueError
    otherwise: the file's own refusal when it is no readable bank, else that it holds no such
    identity."""
    header = read_header(path)
    try:
        identity = json.loads(header.get("fingerprint") or "")
    except ValueError:
        identity = None
    if not isinstance(identity, dict) or identity.get("kind") != kind:
        raise ValueError(f"no {kind} identity in its header")
    return identity


def _read(path, tensors: bool = True):
    """(header dict, tensors on CPU) of a saved bank; structural damage -> one-line ValueError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            loaded = {name: f.get_tensor(name) for name in f.keys()} if tensors else {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise ValueError(f"{path}: refused, expected a complete safetensors memory-bank file, "
                         f"found an unreadable file (truncated or corrupt: {msg})") from e
    if HEADER_KEY not in meta:
        raise ValueError(f"{path}: refused, expected safetensors metadata key {HEADER_KEY!r}, "
                         f"found keys {sorted(meta)}")
    try:
        header = json.loads(meta[HEADER_KEY])
        if not isinstance(header, dict):
            raise ValueError(type(header).__name__)
    except ValueError as e:
        raise ValueError(f"{path}: refused, expected a JSON object header, "
                         f"found invalid JSON ({e})") from e
    return header, loaded
