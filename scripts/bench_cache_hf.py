#!/usr/bin/env python3
"""Reference pipeline for `crossdiff cache` throughput: transformers with hidden-state outputs.

    python3 scripts/bench_forward_hf.py --out /tmp/g2w --layers 4      # makes the 2B-width model
    python3 scripts/bench_cache_hf.py --model /tmp/g2w --layer 1 --tokens 8192 --out /tmp/hf-cache
    crossdiff --backend cpu cache --base /tmp/g2w --chat /tmp/g2w --data assets/data/web.txt \
        assets/data/chat.jsonl --mix --layer 1 --tokens 8192 --context 128 --out /tmp/cd-cache

What the public crosscoder pipelines do: for each batch of documents, run each model with
`output_hidden_states=True` (the whole model), take hidden_states[L+1], drop padding, store bf16
shards. Same documents, tokenizer, context, batching by length and dtype as crossdiff's defaults.

`--truncate` is the authors' route instead (their ActivationCache stops each model at the cached
layer): blocks 0..=L only, no final norm or unembedding, the output of block L taken by a hook —
the same work `crossdiff cache` does, so the fair reference for its speed.
"""
import argparse
import json
import os
import time

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import Gemma2ForCausalLM

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "data")



def length_batches(docs, batch_tokens):
    """crossdiff's batching of a shard: longest documents first, at most `batch_tokens` padded tokens
    per batch. Yields (document indices, right-padded ids [b, t], attention mask [b, t])."""
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
    i = 0
    while i < len(order):
        group = order[i:i + max(1, batch_tokens // len(docs[order[i]]))]
        t = len(docs[group[0]])
        ids = torch.zeros((len(group), t), dtype=torch.long)
        mask = torch.zeros((len(group), t), dtype=torch.long)
        for b, j in enumerate(group):
            ids[b, : len(docs[j])] = torch.tensor(docs[j])
            mask[b, : len(docs[j])] = 1
        yield group, ids, mask
        i += len(group)

def documents(tok, context):
    """web.txt blocks and chat.jsonl conversations, interleaved, as token ids (repeated as needed)."""
    web = [b.strip() for b in open(os.path.join(DATA, "web.txt")).read().split("\n\n") if b.strip()]
    chats = []
    for line in open(os.path.join(DATA, "chat.jsonl")):
        msgs = json.loads(line)["messages"]
        text = "<bos>" + "".join(
            f"<start_of_turn>{'model' if m['role'] == 'assistant' else m['role']}\n{m['content'].strip()}<end_of_turn>\n"
            for m in msgs)
        chats.append(text)
    while True:
        for w, c in zip(web, chats):
            yield tok.encode(w).ids[:context]
            yield tok.encode(c, add_special_tokens=False).ids[:context]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--out", required=True)
    ap.add_argument("--truncate", action="store_true", help="run blocks 0..=layer only (the authors' route)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    models = [Gemma2ForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
              for _ in range(2)]  # base and chat (same widths; throughput does not depend on the weights)
    captured = {}
    if args.truncate:
        for m, model in enumerate(models):
            model.model.layers = model.model.layers[: args.layer + 1]
            model.model.layers[args.layer].register_forward_hook(
                lambda _mod, _inp, out, m=m: captured.__setitem__(m, out[0] if isinstance(out, tuple) else out))
    docs, n = [], 0
    for ids in documents(tok, args.context):
        ids = ids[: args.tokens - n]
        docs.append(ids)
        n += len(ids)
        if n >= args.tokens:
            break
    start = time.perf_counter()
    acts = [[None] * len(docs) for _ in models]
    with torch.no_grad():
        for group, ids, mask in length_batches(docs, args.batch_tokens):
            for m, model in enumerate(models):
                if args.truncate:
                    model.model(input_ids=ids, attention_mask=mask)
                    h = captured[m]
                else:
                    h = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[args.layer + 1]
                for b, j in enumerate(group):
                    acts[m][j] = h[b, : len(docs[j])].to(torch.bfloat16)
    pairs = torch.stack([torch.cat(acts[0]), torch.cat(acts[1])], dim=1)
    save_file({"acts": pairs.contiguous()}, os.path.join(args.out, "acts-00000.safetensors"))
    secs = time.perf_counter() - start
    impl = "transformers blocks 0..=L (truncated)" if args.truncate else "transformers output_hidden_states"
    print(json.dumps({"impl": impl, "tokens": n, "layer": args.layer,
                      "layers": models[0].config.num_hidden_layers, "seconds": secs, "tokens_per_s": n / secs}))


if __name__ == "__main__":
    main()
