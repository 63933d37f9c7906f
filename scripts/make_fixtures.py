#!/usr/bin/env python3
"""Writes the tiny random Gemma 2 test fixtures and their Hugging Face transformers reference outputs.

    pip install torch transformers tokenizers safetensors
    python3 scripts/make_fixtures.py            # writes assets/tiny-gemma2/{base,chat,reference}

Two snapshots in the hub layout ("base" and a perturbed "chat"): sharded bf16 safetensors with an
index, a hub-style config.json (base: the newer `rope_parameters`/`layer_types` spelling, chat: the
older `rope_theta` spelling with no `layer_types`), a Gemma-style tokenizer.json (BPE with byte
fallback, a normalizer replacing " " with "▁", `<bos>` post-processor, `<start_of_turn>` and
`<end_of_turn>`), and a tokenizer_config.json carrying Gemma's chat template.

The config makes every Gemma 2 feature change the numbers: query_pre_attn_scalar != head_dim,
heads*head_dim != hidden_size, GQA (4 query heads on 2 KV heads), a sliding window shorter than the
prompts, soft-caps small enough to bite, random (non-zero) norm offsets, a hidden size whose sqrt is
not representable in bf16 (the embedding normaliser must be rounded to the weight dtype).

Reference outputs come from transformers with eager attention, computed in f32 from the bf16 weights.
Transformers multiplies embeddings by sqrt(hidden) cast to the *weight* dtype; running the bf16
snapshot in bf16 would round it, running it upcast to f32 would not. crossdiff rounds it to the dtype
the config declares (`torch_dtype`/`dtype`: what the model runs in with transformers' dtype="auto"),
so the reference sets that same rounded scale explicitly. Nothing else is patched.
"""
import json
import math
import os
import random
import shutil
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "tiny-gemma2")

# Gemma's chat template as shipped in google/gemma-2-2b-it's tokenizer_config.json.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]

WORDS = (
    "the a model chat base layer token sparse latent decoder encoder residual stream user assistant "
    "question answer refuse help cannot sorry sure here is what why how when where who language "
    "learning fine tuning crosscoder dictionary feature activation norm weight matrix vector gradient "
    "train test data text web page cat dog house river mountain city night day sun moon star water"
).split()


def corpus(n, rng):
    out = []
    for _ in range(n):
        k = rng.randint(4, 14)
        s = " ".join(rng.choice(WORDS) for _ in range(k))
        out.append(s.capitalize() + rng.choice([".", "?", "!", ","]))
    return out


def make_tokenizer(path, rng):
    """Gemma-layout BPE: specials, then the 256 byte-fallback tokens, then learned merges."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(corpus(3000, rng), trainer)
    learned = json.loads(tok.to_str())
    vocab_learned = sorted(learned["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in vocab_learned:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": vocab[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for s in SPECIALS
        ],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [vocab["<bos>"]], "tokens": ["<bos>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": learned["model"]["merges"]},
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False, indent=1)
    Tokenizer.from_file(path)  # must parse
    return vocab


def config_for(vocab):
    return Gemma2Config(
        vocab_size=len(vocab), hidden_size=72, intermediate_size=136, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=40,
        sliding_window=6, attn_logit_softcapping=8.0, final_logit_softcapping=15.0,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=256, initializer_range=0.08,
        pad_token_id=vocab["<pad>"], eos_token_id=vocab["<eos>"], bos_token_id=vocab["<bos>"],
        attn_implementation="eager", dtype="bfloat16",
    )


def randomize(model, gen, scale):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * scale / math.sqrt(p.shape[1]))


def write_snapshot(model, out, old_style):
    if os.path.exists(out):
        shutil.rmtree(out)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="150KB", safe_serialization=True)
    cfg_path = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_path))
    if old_style:
        # The older hub spelling (as in google/gemma-2-2b's config.json): rope_theta, no layer_types.
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg.pop("layer_types", None)
        cfg["hidden_act"] = cfg.pop("hidden_activation")
        cfg["torch_dtype"] = cfg.pop("dtype", "bfloat16")
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    for extra in ("generation_config.json",):
        p = os.path.join(out, extra)
        if os.path.exists(p):
            os.remove(p)


def write_tokenizer_files(out, tok_json):
    shutil.copy(tok_json, os.path.join(out, "tokenizer.json"))
    json.dump({
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "chat_template": GEMMA_CHAT_TEMPLATE,
        "model_max_length": 256, "tokenizer_class": "GemmaTokenizer",
    }, open(os.path.join(out, "tokenizer_config.json"), "w"), indent=2)


PROMPTS = [
    "The cat sat on the river bank at night.",
    "Why does a sparse dictionary help?",
    "Hello world, 3.14 ünïcödé 🐱 tabs\tand  double  spaces",
    "a",
]
CONVERSATIONS = [
    [{"role": "user", "content": "  How do crosscoders work?  "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
     {"role": "user", "content": "What is a latent?"}],
]


def reference(model, tokenizer, name):
    """Every block output, logits and a greedy continuation from transformers (eager, f32)."""
    model = model.float().eval()
    scale = torch.tensor(math.sqrt(model.config.hidden_size), dtype=torch.bfloat16).float()
    model.model.embed_tokens.embed_scale.fill_(scale)
    tensors, meta = {}, {"embed_scale": scale.item(), "prompts": [], "chats": []}
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    texts = [(p, tokenizer(p)["input_ids"], "prompt") for p in PROMPTS]
    for conv in CONVERSATIONS:
        rendered = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        texts.append((rendered, ids, "chat"))
        meta["chats"].append({"messages": conv, "rendered": rendered, "ids": ids})
    with torch.no_grad():
        for i, (text, ids, kind) in enumerate(texts):
            x = torch.tensor([ids])
            out = model(x, output_hidden_states=True)
            tensors[f"p{i}.input_ids"] = x[0].to(torch.int64)
            for l in range(model.config.num_hidden_layers):
                tensors[f"p{i}.block.{l}"] = out.hidden_states[l + 1][0].contiguous()
            tensors[f"p{i}.logits"] = out.logits[0].contiguous()
            gen = model.generate(x, max_new_tokens=10, do_sample=False,
                                 eos_token_id=[model.config.eos_token_id, end_of_turn],
                                 pad_token_id=model.config.pad_token_id)
            tensors[f"p{i}.greedy"] = gen[0, len(ids):].to(torch.int64).contiguous()
            meta["prompts"].append({"text": text, "kind": kind, "ids": ids})
    # The last block's hidden state in transformers is after the final norm; record the raw residual
    # of the last block separately via a hook so block.{N-1} means the same thing for every block.
    with torch.no_grad():
        for i, (text, ids, kind) in enumerate(texts):
            captured = {}
            h = model.model.layers[-1].register_forward_hook(lambda m, a, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o))
            model(torch.tensor([ids]))
            h.remove()
            tensors[f"p{i}.block.{model.config.num_hidden_layers - 1}"] = captured["h"][0].contiguous()
    return tensors, meta


def main():
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(1234)
    os.makedirs(ROOT, exist_ok=True)
    tok_json = os.path.join(ROOT, "tokenizer.json.tmp")
    vocab = make_tokenizer(tok_json, rng)

    config = config_for(vocab)
    base = Gemma2ForCausalLM(config)
    randomize(base, gen, scale=2.0)
    chat = Gemma2ForCausalLM(config)
    chat.load_state_dict(base.state_dict())
    with torch.no_grad():  # the "chat fine-tune": a small perturbation of every weight
        for _, p in chat.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.detach().float().std() * 0.15)

    for name, model, old in (("base", base, False), ("chat", chat, True)):
        out = os.path.join(ROOT, name)
        write_snapshot(model, out, old_style=old)
        write_tokenizer_files(out, tok_json)
    os.remove(tok_json)

    refdir = os.path.join(ROOT, "reference")
    os.makedirs(refdir, exist_ok=True)
    for name in ("base", "chat"):
        snap = os.path.join(ROOT, name)
        tokenizer = AutoTokenizer.from_pretrained(snap)
        model = Gemma2ForCausalLM.from_pretrained(snap, dtype=torch.bfloat16, attn_implementation="eager")
        tensors, meta = reference(model, tokenizer, name)
        save_file(tensors, os.path.join(refdir, f"{name}.safetensors"))
        json.dump(meta, open(os.path.join(refdir, f"{name}.json"), "w", encoding="utf-8"), indent=1, ensure_ascii=False)
        # How much the soft-caps and window bite, so a reader can see the fixture exercises them.
        print(name, "max |logit| before final cap check:", tensors["p0.logits"].abs().max().item())
    print("wrote", ROOT)


if __name__ == "__main__":
    sys.exit(main())
