"""Read a llama-architecture GGUF file (llama.cpp's model format) into Hugging Face form.

``read_gguf(path)`` returns a :class:`GGUFModel`: a ``config.json``-style dict for
``LlamaForCausalLM``, the parameters under their Hugging Face names as fp32 CPU tensors
(dequantized with llama.cpp's own ``gguf`` package) and the file's other key/values (the tokenizer
lives there). Needs only numpy, torch and ``gguf``.

The file is untrusted input. Before ``gguf.GGUFReader`` sees it, :func:`_scan_layout` walks the
header with bounds checks, because the reader trusts its counts: an array length past the end of
the file makes it loop over empty reads for as long as the length says, and a short tensor surfaces
as a numpy reshape error. Every refusal is a :class:`GGUFError` with a one-line message.

llama.cpp's converter reorders the rows of ``attn_q``/``attn_k`` within each head (its rotary
kernel pairs rows ``2i, 2i+1``, Hugging Face pairs ``i, i + head_dim/2``); :func:`_unpermute`
puts them back, as transformers does when it loads a GGUF.
"""

import logging
import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch

try:
    import gguf
    from gguf import GGMLQuantizationType as QT
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"reading GGUF files needs the gguf package: pip install gguf ({e})") \
        from None

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1,
                   QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)
# GGUF -> HF names: global tensors, then the per-layer ones ("blk.N.<key>.weight" ->
# "model.layers.N.<value>.weight")
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
REQUIRED_KEYS = ("block_count", "embedding_length", "attention.head_count", "feed_forward_length",
                 "attention.layer_norm_rms_epsilon", "context_length")
# GGUFValueType -> bytes of a scalar; 8 (STRING) and 9 (ARRAY) are variable
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
MAX_DIMS = 4  # GGML_MAX_DIMS


class GGUFError(ValueError):
    """A GGUF file this reader refuses; the message is one line meant for the user."""


@dataclass
class GGUFModel:
    architecture: str
    config: dict
    tensors: Dict[str, torch.Tensor]
    metadata: Dict[str, object]


def _show(name: str) -> str:
    """A name from the file, safe to put in a one-line message."""
    return name if name.isprintable() and len(name) <= 120 else repr(name[:120])


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


class _Cursor:
    """Little-endian reads from a buffer; reading past its end is a truncated file."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path} is truncated: {len(self.buf)} bytes, but {what} needs "
                            f"at least {self.pos + n}")

    def take(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)  # "<": no native alignment padding
        self.need(n, what)
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return out[0] if len(out) == 1 else out

    def take_bytes(self, what: str) -> bytes:
        """A GGUF string: u64 length, then that many bytes."""
        n = self.take("Q", what)
        self.need(n, what)
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos])

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in SCALAR_SIZES:
            self.need(SCALAR_SIZES[vtype], what)
            self.pos += SCALAR_SIZES[vtype]
        elif vtype == 8:  # string: u64 length, bytes
            n = self.take("Q", what)
            self.need(n, what)
            self.pos += n
        elif vtype == 9 and depth < 3:  # array: u32 item type, u64 count, items
            itype, count = self.take("IQ", what)
            if itype in SCALAR_SIZES:
                self.need(count * SCALAR_SIZES[itype], what)
                self.pos += count * SCALAR_SIZES[itype]
            else:
                self.need(count * 8, what)  # so the loop below is bounded by the file's size
                for _ in range(count):
                    self.skip_value(itype, what, depth + 1)
        else:
            raise GGUFError(f"{self.path}: {what} has value type {vtype}, not one this reader "
                            "accepts")


def _scan_layout(path: str, buf) -> None:
    """Walk the header and the tensor table with bounds checks: magic, version, that every
    key/value and tensor info is inside the file, tensor types, and that every tensor's data
    ends before the file does."""
    cur = _Cursor(buf, path)
    magic = bytes(buf[:4])
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.take("I", "the header")
    if version & 0xFFFF == 0:
        raise GGUFError(f"{path} is a big-endian GGUF file, which is not supported")
    if version not in (2, 3):
        raise GGUFError(f"{path} is GGUF version {version}; versions 2 and 3 are supported")
    n_tensors, n_kv = cur.take("QQ", "the header")
    # a key/value takes >= 12 bytes and a tensor info >= 24: refuse absurd counts up front
    cur.need(n_kv * 12 + n_tensors * 24, f"a header with {n_kv} key/values and {n_tensors} tensors")
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = cur.take_bytes(f"key/value {i}")
        vtype = cur.take("I", f"key/value {i}")
        if key == b"general.alignment" and vtype == 4:
            cur.need(4, "general.alignment")
            alignment = struct.unpack_from("<I", buf, cur.pos)[0]
            if alignment == 0 or alignment & (alignment - 1):
                raise GGUFError(f"{path}: general.alignment {alignment} is not a power of two")
        cur.skip_value(vtype, f"key/value {key[:60]!r}")
    infos = []
    for i in range(n_tensors):
        what = f"tensor info {i}"
        name = _show(cur.take_bytes(what).decode("utf-8", "replace"))
        n_dims = cur.take("I", what)
        if n_dims > MAX_DIMS:
            raise GGUFError(f"{path}: tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [cur.take("Q", what) for _ in range(n_dims)]
        raw_type, offset = cur.take("IQ", what)
        infos.append((name, dims, raw_type, offset))
    data_start = -(-cur.pos // alignment) * alignment
    for name, dims, raw_type, offset in infos:
        try:
            qtype = QT(raw_type)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name} has unknown GGML type id {raw_type}") from None
        if qtype not in SUPPORTED_TYPES:
            raise GGUFError(f"{path}: tensor {name} has type {qtype.name}, which is not supported "
                            f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if not dims or dims[0] % block:
            raise GGUFError(f"{path}: tensor {name} has shape {dims}, whose rows are not whole "
                            f"{qtype.name} blocks of {block}")
        end = data_start + offset + int(np.prod(dims, dtype=object)) // block * type_size
        if end > len(buf):
            raise GGUFError(f"{path} is truncated: {len(buf)} bytes, but tensor {name} "
                            f"needs {end}")


def _expected_shapes(cfg: dict, rope_dim: int) -> Dict[str, Tuple[int, ...]]:
    """GGUF name -> shape in PyTorch layout, (out_features, in_features) for linear layers."""
    d, ff, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"token_embd.weight": (v, d), "output_norm.weight": (d,), "output.weight": (v, d),
              "rope_freqs.weight": (rope_dim // 2,)}
    per_layer = {"attn_norm": (d,), "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d),
                 "attn_output": (d, q), "ffn_norm": (d,), "ffn_gate": (ff, d), "ffn_up": (ff, d),
                 "ffn_down": (d, ff)}
    for i in range(cfg["num_hidden_layers"]):
        shapes.update({f"blk.{i}.{k}.weight": s for k, s in per_layer.items()})
    return shapes


def _hf_name(gguf_name: str) -> Optional[str]:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    return f"model.layers.{m[1]}.{LAYER_NAMES[m[2]]}.weight" if m and m[2] in LAYER_NAMES else None


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute``: within each head it stores rows in the order
    ``0, h, 1, h+1, ...`` (h = head_dim/2) for HF's ``0 .. 2h-1``."""
    rows, cols = w.shape
    # (heads * head_dim, d) -> (heads, h, 2, d): gguf row 2i+j is HF row j*h+i
    w = w.reshape(n_heads, rows // n_heads // 2, 2, cols)
    return w.transpose(1, 2).reshape(rows, cols).contiguous()


def _config(path: str, meta: dict, arch: str, embd_rows: Optional[int]) -> Tuple[dict, int]:
    def key(name, default=KeyError, cast=int):
        value = meta.get(f"{arch}.{name}", default)
        if value is KeyError:
            raise GGUFError(f"{path}: required metadata key {arch}.{name} is missing")
        # a crafted or per-layer (array) value must not reach int() or a range() below
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise GGUFError(f"{path}: metadata key {arch}.{name} is {str(value)[:40]!r}, "
                            "expected a positive number")
        return cast(value)

    for name in REQUIRED_KEYS:
        key(name, cast=float)
    if meta.get(f"{arch}.expert_count", 0):
        raise GGUFError(f"{path}: mixture-of-experts models ({arch}.expert_count) are not "
                        "supported")
    d, n_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", d // n_heads)
    if key("attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{path}: attention.value_length differs from key_length; not supported")
    rope_dim = key("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"{path}: partial rotary embeddings (rope.dimension_count {rope_dim}, "
                        f"head_dim {head_dim}) are not supported")
    scaling = {k: v for k, v in meta.items() if k.startswith(f"{arch}.rope.scal")}
    if (str(scaling.get(f"{arch}.rope.scaling.type", "none")) not in ("none", "")
            or any(k.endswith(("factor", "scale_linear")) and v not in (0, 1)
                   for k, v in scaling.items())):
        raise GGUFError(f"{path}: rope scaling ({', '.join(sorted(scaling))}) is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    n_kv_heads = key("attention.head_count_kv", n_heads)
    if n_heads % n_kv_heads or head_dim % 2:
        raise GGUFError(f"{path}: inconsistent attention config (head_count {n_heads}, "
                        f"head_count_kv {n_kv_heads}, head_dim {head_dim})")
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d,
        "num_hidden_layers": key("block_count"), "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads, "intermediate_size": key("feed_forward_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", cast=float),
        # 10000 is llama.cpp's default when the key is absent
        "rope_theta": key("rope.freq_base", 10000.0, cast=float),
        "max_position_embeddings": key("context_length"),
        "vocab_size": key("vocab_size", len(tokens) if isinstance(tokens, list) else embd_rows),
        "tie_word_embeddings": True,  # the caller sets it from the presence of output.weight
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "head_dim": head_dim, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    }, rope_dim


def read_gguf(path: str) -> GGUFModel:
    """Read a llama GGUF file; raise :class:`GGUFError` (one line) for anything it refuses."""
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise GGUFError(f"{path} is not a GGUF file (empty)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _scan_layout(path, buf)
    try:
        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:  # a crafted file can trip anything inside gguf/numpy
        raise GGUFError(f"{path}: cannot parse GGUF ({_first_line(e)})") from None
    arch = meta.get("general.architecture")
    if arch is None:
        raise GGUFError(f"{path}: required metadata key general.architecture is missing")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise GGUFError(f"{path}: required tensor token_embd.weight is missing")
    # GGUF dims are innermost first: token_embd is [d, vocab]
    cfg, rope_dim = _config(path, meta, arch, int(by_name["token_embd.weight"].shape[-1]))
    cfg["tie_word_embeddings"] = "output.weight" not in by_name
    if cfg["num_hidden_layers"] > len(by_name):  # before building a table that long
        raise GGUFError(f"{path}: {arch}.block_count is {cfg['num_hidden_layers']}, but the file "
                        f"has only {len(by_name)} tensors")
    shapes = _expected_shapes(cfg, rope_dim)
    for name in shapes:
        if name not in by_name and name not in ("output.weight", "rope_freqs.weight"):
            raise GGUFError(f"{path}: required tensor {name} is missing")
    tensors = {}
    for name, t in by_name.items():
        if name not in shapes:
            raise GGUFError(f"{path}: unexpected tensor {_show(name)} (not part of a "
                            f"{cfg['num_hidden_layers']}-layer {arch} model)")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists innermost first
        if shape != shapes[name]:
            raise GGUFError(f"{path}: tensor {name} has shape {shape}, but the header's config "
                            f"implies {shapes[name]}")
        try:
            # t.data is (rows, bytes per row) for quantized types; dequantize gives (rows, cols)
            arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        except Exception as e:
            raise GGUFError(f"{path}: cannot dequantize tensor {name} ({_first_line(e)})") from None
        if not np.isfinite(arr).all():  # numpy's is ~10x faster than torch's on CPU here
            raise GGUFError(f"{path}: tensor {name} has non-finite values")
        # np.require copies read-only memmap views (F32) so torch gets writable memory
        w = torch.from_numpy(np.require(arr, np.float32, ["C", "W"]))
        if name == "rope_freqs.weight":
            # llama-3-style rope scaling factors; all ones is the plain rope we implement
            if not torch.equal(w, torch.ones_like(w)):
                raise GGUFError(f"{path}: tensor rope_freqs.weight holds rope scaling factors, "
                                "which are not supported")
            continue
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg["num_attention_heads" if ".attn_q." in name else "num_key_value_heads"]
            w = _unpermute(w, heads)
        tensors[_hf_name(name)] = w
    logger.info("read %s: %s, %d layers, %d tensors", path, arch, cfg["num_hidden_layers"],
                len(tensors))
    return GGUFModel(architecture=arch, config=cfg, tensors=tensors, metadata=meta)
