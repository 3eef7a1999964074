# Minor page faults of one no-gradient forward to the logits (T = 1,024), each call repeated 3 times after a
# warm-up of the same call (steady state), 2 threads, the training beside it paused; 2026-12-07, this
# commit's in-place MLP (--out-of-place: the MLP as before it). Run from the repository root: python docs/results/logs/benchmarks/llama_forward_inplace_xeon_2026-12-07/faults_steady_state.py CHECKPOINT
import sys, resource, torch
sys.path.insert(0, "examples/benchmarks")
from llama_forward import load_ours, hf_twin
torch.set_num_threads(2)
ours, _ = load_ours(sys.argv[1]); hf = hf_twin(ours)
if "--out-of-place" in sys.argv:  # the MLP as before the in-place change
    import torch.nn.functional as F
    from fairseq_longmem.families.llama.modules import LlamaMLP
    LlamaMLP.forward = lambda self, x: self.dropout(
        self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))
    print("MLP out of place")
def faults(fn, n=3):
    fn(); out = []
    for _ in range(n):
        a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a)
    return out
def last_only(tok):
    x = ours.embed(tok)
    for b in ours.blocks:
        x, _ = b(x)
    return ours.logits(x)
for B in (1, 4):
    tok = torch.randint(0, 49000, (B, 1024))
    with torch.no_grad():
        print(B, "ours (all hiddens kept)", faults(lambda: ours.logits(ours(tok)[0][-1])))
        print(B, "ours (last hidden only)", faults(lambda: last_only(tok)))
        print(B, "transformers", faults(lambda: hf(input_ids=tok, use_cache=False).logits))
