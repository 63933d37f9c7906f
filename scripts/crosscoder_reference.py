#!/usr/bin/env python3
"""Independent PyTorch computation of the crosscoder loss terms and gradients (method.md §2),
written from the spec, for crossdiff's tests.

    python3 scripts/crosscoder_reference.py     # writes assets/crosscoder-reference/*.safetensors

Tiny case: d = 4 per model, D = 8 latents, B = 6 pairs, k = 2. Parameters are stored in our internal
layout (W_enc [2d, D], b_enc [1, D], W_dec [D, 2d], b_dec [1, 2d]) and also in the authors' layout
(encoder.weight (2, d, D), decoder.weight (2, D, d), ...) as `authors.safetensors`, which the loader
must read.
"""
import os

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "crosscoder-reference")
d, D, B, k = 4, 8, 6, 2
MU, ALPHA, DEAD_TOKENS = 0.041, 1.0 / 32.0, 100


def params(gen):
    w_enc = torch.randn(2 * d, D, generator=gen, dtype=torch.float64) * 0.6
    b_enc = torch.randn(1, D, generator=gen, dtype=torch.float64) * 0.1
    w_dec = torch.randn(D, 2 * d, generator=gen, dtype=torch.float64) * 0.5
    b_dec = torch.randn(1, 2 * d, generator=gen, dtype=torch.float64) * 0.1
    return [t.requires_grad_() for t in (w_enc, b_enc, w_dec, b_dec)]


def norm_sum(w_dec):
    w = w_dec.reshape(D, 2, d)
    return w.norm(dim=2).sum(dim=1)  # ‖d_j^0‖ + ‖d_j^1‖


def recon(err, squared):
    per = err.reshape(-1, 2, d).pow(2).sum(-1)  # [B, 2]
    return 0.5 * per.sum(-1).mean() if squared else per.sqrt().mean()


def l1_case(x, p, squared):
    w_enc, b_enc, w_dec, b_dec = p
    f = torch.relu(x @ w_enc + b_enc)
    err = x - (f @ w_dec + b_dec)
    r = recon(err, squared)
    sparsity = (f * norm_sum(w_dec)).sum(-1).mean()
    return r + MU * sparsity, {"recon": r, "sparsity": sparsity}


def topk_case(x, p, before):
    w_enc, b_enc, w_dec, b_dec = p
    f = torch.relu(x @ w_enc + b_enc)
    scores = f * norm_sum(w_dec)
    flat = scores.detach().flatten()
    idx = flat.topk(k * B).indices
    mask = torch.zeros_like(flat)
    mask[idx] = 1.0
    mask = mask.reshape(B, D) * (scores.detach() > 0)
    codes = f * mask
    err = x - (codes @ w_dec + b_dec)
    r = recon(err, False)
    selected = mask.sum(0) > 0
    after = torch.where(selected, torch.zeros_like(before), before + B)
    dead = after >= DEAD_TOKENS
    n_dead = int(dead.sum())
    k_aux = min(d // 2, n_dead)
    aux_scores = torch.where(dead[None, :], scores.detach(), torch.full_like(scores, -1.0))
    top = aux_scores.topk(k_aux, dim=1)
    aux_mask = torch.zeros_like(scores).scatter(1, top.indices, 1.0)
    aux_mask = aux_mask * (aux_scores > 0)
    e_hat = (f * aux_mask) @ w_dec
    e = err.detach()
    aux = (e - e_hat).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()
    kept = flat[idx]
    return r + ALPHA * aux, {"recon": r, "aux": aux, "mask": mask, "after": after, "min_kept": kept[kept > 0].min()}


def main():
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(B, 2 * d, generator=gen, dtype=torch.float64)
    base = params(gen)
    names = ["w_enc", "b_enc", "w_dec", "b_dec"]
    out = {"x": x, **{f"param.{n}": t.detach() for n, t in zip(names, base)}}
    for tag, fn in [("l1", lambda p: l1_case(x, p, False)), ("l1sq", lambda p: l1_case(x, p, True))]:
        p = [t.detach().clone().requires_grad_() for t in base]
        loss, parts = fn(p)
        loss.backward()
        out[f"{tag}.loss"] = loss.detach().reshape(1)
        out[f"{tag}.recon"] = parts["recon"].detach().reshape(1)
        for n, t in zip(names, p):
            out[f"{tag}.grad.{n}"] = t.grad
    # Latents 1, 5 and 6 start "dead" (counter at the limit); this batch may revive some.
    before = torch.tensor([0, DEAD_TOKENS, 0, 0, 0, DEAD_TOKENS, DEAD_TOKENS, 0], dtype=torch.float64)
    p = [t.detach().clone().requires_grad_() for t in base]
    loss, parts = topk_case(x, p, before)
    loss.backward()
    out["topk.before"] = before
    out["topk.after"] = parts["after"]
    out["topk.mask"] = parts["mask"]
    out["topk.min_kept"] = parts["min_kept"].reshape(1)
    out["topk.loss"] = loss.detach().reshape(1)
    out["topk.recon"] = parts["recon"].detach().reshape(1)
    out["topk.aux"] = parts["aux"].detach().reshape(1)
    for n, t in zip(names, p):
        out[f"topk.grad.{n}"] = t.grad
    save_file({n: t.float().contiguous() for n, t in out.items()}, os.path.join(OUT, "cases.safetensors"))
    # The same parameters in the authors' layout, with their torch.compile key prefix.
    w_enc, b_enc, w_dec, b_dec = [t.detach().float() for t in base]
    authors = {
        "_orig_mod.encoder.weight": w_enc.reshape(2, d, D).contiguous(),
        "_orig_mod.encoder.bias": b_enc.reshape(D).contiguous(),
        "_orig_mod.decoder.weight": w_dec.reshape(D, 2, d).transpose(0, 1).contiguous(),
        "_orig_mod.decoder.bias": b_dec.reshape(2, d).contiguous(),
        "_orig_mod.k": torch.tensor([float(k)]),
        "_orig_mod.threshold": torch.tensor([0.25]),
    }
    save_file(authors, os.path.join(OUT, "authors.safetensors"))
    print("dead after:", (parts["after"] >= DEAD_TOKENS).tolist(), "aux:", float(parts["aux"]))


if __name__ == "__main__":
    main()
