"""The memory-bank file format: one safetensors file plus a JSON header, no pickle; writing (atomic,
never over an existing file unless asked) and reading (validated before anything is used).

Tensors ``row{i}.keys``, ``row{i}.values`` (heads, count, csz, hd), ``row{i}.summaries``
(heads, count, hd), ``row{i}.staging_keys`` / ``row{i}.staging_values`` (heads, staged, hd), in the
storage dtype. The safetensors metadata key ``"longmem_memory_bank"`` holds a JSON header: format
version, num_heads, head_dim, chunk_size, memory_size, dtype, fingerprint, and per saved row its
source row, write pointer, chunk count, staged token count, plus a CRC-32 per tensor (catches
corruption that keeps the file's structure intact). A bank with a fingerprint refuses a file with
another fingerprint or with none; a bank without one accepts any file.

A memory of several reading layers (:class:`~.layered.LayeredMemory`, one bank per layer) is one
file of the same format: its tensors are named ``layer{L}.row{i}.{part}``, the header's
``layers`` lists the layers in order and its ``rows`` holds one list of row entries per layer. A
one-layer memory refuses a layered file and the other way round, and a layered memory refuses a
file of other layers.
"""

import json
import os
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

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


def save(path, config: dict, dtype: torch.dtype, fingerprint: str,
         rows: Union[List[SavedRow], Dict[int, List[SavedRow]]], overwrite: bool = False,
         layers: Optional[Sequence[int]] = None):
    """Write ``rows`` to ``path`` atomically (:func:`fairseq_longmem.fileio.atomic_write`).

    ``config``: num_heads, head_dim, chunk_size, memory_size. ``layers``: None for one bank
    (``rows`` a list), else the reading layers in order (``rows`` a dict layer -> list, the same
    number of rows in each). The file gets the usual permissions of a new file (0666 less the
    umask), like any file the user writes.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    from safetensors.torch import save as safetensors_bytes

    tensors, groups = {}, []
    for layer in _groups(layers):
        meta = []
        for i, row in enumerate(rows if layer is None else rows[layer]):
            for part in PARTS:
                tensors[_prefix(layer) + f"row{i}.{part}"] = \
                    row.tensors[part].detach().to("cpu").contiguous()
            meta.append(dict(source_row=row.source_row, write_pointer=row.write_pointer,
                             count=row.count, staging=row.staged))
        groups.append(meta)
    row_meta = groups[0] if layers is None else groups  # one list, or one per layer
    header = dict(format=FORMAT_NAME, version=FORMAT_VERSION, **config,
                  dtype=str(dtype).replace("torch.", ""), fingerprint=fingerprint,
                  rows=row_meta, crc32={n: crc32(t) for n, t in tensors.items()})
    if layers is not None:
        header["layers"] = [int(i) for i in layers]
    data = safetensors_bytes(tensors, metadata={HEADER_KEY: json.dumps(header)})
    atomic_write(path, lambda f: f.write(data))


def _groups(layers):
    return [None] if layers is None else [int(i) for i in layers]


def _prefix(layer) -> str:
    return "" if layer is None else f"layer{layer}."


def _describe_layers(layers) -> str:
    if layers is None:
        return "a memory of one layer"
    return f"a memory of {len(layers)} reading layer(s) {list(layers)}"


def load(path, config: dict, fingerprint: str, num_rows: int,
         layers: Optional[Sequence[int]] = None
         ) -> Union[List[SavedRow], Dict[int, List[SavedRow]]]:
    """Read and validate a file against a bank's ``config`` and ``fingerprint``; ``num_rows`` rows
    are expected, of one bank (``layers`` None: a list of rows) or of one bank per reading layer
    (a dict layer -> rows). Any mismatch or damage raises a one-line ValueError naming the file."""
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
    want_layers = None if layers is None else [int(i) for i in layers]
    found_layers = header.get("layers")
    if found_layers != want_layers:
        refuse("memory layers", _describe_layers(want_layers), _describe_layers(found_layers))
    crc = header.get("crc32")
    if not isinstance(crc, dict):
        refuse("header crc32 table", "a dict", type(crc).__name__)
    row_meta = header.get("rows")
    if want_layers is not None:
        if not isinstance(row_meta, list) or len(row_meta) != len(want_layers):
            found = len(row_meta) if isinstance(row_meta, list) else row_meta
            refuse("row lists (one per layer)", len(want_layers), found)
    names, out = set(), {}
    for n, layer in enumerate(_groups(want_layers)):
        meta = row_meta if layer is None else row_meta[n]
        if not isinstance(meta, list) or len(meta) != num_rows:
            found = len(meta) if isinstance(meta, list) else meta
            refuse("number of rows" + ("" if layer is None else f" of layer {layer}"), num_rows,
                   found)
        out[layer] = [_row(i, m, _prefix(layer), config, tensors, crc, names, refuse)
                      for i, m in enumerate(meta)]
    if set(tensors) != names:
        refuse("tensor names", sorted(names), sorted(tensors))
    return out[None] if want_layers is None else out


def _row(i, meta, prefix, config, tensors, crc, names, refuse) -> SavedRow:
    """Row ``i`` of a file (its header entry ``meta``, its tensors under ``prefix``), checked."""
    H, D, S = config["num_heads"], config["head_dim"], config["chunk_size"]
    C = config["memory_size"] // S
    try:
        ptr, cnt, s = (int(meta[k]) for k in ("write_pointer", "count", "staging"))
    except (KeyError, TypeError, ValueError):
        refuse(f"{prefix}row {i} header", "write_pointer/count/staging ints", meta)
    if not (0 <= cnt <= C and 0 <= ptr < C and 0 <= s < S and (cnt == C or ptr == cnt)):
        refuse(f"{prefix}row {i} pointers", f"0<=count<={C}, write_pointer=count unless full, "
               f"staging<{S}", f"count={cnt}, write_pointer={ptr}, staging={s}")
    shapes = {"keys": (H, cnt, S, D), "values": (H, cnt, S, D), "summaries": (H, cnt, D),
              "staging_keys": (H, s, D), "staging_values": (H, s, D)}
    row = SavedRow(write_pointer=ptr, count=cnt, staged=s, tensors={},
                   source_row=meta.get("source_row", -1))
    for part, shape in shapes.items():
        name = f"{prefix}row{i}.{part}"
        names.add(name)
        t = tensors.get(name)
        if t is None:
            refuse("tensors", name, "it missing")
        if tuple(t.shape) != shape or not t.is_floating_point():
            refuse(f"tensor {name}", f"float {shape}", f"{t.dtype} {tuple(t.shape)}")
        if crc.get(name) != crc32(t):
            refuse(f"tensor {name} checksum", crc.get(name), f"{crc32(t)} (corrupt data)")
        row.tensors[part] = t
    return row


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
