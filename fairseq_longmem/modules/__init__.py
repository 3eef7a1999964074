"""Building blocks that do not depend on fairseq: GPT-2 modules and the memory bank."""
