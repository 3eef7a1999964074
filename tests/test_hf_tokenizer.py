"""tokenizer.json from GGUF metadata (fairseq_longmem.tokenizer_files) and the ``hf_tokenizer``
fairseq BPE (fairseq_longmem.hf_tokenizer_bpe): a tiny hand-built vocabulary through fairseq's
Dictionary, GPT-2's real one against fairseq's own ``gpt2`` BPE, the refusals, and (slow) SmolLM2's
real GGUF against transformers' GGUF tokenizer and an independent pure-python BPE."""

import json
import os
from argparse import Namespace

import pytest
import regex

import fairseq_longmem.hf_tokenizer_bpe  # noqa: F401  registers --bpe hf_tokenizer
from fairseq.data import Dictionary, encoders
from fairseq.data.encoders.gpt2_bpe_utils import Encoder, bytes_to_unicode
from fairseq_longmem.tokenizer_files import gguf_metadata, tokenizer_json_from_gguf

EOT = "<|endoftext|>"
# digits, unicode, whitespace runs, newlines, leading/trailing spaces, indented code
TEXTS = [
    "In 1984, 3.14159 and 1,000,000",
    "Café, naïve, Ünïcödé: 日本語の文章です。 한국어 🙂🎉 👩\u200d👩\u200d👧",
    "a    b\t\tc",
    "first line\nsecond line\r\nthird\n\n\nlast",
    "  leading and trailing  ",
    " ",
    "def f(x):\n    if x:\n        return [x, 2]\n\treturn None\n",
]


def build(tmp_path, metadata):
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer_json_from_gguf(metadata), encoding="utf-8")
    return encoders.build_bpe(Namespace(bpe="hf_tokenizer", tokenizer_file=str(path)))


def write_dict(path, vocab_size, eos_id=0):
    """dict.txt per the converters' convention: model ids as strings, end-of-text left out."""
    path.write_text("".join(f"{i} 1\n" for i in range(vocab_size) if i != eos_id))
    return Dictionary.load(str(path))


# --------------------------------------------------------------------------- tiny vocabulary

BYTES = [bytes_to_unicode()[b] for b in range(256)]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "Ġc a", "Ġca t", "Ġ Ġ"]
TINY_TOKENS = [EOT] + BYTES + [m.replace(" ", "") for m in MERGES]


def tiny_metadata(pre="smollm", **extra):
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": TINY_TOKENS, "tokenizer.ggml.merges": MERGES,
            "tokenizer.ggml.token_type": [3] + [1] * (len(TINY_TOKENS) - 1),
            "tokenizer.ggml.eos_token_id": 0, **extra}


def test_tiny_tokenizer_through_fairseq_dictionary(tmp_path):
    bpe = build(tmp_path, tiny_metadata())
    ids = {t: i for i, t in enumerate(TINY_TOKENS)}
    text = " the cat  12"
    # smollm: digits isolated first, so the two spaces before "1" are one run ("ĠĠ")
    expected = [ids[t] for t in ("Ġthe", "Ġcat", "ĠĠ", "1", "2")]
    assert bpe.encode(text) == " ".join(map(str, expected))

    d = write_dict(tmp_path / "dict.txt", len(TINY_TOKENS))
    idx = d.encode_line(bpe.encode(text), add_if_not_exist=False, append_eos=True).tolist()
    assert idx == [i + 3 for i in expected] + [d.eos()]  # model id i -> fairseq i + 3, then </s>
    assert d.eos() == 2 and d.unk() not in idx
    assert bpe.decode(d.string(idx[:-1])) == text

    # text spelling the end-of-text token stays text: only fairseq's </s> ends a document
    assert "0" not in bpe.encode(f"a{EOT}b").split()
    for s in [text, f"a{EOT}b", "日本 🙂\t\t x\n\n  y ", "", "   "]:
        assert bpe.decode(bpe.encode(s)) == s
    assert bpe.decode("0") == EOT and bpe.decode(f"{ids['h']} <unk> {ids['i']}") == "h<unk>i"
    bow = [bpe.is_beginning_of_word(str(ids[t])) for t in ("Ġthe", "he", EOT)]
    assert bow == [True, False, True]
    assert bpe.is_beginning_of_word("<unk>")


def test_tiny_gpt2_pre_tokenizer_and_bos(tmp_path):
    # GPT-2's regex alone keeps " 12" together: one space, then "Ġ" "1" "2"
    ids = {t: i for i, t in enumerate(TINY_TOKENS)}
    bpe = build(tmp_path, tiny_metadata(pre="gpt2"))
    assert bpe.encode(" the cat  12").split() == [
        str(ids[t]) for t in ("Ġthe", "Ġcat", "Ġ", "Ġ", "1", "2")]
    # a file that asks for BOS gets it in tokenizer.json; the BPE still adds none
    from tokenizers import Tokenizer

    meta = tiny_metadata(**{"tokenizer.ggml.add_bos_token": True,
                            "tokenizer.ggml.bos_token_id": ids["h"]})
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(meta))
    assert tok.encode("e").ids == [ids["h"], ids["e"]]
    assert build(tmp_path, meta).encode("e") == str(ids["e"])


@pytest.mark.parametrize("key,value,named", [
    ("tokenizer.ggml.pre", "llama-bpe", "'llama-bpe'"),
    ("tokenizer.ggml.pre", None, "None"),  # llama.cpp's "default" split, not GPT-2's
    ("tokenizer.ggml.model", "llama", "'llama'"),
])
def test_unsupported_tokenizer_refused(key, value, named):
    with pytest.raises(ValueError) as e:
        tokenizer_json_from_gguf({**tiny_metadata(), key: value})
    msg = str(e.value)
    assert named in msg and "supported" in msg and "\n" not in msg


# --------------------------------------------------------------------------- GPT-2's real BPE

def test_gpt2_pre_tokenizer_matches_fairseq_gpt2_bpe(gpt2_files, tmp_path):
    enc, vocab_bpe, _ = gpt2_files
    with open(enc, encoding="utf-8") as f:
        encoder = json.load(f)
    with open(vocab_bpe, encoding="utf-8") as f:
        merges = [line for line in f.read().split("\n")[1:] if line]
    tokens = sorted(encoder, key=encoder.get)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": [3 if t == EOT else 1 for t in tokens]}
    ours = build(tmp_path, meta)
    theirs = encoders.build_bpe(
        Namespace(bpe="gpt2", gpt2_encoder_json=enc, gpt2_vocab_bpe=vocab_bpe))
    for text in TEXTS + [f"quoted {EOT} stays text", "x  1"]:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == text


# --------------------------------------------------------------------------- SmolLM2's real GGUF

# from transformers' GGUF tokenizer once, pasted: they guard against drift
PINNED = {
    "Hello, world!": [19556, 28, 905, 17],
    "The year 2024 had 366 days.": [504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30],
    "a    b\t\tc": [81, 333, 278, 197, 197, 83],
}
# whitespace before a digit: SmolLM2's digit split makes the spaces one run; transformers' GGUF
# loader (5.x) lacks it and gives "x  1" -> [104, 216, 216, 33], "\n    1" -> [472, 216, 33]
DIGIT_SPLIT = {"x  1": [104, 256, 33], "\n    1": [2367, 33]}


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf, tmp_path_factory):
    """(metadata, tokenizer.json path, hf_tokenizer BPE), built once per session."""
    meta = gguf_metadata(smollm2_gguf)
    path = tmp_path_factory.mktemp("smollm2_tokenizer") / "tokenizer.json"
    path.write_text(tokenizer_json_from_gguf(meta), encoding="utf-8")
    bpe = encoders.build_bpe(Namespace(bpe="hf_tokenizer", tokenizer_file=str(path)))
    return meta, str(path), bpe


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf):
    from transformers import AutoTokenizer

    folder, name = os.path.split(smollm2_gguf)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def ids_of(bpe, text):
    return [int(i) for i in bpe.encode(text).split()]


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_tokenizer(smollm2_tokenizer, smollm2_reference):
    meta, _, bpe = smollm2_tokenizer
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.tokens"][0] == EOT
    for text in TEXTS + list(PINNED):
        assert ids_of(bpe, text) == smollm2_reference(text, add_special_tokens=False)["input_ids"]
        assert bpe.decode(bpe.encode(text)) == text
    for text, ids in {**PINNED, **DIGIT_SPLIT}.items():
        assert ids_of(bpe, text) == ids, text
    # SmolLM2's HF tokenizer reads the literal text as the end-of-text token; we keep it text
    text = f"quoted {EOT} here"
    assert 0 in smollm2_reference(text, add_special_tokens=False)["input_ids"]
    assert 0 not in ids_of(bpe, text) and bpe.decode(bpe.encode(text)) == text


@pytest.mark.slow
def test_smollm2_matches_llama_cpp_smollm_pipeline(smollm2_tokenizer, tmp_path):
    """An independent reference: llama.cpp's "smollm" pre-type (each \\p{N} isolated, then GPT-2's
    regex) over fairseq's pure-python GPT-2 BPE with the file's vocabulary and merges."""
    meta, _, bpe = smollm2_tokenizer
    tokens = meta["tokenizer.ggml.tokens"]
    ref = Encoder({t: i for i, t in enumerate(tokens)},
                  [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]])

    def ref_ids(text):
        return [i for part in regex.split(r"(\p{N})", text) if part for i in ref.encode(part)]

    for text in TEXTS + list(PINNED) + list(DIGIT_SPLIT) + ["٣٤٥ ²³ ½  7", "x\t 1\n\n 2"]:
        assert ids_of(bpe, text) == ref_ids(text), text

    # a document through fairseq's Dictionary: newlines inside, </s> only at its end
    d = write_dict(tmp_path / "dict.txt", len(tokens))
    doc = "Title\n\nBody with 42 words.\n"
    idx = d.encode_line(bpe.encode(doc), add_if_not_exist=False, append_eos=True).tolist()
    assert idx == [i + 3 for i in ids_of(bpe, doc)] + [d.eos()]
    assert idx.count(d.eos()) == 1 and d.index("198") in idx  # "\n" is model id 198
    assert bpe.decode(d.string(idx)) == doc
