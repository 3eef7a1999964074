"""Milliseconds per generated token against the number of tokens already generated: LongMem's
incremental decoding (a segment of T tokens in the local caches, the past in a memory of msz
tokens) against the plain backbone decoding with a key/value cache over its whole context, up to
its maximum positions, where stock decoding has to stop. Both in the same run, same weights.

    python examples/benchmarks/generation_speed.py --tokens 16384 --log-dir DIR

prints a table (median ms per token per range of tokens already generated, and the ratio to the
first segment); with --log-dir it also writes ``table.md``, ``raw.json`` (every token's time),
``machine.json`` and ``command.txt`` there (``runlog.py``, like the other benchmarks).
The weights are random (the cost does not depend on them); the defaults are a tiny model.
``--backbone CK`` decodes LongMem over a plain LM checkpoint of any family instead (e.g. a
converted SmolLM2, with ``--reduction-factor`` and ``--memory-layer``; its SideNet copies the
backbone's blocks), the backbone alone up to its own maximum positions. With a Llama-family
``--backbone``, ``--transformers`` adds transformers' own ``generate`` (greedy, its default
key/value cache, SDPA) on the same weights, up to the model's maximum positions: the baseline a user
of that model already has. ``--no-backbone`` leaves out our backbone's full-context decoding.
"""

import argparse
import statistics
import time

import torch
from fairseq.data import Dictionary

from fairseq_longmem.families.gpt2.model import LongMemGPT2Config, LongMemGPT2Model
from fairseq_longmem.families.gpt2.modules import GPT2Backbone, GPT2Dims
from runlog import RunLog  # examples/benchmarks/runlog.py, beside this script


def build(args):
    d = Dictionary()
    for i in range(args.vocab - d.nspecial):
        d.add_symbol(f"w{i}")
    torch.manual_seed(0)
    dims = GPT2Dims(vocab_size=len(d), embed_dim=args.dim, num_layers=args.layers,
                    num_heads=args.heads, max_positions=args.max_positions, dropout=0.0,
                    attention_dropout=0.0)
    cfg = LongMemGPT2Config(embed_dim=args.dim, num_layers=args.layers, num_heads=args.heads,
                            max_positions=args.max_positions, memory_layer=args.layers - 1,
                            memory_size=args.memory_size, chunk_size=args.chunk_size,
                            retrieved_tokens=args.retrieved_tokens, dropout=0.0,
                            max_target_positions=args.segment, search_backend=args.backend)
    return LongMemGPT2Model.from_backbone(cfg, d, GPT2Backbone(dims)).eval(), d


def build_from_checkpoint(args):
    """LongMem over ``--backbone`` (any family) or over SmolLM2's shape with random weights
    (``--random-smollm2``), through longmem_speed.py's builder."""
    import argparse as _argparse

    from fairseq_longmem.models.backbone import read_backbone_checkpoint
    from longmem_speed import SMOLLM2_VOCAB, build_models, make_dictionary  # beside this script

    d = make_dictionary(read_backbone_checkpoint(args.backbone)[0].dims.vocab_size
                        if args.backbone else SMOLLM2_VOCAB)
    spec = _argparse.Namespace(
        backbone=args.backbone, size="smollm2" if args.random_smollm2 else None, T=args.segment,
        msz=args.memory_size, csz=args.chunk_size, K=args.retrieved_tokens, backend=args.backend,
        reduction_factor=args.reduction_factor, sidenet_copy="first",
        memory_layer=args.memory_layer)
    model, _ = build_models(spec, d)
    return model.eval(), d


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_longmem(model, tokens, device):
    dec = model.decoder
    template = next(dec.backbone.parameters())
    state = dec.start_decoding(1, template, segment_len=dec.cfg.max_target_positions)
    out = []
    for i in range(tokens.size(1)):
        sync(device)
        start = time.perf_counter()
        logits = dec.advance(tokens[:, i:i + 1], state)
        int(logits[0, -1].argmax())  # what a generator reads: forces the step to finish
        out.append((time.perf_counter() - start) * 1e3)
    return out, state


@torch.no_grad()
def time_backbone(model, tokens, device):
    """Stock incremental decoding of the backbone alone: one cache over the whole context."""
    backbone = model.decoder.backbone
    P = backbone.dims.max_positions
    caches = backbone.new_caches(1, P, next(backbone.parameters()))
    out = []
    for i in range(min(P, tokens.size(1))):
        sync(device)
        start = time.perf_counter()
        hiddens, _ = backbone(tokens[:, i:i + 1], caches=caches)
        int(backbone.logits(hiddens[-1])[0, -1].argmax())
        out.append((time.perf_counter() - start) * 1e3)
    return out


@torch.no_grad()
def time_transformers(model, tokens, device):
    """transformers' ``generate`` on the same weights (``llama_forward.hf_twin``), greedy, one token
    per step with its default cache, as many new tokens as the model's positions allow after a
    one-token prompt; a logits processor stamps the clock once per step, so step i's time is
    everything between two stamps (the forward, the cache update and the generation loop)."""
    from llama_forward import hf_twin  # beside this script
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    backbone = model.decoder.backbone
    hf = hf_twin(backbone).to(device)
    n = min(tokens.size(1), backbone.dims.max_positions - 1)
    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            sync(device)
            stamps.append(time.perf_counter())
            return scores

    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0, use_cache=True)
    sync(device)
    start = time.perf_counter()
    out = hf.generate(tokens[:, :1], generation_config=config,
                      logits_processor=LogitsProcessorList([Stamp()]))
    if out.size(1) != n + 1 or len(stamps) != n:
        raise SystemExit(f"error: transformers generated {out.size(1) - 1} tokens in "
                         f"{len(stamps)} steps; expected {n}")
    times = [(b - a) * 1e3 for a, b in zip([start] + stamps[:-1], stamps)]
    return times


def ranges(n, segment):
    """Ranges of tokens already generated: the first segment, then doubling up to n."""
    bounds, b = [0, segment], segment
    while b < n:
        b = min(2 * b, n)
        bounds.append(b)
    return list(zip(bounds[:-1], bounds[1:]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--max-positions", type=int, default=1024)
    p.add_argument("--segment", type=int, default=256, help="T, --tokens-per-sample")
    p.add_argument("--memory-size", type=int, default=8192)
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--retrieved-tokens", type=int, default=64)
    p.add_argument("--backend", default="torch")
    p.add_argument("--backbone", help="a plain LM checkpoint (any family) instead of a random "
                   "tiny GPT-2; --dim/--layers/--heads/--vocab/--max-positions then come from it")
    p.add_argument("--random-smollm2", action="store_true",
                   help="instead of --backbone: SmolLM2-135M's shape with seeded random weights "
                   "(a GPU machine without the checkpoint)")
    p.add_argument("--reduction-factor", type=int, default=2, help="with --backbone: r")
    p.add_argument("--memory-layer", type=int, default=-1,
                   help="with --backbone: the memory layer (-1: the family's default)")
    p.add_argument("--transformers", action="store_true",
                   help="with a Llama-family --backbone: also time transformers' generate")
    p.add_argument("--no-backbone", action="store_true",
                   help="leave out our backbone's own full-context decoding")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--log-dir", default=None,
                   help="also write table.md, raw.json, machine.json and command.txt here")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    log = RunLog(args.log_dir)
    device = torch.device(args.device)
    if args.backbone and args.random_smollm2:
        p.error("--backbone and --random-smollm2 exclude each other")
    model, d = build_from_checkpoint(args) if args.backbone or args.random_smollm2 else build(args)
    model.to(device)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(d.nspecial, len(d), (1, args.tokens), generator=g).to(device)
    if args.transformers and model.decoder.backbone.family != "llama":
        p.error("--transformers needs a Llama-family --backbone")
    longmem, state = time_longmem(model, tokens, device)
    baselines = {}
    if not args.no_backbone:
        baselines["backbone (full context)"] = time_backbone(model, tokens, device)
    if args.transformers:
        baselines["transformers generate"] = time_transformers(model, tokens, device)

    first = statistics.median(longmem[:args.segment])
    rows = ["| tokens already generated | LongMem ms/token | ratio to first segment |"
            + (" " if baselines else "")
            + " | ".join(f"{name} ms/token | LongMem / {name.split(' (')[0]}"
                         for name in baselines) + (" |" if baselines else ""),
            "|---|---|---|" + "---|---|" * len(baselines)]
    for a, b in ranges(args.tokens, args.segment):
        lm = statistics.median(longmem[a:b])
        row = f"| {a}-{b} | {lm:.2f} | {lm / first:.2f} |"
        for times in baselines.values():
            if a < len(times):
                bb = statistics.median(times[a:b])
                row += f" {bb:.2f} | {lm / bb:.2f} |"
            else:
                row += f" stops at {len(times)} tokens | - |"
        rows.append(row)
    state_bytes = sum(t.numel() * t.element_size() for t in state.tensors())
    dims = model.decoder.backbone.dims
    head = (f"LongMem over {dims.num_layers} layers x {dims.embed_dim} ({dims.num_heads} heads"
            f"{', ' + args.backbone if args.backbone else ''}"
            f"{', random weights' if args.random_smollm2 else ''}, "
            f"{len(model.decoder.sidenet.h)} side layers), T={args.segment}, "
            f"msz={args.memory_size}, csz={args.chunk_size}, K={args.retrieved_tokens}, "
            f"{args.backend} search, {device}; {args.tokens} tokens generated one at a time; "
            f"decoding state {state_bytes / 2**20:.1f} MiB (fixed: caches + memory), "
            f"{torch.get_num_threads()} thread(s)")
    for line in [head, ""] + rows:
        log.print(line)
    log.times("longmem_token_s", [ms / 1e3 for ms in longmem])
    for name, times in baselines.items():
        key = "backbone" if name.startswith("backbone") else "transformers"
        log.times(f"{key}_token_s", [ms / 1e3 for ms in times])
    log.close()


if __name__ == "__main__":
    main()
