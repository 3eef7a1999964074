"""Gate gradient of a LongMem checkpoint over consecutive training batches: per head mean, std and
signal-to-noise (|mean| / std) of d loss / d g_h (loss = mean token cross-entropy, nats)."""
import sys
import torch, torch.nn.functional as F
from fairseq import checkpoint_utils, utils
import argparse
from fairseq_longmem import user_dir
utils.import_user_module(argparse.Namespace(user_dir=user_dir.path()))
ck, n = sys.argv[1], int(sys.argv[2])
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
    [ck], arg_overrides={"data": "/tmp/lr_levers/bin", "batch_size": 4})
model = models[0]
model.train()
task.load_dataset("train")
ds = task.dataset("train")
gate = model.decoder.sidenet.memory_attention.gate
grads, other = [], []
for t in range(n + 140):  # the first 140 batches fill the 16k-token memory
    s = ds.collater([ds[t]])
    logits, _ = model(**s["net_input"])
    if t < 140:
        continue
    loss = F.cross_entropy(logits.flatten(0, 1), s["target"].flatten(), ignore_index=1)
    model.zero_grad()
    loss.backward()
    grads.append(gate.grad.clone())
    other.append(model.decoder.sidenet.h[1].attn.c_attn.weight.grad.abs().mean().item())
g = torch.stack(grads)  # (n, H)
print("gate logits:", [round(x, 4) for x in (gate * model.decoder.sidenet.memory_attention.gate_scale).tolist()])
print("per head mean grad:", [f"{x:.2e}" for x in g.mean(0).tolist()])
print("per head std grad: ", [f"{x:.2e}" for x in g.std(0).tolist()])
print("signal/noise |mean|/std:", [round(x, 3) for x in (g.mean(0).abs() / g.std(0)).tolist()])
print("share of batches with a positive gradient:", [round(x, 2) for x in (g > 0).float().mean(0).tolist()])
print(f"mean |grad| of the memory layer's c_attn weights: {sum(other)/len(other):.2e}")
