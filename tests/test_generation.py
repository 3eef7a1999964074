"""Text generation with long-term memory: incremental decoding against the full forward, the
segment and beam rules, and fairseq-generate / fairseq-interactive on ``--task longmem_lm``."""

import math
import os

import pytest
import torch

from conftest import TOKENS_PER_SAMPLE, USER_DIR, run_cli_cases
from fairseq_longmem.modules.decoding_state import SharedPromptMemory
from tiny_longmem import DICT, T, make_model, random_tokens, stream

SEGMENTS = 5  # 4 boundaries; the 64-token memory is full after 4 segments, so FIFO is crossed


def incremental_logits(model, tokens, state=None):
    """(B, n, V) logits of ``tokens`` fed one at a time through the incremental state."""
    dec = model.decoder
    if state is None:
        state = dec.start_decoding(tokens.size(0), dec.backbone.wte.weight, segment_len=T)
    return torch.cat([dec.advance(tokens[:, i:i + 1], state) for i in range(tokens.size(1))],
                     dim=1), state


def test_token_by_token_log_probs_equal_the_full_forward_across_segments():
    model = make_model()
    tokens = random_tokens(3, SEGMENTS * T, seed=5)
    full = stream(model, tokens).log_softmax(-1)
    step, _ = incremental_logits(model, tokens)
    assert (step.log_softmax(-1) - full).abs().max() < 1e-5
    # the memory was read: memory off gives other numbers
    off = stream(make_model(disable_memory=True), tokens).log_softmax(-1)
    assert (off[:, T:] - full[:, T:]).abs().max() > 1e-3


def test_prefill_memory_is_bit_identical_to_the_evaluation_memory():
    model = make_model()
    tokens = random_tokens(2, 3 * T + 5, seed=6)
    stream(model, tokens[:, :3 * T])  # eval: full segments write their memory
    evaluated = model.decoder.stream_memory("eval")
    dec = model.decoder
    state = dec.start_decoding(2, dec.backbone.wte.weight, segment_len=T)
    dec.prefill(tokens, state)
    assert state.pos == 5
    for name in ("_keys", "_values", "_summaries"):
        assert torch.equal(getattr(state.memory, name), getattr(evaluated, name)), name
    assert state.memory.fill().tolist() == evaluated.fill().tolist() == [48, 48]


def test_prefill_then_steps_equal_token_by_token():
    model = make_model()
    tokens = random_tokens(2, 4 * T + 3, seed=7)
    dec = model.decoder
    state = dec.start_decoding(2, dec.backbone.wte.weight, segment_len=T)
    last = dec.prefill(tokens[:, :2 * T + 7], state)
    rest, _ = incremental_logits(model, tokens[:, 2 * T + 7:], state)
    step, _ = incremental_logits(model, tokens)
    assert (last.log_softmax(-1) - step[:, 2 * T + 6].log_softmax(-1)).abs().max() < 1e-5
    assert (rest.log_softmax(-1) - step[:, 2 * T + 7:].log_softmax(-1)).abs().max() < 1e-5


def test_per_token_state_does_not_grow_with_the_generated_length():
    model = make_model()
    dec = model.decoder
    tokens = random_tokens(2, 8 * T, seed=8)
    state = dec.start_decoding(2, dec.backbone.wte.weight, segment_len=T)
    sizes = []
    for i in range(tokens.size(1)):
        dec.advance(tokens[:, i:i + 1], state)
        if i % T == 3:
            sizes.append([tuple(t.shape) for t in state.tensors()])
    assert len(sizes) == 8 and all(s == sizes[0] for s in sizes)
    assert state.memory.fill().tolist() == [64, 64]  # full: FIFO from here on


def hypotheses_run(model, prompts, beam, steps, share, seed):
    """Prefill ``prompts`` (R, n), expand to ``beam`` hypotheses each, then at every step
    reorder the hypotheses at random (within each prompt's group, as beam search does) and feed
    each a random token. Returns the per-step logits (R*beam, V), each final hypothesis's history
    and lineage (the row that held its ancestor at every step) and the state."""
    dec = model.decoder
    R = prompts.size(0)
    state = dec.start_decoding(R, dec.backbone.wte.weight, segment_len=T)
    dec.prefill(prompts, state)
    state.expand(beam, lambda rows: dec.new_memory(rows, dec.cfg.memory_size,
                                                   dec.backbone.wte.weight), share)
    g = torch.Generator().manual_seed(seed)
    histories = [prompts[n // beam].tolist() for n in range(R * beam)]
    outs, orders = [], []
    for _ in range(steps):
        within = torch.randint(0, beam, (R, beam), generator=g)
        order = (torch.arange(R)[:, None] * beam + within).view(-1)
        state.reorder(order)
        orders.append(order)
        histories = [list(histories[o]) for o in order.tolist()]
        tok = torch.randint(DICT.nspecial, len(DICT), (R * beam, 1), generator=g)
        outs.append(dec.advance(tok, state)[:, 0])
        for n in range(R * beam):
            histories[n].append(int(tok[n]))
    lineage = [torch.arange(R * beam)]
    for order in reversed(orders[1:]):
        lineage.insert(0, order[lineage[0]])
    return outs, histories, lineage, state


@pytest.mark.parametrize("share", [True, False])
def test_every_beam_reads_its_own_history_across_segment_boundaries(share):
    model = make_model(memory_size=256)  # prompt + generated fit: sharing is exact
    prompts = random_tokens(2, 2 * T + 9, seed=9)
    steps = 2 * T  # crosses two boundaries: each beam writes segments of its own
    outs, histories, lineage, state = hypotheses_run(model, prompts, 3, steps, share, seed=10)
    assert isinstance(state.memory, SharedPromptMemory) == share
    if share:
        assert state.memory.prompt.num_rows == 2 and state.memory.generated.num_rows == 6
        assert state.memory.generated.fill().tolist() == [32] * 6  # two generated segments
    for n, history in enumerate(histories):
        alone, _ = incremental_logits(model, torch.tensor([history]))
        got = torch.stack([o[rows[n]] for o, rows in zip(outs, lineage)])  # (steps, V)
        want = alone[0, -steps:]
        assert (got.log_softmax(-1) - want.log_softmax(-1)).abs().max() < 1e-5, n
    # beams do hold different histories, and so read different memories
    assert len({tuple(h) for h in histories[:3]}) == 3


# ---------------------------------------------------------------------------------------------
# fairseq-generate and fairseq-interactive


PROMPT = 20  # tokens; with the </s> before it 21 inputs, then MAX_LEN generated: 3 segments
MAX_LEN = 70


@pytest.fixture(scope="module")
def longmem_ckpt(longmem_run):
    return longmem_run.checkpoint


def generate_args(corpus, ckpt, *extra, batch_size=1, prompt=PROMPT):
    prompt = ["--prompt-tokens", prompt] if prompt else []
    return [corpus.data_dir, "--user-dir", USER_DIR, "--task", "longmem_lm", "--path", ckpt,
            "--tokens-per-sample", TOKENS_PER_SAMPLE, "--batch-size", batch_size, "--cpu",
            "--gen-subset", "valid", *prompt, "--max-len-b", MAX_LEN, "--num-workers", "0",
            *extra]


def lines_of(log, kind):
    """id -> text of the log's ``kind``- lines (S, H, D, P), first per id."""
    out = {}
    for line in log.splitlines():
        if line.startswith(kind + "-"):
            head, _, rest = line.partition("\t")
            out.setdefault(int(head[len(kind) + 1:]), rest)
    return out


def load_in_process(corpus, ckpt):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [ckpt], arg_overrides={"data": corpus.data_dir, "prompt_tokens": PROMPT,
                               "tokens_per_sample": TOKENS_PER_SAMPLE, "batch_size": 1})
    task.load_dataset("valid")
    return models[0].eval(), task


def full_forward_greedy(model, prompt, steps):
    """fairseq-generate's greedy search, by hand, over the full forward: every step scores the
    whole stream (</s>, prompt, generated so far) from an empty memory, segment by segment as
    eval-lm does, and takes the best token that neither is <s>/<pad> (never generated) nor
    repeats a trigram of the hypothesis (--no-repeat-ngram-size 3, without which this tiny
    model repeats </s>; the hypothesis starts with the generator's <s>)."""
    dec = model.decoder
    d = dec.dictionary
    seq, hyp = [d.eos()] + prompt.tolist(), [d.bos()]
    like = dec.backbone.wte.weight
    for _ in range(steps):
        memory = dec.new_memory(1, dec.cfg.memory_size, like)
        x = torch.tensor([seq])
        for s in range(0, len(seq), TOKENS_PER_SAMPLE):
            logits, _ = model(src_tokens=x[:, s:s + TOKENS_PER_SAMPLE], memory=memory)
        lp = logits[0, -1].log_softmax(-1)
        lp[[d.bos(), d.pad()]] = -math.inf
        banned = [hyp[i + 2] for i in range(len(hyp) - 2) if hyp[i:i + 2] == hyp[-2:]]
        if banned:
            lp[banned] = -math.inf
        tok = int(lp.argmax())
        seq.append(tok)
        hyp.append(tok)
    return hyp[1:]


def stream_log_probs(model, prompt, hypothesis):
    """log2-probabilities of ``hypothesis`` after ``prompt`` by the full forward."""
    dec = model.decoder
    d = dec.dictionary
    seq = torch.tensor([[d.eos()] + prompt.tolist() + hypothesis])
    memory = dec.new_memory(1, dec.cfg.memory_size, dec.backbone.wte.weight)
    out = []
    for s in range(0, seq.size(1) - 1, TOKENS_PER_SAMPLE):
        logits, _ = model(src_tokens=seq[:, s:s + TOKENS_PER_SAMPLE], memory=memory)
        out.append(logits[0].log_softmax(-1))
    lp = torch.cat(out)[-len(hypothesis) - 1:-1]  # the scores of the hypothesis's tokens
    return (lp.gather(1, torch.tensor(hypothesis)[:, None])[:, 0] / math.log(2)).tolist()


def tokens_of(task, text):
    d = task.target_dictionary
    return [d.eos() if w == d.line_end else d.index(w) for w in text.split()]


@pytest.fixture(scope="module")
def generated(runs):
    """fairseq-generate's logs: greedy with batch 1 and 4, a beam of 4, greedy --stop-at-eos."""
    logs = runs[0]
    for name in ("greedy1", "greedy4", "beam4", "stop"):
        assert not logs[name].failed, logs[name].log[-3000:]
    return {name: logs[name].log for name in ("greedy1", "greedy4", "beam4", "stop")}


def test_greedy_generation_is_the_same_with_batch_1_and_batch_4(generated, corpus):
    one, four = lines_of(generated["greedy1"], "H"), lines_of(generated["greedy4"], "H")
    assert sorted(one) == sorted(four) == list(range(len(corpus.docs["valid"])))
    for i in one:  # the same tokens; the scores up to the last bits of batched matmuls
        assert one[i].split("\t")[1] == four[i].split("\t")[1]
        assert abs(float(one[i].split("\t")[0]) - float(four[i].split("\t")[0])) < 1e-5
    # the hypotheses cross three segment boundaries and run past line ends
    assert all(len(h.split("\t")[1].split()) == MAX_LEN for h in one.values())
    assert sum(h.count("\u23ce") for h in one.values()) > 0


def test_greedy_tokens_equal_a_hand_rolled_greedy_loop_over_the_full_forward(
        generated, corpus, longmem_ckpt):
    model, task = load_in_process(corpus, longmem_ckpt)
    prompts = task.datasets["valid"].prompts
    hyps = lines_of(generated["greedy1"], "H")
    sources = lines_of(generated["greedy1"], "S")
    d = task.target_dictionary
    for i in range(3):
        assert sources[i] == d.string(prompts[i])
        want = full_forward_greedy(model, prompts[i], MAX_LEN)
        assert tokens_of(task, hyps[i].split("\t")[1]) == want, i


def test_every_beam_hypothesis_scores_as_the_full_forward_of_its_own_tokens(
        generated, corpus, longmem_ckpt):
    model, task = load_in_process(corpus, longmem_ckpt)
    prompts = task.datasets["valid"].prompts
    log = generated["beam4"].splitlines()
    checked = 0
    for i in range(2):
        hyps = [l.split("\t") for l in log if l.startswith(f"H-{i}\t")]
        scores = [l.split("\t")[1] for l in log if l.startswith(f"P-{i}\t")]
        assert len(hyps) == len(scores) == 4
        assert len({h[2] for h in hyps}) == 4  # four different continuations
        for (_, _, text), p in zip(hyps, scores):
            tokens = tokens_of(task, text)
            printed = [float(x) for x in p.split()]
            assert printed[-1] == 0.0 and len(printed) == MAX_LEN + 1  # + the end marker
            want = stream_log_probs(model, prompts[i], tokens)
            assert max(abs(a - b) for a, b in zip(printed[:-1], want)) < 2e-4
            checked += 1
    assert checked == 8


def test_stop_at_eos_ends_each_hypothesis_at_its_first_line_end(generated):
    stop = generated["stop"].splitlines()
    hyps = [l.split("\t") for l in stop if l.startswith("H-")]
    scores = [l.split("\t")[1].split() for l in stop if l.startswith("P-")]
    assert len(hyps) == len(scores) == 12
    for (_, _, text), p in zip(hyps, scores):
        words = text.split()
        assert "\u23ce" not in words  # the </s> that ended it is not printed, as in fairseq
        assert len(p) == len(words) + 1 and float(p[-1]) < 0  # the </s> was generated
    assert all(len(h[2].split()) < MAX_LEN for h in hyps)


A_WORDS = 2 * TOKENS_PER_SAMPLE - 1  # with the </s> before it, two whole segments
WORDS = "the cat sat on a mat and then it ran under the old tree".split()


def write_prompt_files(folder):
    """fairseq-interactive inputs in ``folder``: a.txt (two whole segments of words), b.txt (a
    short prompt) and ab.txt (a, then </s>, then b: b's prompt as if a's text preceded it)."""
    a = " ".join(WORDS[i % len(WORDS)] for i in range(A_WORDS))
    b = "the dog flew over a log"
    for name, text in (("a", a), ("b", b), ("ab", f"{a} </s> {b}")):
        (folder / f"{name}.txt").write_text(text + "\n")


@pytest.fixture(scope="module")
def runs(corpus, longmem_ckpt, tmp_path_factory):
    """fairseq-generate, and fairseq-interactive with memory files, through the CLIs' entry
    points in one interpreter: (name -> CaseLog, memory file, folder). Refusals that need no
    memory file are in tests/test_bad_input.py."""
    tmp = tmp_path_factory.mktemp("interactive")
    write_prompt_files(tmp)
    (tmp / "empty.safetensors").write_bytes(b"")
    memory = str(tmp / "a.safetensors")

    def interactive(prompt, *extra):
        return ("fairseq-interactive", [
            corpus.data_dir, "--user-dir", USER_DIR, "--task", "longmem_lm", "--path",
            longmem_ckpt, "--tokens-per-sample", TOKENS_PER_SAMPLE, "--batch-size", "1",
            "--cpu", "--beam", "1", "--max-len-b", "12", "--input", tmp / f"{prompt}.txt",
            *extra])

    def generate(*extra, **kwargs):
        return ("fairseq-generate", generate_args(corpus, longmem_ckpt, *extra, **kwargs))

    block = ["--no-repeat-ngram-size", "3"]
    greedy = [*block, "--beam", "1"]  # fairseq-generate's default is a beam of 5
    todo = {
        "greedy1": generate(*greedy),
        "greedy4": generate(*greedy, batch_size=4),
        "beam4": generate(*block, "--beam", "4", "--nbest", "4", batch_size=2),
        "stop": generate(*greedy, "--stop-at-eos", batch_size=4),
        "save": interactive("a", "--save-memory", memory),
        "save_again": interactive("a", "--save-memory", memory),
        "from_memory": interactive("b", "--memory-file", memory),
        "one_prompt": interactive("ab"),
        "empty_memory_file": interactive("b", "--memory-file", tmp / "empty.safetensors"),
        "other_model": interactive("b", "--memory-file", memory, "--model-overrides",
                                   "{'chunk_size': 2}"),
    }
    return run_cli_cases(todo, timeout=600), memory, tmp


def refused(case, *parts):
    assert case.failed, case.log[-2000:]
    line = case.last_line()
    for part in parts:
        assert part in line, line
    return line


def test_a_saved_memory_continues_as_if_its_text_preceded_the_prompt(runs):
    logs, memory, _ = runs
    assert not logs["save"].failed and os.path.isfile(memory)
    got, want = logs["from_memory"].log, logs["one_prompt"].log
    assert not logs["from_memory"].failed and not logs["one_prompt"].failed
    h_got, h_want = lines_of(got, "H")[0].split("\t"), lines_of(want, "H")[0].split("\t")
    assert h_got[1] == h_want[1] and len(h_got[1].split()) == 12
    p_got = [float(x) for x in lines_of(got, "P")[0].split()]
    p_want = [float(x) for x in lines_of(want, "P")[0].split()]
    assert max(abs(x - y) for x, y in zip(p_got, p_want)) < 2e-4
    from safetensors import safe_open

    with safe_open(memory, framework="pt") as f:  # 64 tokens in chunks of 4, 4 heads
        assert tuple(f.get_tensor("row0.keys").shape) == (4, 16, 4, 32)


def test_memory_files_are_never_overwritten(runs):
    logs, memory, _ = runs
    refused(logs["save_again"], f"--save-memory {memory} exists: memory files are never "
            "overwritten")


def test_empty_and_foreign_memory_files_are_refused_in_one_line(runs):
    logs, memory, tmp = runs
    empty = tmp / "empty.safetensors"
    refused(logs["empty_memory_file"], f"--memory-file {empty} is not a prompt memory",
            "unreadable file")
    refused(logs["other_model"], f"--memory-file {memory} was written by another model",
            "chunk_size (file 4, this model 2)")
