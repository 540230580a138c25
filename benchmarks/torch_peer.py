"""The peer the throughput issue measures us against: a GPT of the reference shape in
plain PyTorch, written the way the well-known minimal PyTorch GPT trainers write it
(pre-LN LayerNorm without bias, GELU MLP 4x, no biases, tied embeddings, learned
absolute positions, `F.scaled_dot_product_attention(is_causal=True)`, AdamW with
fused/foreach off), timed the way `lm bench` times a step (median of N after warm-up).

PyTorch is not an lmlab dependency; run this from an environment that has it:

    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
    /tmp/torchenv/bin/python benchmarks/torch_peer.py            # prints tokens/s

`benchmarks/cpu_throughput.py --torch /tmp/torchenv/bin/python` interleaves it with
lm bench runs so that the ratio comes from one noisy machine in one run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d, bias=False)
        self.attn = SelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d, bias=False)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.out = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int, layers: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=259)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(args.vocab, args.seq, args.d_model, args.layers, args.heads)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=False,
                            foreach=False)
    data = torch.randint(0, args.vocab, (args.warmup + args.steps, args.batch, args.seq + 1))
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = model(data[i, :, :-1], data[i, :, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tps = args.batch * args.seq / step
    params = sum(q.numel() for q in model.parameters())
    if args.json:
        print(json.dumps({"tokens_per_s": tps, "step_time_s": step, "params": params,
                          "threads": torch.get_num_threads(), "torch": torch.__version__}))
    else:
        print(f"torch {torch.__version__} peer: {params:,} params | batch {args.batch} x seq "
              f"{args.seq} | {torch.get_num_threads()} threads | step {1e3 * step:.1f} ms "
              f"(median of {args.steps}) | {tps:,.0f} tokens/s")


if __name__ == "__main__":
    main()
