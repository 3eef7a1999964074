"""Our Llama forward against transformers' LlamaForCausalLM on the same weights (a converted
SmolLM2-135M, or any llama_lm checkpoint): tokens/s of a no-gradient forward to the logits, fp32,
timed alternately in one process (ratios, not absolute times: the machine is shared), and LongMem's
evaluation step with its memory off over the same backbone.

Run from the repository root (transformers installed, e.g. pip install -e '.[test]'):

    python examples/get_smollm2.py --out SMOLLM2
    python examples/benchmarks/llama_forward.py SMOLLM2/checkpoint.pt --threads 1,2 \\
        --lengths 512,1024,2048 --batches 1,4 [--repeats 3] [--log-dir DIR]

On a GPU machine without the weights, ``--random-smollm2`` (no checkpoint) builds SmolLM2-135M's
shape with seeded random weights; ``--device cuda --dtype bf16`` runs both models there
(``examples/benchmarks/gpu_device.sh``).

Both models get the same token ids (random, from the model's vocabulary) and the same thread
count; transformers runs with its default attention (SDPA) and ``use_cache=False``. Their logits
are compared once per shape (max |difference|), so that a fast but wrong forward cannot pass.
"""

import argparse
import os
import resource
import statistics
import sys
import time

import torch
from runlog import RunLog, cpu_model  # examples/benchmarks/runlog.py, beside this script


def load_ours(path):
    from fairseq_longmem.models.backbone import read_backbone_checkpoint

    if path is None:  # --random-smollm2
        from longmem_speed import SMOLLM2_VOCAB, random_smollm2  # beside this script

        return random_smollm2(SMOLLM2_VOCAB)
    backbone, cfg = read_backbone_checkpoint(path)
    if backbone.family != "llama":
        raise SystemExit(f"error: {path} is a {cfg.get('_name')!r} checkpoint; expected a llama_lm "
                         "(python -m fairseq_longmem.convert, examples/get_smollm2.py)")
    return backbone, cfg


def hf_twin(backbone):
    """transformers' LlamaForCausalLM with our backbone's weights (the same parameter names)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = backbone.dims
    config = LlamaConfig(
        vocab_size=d.vocab_size, hidden_size=d.embed_dim, intermediate_size=d.ffn_dim,
        num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads,
        num_key_value_heads=d.num_kv_heads, max_position_embeddings=d.max_positions,
        rms_norm_eps=d.rms_norm_eps, rope_theta=d.rope_theta, tie_word_embeddings=d.tie_embeddings,
        attention_bias=False, mlp_bias=False)
    model = LlamaForCausalLM(config)
    state = {("" if k.startswith("lm_head") else "model.") + k: v
             for k, v in backbone.state_dict().items()}
    if d.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise SystemExit(f"error: weights do not map onto transformers' Llama: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.eval()


def longmem_memory_off(backbone, T):
    """LongMem over the backbone with its memory off, the SideNet at the paper's default ratio
    (r = 2) and copied from the backbone: its evaluation step without reading."""
    from fairseq.data import Dictionary

    from fairseq_longmem.families.llama.model import LongMemLlamaConfig, LongMemLlamaModel

    d = backbone.dims
    dictionary = Dictionary()
    for i in range(d.vocab_size - len(dictionary)):
        dictionary.add_symbol(str(i))
    cfg = LongMemLlamaConfig(
        embed_dim=d.embed_dim, num_layers=d.num_layers, num_heads=d.num_heads,
        num_kv_heads=d.num_kv_heads, ffn_dim=d.ffn_dim, max_positions=d.max_positions,
        rope_theta=d.rope_theta, rms_norm_eps=d.rms_norm_eps, tie_embeddings=d.tie_embeddings,
        memory_layer=(d.num_layers * 3 // 4 + 1) // 2 * 2 - 1, disable_memory=True, dropout=0.0,
        max_target_positions=T)
    return LongMemLlamaModel.from_backbone(cfg, dictionary, backbone).eval()


def page_faults(fn) -> int:
    """Minor page faults of one call (this process): fresh memory the call touches, which on a
    CPU is much of the cost of elementwise ops on large new buffers."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def timed(fn, repeats: int, sync=lambda: None):
    out = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?",
                   help="a llama_lm checkpoint (e.g. SMOLLM2/checkpoint.pt)")
    p.add_argument("--random-smollm2", action="store_true",
                   help="instead of a checkpoint: SmolLM2-135M's shape, seeded random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="both models' weights and activations")
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--longmem", action="store_true",
                   help="also time LongMem's evaluation step with its memory off (r = 2)")
    p.add_argument("--log-dir")
    args = p.parse_args(argv)
    if (args.checkpoint is None) == (not args.random_smollm2):
        p.error("give a llama_lm checkpoint or --random-smollm2 (one of them)")
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ours, _ = load_ours(args.checkpoint)
    hf = hf_twin(ours).to(device, dtype)
    ours = ours.to(device, dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    log = RunLog(args.log_dir)
    what = ("SmolLM2-135M's shape, random weights" if args.checkpoint is None
            else os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint))))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    log.print(f"# Llama forward, ours vs transformers: {what} "
              f"({ours.dims.num_layers}x{ours.dims.embed_dim}, {ours.dims.num_heads}/"
              f"{ours.dims.num_kv_heads} heads), {args.dtype}, {where}")
    log.print()
    cols = ["threads", "B", "T", "ours tok/s", "transformers tok/s", "ours / transformers",
            "max |logit diff|", "page faults ours / transformers"]
    if args.longmem:
        cols += ["LongMem mem-off tok/s", "LongMem / ours"]
    log.print("| " + " | ".join(cols) + " |")
    log.print("|" + "---|" * len(cols))
    g = torch.Generator().manual_seed(0)
    for threads in [int(x) for x in args.threads.split(",")]:  # (CPU threads; on CUDA: the host's)
        torch.set_num_threads(threads)
        for B in [int(x) for x in args.batches.split(",")]:
            for T in [int(x) for x in args.lengths.split(",")]:
                tokens = torch.randint(0, ours.dims.vocab_size, (B, T), generator=g).to(device)
                with torch.no_grad():
                    ours_fn = lambda: ours.logits(ours(tokens)[0][-1])  # noqa: E731
                    hf_fn = lambda: hf(input_ids=tokens, use_cache=False).logits  # noqa: E731
                    # also the warm-up
                    diff = float((ours_fn().float() - hf_fn().float()).abs().max())
                    t_ours, t_hf, t_lm = [], [], []
                    lm = (longmem_memory_off(ours, T).to(device, dtype) if args.longmem
                          else None)
                    if lm is not None:
                        lm(tokens)  # its warm-up, as the diff above is the other two's
                    for _ in range(args.repeats):  # alternated, so that load hits both alike
                        t_ours += timed(ours_fn, 1, sync)
                        t_hf += timed(hf_fn, 1, sync)
                        if lm is not None:
                            t_lm += timed(lambda: lm(tokens), 1, sync)
                    faults = page_faults(ours_fn) / max(page_faults(hf_fn), 1)
                key = f"threads{threads}_B{B}_T{T}"
                log.times(key + "_ours", t_ours)
                log.times(key + "_transformers", t_hf)
                a, b = statistics.median(t_ours), statistics.median(t_hf)
                row = [threads, B, T, f"{B * T / a:.0f}", f"{B * T / b:.0f}", f"{b / a:.2f}",
                       f"{diff:.1e}", f"{faults:.2f}"]
                if lm is not None:
                    log.times(key + "_longmem_off", t_lm)
                    c = statistics.median(t_lm)
                    row += [f"{B * T / c:.0f}", f"{a / c:.2f}"]
                log.print("| " + " | ".join(map(str, row)) + " |")
    log.print()
    log.print(f"median of {args.repeats} alternated repeats per cell; tok/s = B*T / seconds; "
              "page faults: minor faults of one forward after the timed ones (getrusage), ours "
              "over transformers'")
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
