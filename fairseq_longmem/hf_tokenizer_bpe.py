"""fairseq BPE ``hf_tokenizer``: a Hugging Face ``tokenizers`` tokenizer.json as a ``--bpe``.

``--bpe hf_tokenizer --tokenizer-file DIR/tokenizer.json`` (e.g. the one
:func:`fairseq_longmem.tokenizer_files.tokenizer_json_from_gguf` builds for SmolLM2). Like fairseq's
``gpt2`` BPE, ``encode`` returns the model's token ids as space-separated strings; the converter's
dict.txt lists them as ``"1" .. "V-1"`` (the model's end-of-text id left out), so fairseq's index of
model id ``i`` is ``dictionary.index(str(i))``: ``i + 3`` for SmolLM2, whose end-of-text id is 0.

Documents. fairseq's line-based binarizer (``fairseq-preprocess``) appends ``</s>`` to every line,
and ``</s>`` stands for the model's end-of-text token (SmolLM2: id 0 ``<|endoftext|>``, the token
between its pretraining documents); so ``</s>`` ends a document and a line of ids is one document.
Encode a whole document, newlines included (they become newline tokens, SmolLM2 ``"\\n"`` -> 198),
into one line: encoding it line by line would put ``<|endoftext|>`` where each newline was. The
SmolLM2-Instruct GGUF's ``eos_token_id`` is 2 ``<|im_end|>``, the end of a chat turn: an ordinary
symbol here.

Special tokens. ``encode`` adds none (no BOS), and text that spells one (``"<|endoftext|>"``,
``"<|im_start|>"``) is encoded as the ordinary text it is. SmolLM2's own HF tokenizer maps the
literal ``"<|endoftext|>"`` to id 0, which in a corpus would make a quoted token into a document
boundary the text never had; only fairseq's ``</s>`` may produce id 0. ``decode`` renders every id,
special ones included, so ``decode(encode(s)) == s`` for any text.
"""

import os
from dataclasses import dataclass, field

from fairseq.data.encoders import register_bpe
from fairseq.dataclass import FairseqDataclass


@dataclass
class HFTokenizerBPEConfig(FairseqDataclass):
    tokenizer_file: str = field(default="???", metadata={"help": "path to a tokenizer.json"})


@register_bpe("hf_tokenizer", dataclass=HFTokenizerBPEConfig)
class HFTokenizerBPE(object):
    def __init__(self, cfg):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("--bpe hf_tokenizer needs Hugging Face tokenizers: "
                              "pip install tokenizers") from None
        if not os.path.isfile(cfg.tokenizer_file):
            raise FileNotFoundError(f"--tokenizer-file {cfg.tokenizer_file}: no such file")
        self.tok = Tokenizer.from_file(cfg.tokenizer_file)
        # special tokens spelled in the text stay text (module docstring)
        self.tok.encode_special_tokens = True
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = set(self.tok.get_added_tokens_decoder())

    def encode(self, x: str) -> str:
        return " ".join(map(str, self.tok.encode(x, add_special_tokens=False).ids))

    def _decode_ids(self, ids) -> str:
        bad = [i for i in ids if i >= self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is not in the tokenizer's {self.vocab_size} ids")
        return self.tok.decode(ids, skip_special_tokens=False)

    def decode(self, x: str) -> str:
        # fairseq symbols that are not ids (<unk>, <mask>) are kept as text, as the gpt2 BPE does
        out, ids = [], []
        for t in x.split():
            if t.isascii() and t.isdigit():
                ids.append(int(t))
                continue
            out += [self._decode_ids(ids), t]
            ids = []
        return "".join(out + [self._decode_ids(ids)])

    def is_beginning_of_word(self, x: str) -> bool:
        if not (x.isascii() and x.isdigit()) or int(x) in self.special_ids:
            return True
        return self.decode(x)[:1].isspace()
