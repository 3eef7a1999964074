"""Tokenizers through fairseq's own BPE encoders: GPT-2 BPE with local files plus our dict.txt, and
sentencepiece trained on the spot."""

import os
import subprocess
import sys
from argparse import Namespace

from conftest import REPO

GET_BPE = os.path.join(REPO, "examples", "get_gpt2_bpe.py")


def test_gpt2_bpe_and_dict(gpt2_files):
    from fairseq.data import Dictionary, encoders

    enc, vocab_bpe, dict_txt = gpt2_files
    bpe = encoders.build_bpe(Namespace(bpe="gpt2", gpt2_encoder_json=enc, gpt2_vocab_bpe=vocab_bpe))
    text = " The capital of France is"
    encoded = bpe.encode(text)
    assert encoded == "383 3139 286 4881 318"

    d = Dictionary.load(dict_txt)
    assert len(d) == 4 + 50256
    idx = d.encode_line(encoded, add_if_not_exist=False, append_eos=False)
    assert idx.tolist() == [387, 3143, 290, 4885, 322]  # GPT-2 id + 4
    assert [int(d[i]) for i in idx] == [383, 3139, 286, 4881, 318]
    assert d.unk() not in idx.tolist()
    assert bpe.decode(d.string(idx)) == text
    # <|endoftext|> (50256) is not a dict symbol: fairseq's </s> stands for it
    assert d.index("50256") == d.unk() and d.index("50255") == 50259


def test_gpt2_bpe_script_is_idempotent(gpt2_files):
    before = {p: os.stat(p).st_mtime_ns for p in gpt2_files}
    cache = os.path.dirname(gpt2_files[0])
    res = subprocess.run([sys.executable, GET_BPE, "--dest", cache], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == list(gpt2_files)
    assert {p: os.stat(p).st_mtime_ns for p in gpt2_files} == before


SPM_TEXT = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog met on a mat",
    "the mat was flat and the log was long",
] * 50


def test_sentencepiece_round_trip(tmp_path):
    import sentencepiece as spm
    from fairseq.data import Dictionary, encoders

    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(SPM_TEXT) + "\n")
    prefix = tmp_path / "spm"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=40, model_type="bpe",
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    bpe = encoders.build_bpe(
        Namespace(bpe="sentencepiece", sentencepiece_model=f"{prefix}.model",
                  sentencepiece_enable_sampling=False, sentencepiece_alpha=None)
    )
    text = "the cat met the dog on a flat log"
    encoded = bpe.encode(text)
    # deterministic for this corpus and settings (single thread)
    assert encoded.split() == [
        "\u2581the", "\u2581cat", "\u2581m", "e", "t", "\u2581the", "\u2581dog", "\u2581on",
        "\u2581a", "\u2581", "f", "l", "at", "\u2581log",
    ]
    assert bpe.decode(encoded) == text

    # through a fairseq dictionary built from the encoded training text, and back
    d = Dictionary()
    for line in SPM_TEXT:
        for piece in bpe.encode(line).split():
            d.add_symbol(piece)
    d.finalize()
    idx = d.encode_line(encoded, add_if_not_exist=False, append_eos=False)
    assert d.unk() not in idx.tolist()
    assert bpe.decode(d.string(idx)) == text
