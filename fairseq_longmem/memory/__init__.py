"""LongMem's long-term memory, pure torch (no fairseq): the bank (:mod:`.bank`), its file format
(:mod:`.file_format`) and its exact chunk search with its backends (:mod:`.search`, the shared
selection in :mod:`.topk`, the CUDA kernels in :mod:`.search_triton`)."""
