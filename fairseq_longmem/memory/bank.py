"""LongMem's long-term memory: a per-row, per-head chunked ring buffer of keys and values with exact
top-k chunk retrieval, per-row clearing and save/load (pure torch; faiss and triton optional).

This module holds the interface and the storage; the search backends live in ``search.py``
(the CUDA kernels in ``search_triton.py``), the file format in ``file_format.py``. None of them
imports fairseq: ``import fairseq_longmem.memory.bank`` works without fairseq installed.

Layout and semantics
--------------------
Each batch row (stream) and head owns ``capacity = memory_size // chunk_size`` chunk slots of
``chunk_size`` tokens, preallocated at construction::

    keys, values : (rows, heads, capacity, chunk_size, head_dim)   storage dtype/device
    summaries    : (rows, heads, capacity, head_dim)               mean of the chunk's keys

``add`` writes whole chunks in place at the row's write pointer (``index_copy_``); once a row holds
``capacity`` chunks, the oldest are overwritten (FIFO). Its cost depends on the segment, never on
``memory_size``: no rebuild, no copy of the store, no device round trip. The valid chunks of a row
are always the slots ``[0, count)`` (the pointer only wraps once the row is full, and ``clear``
resets it to 0), which keeps masking and saving trivial. Keys or values that are not finite
(inf, NaN) are refused before anything is written.

*Trailing partial chunk*: if a row's appended tokens do not fill a whole chunk, the last
``n % chunk_size`` tokens wait in a per-row staging area. They are **not searchable** until a later
``add`` to the same row completes the chunk, so chunks stay contiguous across segment boundaries
(a chunk may start in one segment and end in the next). ``clear`` drops staged tokens; ``save`` /
``load`` preserve them; ``fill`` does not count them.

*Search*: per (row, head, query token) the top ``k // chunk_size`` chunks by inner product
``<q, summary>`` (exact), in descending score order, expanded to their ``k`` tokens. The backends
(``BACKENDS``: ``auto``, ``torch``, ``matmul``, ``triton``, ``faiss``) and what ``auto`` picks
(``torch``) are described in ``search.py``; all return the same chunks, ties aside.

*Write times*: each row counts its ``add`` calls since it was last cleared, and each chunk slot
remembers the count of the ``add`` that completed it, so :meth:`segments_back` tells how many
segments ago a retrieved chunk was written (1 = by the latest ``add``). A loaded row starts
counting afresh: its loaded chunks count as written by the latest ``add``.

*Files* (``save``/``load``): one safetensors file with a JSON header, no pickle
(``file_format.py``). Loading casts to the bank's own device and dtype, so a memory saved from
fp16 on a GPU loads into an fp32 CPU bank (and vice versa; fp32 -> fp16 rounds).

The bank is a plain object, not an ``nn.Module``: its tensors never enter a model's ``state_dict``
and are never touched by ``model.to()``/``model.half()`` or DDP buffer broadcast; call
``bank.to()`` yourself.
"""

import logging
import numpy as np
import torch

from . import file_format as memory_file
from . import search as memory_search
from .interface import Memory, MemoryRetrieval, chunk_means

logger = logging.getLogger(__name__)


def _storage_use_count(t):
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


try:  # what a tensor nobody else holds reads (the count includes the temporary storage object)
    _FREE_USE_COUNT = _storage_use_count(torch.empty(1))
except AttributeError:  # private API gone: search results are then gathered into fresh tensors
    _FREE_USE_COUNT = None


class GatherPool:
    """CPU buffers for search results, shared by the banks that hold this pool.

    On CPU a fresh tensor of a search result's size (tens to hundreds of MB) costs more in page
    faults than the gather that fills it, since the allocator hands such blocks back to the OS
    when they are freed (docs/BENCHMARKS.md, "Exact search"). So a buffer is reused once nothing
    holds it anymore: callers only ever get views of it, and a view still alive (or saved for
    backward) raises its storage's use count. Shared by every bank of the process (the default),
    a model whose 15 layers each search their own memory needs two buffers at a time under
    ``torch.no_grad`` (keys and values of the one layer attending), not two per layer; in
    training, what backward holds is never handed out again and the pool grows to what one step
    holds at once. Free buffers of another shape than the one asked for are dropped, so the pool
    keeps at most the current shape's."""

    def __init__(self):
        self._buffers = {}  # (shape, dtype) -> [tensor, ...]

    @staticmethod
    def _free(buf) -> bool:
        return _storage_use_count(buf) == _FREE_USE_COUNT

    def take(self, shape, dtype) -> torch.Tensor:
        """A (shape, dtype) CPU tensor nobody else holds, reused when possible."""
        key = (tuple(shape), dtype)
        same = self._buffers.get(key, [])
        for buf in same:
            if self._free(buf):
                return buf
        self.release()  # the free ones of this shape are none, those of others go
        buf = torch.empty(shape, dtype=dtype)
        self._buffers.setdefault(key, []).append(buf)
        return buf

    def release(self):
        """Drop every buffer nobody holds (the memory goes back to the allocator)."""
        for key in list(self._buffers):
            held = [b for b in self._buffers[key] if not self._free(b)]
            if held:
                self._buffers[key] = held
            else:
                del self._buffers[key]

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the pool keeps, held by a caller or free."""
        return sum(b.numel() * b.element_size() for bufs in self._buffers.values() for b in bufs)


SHARED_GATHER_POOL = GatherPool()

# Upper bound on one block of a batched search's (rows, heads, queries, chunks) score tensor.
_MAX_SCORE_BYTES = 256 * 2**20


class ChunkedMemoryBank(Memory):
    """Per-row, per-head FIFO memory of ``memory_size`` tokens in chunks of ``chunk_size``.

    See the module docstring for the layout, the staging of partial chunks and the file format.
    """

    BACKENDS = memory_search.BACKENDS

    def __init__(
        self,
        num_rows: int,
        num_heads: int,
        head_dim: int,
        chunk_size: int,
        memory_size: int,
        dtype=torch.float32,
        device="cpu",
        backend: str = "auto",
        fingerprint: str = "",
    ):
        for name, v in (
            ("num_rows", num_rows),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
            ("chunk_size", chunk_size),
            ("memory_size", memory_size),
        ):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if memory_size % chunk_size != 0:
            raise ValueError(
                f"memory_size must be a multiple of chunk_size: got memory_size={memory_size}, "
                f"chunk_size={chunk_size}"
            )
        backend = str(backend)  # fairseq's ChoiceEnum members compare and print as their value
        memory_search.check_backend(backend)  # unknown name, or its package missing
        dtype = self._check_dtype(dtype)
        if not isinstance(fingerprint, str):
            raise ValueError(f"fingerprint must be a str, got {type(fingerprint).__name__}")
        self.num_heads = int(num_heads)
        self.head_dim = int(head_dim)
        self.chunk_size = int(chunk_size)
        self.memory_size = int(memory_size)
        self.capacity = self.memory_size // self.chunk_size
        self.backend = backend
        self.fingerprint = fingerprint
        self.max_score_bytes = _MAX_SCORE_BYTES
        self._dtype = dtype
        self._device = torch.device(device)
        self._allocate(int(num_rows))

    # ------------------------------------------------------------------ state

    @staticmethod
    def _check_dtype(dtype):
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        return dtype

    def _allocate(self, num_rows):
        B, H, C, S, D = num_rows, self.num_heads, self.capacity, self.chunk_size, self.head_dim
        kw = dict(dtype=self._dtype, device=self._device)
        self._keys = torch.zeros(B, H, C, S, D, **kw)
        self._values = torch.zeros(B, H, C, S, D, **kw)
        self._summaries = torch.zeros(B, H, C, D, **kw)
        self._stage_keys = torch.zeros(B, H, S, D, **kw)
        self._stage_values = torch.zeros(B, H, S, D, **kw)
        self._device = self._keys.device  # resolves "cuda" to "cuda:N"
        # Pointers live on the host: the ragged paths branch on them without a device sync.
        self._write_ptr = np.zeros(B, dtype=np.int64)
        self._count = np.zeros(B, dtype=np.int64)  # valid chunks; they occupy slots [0, count)
        self._stage_len = np.zeros(B, dtype=np.int64)
        self._clock = np.zeros(B, dtype=np.int64)  # add calls since the row was cleared
        # per slot, the row's _clock when the add that completed its chunk ran
        self._written_at = torch.zeros(B, C, dtype=torch.long, device=self._device)
        self.gather_pool = SHARED_GATHER_POOL  # CPU search outputs, reused (_gather)

    @staticmethod
    def bytes_for(num_rows: int, num_heads: int, head_dim: int, chunk_size: int,
                  memory_size: int, dtype=torch.float32) -> int:
        """Bytes the tensors of a bank built with these arguments take, allocated at construction
        (keys and values, one mean key per chunk, one chunk's staging area per row and head, and
        each chunk slot's write time, an int64 per row)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        capacity = memory_size // chunk_size
        per_head = 2 * capacity * chunk_size + capacity + 2 * chunk_size  # vectors of head_dim
        write_times = num_rows * capacity * torch.empty((), dtype=torch.long).element_size()
        return num_rows * num_heads * per_head * head_dim * itemsize + write_times

    @property
    def num_rows(self) -> int:
        return self._keys.shape[0]

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the storage tensors (keys, values, summaries, staging)."""
        ts = (self._keys, self._values, self._summaries, self._stage_keys, self._stage_values)
        return sum(t.numel() * t.element_size() for t in ts)

    def __repr__(self):
        return (
            f"ChunkedMemoryBank(num_rows={self.num_rows}, num_heads={self.num_heads}, "
            f"head_dim={self.head_dim}, chunk_size={self.chunk_size}, "
            f"memory_size={self.memory_size}, dtype={self._dtype}, device={self._device}, "
            f"backend={self.backend!r})"
        )

    def fill(self) -> torch.LongTensor:
        """(B,) number of searchable tokens per row (staged tokens excluded), on the CPU."""
        return torch.from_numpy(self._count * self.chunk_size)

    def staged(self) -> torch.LongTensor:
        """(B,) number of tokens waiting in each row's staging area (not searchable yet)."""
        return torch.from_numpy(self._stage_len.copy())

    def to(self, device=None, dtype=None):
        """Move (and/or cast) the storage; returns self."""
        if dtype is not None:
            self._dtype = self._check_dtype(dtype)
        if device is not None:
            self._device = torch.device(device)
        for name in ("_keys", "_values", "_summaries", "_stage_keys", "_stage_values"):
            setattr(self, name, getattr(self, name).to(device=self._device, dtype=self._dtype))
        self._device = self._keys.device
        self._written_at = self._written_at.to(self._device)
        return self

    def resize_rows(self, num_rows: int):
        """Re-allocate for ``num_rows`` rows; clears everything."""
        if isinstance(num_rows, bool) or not isinstance(num_rows, (int, np.integer)) \
                or num_rows <= 0:
            raise ValueError(f"num_rows must be a positive int, got {num_rows!r}")
        self._allocate(int(num_rows))

    def select_rows(self, order):
        """Replace the rows by rows ``order`` (a 1-D index; repeats allowed, e.g. one copy per
        beam of a prompt's memory), in place; returns self."""
        order = torch.as_tensor(order, dtype=torch.long).flatten()
        if order.numel() == 0 or int(order.min()) < 0 or int(order.max()) >= self.num_rows:
            raise ValueError(f"select_rows: expected row indices in [0, {self.num_rows}), "
                             f"got {order.tolist()}")
        on_device = order.to(self._device)
        for name in ("_keys", "_values", "_summaries", "_stage_keys", "_stage_values",
                     "_written_at"):
            setattr(self, name, getattr(self, name).index_select(0, on_device))
        host = order.cpu().numpy()
        for name in ("_write_ptr", "_count", "_stage_len", "_clock"):
            setattr(self, name, getattr(self, name)[host])
        return self

    def _rows(self, rows, what="rows"):
        """Normalise rows (None, int, bool mask, LongTensor, iterable) to a list of row indices."""
        B = self.num_rows
        if rows is None:
            return list(range(B))
        if isinstance(rows, torch.Tensor):
            if rows.dtype == torch.bool:
                if rows.shape != (B,):
                    raise ValueError(f"{what}: bool mask must have shape ({B},), "
                                     f"got {tuple(rows.shape)}")
                return rows.nonzero().flatten().tolist()
            if rows.is_floating_point() or rows.is_complex() or rows.dim() > 1:
                raise ValueError(f"{what}: expected row indices or a bool mask, got {rows.dtype} "
                                 f"tensor of shape {tuple(rows.shape)}")
            rows = rows.flatten().tolist()
        elif isinstance(rows, np.ndarray) and rows.dtype == np.bool_:
            return self._rows(torch.from_numpy(rows), what)
        elif isinstance(rows, (int, np.integer)) and not isinstance(rows, bool):
            rows = [rows]
        out = []
        for r in rows:
            if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 0 <= r < B:
                raise ValueError(f"{what}: row index must be an int in [0, {B}), got {r!r}")
            out.append(int(r))
        if len(set(out)) != len(out):
            raise ValueError(f"{what}: duplicate row indices in {out}")
        return out

    def clear(self, rows=None):
        """Empty the given rows (None = all): no searchable chunk, no staged token."""
        idx = self._rows(rows)
        self._write_ptr[idx] = 0
        self._count[idx] = 0
        self._stage_len[idx] = 0
        self._clock[idx] = 0

    # ------------------------------------------------------------------ add

    def _check_kv(self, name, t, T=None):
        B, H, D = self.num_rows, self.num_heads, self.head_dim
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or t.shape[0] != B or t.shape[1] != H or t.shape[3] != D:
            raise ValueError(f"{name}: expected shape (B={B}, H={H}, T, hd={D}), "
                             f"got {tuple(t.shape)}")
        if T is not None and t.shape[2] != T:
            raise ValueError(f"{name}: expected T={T} (as keys), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.device != self._device:
            raise ValueError(f"{name}: expected device {self._device}, got {t.device}")

    def add(self, keys, values, lengths=None):
        """Append a segment's keys/values (B, H, T, hd) to each row (cast to the storage dtype).

        ``lengths`` (B,): only the first ``lengths[b]`` tokens of row b are appended.
        Whole chunks become searchable; a trailing partial chunk is staged (module docstring).
        Non-finite keys or values among the appended tokens are refused; nothing is written then.
        """
        self._check_kv("keys", keys)
        T = keys.shape[2]
        self._check_kv("values", values, T)
        # cast first: what is checked is what gets stored (1e5 is finite in fp32, inf in fp16)
        keys = keys.detach().to(self._dtype)
        values = values.detach().to(self._dtype)
        B, S = self.num_rows, self.chunk_size
        if lengths is not None:
            if not isinstance(lengths, torch.Tensor):
                lengths = torch.as_tensor(lengths)
            if lengths.shape != (B,) or lengths.is_floating_point() or lengths.dtype == torch.bool:
                raise ValueError(f"lengths: expected an integer tensor of shape ({B},), "
                                 f"got {lengths.dtype} of shape {tuple(lengths.shape)}")
        lengths, nonfinite = self._lengths_and_nonfinite_rows(keys, values, lengths)
        if (lengths < 0).any() or (lengths > T).any():
            raise ValueError(f"lengths: expected values in [0, T={T}], got {lengths.tolist()}")
        if nonfinite:
            raise ValueError(f"keys/values: refused, expected finite numbers, found inf or NaN "
                             f"among the tokens appended to row(s) {nonfinite}; nothing was added")
        self._clock += 1
        if T == 0:
            return
        # Common case, vectorised: rows taking all T tokens as T/csz whole chunks, nothing staged.
        whole = (lengths == T) & (self._stage_len == 0) if T % S == 0 else np.zeros(B, dtype=bool)
        if whole.any():
            n, H, D = T // S, self.num_heads, self.head_dim
            rows = np.flatnonzero(whole)
            if not whole.all():
                sel = torch.from_numpy(rows).to(self._device)
                whole_keys, whole_values = keys.index_select(0, sel), values.index_select(0, sel)
            else:
                whole_keys, whole_values = keys, values
            self._write_chunks(rows.tolist(),
                               whole_keys.reshape(len(rows), H, n, S, D),  # (R, H, n, csz, hd)
                               whole_values.reshape(len(rows), H, n, S, D))
        for b in np.flatnonzero(~whole).tolist():  # ragged rows: partial chunks, staging
            self._add_row(b, keys[b], values[b], int(lengths[b]))

    def _lengths_and_nonfinite_rows(self, keys, values, lengths):
        """(lengths as numpy (B,), rows whose appended tokens hold inf or NaN).

        A sum is finite only if all its terms are, so one fp32 sum per row of its appended keys
        and values is the check (a plain reduction: 1/25 of an elementwise isfinite on CPU);
        only a row whose sum is not finite is looked at exactly, since a sum of huge finite
        numbers may also overflow. On CUDA the sums travel to the host in the same copy as
        ``lengths``, which must come over anyway when it is a device tensor (as the model
        passes it): no extra sync then; with ``lengths`` None or on the CPU, one sync.
        """
        B, _, T, _ = keys.shape
        sums = (keys.sum(dim=(1, 3), dtype=torch.float32)
                + values.sum(dim=(1, 3), dtype=torch.float32))  # (B, T)
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int64, device=keys.device)
        else:
            lengths = lengths.to(device=keys.device, dtype=torch.int64)
            taken = torch.arange(T, device=keys.device)[None, :] < lengths[:, None]  # (B, T)
            sums = torch.where(taken, sums, 0.0)
        host = torch.cat([lengths.double(), sums.sum(dim=1).double()]).cpu().numpy()
        lengths = host[:B].astype(np.int64)
        suspect = np.flatnonzero(~np.isfinite(host[B:])).tolist()
        bad = [b for b in suspect if 0 <= lengths[b] <= T and not (
            torch.isfinite(keys[b, :, :lengths[b]]).all()
            and torch.isfinite(values[b, :, :lengths[b]]).all())]
        return lengths, bad

    def _add_row(self, b, keys, values, length):
        # keys/values: (H, T, hd); the first `length` tokens are appended after the staged ones.
        S, s = self.chunk_size, int(self._stage_len[b])
        if length == 0:
            return
        total = s + length
        n, r = divmod(total, S)
        if n == 0:
            self._stage_keys[b, :, s:total] = keys[:, :length]
            self._stage_values[b, :, s:total] = values[:, :length]
            self._stage_len[b] = total
            return
        used = n * S - s  # tokens of this segment that go into whole chunks
        chunk_keys = torch.cat([self._stage_keys[b, :, :s], keys[:, :used].to(self._dtype)], dim=1)
        chunk_values = torch.cat([self._stage_values[b, :, :s], values[:, :used].to(self._dtype)],
                                 dim=1)
        H, D = self.num_heads, self.head_dim
        self._write_chunks([b], chunk_keys.view(1, H, n, S, D), chunk_values.view(1, H, n, S, D))
        self._stage_keys[b, :, :r] = keys[:, used:length]
        self._stage_values[b, :, :r] = values[:, used:length]
        self._stage_len[b] = r

    def _write_chunks(self, rows, chunk_keys, chunk_values):
        """Write n chunks per row at the rows' write pointers. chunk_keys/chunk_values:
        (R, H, n, csz, hd)."""
        R, H, n, S, D = chunk_keys.shape
        C = self.capacity
        keep = min(n, C)  # with n > C only the newest C chunks survive
        ck, cv = chunk_keys[:, :, n - keep:], chunk_values[:, :, n - keep:]
        ptr = self._write_ptr[rows]  # (R,)
        slots = (ptr[:, None] + (n - keep) + np.arange(keep)[None, :]) % C  # (R, keep)
        base = (np.asarray(rows)[:, None] * H + np.arange(H)[None, :]) * C  # (R, H)
        flat = torch.from_numpy((base[:, :, None] + slots[:, None, :]).reshape(-1))  # (R*H*keep,)
        flat = flat.to(self._device, non_blocking=True)
        summ = chunk_means(ck)  # (R, H, keep, hd)
        self._keys.view(-1, S * D).index_copy_(0, flat, ck.reshape(-1, S * D).to(self._dtype))
        self._values.view(-1, S * D).index_copy_(0, flat, cv.reshape(-1, S * D).to(self._dtype))
        self._summaries.view(-1, D).index_copy_(0, flat, summ.reshape(-1, D).to(self._dtype))
        when = torch.from_numpy(np.repeat(self._clock[rows], keep)).to(self._device)
        self._written_at[torch.from_numpy(np.repeat(rows, keep)).to(self._device),
                      torch.from_numpy(slots.reshape(-1)).to(self._device)] = when
        self._write_ptr[rows] = (ptr + n) % C
        self._count[rows] = np.minimum(self._count[rows] + n, C)

    # ------------------------------------------------------------------ search

    def search(self, queries, k: int) -> MemoryRetrieval:
        """Top ``k // csz`` chunks per (row, head, query) by <query, chunk summary>, expanded.

        queries: (B, H, T, hd). Returns a :class:`MemoryRetrieval` in storage dtype/device, chunks
        in descending score order; slots beyond a row's chunk count have mask False and zero
        keys/values.
        """
        S, C = self.chunk_size, self.capacity
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0 or k % S != 0:
            raise ValueError(f"k must be a positive multiple of chunk_size={S}, got {k!r}")
        if k // S > C:
            raise ValueError(f"k={k} asks for {k // S} chunks but a row holds at most "
                             f"capacity={C} (memory_size={self.memory_size}, chunk_size={S})")
        self._check_kv("queries", queries)
        backend = memory_search.resolve(self.backend)
        slots = memory_search.search(backend, queries.detach().to(self._dtype), self._summaries,
                                     self._count, k // S, self.max_score_bytes)
        return self._expand(slots)

    def gather(self, slots: torch.Tensor, check_range: bool = True) -> MemoryRetrieval:
        """The chunks named by ``slots`` (B, H, T, nk; -1 = missing), as :meth:`search` returns
        them: what another search chose, read from this bank's keys and values (a shared search,
        ``--search-every``). B must be this bank's rows and H its heads. ``check_range`` False
        skips the check that every slot lies in [-1, capacity) (a host sync on CUDA), for slots
        a search of a bank of this capacity returned."""
        if slots.dim() != 4 or tuple(slots.shape[:2]) != (self.num_rows, self.num_heads):
            raise ValueError(f"gather: expected slots of shape ({self.num_rows}, {self.num_heads}, "
                             f"T, chunks), got {tuple(slots.shape)}")
        if check_range and slots.numel() and (int(slots.min()) < -1
                                              or int(slots.max()) >= self.capacity):
            raise ValueError(f"gather: slots must lie in [-1, {self.capacity})")
        return self._expand(slots)

    def segments_back(self, slots: torch.Tensor) -> torch.LongTensor:
        """How many ``add`` calls ago (1 = the latest) each chunk named by ``slots`` (B', H, T, nk)
        was written, B' a multiple of the rows (batch row b names chunks of row b // (B'/rows),
        as ``read_memory`` folds shared rows); values for missing slots (-1) are meaningless."""
        n = slots.shape[0] // self.num_rows
        rows = torch.arange(slots.shape[0], device=self._device) // n  # (B',)
        clock = torch.from_numpy(self._clock).to(self._device)[rows]  # (B',)
        written = self._written_at[rows].gather(1, slots.clamp_min(0).flatten(1)).view(slots.shape)
        return clock.view(-1, 1, 1, 1) - written + 1

    def contents_segments_back(self) -> torch.LongTensor:
        """(rows, capacity): how many ``add`` calls ago (1 = the latest) each stored chunk was
        written, as ``segments_back`` counts; -1 for the empty slots (from ``count`` on)."""
        clock = torch.from_numpy(self._clock).to(self._device)
        count = torch.from_numpy(self._count).to(self._device)
        stored = torch.arange(self.capacity, device=self._device)[None, :] < count[:, None]
        return (clock[:, None] - self._written_at + 1).masked_fill(~stored, -1)

    def tensors(self):
        return [self._keys, self._values, self._summaries, self._stage_keys, self._stage_values]

    def _expand(self, slots):
        """Gather the chunks named by slots (B, H, T, nk), -1 = missing, into a MemoryRetrieval."""
        B, H, T, nk = slots.shape
        C, S, D = self.capacity, self.chunk_size, self.head_dim
        slots = slots.to(self._device)
        missing = slots < 0  # (B, H, T, nk)
        base = (torch.arange(B, device=self._device)[:, None] * H
                + torch.arange(H, device=self._device)[None, :]) * C  # (B, H)
        flat = (slots.clamp_min(0) + base[:, :, None, None]).reshape(-1)  # (B*H*T*nk,)
        keys = self._gather(self._keys, flat).view(B, H, T, nk * S, D)
        values = self._gather(self._values, flat).view(B, H, T, nk * S, D)
        mask = (~missing)[..., None].expand(B, H, T, nk, S).reshape(B, H, T, nk * S)
        if bool((self._count < nk).any()):
            keys.masked_fill_(~mask[..., None], 0)
            values.masked_fill_(~mask[..., None], 0)
        return MemoryRetrieval(keys=keys, values=values, mask=mask, chunk_index=slots)

    def _gather(self, store, flat):
        """Chunks ``flat`` of ``store`` as a (len(flat), csz * hd) tensor; on CPU into a buffer of
        ``self.gather_pool`` (:class:`GatherPool`: shared by every bank unless replaced)."""
        src = store.view(-1, store.shape[-2] * store.shape[-1])
        if self._device.type != "cpu" or _FREE_USE_COUNT is None:
            return src.index_select(0, flat)
        buf = self.gather_pool.take((flat.numel(), src.shape[1]), src.dtype)
        return torch.index_select(src, 0, flat, out=buf)

    # ------------------------------------------------------------------ save / load

    def _config(self):
        return dict(num_heads=self.num_heads, head_dim=self.head_dim,
                    chunk_size=self.chunk_size, memory_size=self.memory_size)

    def save(self, path, rows=None, overwrite: bool = False):
        """Write the given rows (None = all) to ``path`` (safetensors + JSON header, atomic)."""
        memory_file.save(path, self._config(), self._dtype, self.fingerprint,
                         self._saved_rows(rows), overwrite)

    def _saved_rows(self, rows=None):
        """The given rows (None = all) as :class:`~.file_format.SavedRow` (views, not copies)."""
        saved = []
        for b in self._rows(rows):
            cnt, s = int(self._count[b]), int(self._stage_len[b])
            tensors = dict(keys=self._keys[b, :, :cnt], values=self._values[b, :, :cnt],
                           summaries=self._summaries[b, :, :cnt],
                           staging_keys=self._stage_keys[b, :, :s],
                           staging_values=self._stage_values[b, :, :s])
            saved.append(memory_file.SavedRow(write_pointer=int(self._write_ptr[b]), count=cnt,
                                              staged=s, tensors=tensors, source_row=b))
        return saved

    def load(self, path, rows=None):
        """Load a saved memory into ``rows`` of this bank (None = all; count must match the file).

        Everything is validated before anything is written: a refused file leaves the memory as it
        was. Tensors are cast to this bank's device and dtype.
        """
        idx = self._rows(rows)
        self._put_rows(idx, memory_file.load(path, self._config(), self.fingerprint, len(idx)))
        logger.info("loaded %d memory row(s) from %s into rows %s (%s, %s)", len(idx), path, idx,
                    self._device, self._dtype)

    def _put_rows(self, idx, saved):
        """Rows ``idx`` of this bank := the validated rows ``saved`` (one each)."""
        put = dict(device=self._device, dtype=self._dtype)
        for b, row in zip(idx, saved):
            cnt, s = row.count, row.staged
            self._keys[b, :, :cnt] = row.tensors["keys"].to(**put)
            self._values[b, :, :cnt] = row.tensors["values"].to(**put)
            self._summaries[b, :, :cnt] = row.tensors["summaries"].to(**put)
            self._stage_keys[b, :, :s] = row.tensors["staging_keys"].to(**put)
            self._stage_values[b, :, :s] = row.tensors["staging_values"].to(**put)
            self._write_ptr[b], self._count[b], self._stage_len[b] = row.write_pointer, cnt, s
            self._clock[b] = 0
            self._written_at[b] = 0
