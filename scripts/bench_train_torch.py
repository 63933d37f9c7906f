#!/usr/bin/env python3
"""A faithful dense PyTorch implementation of the crosscoder recipe (method.md §2), written from the
spec, to time beside `crossdiff bench train` at the same sizes on the same machine.

    python3 scripts/bench_train_torch.py --d 256 --dict-size 8192 --k 32 --batch 1024 --steps 5
    python3 scripts/bench_train_torch.py --device cuda      # the paper's size on a GPU (f32, as crossdiff)

On CUDA the step is timed with synchronisation and the JSON adds peak_device_bytes
(torch.cuda.max_memory_allocated).
"""
import argparse
import json
import resource
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=2304)
    ap.add_argument("--dict-size", type=int, default=73728)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--kind", default="batchtopk", choices=["batchtopk", "l1"])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args()
    d, D, B, k = args.d, args.dict_size, args.batch, args.k
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    w = torch.empty(d, D, device=dev)
    torch.nn.init.kaiming_uniform_(w)
    w = w / w.norm(dim=0, keepdim=True) * (1.0 if args.kind == "batchtopk" else 0.005)
    w_enc = torch.cat([w, w], 0).requires_grad_()          # [2d, D]
    b_enc = torch.zeros(D, device=dev, requires_grad=True)
    w_dec = torch.cat([w.t(), w.t()], 1).clone().requires_grad_()  # [D, 2d]
    b_dec = torch.zeros(2 * d, device=dev, requires_grad=True)
    params = [w_enc, b_enc, w_dec, b_dec]
    opt = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999))
    since = torch.zeros(D, device=dev)

    def step(x):
        nonlocal since
        f = torch.relu(x @ w_enc + b_enc)
        norms = w_dec.reshape(D, 2, d).norm(dim=2).sum(1)
        if args.kind == "batchtopk":
            scores = f * norms
            flat = scores.detach().flatten()
            idx = flat.topk(k * B).indices
            mask = torch.zeros_like(flat).index_fill_(0, idx, 1.0).reshape(B, D)
            codes = f * mask
        else:
            codes = f
        err = x - (codes @ w_dec + b_dec)
        loss = err.reshape(B, 2, d).norm(dim=2).mean()
        if args.kind == "l1":
            loss = loss + 0.041 * (f * norms).sum(1).mean()
        else:
            selected = mask.sum(0) > 0
            since = torch.where(selected, torch.zeros_like(since), since + B)
            dead = since >= 10_000_000
            if dead.any():
                k_aux = min(d // 2, int(dead.sum()))
                aux_scores = torch.where(dead[None], scores.detach(), torch.full_like(scores, -1.0))
                top = aux_scores.topk(k_aux, dim=1)
                aux_mask = torch.zeros_like(scores).scatter(1, top.indices, 1.0) * (aux_scores > 0)
                e = err.detach()
                e_hat = (f * aux_mask) @ w_dec
                loss = loss + (1 / 32) * (e - e_hat).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        if args.kind == "batchtopk":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step(torch.randn(B, 2 * d, device=dev))
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        step(torch.rand(B, 2 * d, device=dev) * 2 - 1)
    if cuda:
        torch.cuda.synchronize()
    secs = (time.perf_counter() - t) / args.steps
    out = {"impl": "pytorch " + torch.__version__, "threads": torch.get_num_threads(), "kind": args.kind,
           "d": d, "D": D, "k": k, "batch": B, "seconds_per_step": secs, "tokens_per_s": B / secs,
           "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if cuda:
        out.update(device=args.device, device_name=torch.cuda.get_device_name(dev),
                   peak_device_bytes=int(torch.cuda.max_memory_allocated(dev)),
                   allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
