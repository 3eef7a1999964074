"""LongMem's building blocks that do not depend on fairseq, for a backbone of any family
(:mod:`fairseq_longmem.families`): the memory-reading attention (:mod:`.memory_attention`), the
SideNet (:mod:`.sidenet`) and the state of incremental decoding (:mod:`.decoding_state`)."""
