"""Model building blocks that do not depend on fairseq: the GPT-2 backbone (:mod:`.gpt2`), the
SideNet with its memory-reading attention (:mod:`.sidenet`) and the state of incremental decoding
(:mod:`.decoding_state`)."""
