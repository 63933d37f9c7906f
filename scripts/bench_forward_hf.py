#!/usr/bin/env python3
"""Reference numbers for `crossdiff bench forward`: transformers' Gemma 2 on the same CPU and shapes.

    python3 scripts/bench_forward_hf.py --out /tmp/gemma2-2b-width --layers 2
    crossdiff --backend cpu bench forward --model /tmp/gemma2-2b-width --batch 1 --context 128 --decode 32

Writes (once) a random Gemma 2 with the real 2B widths (d=2304, 8 heads, 4 KV heads, head_dim 256,
MLP 9216, vocab 256000) but only --layers blocks, as an f32 hub-layout snapshot (the 2B base ships
in f32), then times transformers on it: prefill tokens/s of a full forward over a [batch, context]
batch (all logits, like crossdiff), decode tokens/s of greedy KV-cache steps, peak RSS.
"""
import argparse
import json
import os
import resource
import shutil
import time

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "tiny-gemma2", "base")


def make_snapshot(out, layers):
    if os.path.exists(os.path.join(out, "config.json")):
        return
    torch.manual_seed(0)
    cfg = Gemma2Config(num_hidden_layers=layers, attn_implementation="eager", dtype="float32")
    model = Gemma2ForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(FIXTURE, f), os.path.join(out, f))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    make_snapshot(args.out, args.layers)
    model = Gemma2ForCausalLM.from_pretrained(args.out, dtype=torch.float32, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.context), generator=gen)
    with torch.no_grad():
        model(ids)
        t = time.perf_counter()
        for _ in range(args.repeats):
            model(ids)
        prefill = args.batch * args.context * args.repeats / (time.perf_counter() - t)
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        one = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=args.decode + 1, min_new_tokens=args.decode + 1, **kw)
        many = time.perf_counter() - t
        decode = args.batch * args.decode / max(many - one, 1e-9)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "impl": "transformers " + __import__("transformers").__version__ + ", torch " + torch.__version__,
        "threads": torch.get_num_threads(), "batch": args.batch, "context": args.context,
        "decode_tokens": args.decode, "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
        "peak_host_bytes": peak,
    }))


if __name__ == "__main__":
    main()
