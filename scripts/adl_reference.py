#!/usr/bin/env python3
"""Independent reference for `crossdiff adl` (the activation-difference lens) on the tiny fixtures.

From transformers' block outputs in assets/tiny-gemma2/reference/{base,chat}.safetensors (made by
scripts/make_fixtures.py) for the plain-text prompts of reference/base.json, this computes for every
layer:
  - the per-position mean of chat − base over the first POSITIONS positions of each prompt (position
    0 = <bos>; a prompt shorter than POSITIONS counts at the positions it has) and the counts;
  - the mean ‖h_chat‖ over positions ≥ 5 (over all positions when none is that far);
  - each position's mean read through each model's final RMSNorm (Gemma's x·rsqrt(mean x² + eps)·(1 + w)),
    tied unembedding and final logit soft-cap: the TOP token ids with the largest and smallest logits,
    with their logits;
from the weights in assets/tiny-gemma2/{base,chat}/ (bf16 safetensors, read with struct). Pure Python,
float64. Writes assets/tiny-gemma2/reference/adl.json; tests/adl.rs compares crossdiff against it.

    python3 scripts/adl_reference.py
"""

import json
import math
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "tiny-gemma2")
POSITIONS = 12
TOP = 20
NORM_SKIP = 5


def read_safetensors(path, wanted=None):
    """{name: (shape, [float])} for F32 / BF16 tensors (all, or the names in `wanted`)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or (wanted is not None and name not in wanted):
            continue
        a, b = info["data_offsets"]
        raw = data[a:b]
        if info["dtype"] == "F32":
            values = list(struct.unpack("<%df" % (len(raw) // 4), raw))
        elif info["dtype"] == "BF16":
            halves = struct.unpack("<%dH" % (len(raw) // 2), raw)
            values = list(struct.unpack("<%df" % len(halves), struct.pack("<%dI" % len(halves), *[h << 16 for h in halves])))
        else:
            continue
        out[name] = (info["shape"], values)
    return out


def model_weights(name, wanted):
    folder = os.path.join(ROOT, name)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)["weight_map"]
    out = {}
    for file in sorted({index[w] for w in wanted}):
        out.update(read_safetensors(os.path.join(folder, file), wanted))
    return out


def lens(x, norm_w, embed, vocab, d, eps, cap):
    """Logits of one residual vector: final RMSNorm, tied unembedding, soft-cap."""
    inv = 1.0 / math.sqrt(sum(v * v for v in x) / d + eps)
    xn = [x[i] * inv * (1.0 + norm_w[i]) for i in range(d)]
    logits = []
    for t in range(vocab):
        row = embed[t * d:(t + 1) * d]
        logit = sum(a * b for a, b in zip(row, xn))
        logits.append(cap * math.tanh(logit / cap) if cap else logit)
    return logits


def main():
    configs, weights = {}, {}
    for name in ["base", "chat"]:
        with open(os.path.join(ROOT, name, "config.json")) as f:
            configs[name] = json.load(f)
        weights[name] = model_weights(name, {"model.norm.weight", "model.embed_tokens.weight"})
    with open(os.path.join(ROOT, "reference", "base.json")) as f:
        meta = json.load(f)
    prompts = [i for i, p in enumerate(meta["prompts"]) if p["kind"] == "prompt"]
    blocks = {name: read_safetensors(os.path.join(ROOT, "reference", name + ".safetensors")) for name in ["base", "chat"]}
    d = configs["base"]["hidden_size"]
    layers = configs["base"]["num_hidden_layers"]
    out = {
        "source": "scripts/adl_reference.py from reference/{base,chat}.safetensors (transformers, eager, f32)",
        "prompts": prompts,
        "texts": [meta["prompts"][i]["text"] for i in prompts],
        "positions": POSITIONS,
        "top": TOP,
        "norm_skip": NORM_SKIP,
        "layers": {},
    }
    for layer in range(layers):
        sums = [[0.0] * d for _ in range(POSITIONS)]
        counts = [0] * POSITIONS
        late, every = [0.0, 0], [0.0, 0]
        for i in prompts:
            hb = blocks["base"]["p%d.block.%d" % (i, layer)]
            hc = blocks["chat"]["p%d.block.%d" % (i, layer)]
            t = hb[0][0]
            for p in range(min(t, POSITIONS)):
                rb = hb[1][p * d:(p + 1) * d]
                rc = hc[1][p * d:(p + 1) * d]
                for k in range(d):
                    sums[p][k] += rc[k] - rb[k]
                counts[p] += 1
                n = math.sqrt(sum(v * v for v in rc))
                every[0] += n
                every[1] += 1
                if p >= NORM_SKIP:
                    late[0] += n
                    late[1] += 1
        reached = sum(1 for c in counts if c > 0)
        means = [[s / counts[p] for s in sums[p]] for p in range(reached)]
        norm_src = late if late[1] > 0 else every
        entry = {"counts": counts[:reached], "mean_chat_norm": norm_src[0] / norm_src[1], "mean_diff": means}
        for name in ["base", "chat"]:
            cfg = configs[name]
            w = weights[name]
            readings = []
            for m in means:
                logits = lens(
                    m,
                    w["model.norm.weight"][1],
                    w["model.embed_tokens.weight"][1],
                    cfg["vocab_size"],
                    d,
                    cfg["rms_norm_eps"],
                    cfg.get("final_logit_softcapping"),
                )
                up = sorted(range(len(logits)), key=lambda j: (-logits[j], j))[:TOP]
                down = sorted(range(len(logits)), key=lambda j: (logits[j], j))[:TOP]
                readings.append(
                    {
                        "promoted": up,
                        "promoted_logits": [logits[j] for j in up],
                        "suppressed": down,
                        "suppressed_logits": [logits[j] for j in down],
                    }
                )
            entry[name] = readings
        out["layers"][str(layer)] = entry
    path = os.path.join(ROOT, "reference", "adl.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print("wrote", os.path.normpath(path), "for prompts", prompts, "and layers 0..%d" % (layers - 1))


if __name__ == "__main__":
    main()
