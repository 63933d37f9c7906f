#!/usr/bin/env python3
"""The PyTorch/transformers side of `scripts/gpu-bench.sh` (CUDA on a GPU machine, CPU in the dry run).

    python3 scripts/gpu_bench_torch.py build   --out DIR [--preset gemma2-2b|tiny] [--device cuda]
    python3 scripts/gpu_bench_torch.py forward --model DIR --shapes 1x128,8x256 --decode 32 [--device cuda]
    python3 scripts/gpu_bench_torch.py cache   --base DIR --chat DIR --data FILE --layer 13 --tokens N [--device cuda]

build   writes a random base/chat pair (DIR/base, DIR/chat) of Gemma 2 2B's exact shape in bf16 with
        transformers' own random init (different seeds), plus the tokenizer files crossdiff needs.
forward times prefill (a full forward of a [batch, context] batch, all logits, like
        `crossdiff bench forward`) and greedy KV-cache decode, in the snapshot's bf16.
cache   the truncated transformers route for `crossdiff cache`: only blocks 0..=L are kept, and each
        batch runs base then chat and keeps hidden_states[L+1] (the output of block L), as bf16 shards.

Each subcommand prints one JSON line (last line of stdout). Errors exit non-zero with a one-line
message naming what failed.
"""
import argparse
import json
import os
import shutil
import sys
import time


def die(msg):
    print(f"gpu_bench_torch: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


try:
    import torch
except Exception as e:  # noqa: BLE001
    die(f"cannot import torch ({e}); this helper needs PyTorch")
try:
    import transformers
    from transformers import Gemma2Config, Gemma2ForCausalLM
except Exception as e:  # noqa: BLE001
    die(f"cannot import transformers' Gemma 2 ({e}); this helper needs transformers >= 4.42")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TOKENIZER_DIR = os.path.join(ROOT, "assets", "demo", "chat")

# google/gemma-2-2b's config.json (the published values); the random pair has exactly this shape.
GEMMA2_2B = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=8192, initializer_range=0.02, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    attention_bias=False, attention_dropout=0.0, query_pre_attn_scalar=256, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
)
# The dry run's miniature: same structure, tiny widths, a vocabulary larger than the tokenizer's.
TINY = dict(GEMMA2_2B, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
            sliding_window=32, max_position_embeddings=1024)
PRESETS = {"gemma2-2b": GEMMA2_2B, "tiny": TINY}


def device_info(device):
    info = {"impl": f"transformers {transformers.__version__}, torch {torch.__version__}", "device": device}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            die("--device cuda but torch.cuda.is_available() is False")
        info["device_name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["threads"] = torch.get_num_threads()
    return info


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak(device):
    """Peak bytes: torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on the CPU."""
    if device.startswith("cuda"):
        return {"peak_device_bytes": int(torch.cuda.max_memory_allocated()),
                "peak_device_reserved_bytes": int(torch.cuda.max_memory_reserved())}
    import resource
    return {"peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def load(model_dir, device, layers=None):
    """The snapshot in its stored bf16, eager attention (Gemma 2's attention soft-cap is exact there)."""
    kw = dict(dtype=torch.bfloat16, attn_implementation="eager")
    if device == "cpu":
        model = Gemma2ForCausalLM.from_pretrained(model_dir, **kw)
    else:
        try:  # straight onto the GPU (needs accelerate, which the GPU image has)
            model = Gemma2ForCausalLM.from_pretrained(model_dir, device_map=device, **kw)
        except Exception as e:  # noqa: BLE001
            print(f"gpu_bench_torch: device_map={device} failed ({e}); loading on the CPU and moving",
                  file=sys.stderr, flush=True)
            model = Gemma2ForCausalLM.from_pretrained(model_dir, **kw).to(device)
    if layers is not None:
        # Keep blocks 0..layers-1 only: the forward loops over self.layers, so it stops there.
        model.model.layers = model.model.layers[:layers]
    return model.eval()


# ---------------------------------------------------------------------------------------------
def cmd_build(args):
    spec = dict(PRESETS[args.preset])
    info = device_info(args.device)
    started = time.perf_counter()
    cfg = Gemma2Config(**spec, attn_implementation="eager", dtype="bfloat16")
    # Fail loudly if this transformers reads a field differently (renamed or dropped keyword).
    for key, want in spec.items():
        if key == "rope_parameters":
            rp = getattr(cfg, "rope_parameters", None) or {}
            got = rp.get("rope_theta") if isinstance(rp, dict) else getattr(rp, "rope_theta", None)
            got = got if got is not None else getattr(cfg, "rope_theta", None)
            if got is None or abs(float(got) - 10000.0) > 1e-6:
                die(f"Gemma2Config: rope theta is {got!r}, expected 10000.0 (transformers {transformers.__version__})")
            continue
        got = getattr(cfg, key, None)
        if got != want:
            die(f"Gemma2Config: field `{key}` is {got!r}, expected {want!r} (transformers {transformers.__version__})")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    written = {}
    for name, seed in (("base", args.seed), ("chat", args.seed + 1)):
        t = time.perf_counter()
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(args.device), torch.no_grad():
                model = Gemma2ForCausalLM(cfg)
        finally:
            torch.set_default_dtype(previous)
        model = model.to(torch.bfloat16)
        n_params = sum(p.numel() for p in model.parameters())
        target = os.path.join(out, name)
        if os.path.exists(target):
            shutil.rmtree(target)
        model.save_pretrained(target, safe_serialization=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        for f in ("tokenizer.json", "tokenizer_config.json"):
            src = os.path.join(args.tokenizer_from, f)
            if not os.path.exists(src):
                die(f"{src}: missing (the snapshot needs a tokenizer with a chat template)")
            shutil.copy(src, os.path.join(target, f))
        # What crossdiff reads: config.json with the real values, safetensors weights.
        saved = json.load(open(os.path.join(target, "config.json")))
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size", "query_pre_attn_scalar", "sliding_window",
                    "attn_logit_softcapping", "final_logit_softcapping"):
            if saved.get(key) != spec[key]:
                die(f"{target}/config.json: field `{key}` is {saved.get(key)!r}, expected {spec[key]!r}")
        if saved.get("model_type") != "gemma2":
            die(f"{target}/config.json: model_type is {saved.get('model_type')!r}")
        weights = [f for f in os.listdir(target) if f.endswith(".safetensors")]
        if not weights:
            die(f"{target}: save_pretrained wrote no .safetensors file")
        size = sum(os.path.getsize(os.path.join(target, f)) for f in os.listdir(target))
        written[name] = {"dir": target, "seed": seed, "parameters": n_params, "bytes": size,
                         "files": sorted(os.listdir(target)), "seconds": time.perf_counter() - t}
        print(f"gpu_bench_torch: built {name} ({n_params / 1e9:.3f}B parameters, {size / 2**30:.2f} GiB) "
              f"in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    print(json.dumps({**info, "preset": args.preset, "config": spec, "models": written,
                      "seconds": time.perf_counter() - started}))


# ---------------------------------------------------------------------------------------------
def cmd_forward(args):
    info = device_info(args.device)
    t = time.perf_counter()
    model = load(args.model, args.device)
    sync(args.device)
    load_s = time.perf_counter() - t
    vocab = model.config.vocab_size
    results = []
    for shape in args.shapes.split(","):
        batch, context = (int(x) for x in shape.lower().split("x"))
        gen = torch.Generator().manual_seed(7)
        ids = torch.randint(0, vocab, (batch, context), generator=gen).to(args.device)
        reset_peak(args.device)
        with torch.no_grad():
            model(ids)  # warm-up (kernels, allocator)
            sync(args.device)
            t = time.perf_counter()
            for _ in range(args.repeats):
                logits = model(ids).logits  # all positions' logits, as crossdiff computes them
                del logits
            sync(args.device)
            prefill = batch * context * args.repeats / (time.perf_counter() - t)
            kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up of the cache path
            sync(args.device)
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            sync(args.device)
            one = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=args.decode + 1, min_new_tokens=args.decode + 1, **kw)
            sync(args.device)
            many = time.perf_counter() - t
            decode = batch * args.decode / max(many - one, 1e-9)
        row = {"batch": batch, "context": context, "decode_tokens": args.decode, "repeats": args.repeats,
               "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, **peak(args.device)}
        print(f"gpu_bench_torch: forward {batch}x{context}: prefill {prefill:.1f} tokens/s, "
              f"decode {decode:.1f} tokens/s", file=sys.stderr, flush=True)
        results.append(row)
    print(json.dumps({**info, "dtype": "bfloat16", "attn_implementation": "eager", "load_seconds": load_s,
                      "results": results}))


# ---------------------------------------------------------------------------------------------
def read_documents(path, tok, context, tokens):
    """crossdiff's .txt reading: documents separated by blank lines, `<bos>` + text, truncated to context."""
    text = open(path, encoding="utf-8").read()
    docs, n = [], 0
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        ids = tok.encode(block).ids[:context][: tokens - n]
        docs.append(ids)
        n += len(ids)
        if n >= tokens:
            break
    return docs, n


def cmd_cache(args):
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from bench_cache_hf import length_batches  # the CPU benchmark's batching, shared

    info = device_info(args.device)
    os.makedirs(args.out, exist_ok=True)
    tok = Tokenizer.from_file(os.path.join(args.base, "tokenizer.json"))
    docs, n = read_documents(args.data, tok, args.context, args.tokens)
    if n < args.tokens:
        print(f"gpu_bench_torch: {args.data} holds only {n} tokens (asked {args.tokens})", file=sys.stderr)
    t = time.perf_counter()
    models = [load(d, args.device, layers=args.layer + 1) for d in (args.base, args.chat)]
    sync(args.device)
    load_s = time.perf_counter() - t
    reset_peak(args.device)
    start = time.perf_counter()
    shard, shard_tokens, shards = [], 0, 0
    with torch.no_grad():
        # Same batching as crossdiff's defaults: longest first, --batch-tokens per batch, padded rows masked.
        for group, ids, mask in length_batches(docs, args.batch_tokens):
            ids, mask = ids.to(args.device), mask.to(args.device)
            acts = []
            for model in models:  # base, then chat
                h = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
                if len(h) != args.layer + 2:
                    die(f"expected {args.layer + 2} hidden states from the truncated model, got {len(h)}")
                acts.append(h[args.layer + 1].to(torch.bfloat16))
            pair = torch.stack(acts, dim=2)  # [b, t, 2, d]
            rows = [pair[b, : len(docs[j])] for b, j in enumerate(group)]
            shard.append(torch.cat(rows).cpu())
            shard_tokens += sum(len(docs[j]) for j in group)
            if shard_tokens >= args.shard_tokens:
                save_file({"acts": torch.cat(shard).contiguous()},
                          os.path.join(args.out, f"acts-{shards:05d}.safetensors"))
                shard, shard_tokens, shards = [], 0, shards + 1
        if shard:
            save_file({"acts": torch.cat(shard).contiguous()}, os.path.join(args.out, f"acts-{shards:05d}.safetensors"))
            shards += 1
    sync(args.device)
    secs = time.perf_counter() - start
    print(json.dumps({**info, "route": "transformers, blocks 0..=L only, output_hidden_states, base then chat",
                      "dtype": "bfloat16", "attn_implementation": "eager", "tokens": n, "documents": len(docs),
                      "layer": args.layer, "layers_run": args.layer + 1, "context": args.context,
                      "batch_tokens": args.batch_tokens, "shards": shards, "load_seconds": load_s,
                      "seconds": secs, "tokens_per_s": n / secs, **peak(args.device)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--preset", choices=sorted(PRESETS), default="gemma2-2b")
    b.add_argument("--device", default="cuda")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--tokenizer-from", default=TOKENIZER_DIR)
    f = sub.add_parser("forward")
    f.add_argument("--model", required=True)
    f.add_argument("--shapes", default="1x128,8x256", help="BATCHxCONTEXT, comma-separated")
    f.add_argument("--decode", type=int, default=32)
    f.add_argument("--repeats", type=int, default=3)
    f.add_argument("--device", default="cuda")
    c = sub.add_parser("cache")
    c.add_argument("--base", required=True)
    c.add_argument("--chat", required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--layer", type=int, required=True)
    c.add_argument("--tokens", type=int, required=True)
    c.add_argument("--context", type=int, default=1024)
    c.add_argument("--batch-tokens", type=int, default=8192)
    c.add_argument("--shard-tokens", type=int, default=65536)
    c.add_argument("--out", required=True)
    c.add_argument("--device", default="cuda")
    args = ap.parse_args()
    {"build": cmd_build, "forward": cmd_forward, "cache": cmd_cache}[args.cmd](args)


if __name__ == "__main__":
    main()
