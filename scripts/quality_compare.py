#!/usr/bin/env python3
"""Equal-quality check for issue 4: the same BatchTopK recipe trained by crossdiff and by the dense
PyTorch implementation (scripts/bench_train_torch.py's step, plus the EMA threshold and the
geometric-median decoder bias) on the same planted data, compared by validation FVE.

    python3 scripts/quality_compare.py make --out /tmp/qc --d 256 --features 4096 --tokens 212992
    crossdiff --backend cpu train --cache /tmp/qc --out /tmp/qc-run --dict-size 4096 --k 32 \
        --batch 1024 --steps 200 --lr 1e-3 --warmup-steps 20 --threshold-start 100 \
        --val-tokens 8192 --val-every 200
    python3 scripts/quality_compare.py torch --cache /tmp/qc --dict-size 4096 --k 32 --batch 1024 \
        --steps 200 --lr 1e-3 --warmup-steps 20 --threshold-start 100 --val-tokens 8192

The cache is in crossdiff's format (f32 shards + cache.json): pairs built from `features` unit
directions (a tenth chat-only, a tenth base-only, the rest shared, ~32 active per token).
"""
import argparse
import json
import os

import torch
from safetensors.torch import load_file, save_file


def make(args):
    g = torch.Generator().manual_seed(0)
    d, F, n = args.d, args.features, args.tokens
    dirs = torch.randn(F, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    kind = torch.arange(F) % 10
    in_base, in_chat = (kind != 1).float(), (kind != 0).float()
    os.makedirs(args.out, exist_ok=True)
    shards, done, i = [], 0, 0
    while done < n:
        m = min(65536, n - done)
        active = (torch.rand(m, F, generator=g) < 32 / F).float() * (0.5 + torch.rand(m, F, generator=g))
        base = (active * in_base) @ dirs
        chat = (active * in_chat) @ dirs
        name = f"acts-{i:05d}.safetensors"
        save_file({"acts": torch.stack([base, chat], 1).contiguous()}, os.path.join(args.out, name))
        shards.append({"file": name, "tokens": m})
        done, i = done + m, i + 1
    json.dump({"format": "crossdiff-cache/1", "d_model": d, "layer": 0, "dtype": "f32", "models": ["planted-base", "planted-chat"],
               "total_tokens": n, "shards": shards, "sources": []}, open(os.path.join(args.out, "cache.json"), "w"))


def geometric_median(x, iters=100, tol=1e-5):
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        nxt = (w[:, None] * x).sum(0) / w.sum()
        if (nxt - y).norm() < tol:
            return nxt
        y = nxt
    return y


def train(args):
    meta = json.load(open(os.path.join(args.cache, "cache.json")))
    acts = torch.cat([load_file(os.path.join(args.cache, s["file"]))["acts"].float() for s in meta["shards"]])
    d, D, B, k = meta["d_model"], args.dict_size, args.batch, args.k
    x_all = acts.reshape(len(acts), 2 * d)
    train_x, val_x = x_all[: len(x_all) - args.val_tokens], x_all[len(x_all) - args.val_tokens:]
    torch.manual_seed(0)
    w = torch.empty(d, D)
    torch.nn.init.kaiming_uniform_(w)
    w = w / w.norm(dim=0, keepdim=True)
    w_enc = torch.cat([w, w], 0).requires_grad_()
    b_enc = torch.zeros(D, requires_grad=True)
    w_dec = torch.cat([w.t(), w.t()], 1).clone().requires_grad_()
    b_dec = torch.zeros(2 * d, requires_grad=True)
    params = [w_enc, b_enc, w_dec, b_dec]
    opt = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup_steps))
    per_epoch = len(train_x) // B
    theta = None
    for step in range(1, args.steps + 1):
        if (step - 1) % per_epoch == 0:
            perm = torch.randperm(len(train_x))  # a new order every epoch
        i = (step - 1) % per_epoch
        x = train_x[perm[i * B: (i + 1) * B]]
        if step == 1:
            with torch.no_grad():
                b_dec.copy_(torch.cat([geometric_median(x[:, :d]), geometric_median(x[:, d:])]))
        f = torch.relu(x @ w_enc + b_enc)
        scores = f * w_dec.reshape(D, 2, d).norm(dim=2).sum(1)
        flat = scores.detach().flatten()
        top = flat.topk(k * B)
        mask = torch.zeros_like(flat).index_fill_(0, top.indices, 1.0).reshape(B, D)
        err = x - ((f * mask) @ w_dec + b_dec)
        loss = err.reshape(B, 2, d).norm(dim=2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step > args.threshold_start:
            m = top.values[top.values > 0].min().item()
            theta = m if theta is None else 0.999 * theta + 0.001 * m
    with torch.no_grad():
        f = torch.relu(val_x @ w_enc + b_enc)
        scores = f * w_dec.reshape(D, 2, d).norm(dim=2).sum(1)
        codes = f * (scores > (theta if theta is not None else 0.0))
        err = val_x - (codes @ w_dec + b_dec)
        fve = [1 - err[:, m * d:(m + 1) * d].var(0).sum().item() / val_x[:, m * d:(m + 1) * d].var(0).sum().item() for m in range(2)]
    print(json.dumps({"impl": "pytorch", "steps": args.steps, "val_fve_base": fve[0], "val_fve_chat": fve[1], "threshold": theta}))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    m.add_argument("--d", type=int, default=256)
    m.add_argument("--features", type=int, default=4096)
    m.add_argument("--tokens", type=int, default=212992)
    t = sub.add_parser("torch")
    t.add_argument("--cache", required=True)
    for name, typ, default in [("--dict-size", int, 4096), ("--k", int, 32), ("--batch", int, 1024), ("--steps", int, 200),
                               ("--lr", float, 1e-3), ("--warmup-steps", int, 20), ("--threshold-start", int, 100),
                               ("--val-tokens", int, 8192)]:
        t.add_argument(name, type=typ, default=default)
    args = ap.parse_args()
    make(args) if args.cmd == "make" else train(args)


if __name__ == "__main__":
    main()
