"""Training and evaluation tokens/s of LongMem with its memory on against the same model with the
memory off (``disable_memory``, same weights), timed alternately in one process; where it goes.

Run from the repository root:  python examples/benchmarks/longmem_speed.py --threads 2
Over a real backbone:          python examples/benchmarks/longmem_speed.py --threads 2 \
    --backbone SMOLLM2/checkpoint.pt --reduction-factor 5 --B 2 --T 256 --msz 16384 --K 32
"""

import argparse
import copy
import functools
import os
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from runlog import RunLog, cpu_model  # examples/benchmarks/runlog.py, beside this script

from fairseq.data import Dictionary
from fairseq.models import MODEL_DATACLASS_REGISTRY, MODEL_REGISTRY

from fairseq_longmem.families.gpt2.model import (
    DEFAULT_MEMORY_LAYER,
    LongMemGPT2Config,
    LongMemGPT2Model,
)
from fairseq_longmem.families.gpt2.modules import GPT2_SIZES, GPT2Backbone, GPT2Dims
from fairseq_longmem.families import FAMILIES
from fairseq_longmem.families.llama.modules import LlamaBackbone, LlamaDims
from fairseq_longmem.memory.bank import ChunkedMemoryBank
from fairseq_longmem.models.backbone import read_backbone_checkpoint
from fairseq_longmem.models.common import read_layers
from fairseq_longmem.modules.memory_attention import JointAttentionMixin
from fairseq_longmem.tasks.document_stream import DocumentStreamDataset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_dictionary(size: int) -> Dictionary:
    """A fairseq Dictionary of exactly ``size`` symbols (4 specials + placeholders)."""
    d = Dictionary()
    for i in range(size - len(d)):
        d.add_symbol(f"tok{i}")
    assert len(d) == size, (len(d), size)
    return d


# SmolLM2-135M's shape (the converted checkpoint's config), for --size smollm2: random weights
# of the real model's sizes, where the weights cannot be had (a GPU machine without a registry)
SMOLLM2_135M = dict(embed_dim=576, num_layers=30, num_heads=9, num_kv_heads=3, ffn_dim=1536,
                    max_positions=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_embeddings=True)
SMOLLM2_VOCAB = 49155  # its 49,152 ids + fairseq's 3 other specials (converted dict.txt)


def random_smollm2(vocab: int):
    """A Llama backbone of SmolLM2-135M's sizes with seeded random weights, and its config."""
    torch.manual_seed(0)
    return LlamaBackbone(LlamaDims(vocab_size=vocab, **SMOLLM2_135M)).eval(), \
        dict(SMOLLM2_135M, _name="llama_lm")


def build_models(args, dictionary):
    """The memory-on model and a memory-off copy with identical weights, over a random GPT-2 of
    ``--size`` or over the ``--backbone`` checkpoint (any family)."""
    T = args.T
    memory = dict(memory_size=args.msz, chunk_size=args.csz, retrieved_tokens=args.K,
                  search_backend=args.backend, max_target_positions=T)
    if args.backbone or args.size == "smollm2":
        backbone, model_cfg = (read_backbone_checkpoint(args.backbone) if args.backbone
                               else random_smollm2(len(dictionary)))
        family = FAMILIES[backbone.family]
        model_class = MODEL_REGISTRY[family.longmem_model]
        config_class = MODEL_DATACLASS_REGISTRY[family.longmem_model]
        sizes = {k: model_cfg[k] for k in model_class.SIZE_OPTIONS + model_class.COPIED_OPTIONS
                 if k in model_cfg}
        options = dict(sizes, **memory, reduction_factor=args.reduction_factor,
                       sidenet_copy=args.sidenet_copy, dropout=0.0,
                       sidenet_from=args.sidenet_from, read_layers=args.read_layers,
                       sidenet_residual=args.sidenet_residual, memory_read=args.memory_read,
                       search_every=args.search_every)
        probe = config_class(**options)
        layers = read_layers(probe, backbone.dims.num_layers)
        # the first of --read-layers stands for the memory layer, as in build_model
        probe.memory_layer = (layers[0] if layers else args.memory_layer
                              if args.memory_layer >= 0 else model_class.default_memory_layer(probe))
        options["memory_layer"] = probe.memory_layer
    else:
        dim, layers, heads = GPT2_SIZES[args.size]
        dims = GPT2Dims(vocab_size=len(dictionary), embed_dim=dim, num_layers=layers,
                        num_heads=heads, max_positions=max(1024, T), dropout=0.0,
                        attention_dropout=0.0)
        torch.manual_seed(0)
        backbone = GPT2Backbone(dims)
        model_class, config_class = LongMemGPT2Model, LongMemGPT2Config
        options = dict(embed_dim=dim, num_layers=layers, num_heads=heads,
                       max_positions=dims.max_positions,
                       memory_layer=DEFAULT_MEMORY_LAYER[args.size], **memory)
    on = model_class.from_backbone(config_class(**options), dictionary, backbone)
    off = model_class.from_backbone(config_class(**options, disable_memory=True),
                                    dictionary, copy.deepcopy(backbone))
    off.load_state_dict(on.state_dict())
    return on, off


def make_batches(args, dictionary, num_segments):
    """``num_segments`` consecutive batches of B streams, one synthetic document per stream (so no
    row starts a new document after batch 0), collated by the task's own dataset."""
    g = torch.Generator().manual_seed(1)
    lo, hi = dictionary.nspecial, len(dictionary)
    docs = [torch.randint(lo, hi, (num_segments * args.T,), generator=g, dtype=torch.int32)
            for _ in range(args.B)]
    ds = DocumentStreamDataset(docs, dictionary.pad(), dictionary.eos(), args.T, args.B, 0, 1)
    assert len(ds) == num_segments
    return [ds.collater([ds[t]]) for t in range(num_segments)]


class Runner:
    """One model, its optimizer, and one training step / one eval forward on a batch."""

    def __init__(self, model, args, device, pad):
        self.model = model.to(device)
        self.device, self.pad = device, pad
        params = [p for p in model.parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in params)
        # the paper's optimiser settings (decoupled weight decay, as fairseq's adam)
        self.opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.98), eps=1e-6,
                                     weight_decay=0.01)
        dtype = DTYPES[args.dtype]
        self.autocast = dtype != torch.float32
        self.amp_dtype = dtype
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def _inputs(self, batch):
        net = {k: v.to(self.device, non_blocking=True) for k, v in batch["net_input"].items()}
        return net, batch["target"].to(self.device, non_blocking=True)

    def _forward(self, net):
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.autocast):
            logits, _ = self.model(**net)
        return logits

    def train_step(self, batch):
        self.model.train()
        net, target = self._inputs(batch)
        self.opt.zero_grad(set_to_none=True)
        logits = self._forward(net)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), target.view(-1),
                               ignore_index=self.pad, reduction="sum")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()

    @torch.no_grad()
    def eval_forward(self, batch):
        self.model.eval()
        net, _ = self._inputs(batch)
        self._forward(net)

    @torch.no_grad()
    def fill(self, batch, train: bool):
        """A forward that only serves to fill the train (or eval) memory."""
        self.model.train(train)
        net, _ = self._inputs(batch)
        self._forward(net)


# ---------------------------------------------------------------- timing


class Timers:
    """Wall time of wrapped calls, summed per name (the wrapping is undone by ``restore``)."""

    def __init__(self, sync):
        self.sync, self.total, self._undo = sync, defaultdict(float), []

    def wrap(self, cls, method, name_of):
        original = getattr(cls, method)

        @functools.wraps(original)
        def timed(*a, **kw):
            self.sync()
            t0 = time.perf_counter()
            out = original(*a, **kw)
            self.sync()
            self.total[name_of(*a, **kw)] += time.perf_counter() - t0
            return out

        setattr(cls, method, timed)
        self._undo.append((cls, method, original))

    def restore(self):
        for cls, method, original in reversed(self._undo):
            setattr(cls, method, original)
        self._undo = []


def timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def alternate(step_on, step_off, batches, sync):
    """Per batch, one memory-on and one memory-off call, the order flipped every batch so that a
    slow spell of the shared machine hits both; returns the two lists of seconds."""
    t_on, t_off = [], []
    for i, batch in enumerate(batches):
        if i % 2 == 0:
            t_on.append(timed(lambda: step_on(batch), sync))
            t_off.append(timed(lambda: step_off(batch), sync))
        else:
            t_off.append(timed(lambda: step_off(batch), sync))
            t_on.append(timed(lambda: step_on(batch), sync))
    return t_on, t_off


def summarise(t_on, t_off, tokens):
    med_on, med_off = statistics.median(t_on), statistics.median(t_off)
    pair = statistics.median(a / b for a, b in zip(t_on, t_off))
    return dict(on=med_on, off=med_off, tps_on=tokens / med_on, tps_off=tokens / med_off,
                ratio=med_on / med_off, pair=pair,
                q_pair=(min(a / b for a, b in zip(t_on, t_off)),
                        max(a / b for a, b in zip(t_on, t_off))))


def breakdown(on, off, batches, sync, train: bool):
    """Per step (mean over ``batches``): bank.search, bank.add, and the memory block's attention
    forward with and without memory. Separate from the speed runs: the timers synchronise."""
    timers = Timers(sync)
    timers.wrap(ChunkedMemoryBank, "search", lambda *a, **k: "search")
    # a shared search's other layers (--search-every) gather by slot: counted as search
    timers.wrap(ChunkedMemoryBank, "gather", lambda *a, **k: "search")
    timers.wrap(ChunkedMemoryBank, "_expand", lambda *a, **k: "gather")  # part of search
    timers.wrap(ChunkedMemoryBank, "add", lambda *a, **k: "add")
    timers.wrap(JointAttentionMixin, "forward",
                lambda self, x, memory=None, **k: "attn_on" if memory is not None else "attn_off")
    step = (lambda r, b: r.train_step(b)) if train else (lambda r, b: r.eval_forward(b))
    try:
        t_on, t_off = alternate(lambda b: step(on, b), lambda b: step(off, b), batches, sync)
    finally:
        timers.restore()
    n = len(batches)
    out = {k: v / n for k, v in timers.total.items()}
    out["step_on"], out["step_off"] = sum(t_on) / n, sum(t_off) / n
    return out


def profile_top(runner, batches, train: bool, rows: int):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if runner.device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    step = runner.train_step if train else runner.eval_forward
    with profile(activities=acts) as prof:
        for b in batches:
            step(b)
    key = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", choices=sorted(GPT2_SIZES) + ["smollm2"],
                   help="backbone size (GPT-2 dims; tiny = 128-d, 4 layers, 4 heads; smollm2: a Llama "
                   "of SmolLM2-135M's sizes with random weights, where its weights are not at hand)")
    p.add_argument("--backbone", help="a plain LM checkpoint of any family (e.g. a converted "
                   "SmolLM2's checkpoint.pt) instead of a random GPT-2 of --size")
    p.add_argument("--reduction-factor", type=int, default=2, help="with --backbone: r")
    p.add_argument("--memory-layer", type=int, default=-1,
                   help="with --backbone: the memory layer (-1: the family's default)")
    p.add_argument("--sidenet-copy", default="last", choices=("last", "first"),
                   help="with --backbone: which backbone blocks the side blocks copy")
    p.add_argument("--sidenet-from", type=int, default=0,
                   help="with --backbone: the SideNet stands beside blocks S..L-1 (LongMem's option)")
    p.add_argument("--read-layers", default="",
                   help="with --backbone: several memory layers, e.g. 15-29 (LongMem's option)")
    p.add_argument("--sidenet-residual", default="cross", choices=("cross", "none"),
                   help="with --backbone: LongMem's --sidenet-residual")
    p.add_argument("--memory-read", default="gated", choices=("gated", "joint"),
                   help="with --backbone: LongMem's --memory-read")
    p.add_argument("--search-every", type=int, default=1,
                   help="with --backbone and --read-layers: LongMem's --search-every (memory "
                   "layers per search)")
    p.add_argument("--vocab", type=int, default=None,
                   help="dictionary size (default: 8000, a sentencepiece-sized vocabulary, for "
                   "tiny; 50260, a converted GPT-2 dict.txt, otherwise)")
    p.add_argument("--T", type=int, default=256, help="segment length (tokens per row and step)")
    p.add_argument("--B", type=int, default=8, help="batch rows (streams)")
    p.add_argument("--msz", type=int, default=16384, help="memory size in tokens per stream")
    p.add_argument("--K", type=int, default=64, help="retrieved tokens per query and head")
    p.add_argument("--csz", type=int, default=4, help="chunk size")
    p.add_argument("--backend", default="auto", choices=ChunkedMemoryBank.BACKENDS,
                   help="memory search backend")
    p.add_argument("--steps", type=int, default=12, help="timed steps per model and mode")
    p.add_argument("--warmup-steps", type=int, default=2,
                   help="untimed steps per model and mode after the memory is full")
    p.add_argument("--breakdown-steps", type=int, default=4,
                   help="steps per model and mode of the timer breakdown (0: skip)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print torch.profiler's top N ops of the memory-on and -off steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="bf16/fp16: autocast (fp32 weights; fp16 with a GradScaler)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--log-dir", help="also write the tables, every step time and the machine's "
                   "description there (docs/results/logs/benchmarks/RUN)")
    args = p.parse_args()
    log = RunLog(args.log_dir)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        sync = functools.partial(torch.cuda.synchronize, device)
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        sync = lambda: None  # noqa: E731
    if args.backbone:
        # the dictionary must have the backbone's rows: read them off the checkpoint
        args.vocab = read_backbone_checkpoint(args.backbone)[0].dims.vocab_size
    elif args.vocab is None:
        args.vocab = {"tiny": 8000, "smollm2": SMOLLM2_VOCAB}.get(args.size, 50260)
    if args.msz % args.T:
        p.error(f"--msz ({args.msz}) must be a multiple of --T ({args.T})")
    fill_segments = args.msz // args.T
    dictionary = make_dictionary(args.vocab)
    on_model, off_model = build_models(args, dictionary)
    on = Runner(on_model, args, device, dictionary.pad())
    off = Runner(off_model, args, device, dictionary.pad())
    n_after = args.warmup_steps + args.steps + args.breakdown_steps + (1 if args.profile else 0)
    batches = make_batches(args, dictionary, fill_segments + n_after)
    fill_b, rest = batches[:fill_segments], batches[fill_segments:]
    warm_b = rest[:args.warmup_steps]
    timed_b = rest[args.warmup_steps:args.warmup_steps + args.steps]
    brk_b = rest[args.warmup_steps + args.steps:][:args.breakdown_steps]
    prof_b = rest[-1:]
    tokens = int(timed_b[0]["ntokens"])
    dims = on.model.decoder.backbone.dims
    what = ((os.path.basename(os.path.dirname(os.path.abspath(args.backbone))) if args.backbone
             else "SmolLM2-135M's shape, random weights") + " "
            f"({on.model.decoder.backbone.family}, {dims.num_kv_heads} key-value heads, "
            f"r={args.reduction_factor}, {len(on.model.decoder.sidenet.h)} side layers)"
            if args.backbone or args.size == "smollm2" else args.size)

    log.print(f"# {cpu_model()} ({os.cpu_count()} logical CPUs), "
          f"torch {torch.__version__}, torch threads = {torch.get_num_threads()}, device={device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", dtype={args.dtype}")
    log.print(f"# {what}: d={dims.embed_dim}, {dims.num_layers} layers, {dims.num_heads} heads, "
          f"memory layer {on.model.decoder.memory_label}, vocab {len(dictionary)}; "
          f"B={args.B} T={args.T} "
          f"msz={args.msz} K={args.K} csz={args.csz} backend={args.backend}; trainable params "
          f"on={on.num_trainable:,} off={off.num_trainable:,}")

    results = {}
    for mode, train in (("train", True), ("eval", False)):
        # fill this mode's memory: msz/T segments per row, so that every timed step evicts (FIFO)
        t0 = time.perf_counter()
        for b in fill_b:
            on.fill(b, train)  # the memory-off model has no memory to fill
        bank = on.model.decoder.stream_memory(mode)
        fill = bank.fill()
        assert int(fill.min()) == args.msz, fill
        log.print(f"# {mode}: memory filled with {fill_segments} segments per row "
              f"({int(fill.min())}/{args.msz} tokens, {time.perf_counter() - t0:.0f} s); every "
              "timed step adds T tokens and evicts T")
        step = (lambda r, b: r.train_step(b)) if train else (lambda r, b: r.eval_forward(b))
        alternate(lambda b: step(on, b), lambda b: step(off, b), warm_b, sync)
        t_on, t_off = alternate(lambda b: step(on, b), lambda b: step(off, b), timed_b, sync)
        log.times(f"{mode} step memory on", t_on)
        log.times(f"{mode} step memory off", t_off)
        results[mode] = summarise(t_on, t_off, tokens)
        if brk_b:
            results[mode]["brk"] = breakdown(on, off, brk_b, sync, train)
        if args.profile:
            for name, r in (("memory on", on), ("memory off", off)):
                log.print(f"\n## torch.profiler, {mode} step, {name} (1 step)\n")
                log.print(profile_top(r, prof_b, train, args.profile))
        assert int(bank.fill().min()) == args.msz

    log.print(f"\nTokens/s = B*T / median step time over {args.steps} alternating steps; overhead = "
          "median(on)/median(off) - 1; 'paired' = median of per-step on/off ratios - 1 "
          "[min, max].\n")
    cols = ["mode", "memory on tok/s", "memory off tok/s", "on ms/step", "off ms/step",
            "overhead", "paired overhead [min, max]"]
    log.print("| " + " | ".join(cols) + " |")
    log.print("|" + "---|" * len(cols))
    for mode, r in results.items():
        lo, hi = r["q_pair"]
        log.print(f"| {mode} | {r['tps_on']:,.0f} | {r['tps_off']:,.0f} | {1e3 * r['on']:.0f} | "
              f"{1e3 * r['off']:.0f} | {100 * (r['ratio'] - 1):+.1f}% | "
              f"{100 * (r['pair'] - 1):+.1f}% [{100 * (lo - 1):+.0f}%, {100 * (hi - 1):+.0f}%] |")

    if brk_b:
        log.print(f"\nWhere the memory-on overhead goes (ms per step, mean of {len(brk_b)} alternating "
              "steps with synchronising timers; forward only, except 'backward + rest' = the "
              "remainder of the step difference):\n")
        cols = ["mode", "step on", "step off", "difference", "bank.search",
                "of which scores + top-k", "of which K/V gather", "bank.add",
                "memory attention math (fwd)", "backward + rest"]
        log.print("| " + " | ".join(cols) + " |")
        log.print("|" + "---|" * len(cols))
        for mode, r in results.items():
            b = r["brk"]
            diff = b["step_on"] - b["step_off"]
            attn_math = b.get("attn_on", 0) - b.get("search", 0) - b.get("attn_off", 0)
            rest = diff - b.get("search", 0) - b.get("add", 0) - attn_math

            def ms(x):
                return f"{1e3 * x:.0f}" + (f" ({100 * x / diff:.0f}%)" if diff > 0 else "")

            log.print(f"| {mode} | {1e3 * b['step_on']:.0f} | {1e3 * b['step_off']:.0f} | "
                  f"{1e3 * diff:.0f} | {ms(b.get('search', 0))} | "
                  f"{ms(b.get('search', 0) - b.get('gather', 0))} | {ms(b.get('gather', 0))} | "
                  f"{ms(b.get('add', 0))} | "
                  f"{ms(attn_math)} | {ms(rest)} |")
    log.close()


if __name__ == "__main__":
    main()
