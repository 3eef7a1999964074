"""A Hugging Face ``tokenizers`` tokenizer.json rebuilt from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json, only llama.cpp's ``tokenizer.ggml.*`` keys. For byte-level BPE
(``tokenizer.ggml.model == "gpt2"``) the vocabulary and merges are stored in GPT-2's byte-to-unicode
spelling, so they go into ``tokenizers.models.BPE`` as they are; what the file names and does not
store is the pre-tokenizer (``tokenizer.ggml.pre``). Supported, each checked against a reference:

* ``smollm`` (SmolLM/SmolLM2): every digit is its own piece, then GPT-2's regex split and
  byte-level mapping with no prefix space: ``Digits(individual_digits=True)`` then
  ``ByteLevel(add_prefix_space=False)``, the pipeline of SmolLM2's own tokenizer.json and of
  llama.cpp's "smollm" pre-type (``\\p{N}`` isolated, then the GPT-2 regex). transformers' GGUF
  loader (5.x) does not know "smollm" and drops the digit split: it tokenizes whitespace before a
  digit differently (``"x  1"``: ``Ġ Ġ 1`` there, ``ĠĠ 1`` in SmolLM2).
* ``gpt2``: ``ByteLevel(add_prefix_space=False)`` alone, GPT-2's own.

Tokens typed CONTROL (and the bos/eos/unk/padding ids) become special added tokens, USER_DEFINED
ones plain added tokens, so that both stay whole, as llama.cpp and Hugging Face keep them.
``gguf_metadata(path)`` reads the keys with ``gguf.GGUFReader`` for callers without a reader.
"""

import logging
from typing import Dict, List

logger = logging.getLogger(__name__)

SUPPORTED_MODELS = ("gpt2",)
SUPPORTED_PRE = ("gpt2", "smollm")
# llama.cpp's llama_token_type values in tokenizer.ggml.token_type
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4
SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")


def gguf_metadata(path: str) -> Dict[str, object]:
    """The ``tokenizer.*`` keys of a GGUF file as plain python values (strings decoded, arrays as
    lists); the tensors are not read."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return {name: f.contents() for name, f in fields.items() if name.startswith("tokenizer.")}


def _pre_tokenizer(pre: str):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt2":
        return byte_level
    # smollm: digits first, so that whitespace before a digit is its own run ("  1" -> "ĠĠ", "1")
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


def tokenizer_json_from_gguf(metadata: Dict[str, object]) -> str:
    """tokenizer.json (a JSON string) for the byte-level BPE tokenizer that GGUF ``metadata``
    (GGUF key -> python value) describes. Raises ValueError, one line, for a tokenizer model or
    pre-tokenizer other than the supported ones, or for inconsistent metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    def get(key, default=None):
        return metadata.get(f"tokenizer.ggml.{key}", default)

    # no pre-tokenizer named: llama.cpp's "default", which is not GPT-2's split either
    kind, pre = get("model"), get("pre")
    if kind not in SUPPORTED_MODELS:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported: only "
                         f"{', '.join(SUPPORTED_MODELS)} (byte-level BPE)")
    if pre not in SUPPORTED_PRE:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported: only "
                         f"{', '.join(SUPPORTED_PRE)}")
    if get("add_space_prefix", False):
        raise ValueError("GGUF tokenizer.ggml.add_space_prefix=true is not supported for "
                         "byte-level BPE (only false)")
    tokens: List[str] = list(get("tokens") or [])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if not tokens or len(vocab) != len(tokens):
        raise ValueError(f"GGUF tokenizer.ggml.tokens: {len(tokens)} tokens, "
                         f"{len(tokens) - len(vocab)} of them repeated")
    merges = [tuple(m.split(" ")) for m in get("merges") or []]
    if any(len(m) != 2 for m in merges):
        raise ValueError("GGUF tokenizer.ggml.merges: a merge is not two tokens separated by one "
                         "space")

    # no unk_token: every byte has a token, as in SmolLM2's and GPT-2's own tokenizer.json
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    types = list(get("token_type") or [])
    special_ids = {i for i, t in enumerate(types) if t == TOKEN_CONTROL}
    special_ids |= {get(k) for k in SPECIAL_ID_KEYS if get(k) is not None}
    if any(not 0 <= i < len(tokens) for i in special_ids):
        raise ValueError(f"GGUF special token ids {sorted(special_ids)} are not all below the "
                         f"vocabulary size {len(tokens)}")
    # normalized=False: matched in the raw text, before the byte-level mapping
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in sorted(special_ids)])
    user = [i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED and i not in special_ids]
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])

    # BOS/EOS only where the file says llama.cpp adds them (SmolLM2: neither)
    def added(w):  # [the id] of the BOS/EOS that llama.cpp adds to every text, else []
        i = get(f"{w}_token_id")
        return [i] if get(f"add_{w}_token", False) and i is not None else []

    bos, eos = added("bos"), added("eos")
    if bos or eos:
        b, e = [tokens[i] for i in bos], [tokens[i] for i in eos]
        tok.post_processor = processors.TemplateProcessing(
            single=b + ["$A"] + e, pair=b + ["$A", "$B"] + e,
            special_tokens=sorted({(tokens[i], i) for i in bos + eos}))
    logger.info("tokenizer.json from GGUF: %d tokens, %d merges, pre-tokenizer %s, %d special",
                len(tokens), len(merges), pre, len(special_ids))
    return tok.to_str()
