#!/usr/bin/env python3
"""Independent numpy computation of the BatchTopK SAE's step (the authors' BatchTopKSAE and
BatchTopKTrainer, dictionary_learning), written from their formulas, for crossdiff's tests.

    python3 scripts/sae_reference.py     # writes assets/sae-reference/*.safetensors (needs numpy, safetensors)

The committed gradients come from PyTorch autograd (float64) of the loss written the authors' way
(flattened top-k scattered back, AuxK's `where(dead, post_relu, -inf).topk`, the error detached);
the script checks them against central finite differences of an independent numpy loss (the
selection masks and AuxK's detached error held at the unperturbed point, as autodiff treats them).
Run it with a Python that has torch (e.g. a venv with `pip install torch numpy safetensors`);
without torch it falls back to the finite differences and says so. Tiny case: d = 5, D = 16, B = 7
pairs, k = 2, target chat − base, some latents dead. Also written: the decoder-gradient projection
and the unit-row renormalisation, and `authors.safetensors`: the same SAE in the authors' saved
layout (`_orig_mod.` prefixes, int32 0-dim `k`, 0-dim `threshold`) that crossdiff must load.
"""
import os

import numpy as np
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "sae-reference")
d, D, B, k = 5, 16, 7, 2
ALPHA, DEAD_TOKENS = 1.0 / 32.0, 100
rng = np.random.default_rng(7)

w_enc = rng.normal(size=(d, D)) * 0.6          # ours: [d, D] (the authors' encoder.weight transposed)
b_enc = rng.normal(size=(1, D)) * 0.1
w_dec = rng.normal(size=(D, d))
w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)   # unit rows, as training keeps them
b_dec = rng.normal(size=(1, d)) * 0.1
pairs = rng.normal(size=(B, 2 * d))
x = pairs[:, d:] - pairs[:, :d]                 # chat − base
# Tokens since each latent was selected, before this step: 95 and up become dead unless selected.
since = np.array([0, 95, 200, 0, 10, 99, 0, 500, 0, 0, 96, 0, 300, 400, 0, 97], dtype=np.int64)


def encode(p, x):
    w_enc, b_enc, w_dec, b_dec = p
    return np.maximum((x - b_dec) @ w_enc + b_enc, 0.0)


post0 = encode((w_enc, b_enc, w_dec, b_dec), x)
flat = post0.ravel()
keep = np.argsort(-flat, kind="stable")[: k * B]
mask = np.zeros_like(flat)
mask[keep] = 1.0
mask = mask.reshape(B, D)
min_kept = flat[keep].min()
selected = mask.sum(0) > 0
since_after = since + B
since_after[selected] = 0
dead = since_after >= DEAD_TOKENS
k_aux = min(d // 2, int(dead.sum()))
cand = np.where(dead[None, :], post0, -np.inf)
aux_mask = np.zeros((B, D))
for t in range(B):
    top = np.argsort(-cand[t], kind="stable")[:k_aux]
    aux_mask[t, top] = 1.0
e0 = x - ((post0 * mask) @ w_dec + b_dec)       # the detached error AuxK compares against


def terms(p):
    w_enc, b_enc, w_dec, b_dec = p
    post = encode(p, x)
    e = x - ((post * mask) @ w_dec + b_dec)
    recon = (e ** 2).sum(1).mean()
    e_hat = (post * aux_mask) @ w_dec
    num = ((e0 - e_hat) ** 2).sum(1).mean()
    den = ((e0 - e0.mean(0)) ** 2).sum(1).mean()
    aux = num / den
    return recon + ALPHA * aux, recon, aux


params = [w_enc, b_enc, w_dec, b_dec]
loss, recon, aux = terms(params)
grads = []
for i, p in enumerate(params):
    g = np.zeros_like(p)
    for idx in np.ndindex(p.shape):
        hi = [q.copy() for q in params]
        lo = [q.copy() for q in params]
        hi[i][idx] += 1e-6
        lo[i][idx] -= 1e-6
        g[idx] = (terms(hi)[0] - terms(lo)[0]) / 2e-6
    grads.append(g)

try:
    import torch
except ImportError:
    torch = None
    print("torch not found: the committed gradients are the finite differences")
if torch is not None:
    # The authors' route (dictionary_learning BatchTopKSAE.encode / BatchTopKTrainer.loss) in our
    # layout: W_enc [d, D] (their encoder.weight transposed), W_dec [D, d] (their decoder.weight
    # transposed).
    t = lambda a: torch.tensor(a, dtype=torch.float64, requires_grad=True)
    tw_enc, tb_enc, tw_dec, tb_dec = (t(w_enc), t(b_enc), t(w_dec), t(b_dec))
    tx = torch.tensor(x, dtype=torch.float64)
    post_relu = torch.relu((tx - tb_dec) @ tw_enc + tb_enc)
    flat_acts = post_relu.flatten()
    top = flat_acts.topk(k * B, sorted=False, dim=-1)
    f = torch.zeros_like(flat_acts).scatter_(-1, top.indices, top.values).reshape(B, D)
    e = tx - (f @ tw_dec + tb_dec)
    l2 = e.pow(2).sum(dim=-1).mean()
    tdead = torch.tensor(dead)
    aux_in = torch.where(tdead[None], post_relu, -torch.inf)
    aux_acts, aux_idx = aux_in.topk(k_aux, sorted=False)
    aux_f = torch.zeros_like(post_relu).scatter(-1, aux_idx, aux_acts)
    residual = e.detach()
    e_hat = aux_f @ tw_dec
    l2_aux = (residual - e_hat).pow(2).sum(-1).mean()
    denom = (residual - residual.mean(0)).pow(2).sum(-1).mean()
    auxk = (l2_aux / denom).nan_to_num(0.0)
    tloss = l2 + ALPHA * auxk
    tloss.backward()
    torch_grads = [a.grad.numpy() for a in (tw_enc, tb_enc, tw_dec, tb_dec)]
    for name, g_t, g_fd in zip(["w_enc", "b_enc", "w_dec", "b_dec"], torch_grads, grads):
        err = np.abs(g_t - g_fd).max() / max(np.abs(g_t).max(), 1e-12)
        assert err < 1e-6, f"{name}: autograd and finite differences differ by {err:.2e}"
    assert abs(tloss.item() - loss) < 1e-9 * max(abs(loss), 1.0), (tloss.item(), loss)
    grads = torch_grads
    print(f"torch {torch.__version__}: autograd equals the finite differences")

unit = w_dec / (np.linalg.norm(w_dec, axis=1, keepdims=True) + 1e-6)
g_dec_projected = grads[2] - unit * (grads[2] * unit).sum(1, keepdims=True)
stretched = w_dec * rng.uniform(0.5, 2.0, size=(D, 1))
renormed = stretched / (np.linalg.norm(stretched, axis=1, keepdims=True) + np.finfo(np.float32).eps)

f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
os.makedirs(OUT, exist_ok=True)
save_file(
    {
        "w_enc": f32(w_enc), "b_enc": f32(b_enc), "w_dec": f32(w_dec), "b_dec": f32(b_dec),
        "pairs": f32(pairs), "since": since, "since_after": since_after,
        "loss": f32([loss]), "recon": f32([recon]), "aux": f32([aux]), "min_kept": f32([min_kept]),
        "mask": f32(mask), "aux_mask": f32(aux_mask),
        "grad.w_enc": f32(grads[0]), "grad.b_enc": f32(grads[1]), "grad.w_dec": f32(grads[2]),
        "grad.b_dec": f32(grads[3]), "grad.w_dec.projected": f32(g_dec_projected),
        "stretched": f32(stretched), "renormed": f32(renormed),
        "codes": f32(np.where(post0 > 0.5, post0, 0.0)),  # inference codes at threshold 0.5
        "meta": np.array([d, D, B, k, DEAD_TOKENS, k_aux], dtype=np.int64),
    },
    os.path.join(OUT, "cases.safetensors"),
)
# The authors' saved layout: encoder.weight [D, d], decoder.weight [d, D], b_dec [d], int32 k, θ.
save_file(
    {
        "_orig_mod.b_dec": f32(b_dec[0]), "_orig_mod.k": np.array(k, dtype=np.int32),
        "_orig_mod.threshold": np.array(0.5, dtype=np.float32),
        "_orig_mod.decoder.weight": f32(w_dec.T), "_orig_mod.encoder.weight": f32(w_enc.T),
        "_orig_mod.encoder.bias": f32(b_enc[0]),
    },
    os.path.join(OUT, "authors.safetensors"),
)
print(f"loss {loss:.6f} recon {recon:.6f} aux {aux:.6f}; dead {int(dead.sum())}, k_aux {k_aux}")
