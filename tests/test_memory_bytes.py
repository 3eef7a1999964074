"""``ChunkedMemoryBank.bytes_for`` is what a bank really allocates, which the model's RAM check
(``check_memory_fits``) relies on."""

import pytest
import torch

from fairseq_longmem.memory.bank import ChunkedMemoryBank


def allocated(bank: ChunkedMemoryBank) -> int:
    return sum(t.numel() * t.element_size() for t in vars(bank).values()
               if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("rows,heads,head_dim,chunk,size,dtype", [
    (1, 1, 4, 2, 8, torch.float32),
    (3, 4, 32, 4, 256, torch.float32),
    (2, 2, 16, 8, 64, torch.float16),
    (2, 3, 8, 4, 48, torch.bfloat16),
])
def test_bytes_for_is_what_a_bank_allocates(rows, heads, head_dim, chunk, size, dtype):
    bank = ChunkedMemoryBank(rows, heads, head_dim, chunk, size, dtype=dtype)
    expected = ChunkedMemoryBank.bytes_for(rows, heads, head_dim, chunk, size, dtype)
    assert allocated(bank) == expected
    # keys + values (2 * size) + a mean key per chunk (size / chunk) + staging (2 * chunk) per
    # row and head, in vectors of head_dim; plus an int64 write time per chunk slot and row
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert expected == (rows * heads * (2 * size + size // chunk + 2 * chunk) * head_dim * itemsize
                        + rows * (size // chunk) * 8)
