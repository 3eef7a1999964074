"""A tiny in-process LongMem model and its inputs, shared by the model and generation tests
(test files do not import each other)."""

import torch
from fairseq.data import Dictionary

from fairseq_longmem.families.gpt2.model import LongMemGPT2Config, LongMemGPT2Model
from fairseq_longmem.families.gpt2.modules import GPT2Backbone, GPT2Dims
from fairseq_longmem.families.llama.model import LongMemLlamaConfig, LongMemLlamaModel
from fairseq_longmem.families.llama.modules import LlamaBackbone, LlamaDims

D, LAYERS, HEADS, T = 64, 4, 4, 16
KV_HEADS, FFN = 2, 96  # the tiny Llama: grouped-query attention, 2 query heads per key-value head


def make_dictionary(n=40):
    d = Dictionary()
    for i in range(n):
        d.add_symbol(f"w{i}")
    return d


DICT = make_dictionary()


def make_backbone(seed=0, family="gpt2"):
    torch.manual_seed(seed)
    if family == "llama":
        dims = LlamaDims(vocab_size=len(DICT), embed_dim=D, num_layers=LAYERS, num_heads=HEADS,
                         num_kv_heads=KV_HEADS, ffn_dim=FFN, max_positions=64, rope_theta=500.0)
        backbone = LlamaBackbone(dims)
        with torch.no_grad():  # norms away from 1, so that a wrong norm shows
            for name, p in backbone.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(0.1 * torch.randn_like(p))
        return backbone
    dims = GPT2Dims(vocab_size=len(DICT), embed_dim=D, num_layers=LAYERS, num_heads=HEADS,
                    max_positions=64, dropout=0.0, attention_dropout=0.0)
    return GPT2Backbone(dims)


def make_model(seed=0, family="gpt2", **overrides):
    options = dict(embed_dim=D, num_layers=LAYERS, num_heads=HEADS, max_positions=64,
                   memory_layer=3, memory_size=64, chunk_size=4, retrieved_tokens=8,
                   search_backend="torch", dropout=0.0, max_target_positions=T)
    if family == "llama":
        options.update(num_kv_heads=KV_HEADS, ffn_dim=FFN, rope_theta=500.0)
        config, model_class = LongMemLlamaConfig, LongMemLlamaModel
    else:
        config, model_class = LongMemGPT2Config, LongMemGPT2Model
    options.update(overrides)
    model = model_class.from_backbone(config(**options), DICT, make_backbone(seed, family))
    # a gate of 0 already mixes memory in; perturb the SideNet so it differs from the backbone
    with torch.no_grad():
        torch.manual_seed(seed + 1)
        for p in model.decoder.sidenet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def random_tokens(B, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(DICT.nspecial, len(DICT), (B, n), generator=g)


def stream(model, tokens, new_document_at=()):
    """Feed (B, n*T) tokens as n consecutive segments; row b starts a new document at segment
    s if (b, s) is in new_document_at (segment 0 always does). Returns (B, n*T, V) logits."""
    B, total = tokens.shape
    out = []
    with torch.no_grad():
        for s in range(total // T):
            flags = torch.tensor([s == 0 or (b, s) in new_document_at for b in range(B)])
            logits, _ = model(src_tokens=tokens[:, s * T:(s + 1) * T], new_document=flags)
            out.append(logits)
    return torch.cat(out, dim=1)
