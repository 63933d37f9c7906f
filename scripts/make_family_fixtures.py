#!/usr/bin/env python3
"""Writes tiny random Llama 3, Qwen 2.5, Qwen 3 and Gemma 3 test fixtures, two PEFT LoRA adapters, and their
Hugging Face transformers reference outputs.

    pip install torch transformers tokenizers safetensors peft
    python3 scripts/make_family_fixtures.py     # writes assets/tiny-{llama,qwen2,qwen3,gemma3,variants}/

For each family F:

    assets/tiny-F/base/       hub layout: sharded bf16 safetensors + model.safetensors.index.json, config.json in
                              the transformers-5 spelling (what save_pretrained writes: `rope_parameters`,
                              `layer_types`, `dtype`), tokenizer.json, tokenizer_config.json
    assets/tiny-F/chat/       the same architecture with perturbed weights (the "chat fine-tune"), config.json
                              rewritten to the older hub spelling (`rope_theta`/`rope_scaling`/`torch_dtype`, no
                              `layer_types`; Gemma 3 also `rope_local_base_freq`, `sliding_window_pattern`), a
                              tokenizer.json byte-identical to base's, and the family's real chat template
    assets/tiny-F/reference/{base,chat}.{json,safetensors}
                              exactly the format of scripts/make_fixtures.py's reference(): p{i}.input_ids,
                              p{i}.block.{l} (raw residual after block l, every block), p{i}.logits and p{i}.greedy
                              (10 greedy tokens, stopping on the family's end-of-turn/eos ids); the json lists
                              "prompts" [{text, kind, ids}] and "chats" [{messages, rendered, ids}], plus "family",
                              "stop_ids", "chat_template_kwargs" and (Gemma 3) "embed_scale"
    assets/tiny-llama/lora/, lora-rs/
                              PEFT adapters (save_pretrained output) on the llama base: plain LoRA (scale
                              alpha/r) and rsLoRA (scale alpha/sqrt(r)) on different target modules, with
                              reference/{lora,lora-rs}.{json,safetensors} from the merged f32 model

Prompts are make_fixtures.py's PROMPTS (kind "prompt", tokenized with the tokenizer's own special-token handling)
and its CONVERSATIONS plus one conversation that opens with a system turn (kind "chat": apply_chat_template with
add_generation_prompt, then tokenized without adding special tokens). The llama base has no chat template (like
meta-llama/Llama-3.2-1B), so its reference and the LoRA references have prompts only.

Every feature changes the numbers (the script prints each one's effect on the logits):
  llama   SwiGLU, untied lm_head, GQA (4 query heads on 2 KV heads), head_dim 24 != hidden/heads 12 (transformers
          honours an explicit head_dim for Llama), rope_theta 500000 with "llama3" RoPE scaling (factor 8,
          low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 32): with head_dim 24 the 12
          frequencies fall in all three bands (wavelength < 8 untouched, 8..32 smoothed, > 32 divided by 8).
          Byte-level BPE like Llama 3 (its split regex, \\p{N}{1,3}, ignore_merges, <|begin_of_text|> prepended
          by the post-processor) with Llama 3's special-token layout at the end of the vocabulary.
  qwen2   q/k/v biases (random, non-zero; o_proj has none), tied embeddings (no lm_head tensor), rope_theta 1e6,
          `use_sliding_window: false` with `sliding_window: 4` (shorter than the prompts) and
          `max_window_layers: 1`: a loader that ignores use_sliding_window windows layers 1.. and gets other
          numbers. config vocab_size (448) is padded past the tokenizer's 433 ids (as Qwen's 151936 is; those
          rows are small, as untrained rows are, so greedy decoding never picks them). Byte-level BPE like
          Qwen 2.5 (NFC, its split regex with single digits, no BOS), ChatML with the default system message.
  qwen3   q_norm/k_norm (random, not 1), head_dim 20 != hidden/heads 12, no attention bias, untied lm_head,
          rope_theta 1e6, Qwen 2.5's tokenizer plus <think>/</think> (added, not special), Qwen 3's template.
  gemma3  q_norm/k_norm and every norm random (Gemma stores the offset from 1), sliding window 6 shorter than
          the prompts, layers [sliding, sliding, full, sliding] (sliding_window_pattern 3: not simple
          alternation), global layers rope_theta 1e6 with linear scaling factor 8, sliding layers
          rope_local_base_freq 10000, query_pre_attn_scalar 40 != head_dim 24, heads*head_dim 96 != hidden 56,
          final_logit_softcapping 15 (biting: the final norm's scale puts the logits near it), sqrt(56) not
          representable in bf16 (the embedding normaliser rounds to the weight dtype: see embed_scale below).
          make_fixtures.py's Gemma tokenizer, Gemma 3's template (a system turn is prefixed to the first user
          turn). The base config carries transformers 5's own `_sliding_window_pattern` next to `layer_types`.

Variants (assets/tiny-variants/<name>/, one snapshot each, with reference/<name>.{json,safetensors} in the same
format, "variant" added to the json): config options the fixtures above leave off, for a config-driven loader on
configs it has never seen. Each copies its family's chat tokenizer files and has the prompts and the chats.
  llama-bias     attention_bias and mlp_bias (q/k/v/o and gate/up/down biases, random), tied embeddings (no
                 lm_head tensor), no head_dim key (hidden/heads = 8), plain RoPE (rope_theta 10000, no
                 rope_scaling), rms_norm_eps 1e-6, one float16 model.safetensors (no index), torch_dtype float16.
  qwen2-window   use_sliding_window true, sliding_window 4, max_window_layers 1 of 3 and no layer_types: transformers
                 derives [full, sliding, sliding] (layers i >= max_window_layers slide); untied lm_head.
  gemma3-capped  7 layers and no layer_types/sliding_window_pattern: the default pattern 6 (layer 5 full, the others
                 sliding, window 5), final_logit_softcapping 20 (biting), no rope_scaling, rope_theta 1e6 and no
                 rope_local_base_freq (sliding layers: the default 10000), MQA (1 KV head). attn_logit_softcapping is
                 5.0, which would bite, but transformers' Gemma 3 attention never applies it (Gemma3Attention passes
                 no softcap; Gemma 2's does): the reference has no attention cap (noted in its json).
  qwen3-bias     attention_bias (q/k/v/o biases, random; Qwen 2 has no o_proj bias), tied embeddings, no head_dim
                 key: Qwen 3's default 128, not hidden/heads 64/4 = 16 (q_proj 64 -> 512); transformers 5's spelling.
Each is read back with AutoConfig (the options as intended) and from_pretrained (the same logits as the in-memory
model it was saved from); the script prints each option's effect on the logits.

References come from transformers with eager attention, computed in f32 from the bf16 weights (loaded with
dtype=bfloat16, then .float(); llama-bias: float16). For Gemma 3, transformers multiplies embeddings by sqrt(hidden)
cast to the weight dtype; the reference sets that buffer to the bf16-rounded value explicitly (recorded as
"embed_scale"), as make_fixtures.py does for Gemma 2. Llama's chats are rendered with date_string="26 Jul 2024" (the
template's own fallback when strftime_now is undefined) so they do not depend on today's date.
"""
import copy
import json
import math
import os
import random
import shutil
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import CONVERSATIONS, PROMPTS, corpus  # noqa: E402
from make_fixtures import make_tokenizer as make_gemma_tokenizer  # noqa: E402

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets")

# make_fixtures.py's conversations, plus one that opens with a system turn (each template places it differently).
ALL_CONVERSATIONS = CONVERSATIONS + [
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Why is the sky blue?"}],
]

# ---------------------------------------------------------------------------------------------------------------
# Chat templates, as shipped in the models' tokenizer_config.json.

# meta-llama/Llama-3.2-1B-Instruct
LLAMA32_CHAT_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Qwen/Qwen2.5-*-Instruct (the base models ship the same template)
QWEN25_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen/Qwen3-* (hybrid thinking; enable_thinking=false appends an empty think block to the generation prompt)
QWEN3_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# google/gemma-3-1b-it (the -pt models ship the same template)
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# ---------------------------------------------------------------------------------------------------------------
# Byte-level BPE tokenizers (Llama 3, Qwen 2.5 / 3).

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Llama 3's first special tokens in their real order (128000.. there; here right after the BPE vocabulary).
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_3|>",
]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN3_EXTRA = ["<think>", "</think>"]  # added tokens that are not special (as in Qwen 3's tokenizer.json)

# Text the chat templates emit, so it tokenizes into a few tokens as it does with the real vocabularies.
TEMPLATE_TEXT = [
    "system\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    "user\n\n", "assistant\n\n", "system\n", "user\n", "assistant\n",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
]
COMMON_TEXT = ["Hello world, Hi there. What is it? You are a terse assistant. Why is the sky blue?"]


def byte_level_corpus(rng):
    return corpus(500, rng) + TEMPLATE_TEXT * 200 + COMMON_TEXT * 100


def byte_level_tokenizer(path, rng, split_regex, vocab_size, nfc, specials, extra_added=(), ignore_merges=False,
                         bos=None):
    """A GPT-2-style byte-level BPE: the BPE vocabulary (256 byte symbols, then merges), then the added tokens."""
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(byte_level_corpus(rng), trainer)
    learned = json.loads(tok.to_str())
    vocab = dict(sorted(learned["model"]["vocab"].items(), key=lambda kv: kv[1]))
    assert list(vocab.values()) == list(range(len(vocab)))
    added = []
    for s in specials:
        added.append({"id": len(vocab) + len(added), "content": s, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    for s in extra_added:
        added.append({"id": len(vocab) + len(added), "content": s, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": False})
    ids = {a["content"]: a["id"] for a in added}
    split = {"type": "Split", "pattern": {"Regex": split_regex}, "behavior": "Isolated", "invert": False}
    if bos is None:  # Qwen: no BOS, a plain ByteLevel post-processor
        post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        decoder = dict(byte_level)
    else:  # Llama 3: ByteLevel then a template prepending <|begin_of_text|>
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
        decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        post = {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {bos: {"id": bos, "ids": [ids[bos]], "tokens": [bos]}}},
        ]}
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"} if nfc else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
        "post_processor": post,
        "decoder": decoder,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": learned["model"]["merges"]},
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False, indent=1)
    Tokenizer.from_file(path)  # must parse
    full = dict(vocab)
    full.update(ids)
    return full


# ---------------------------------------------------------------------------------------------------------------
# Weights, snapshots, references.

def randomize(model, gen, scale, gemma_norms=False):
    """Every parameter random: norms around 1 (Gemma: the stored offset around 0), biases non-zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                if gemma_norms:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
                else:
                    p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.3)
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif p.dim() == 1:  # q/k/v biases
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * scale / math.sqrt(p.shape[1]))


def perturbed(model, gen):
    """The "chat fine-tune": a copy with a small perturbation of every weight."""
    chat = copy.deepcopy(model)
    with torch.no_grad():
        for _, p in chat.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.detach().float().std() * 0.15)
    return chat


def write_snapshot(model, out, rewrite, dtype=torch.bfloat16, sharded=True):
    if os.path.exists(out):
        shutil.rmtree(out)
    model.to(dtype).save_pretrained(out, max_shard_size="150KB" if sharded else "100MB")
    cfg_path = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_path))
    cfg = rewrite(cfg)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    for extra in ("generation_config.json", "chat_template.jinja"):
        p = os.path.join(out, extra)
        if os.path.exists(p):
            os.remove(p)
    shards = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    if sharded:
        assert len(shards) >= 2 and os.path.exists(os.path.join(out, "model.safetensors.index.json")), shards
    else:
        assert shards == ["model.safetensors"] and not os.path.exists(
            os.path.join(out, "model.safetensors.index.json")), shards


def write_tokenizer(out, tok_json, tokenizer_config):
    shutil.copy(tok_json, os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)


def texts_for(tokenizer, chats, chat_kwargs, meta):
    texts = [(p, tokenizer(p)["input_ids"], "prompt") for p in PROMPTS]
    if chats:
        for conv in ALL_CONVERSATIONS:
            rendered = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, **chat_kwargs)
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            texts.append((rendered, ids, "chat"))
            meta["chats"].append({"messages": conv, "rendered": rendered, "ids": ids})
    return texts


def reference(model, tokenizer, family, stop_ids, pad_id, chats=True, chat_kwargs=None, embed_scale=False,
              extra=None):
    """Every block output, logits and a greedy continuation from transformers (eager, f32)."""
    model = model.float().eval()
    chat_kwargs = chat_kwargs or {}
    meta = {"family": family}
    if embed_scale:
        scale = torch.tensor(math.sqrt(model.config.hidden_size), dtype=torch.bfloat16).float()
        model.model.embed_tokens.embed_scale.fill_(scale)
        meta["embed_scale"] = scale.item()
    meta["stop_ids"] = stop_ids
    if chats:
        meta["chat_template_kwargs"] = chat_kwargs
    meta.update(extra or {})
    meta.update({"prompts": [], "chats": []})
    texts = texts_for(tokenizer, chats, chat_kwargs, meta)
    n = model.config.num_hidden_layers
    tensors = {}
    with torch.no_grad():
        for i, (text, ids, kind) in enumerate(texts):
            x = torch.tensor([ids])
            captured = {}
            hooks = [layer.register_forward_hook(
                lambda m, a, o, l=l: captured.__setitem__(l, o[0] if isinstance(o, tuple) else o))
                for l, layer in enumerate(model.model.layers)]
            out = model(x, output_hidden_states=True)
            for h in hooks:
                h.remove()
            tensors[f"p{i}.input_ids"] = x[0].to(torch.int64)
            # transformers' last hidden state is after the final norm; every block here is the raw residual
            # (for the earlier blocks the hook and hidden_states agree, checked).
            for l in range(n):
                tensors[f"p{i}.block.{l}"] = captured[l][0].contiguous()
                if l < n - 1:
                    assert torch.equal(captured[l][0], out.hidden_states[l + 1][0]), (family, i, l)
            tensors[f"p{i}.logits"] = out.logits[0].contiguous()
            gen = model.generate(x, max_new_tokens=10, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id)
            tensors[f"p{i}.greedy"] = gen[0, len(ids):].to(torch.int64).contiguous()
            meta["prompts"].append({"text": text, "kind": kind, "ids": ids})
    return tensors, meta


def save_reference(refdir, name, tensors, meta):
    os.makedirs(refdir, exist_ok=True)
    save_file(tensors, os.path.join(refdir, f"{name}.safetensors"))
    with open(os.path.join(refdir, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)


def check_tokenizer(snap, meta):
    """transformers' tokenizer and the raw tokenizer.json (what a Rust `tokenizers` reads) give the same ids."""
    raw = Tokenizer.from_file(os.path.join(snap, "tokenizer.json"))
    for p in meta["prompts"]:
        got = raw.encode(p["text"], add_special_tokens=(p["kind"] == "prompt")).ids
        assert got == p["ids"], (snap, p["text"], got, p["ids"])


def max_diff(a, b):
    return (a - b).abs().max().item()


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def variant(model_cls, config, state_dict, change, embed_scale=None):
    """The same weights under a changed config (what a loader that ignores a feature would compute)."""
    cfg = copy.deepcopy(config)
    change(cfg)
    m = model_cls(cfg).float().eval()
    m.load_state_dict(state_dict, strict=True)
    if embed_scale is not None:
        m.model.embed_tokens.embed_scale.fill_(embed_scale)
    return m


def compare_spellings(family, base_dir, chat_dir, keys):
    """Both config spellings load to the same model configuration."""
    b = AutoConfig.from_pretrained(base_dir)
    c = AutoConfig.from_pretrained(chat_dir)
    for k in keys:
        vb, vc = getattr(b, k, None), getattr(c, k, None)
        assert vb == vc, f"{family}: {k} differs between spellings: base {vb!r} vs chat {vc!r}"
    shown = {k: getattr(b, k, None) for k in keys}
    print(f"  [{family}] both spellings load identically: {json.dumps(shown, default=str)}")


def build(family, root, base, chat, rewrite_base, rewrite_chat, tok_json, tok_configs):
    for name, model, rewrite in (("base", base, rewrite_base), ("chat", chat, rewrite_chat)):
        out = os.path.join(root, name)
        write_snapshot(model, out, rewrite)
        write_tokenizer(out, tok_json, tok_configs[name])
    os.remove(tok_json)
    a = open(os.path.join(root, "base", "tokenizer.json"), "rb").read()
    assert a == open(os.path.join(root, "chat", "tokenizer.json"), "rb").read()


def references(family, root, model_cls, in_memory, stop_ids, pad_id, chat_kwargs=None, embed_scale=False,
               base_chats=True):
    """Reference outputs from the saved snapshots, checked against the in-memory models they were saved from."""
    refdir = os.path.join(root, "reference")
    out = {}
    for name in ("base", "chat"):
        snap = os.path.join(root, name)
        tokenizer = AutoTokenizer.from_pretrained(snap)
        model = model_cls.from_pretrained(snap, dtype=torch.bfloat16, attn_implementation="eager")
        chats = base_chats or name == "chat"
        tensors, meta = reference(model, tokenizer, family, stop_ids[name], pad_id, chats=chats,
                                  chat_kwargs=chat_kwargs, embed_scale=embed_scale)
        check_tokenizer(snap, meta)
        # Sanity: the snapshot (its config spelling included) computes what the model it was saved from computes.
        # (A fresh f32 model with the saved bf16 weights: its RoPE buffers are f32, as from_pretrained's are.)
        src = in_memory[name]
        mem = variant(model_cls, src.config, {k: v.to(torch.bfloat16) for k, v in src.state_dict().items()},
                      lambda c: None, embed_scale=meta.get("embed_scale"))
        for i, p in enumerate(meta["prompts"]):
            d = max_diff(logits_of(mem, p["ids"]), tensors[f"p{i}.logits"])
            assert d <= 1e-5 * tensors[f"p{i}.logits"].abs().max().item(), (family, name, i, d)
        save_reference(refdir, name, tensors, meta)
        out[name] = (model, tokenizer, tensors, meta)
        print(f"  [{family}] {name}: {len(meta['prompts'])} texts, tokens {[len(p['ids']) for p in meta['prompts']]}, "
              f"greedy p0 {tensors['p0.greedy'].tolist()}, loaded logits == in-memory logits")
    return out


def longest(meta):
    return max(range(len(meta["prompts"])), key=lambda i: len(meta["prompts"][i]["ids"]))


# ---------------------------------------------------------------------------------------------------------------
# Llama 3 (+ LoRA)

LLAMA_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def llama():
    family, root = "llama", os.path.join(ASSETS, "tiny-llama")
    print(f"== {family}")
    rng, gen = random.Random(3001), torch.Generator().manual_seed(3001)
    os.makedirs(root, exist_ok=True)
    tok_json = os.path.join(root, "tokenizer.json.tmp")
    vocab = byte_level_tokenizer(tok_json, rng, LLAMA3_SPLIT, 440, nfc=False, specials=LLAMA3_SPECIALS,
                                 ignore_merges=True, bos="<|begin_of_text|>")
    bos, eot, eom, eos = (vocab[t] for t in ("<|begin_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"))
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=48, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, hidden_act="silu",
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_parameters=dict(LLAMA_ROPE),
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, initializer_range=0.08,
        bos_token_id=bos, eos_token_id=eos, attn_implementation="eager", dtype="bfloat16",
    )
    base = LlamaForCausalLM(config)
    randomize(base, gen, scale=2.0)
    chat = perturbed(base, gen)
    chat.config.eos_token_id = [eos, eom, eot]  # as meta-llama/Llama-3.2-1B-Instruct's config.json

    def old_spelling(cfg):  # meta-llama/Llama-3.2-1B-Instruct's config.json spelling
        rp = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rp.pop("rope_theta")
        cfg["rope_scaling"] = {k: rp[k] for k in ("factor", "high_freq_factor", "low_freq_factor",
                                                  "original_max_position_embeddings", "rope_type")}
        cfg["torch_dtype"] = cfg.pop("dtype", "bfloat16")
        return cfg

    common = {"bos_token": "<|begin_of_text|>", "clean_up_tokenization_spaces": True,
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    tok_configs = {
        "base": dict(common, eos_token="<|end_of_text|>"),  # no chat_template: meta-llama/Llama-3.2-1B has none
        "chat": dict(common, eos_token="<|eot_id|>", chat_template=LLAMA32_CHAT_TEMPLATE),
    }
    build(family, root, base, chat, lambda c: c, old_spelling, tok_json, tok_configs)
    compare_spellings(family, os.path.join(root, "base"), os.path.join(root, "chat"),
                      ["rope_parameters", "head_dim", "num_key_value_heads", "tie_word_embeddings", "hidden_act",
                       "max_position_embeddings", "vocab_size", "dtype"])

    chat_kwargs = {"date_string": "26 Jul 2024"}
    refs = references(family, root, LlamaForCausalLM, {"base": base, "chat": chat},
                      {"base": [eos, eot], "chat": [eos, eom, eot]}, eos, chat_kwargs=chat_kwargs,
                      base_chats=False)

    # The llama3 RoPE bands at these sizes.
    cfg = refs["base"][0].config
    inv_llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    base_inv = 1.0 / (LLAMA_ROPE["rope_theta"] ** (torch.arange(0, 24, 2, dtype=torch.int64).float() / 24))
    wavelen = 2 * math.pi / base_inv
    hi = LLAMA_ROPE["original_max_position_embeddings"] / LLAMA_ROPE["high_freq_factor"]
    lo = LLAMA_ROPE["original_max_position_embeddings"] / LLAMA_ROPE["low_freq_factor"]
    bands = ["untouched" if w < hi else "divided" if w > lo else "smoothed" for w in wavelen.tolist()]
    for b in ("untouched", "smoothed", "divided"):
        assert b in bands, bands
    print(f"  [llama] llama3 rope (wavelengths <{hi:g} untouched, >{lo:g} divided by 8): " + ", ".join(
        f"{w:.1f}:{b}(x{r:.3f})" for w, b, r in zip(wavelen.tolist(), bands, (inv_llama3 / base_inv).tolist())))

    model, tokenizer, tensors, meta = refs["chat"]
    sd = model.state_dict()
    i = longest(meta)
    ids, want = meta["prompts"][i]["ids"], tensors[f"p{i}.logits"]
    m = variant(LlamaForCausalLM, model.config, sd, lambda c: c.rope_parameters.update(rope_type="default"))
    print(f"  [llama] chat p{i} ({len(ids)} tokens) max|Δlogits| without llama3 scaling: "
          f"{max_diff(logits_of(m, ids), want):.3f} (max|logit| {want.abs().max():.2f})")
    lora(root, eos, eot)


def lora(root, eos, eot):
    """Two PEFT adapters on the llama base and references from the merged f32 models."""
    from peft import LoraConfig, PeftModel, get_peft_model

    specs = [
        ("lora", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
                      use_rslora=False), 4001),
        ("lora-rs", dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj"], use_rslora=True), 4002),
    ]
    base_dir = os.path.join(root, "base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    for name, kw, seed in specs:
        gen = torch.Generator().manual_seed(seed)
        out = os.path.join(root, name)
        if os.path.exists(out):
            shutil.rmtree(out)
        model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16, attn_implementation="eager").float()
        cfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kw)
        peft_model = get_peft_model(model, cfg)
        scale = kw["lora_alpha"] / (math.sqrt(kw["r"]) if kw["use_rslora"] else kw["r"])
        ratios = []
        with torch.no_grad():
            for mod_name, mod in peft_model.named_modules():
                if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
                    continue
                w = mod.base_layer.weight
                a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                assert abs(mod.scaling["default"] - scale) < 1e-12, (mod.scaling, scale)
                # PEFT initialises lora_B to zero; random A and B with the delta ~20% of the weight's scale.
                sa = 1.0 / math.sqrt(a.shape[1])
                sb = 0.2 * w.std().item() / (scale * math.sqrt(kw["r"]) * sa)
                a.copy_(torch.randn(a.shape, generator=gen) * sa)
                b.copy_(torch.randn(b.shape, generator=gen) * sb)
                ratios.append((b @ a * scale).norm().item() / w.norm().item())
        peft_model.save_pretrained(out)
        acfg_path = os.path.join(out, "adapter_config.json")
        acfg = json.load(open(acfg_path))
        acfg["base_model_name_or_path"] = "assets/tiny-llama/base"  # not this machine's absolute path
        acfg["target_modules"] = sorted(acfg["target_modules"])  # PEFT writes a set: hash-seed order
        with open(acfg_path, "w") as f:
            json.dump(acfg, f, indent=2, sort_keys=True)
        readme = os.path.join(out, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
        if name == "lora":
            # Trainers (TRL's SFTTrainer) save the tokenizer beside the adapter, with the chat
            # template the base lacks: the plain adapter carries the chat snapshot's tokenizer_config.json.
            shutil.copy(os.path.join(root, "chat", "tokenizer_config.json"), os.path.join(out, "tokenizer_config.json"))

        # Reference: the base in bf16, cast to f32 first, then the adapter merged in f32.
        merged = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16, attn_implementation="eager").float()
        merged = PeftModel.from_pretrained(merged, out).merge_and_unload()
        rule = "lora_alpha/sqrt(r)" if kw["use_rslora"] else "lora_alpha/r"
        tensors, meta = reference(merged, tokenizer, "llama", [eos, eot], eos, chats=False, extra={
            "adapter": name, "base": "base", "r": kw["r"], "lora_alpha": kw["lora_alpha"],
            "use_rslora": kw["use_rslora"], "target_modules": kw["target_modules"], "scale": scale,
            "scale_rule": rule,
            "note": "the llama base has no chat template, so this reference has kind 'prompt' entries only; "
                    "computed from the base loaded in bf16, cast to f32, with the adapter merged in f32",
        })
        save_reference(os.path.join(root, "reference"), name, tensors, meta)
        base_ref = json.load(open(os.path.join(root, "reference", "base.json")))
        assert [p["ids"] for p in base_ref["prompts"]] == [p["ids"] for p in meta["prompts"]]
        from safetensors.torch import load_file
        base_t = load_file(os.path.join(root, "reference", "base.safetensors"))
        print(f"  [llama] {name}: r={kw['r']} alpha={kw['lora_alpha']} scale={scale:.4f} ({rule}), "
              f"targets {kw['target_modules']}, |ΔW|/|W| {min(ratios):.2f}..{max(ratios):.2f}, "
              f"max|Δlogits| vs base p0 {max_diff(tensors['p0.logits'], base_t['p0.logits']):.3f}")


# ---------------------------------------------------------------------------------------------------------------
# Qwen 2.5 and Qwen 3

def qwen_tok_configs(template):
    common = {"add_bos_token": False, "add_prefix_space": False, "bos_token": None,
              "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 131072,
              "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
              "unk_token": None, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
              "chat_template": template}
    return {"base": dict(common, eos_token="<|endoftext|>"), "chat": dict(common, eos_token="<|im_end|>")}


def padded(n, to=32):
    return (n + to - 1) // to * to


def quiet_padding_rows(model, n_tokens):
    """The embedding (and lm_head) rows past the tokenizer small but non-zero, as untrained rows are in real
    checkpoints, so greedy decoding does not pick an id that has no token."""
    with torch.no_grad():
        model.model.embed_tokens.weight[n_tokens:] *= 0.02
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            model.lm_head.weight[n_tokens:] *= 0.02


def qwen2():
    family, root = "qwen2", os.path.join(ASSETS, "tiny-qwen2")
    print(f"== {family}")
    rng, gen = random.Random(3002), torch.Generator().manual_seed(3002)
    os.makedirs(root, exist_ok=True)
    tok_json = os.path.join(root, "tokenizer.json.tmp")
    vocab = byte_level_tokenizer(tok_json, rng, QWEN_SPLIT, 430, nfc=True, specials=QWEN_SPECIALS)
    eot, im_end = vocab["<|endoftext|>"], vocab["<|im_end|>"]
    config = Qwen2Config(
        vocab_size=padded(len(vocab)), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False, sliding_window=4, max_window_layers=1, tie_word_embeddings=True,
        initializer_range=0.08, bos_token_id=eot, eos_token_id=eot, attn_implementation="eager", dtype="bfloat16",
    )
    base = Qwen2ForCausalLM(config)
    randomize(base, gen, scale=2.0)
    chat = perturbed(base, gen)
    chat.config.eos_token_id = im_end
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied
    for m in (base, chat):
        quiet_padding_rows(m, len(vocab))

    def new_spelling(cfg):  # transformers writes sliding_window null when use_sliding_window is false
        cfg["sliding_window"] = 4
        return cfg

    def old_spelling(cfg):  # Qwen/Qwen2.5-0.5B-Instruct's config.json spelling
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg.pop("layer_types", None)
        cfg["sliding_window"] = 4
        cfg["torch_dtype"] = cfg.pop("dtype", "bfloat16")
        return cfg

    build(family, root, base, chat, new_spelling, old_spelling, tok_json, qwen_tok_configs(QWEN25_CHAT_TEMPLATE))
    for name in ("base", "chat"):
        names = json.load(open(os.path.join(root, name, "model.safetensors.index.json")))["weight_map"]
        assert "lm_head.weight" not in names and "model.layers.0.self_attn.q_proj.bias" in names
        assert "model.layers.0.self_attn.o_proj.bias" not in names
    compare_spellings(family, os.path.join(root, "base"), os.path.join(root, "chat"),
                      ["rope_parameters", "layer_types", "sliding_window", "use_sliding_window", "max_window_layers",
                       "tie_word_embeddings", "num_key_value_heads", "vocab_size", "dtype"])
    refs = references(family, root, Qwen2ForCausalLM, {"base": base, "chat": chat},
                      {"base": [eot, im_end], "chat": [im_end, eot]}, eot)

    model, tokenizer, tensors, meta = refs["chat"]
    sd = model.state_dict()
    i = longest(meta)
    ids, want = meta["prompts"][i]["ids"], tensors[f"p{i}.logits"]
    m = variant(Qwen2ForCausalLM, model.config, sd, lambda c: (
        setattr(c, "sliding_window", 4), setattr(c, "layer_types", ["full_attention"] + ["sliding_attention"] * 2)))
    print(f"  [qwen2] chat p{i} ({len(ids)} tokens) max|Δlogits| if use_sliding_window were ignored (window 4 on "
          f"layers >= max_window_layers 1): {max_diff(logits_of(m, ids), want):.3f} "
          f"(max|logit| {want.abs().max():.2f})")
    sd0 = {k: (torch.zeros_like(v) if k.endswith("bias") else v) for k, v in sd.items()}
    m = variant(Qwen2ForCausalLM, model.config, sd0, lambda c: None)
    print(f"  [qwen2] ... without the q/k/v biases: {max_diff(logits_of(m, ids), want):.3f}")
    greedy = [t for n, t in tensors.items() if n.endswith(".greedy")]
    beyond = sorted({v for g in greedy for v in g.tolist() if v >= len(vocab)})
    print(f"  [qwen2] vocab: tokenizer {len(vocab)}, config {config.vocab_size}; "
          f"greedy ids past the tokenizer: {beyond}")


def qwen3():
    family, root = "qwen3", os.path.join(ASSETS, "tiny-qwen3")
    print(f"== {family}")
    rng, gen = random.Random(3003), torch.Generator().manual_seed(3003)
    os.makedirs(root, exist_ok=True)
    tok_json = os.path.join(root, "tokenizer.json.tmp")
    vocab = byte_level_tokenizer(tok_json, rng, QWEN_SPLIT, 430, nfc=True, specials=QWEN_SPECIALS,
                                 extra_added=QWEN3_EXTRA)
    eot, im_end = vocab["<|endoftext|>"], vocab["<|im_end|>"]
    config = Qwen3Config(
        vocab_size=padded(len(vocab)), hidden_size=48, intermediate_size=112, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=20, hidden_act="silu", max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=4,
        tie_word_embeddings=False, initializer_range=0.08, bos_token_id=eot, eos_token_id=eot,
        attn_implementation="eager", dtype="bfloat16",
    )
    base = Qwen3ForCausalLM(config)
    randomize(base, gen, scale=2.0)
    chat = perturbed(base, gen)
    chat.config.eos_token_id = im_end
    for m in (base, chat):
        quiet_padding_rows(m, len(vocab))

    def old_spelling(cfg):  # Qwen/Qwen3-*'s config.json spelling
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg["rope_scaling"] = None
        cfg.pop("layer_types", None)
        cfg["torch_dtype"] = cfg.pop("dtype", "bfloat16")
        return cfg

    build(family, root, base, chat, lambda c: c, old_spelling, tok_json, qwen_tok_configs(QWEN3_CHAT_TEMPLATE))
    for name in ("base", "chat"):
        names = json.load(open(os.path.join(root, name, "model.safetensors.index.json")))["weight_map"]
        assert "lm_head.weight" in names and "model.layers.0.self_attn.q_norm.weight" in names
    compare_spellings(family, os.path.join(root, "base"), os.path.join(root, "chat"),
                      ["rope_parameters", "layer_types", "sliding_window", "head_dim", "attention_bias",
                       "tie_word_embeddings", "vocab_size", "dtype"])
    refs = references(family, root, Qwen3ForCausalLM, {"base": base, "chat": chat},
                      {"base": [eot, im_end], "chat": [im_end, eot]}, eot)

    model, tokenizer, tensors, meta = refs["chat"]
    sd = model.state_dict()
    i = longest(meta)
    ids, want = meta["prompts"][i]["ids"], tensors[f"p{i}.logits"]
    sd1 = {k: (torch.ones_like(v) if ("q_norm" in k or "k_norm" in k) else v) for k, v in sd.items()}
    m = variant(Qwen3ForCausalLM, model.config, sd1, lambda c: None)
    print(f"  [qwen3] chat p{i} ({len(ids)} tokens) max|Δlogits| with q_norm/k_norm weights 1: "
          f"{max_diff(logits_of(m, ids), want):.3f} (max|logit| {want.abs().max():.2f})")
    print(f"  [qwen3] <think> {vocab['<think>']}, </think> {vocab['</think>']} (added, not special)")


# ---------------------------------------------------------------------------------------------------------------
# Gemma 3

GEMMA3_PATTERN = 3
GEMMA3_LAYERS = ["sliding_attention" if (i + 1) % GEMMA3_PATTERN else "full_attention" for i in range(4)]


def gemma3():
    family, root = "gemma3", os.path.join(ASSETS, "tiny-gemma3")
    print(f"== {family}")
    rng, gen = random.Random(3004), torch.Generator().manual_seed(3004)
    os.makedirs(root, exist_ok=True)
    tok_json = os.path.join(root, "tokenizer.json.tmp")
    vocab = make_gemma_tokenizer(tok_json, rng)
    eos, eot = vocab["<eos>"], vocab["<end_of_turn>"]
    config = Gemma3TextConfig(
        vocab_size=len(vocab), hidden_size=56, intermediate_size=112, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=40,
        sliding_window=6, layer_types=list(GEMMA3_LAYERS), sliding_window_pattern=GEMMA3_PATTERN,
        final_logit_softcapping=15.0,
        attn_logit_softcapping=None, rms_norm_eps=1e-6, max_position_embeddings=256,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        initializer_range=0.08, pad_token_id=vocab["<pad>"], eos_token_id=eos, bos_token_id=vocab["<bos>"],
        attn_implementation="eager", dtype="bfloat16",
    )
    base = Gemma3ForCausalLM(config)
    randomize(base, gen, scale=2.0, gemma_norms=True)
    with torch.no_grad():
        # Smaller embeddings than make_fixtures.py's, so the blocks rather than the (tied) input embedding decide
        # the next token (else greedy decoding repeats the last token), and a final norm scale (1 + ~4) that puts
        # the logits where the soft-cap bites.
        base.model.embed_tokens.weight.mul_(0.2)
        base.model.norm.weight.add_(4.0)
    chat = perturbed(base, gen)
    chat.config.eos_token_id = [eos, eot]  # as google/gemma-3-1b-it's config.json

    def old_spelling(cfg):  # google/gemma-3-1b-it's config.json spelling (gemma-3-4b-it's rope_scaling)
        rp = cfg.pop("rope_parameters")
        full, local = dict(rp["full_attention"]), rp["sliding_attention"]
        cfg["rope_theta"] = full.pop("rope_theta")
        cfg["rope_local_base_freq"] = local["rope_theta"]
        cfg["rope_scaling"] = {"factor": full["factor"], "rope_type": full["rope_type"]}
        cfg.pop("layer_types")
        cfg.pop("_sliding_window_pattern", None)  # transformers 5 writes its private copy; the hub spelling has none
        cfg["sliding_window_pattern"] = GEMMA3_PATTERN
        cfg["torch_dtype"] = cfg.pop("dtype", "bfloat16")
        return cfg

    tok_common = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
                  "pad_token": "<pad>", "unk_token": "<unk>",
                  "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
                  "chat_template": GEMMA3_CHAT_TEMPLATE, "model_max_length": 256,
                  "tokenizer_class": "GemmaTokenizer"}
    build(family, root, base, chat, lambda c: c, old_spelling, tok_json, {"base": tok_common, "chat": tok_common})
    for name in ("base", "chat"):
        names = json.load(open(os.path.join(root, name, "model.safetensors.index.json")))["weight_map"]
        assert "lm_head.weight" not in names and "model.layers.0.self_attn.q_norm.weight" in names
    compare_spellings(family, os.path.join(root, "base"), os.path.join(root, "chat"),
                      ["layer_types", "rope_parameters", "sliding_window", "query_pre_attn_scalar", "head_dim",
                       "final_logit_softcapping", "attn_logit_softcapping", "hidden_activation", "vocab_size",
                       "dtype"])
    refs = references(family, root, Gemma3ForCausalLM, {"base": base, "chat": chat},
                      {"base": [eos, eot], "chat": [eos, eot]}, vocab["<pad>"], embed_scale=True)

    model, tokenizer, tensors, meta = refs["chat"]
    sd = model.state_dict()
    es = meta["embed_scale"]
    i = longest(meta)
    ids, want = meta["prompts"][i]["ids"], tensors[f"p{i}.logits"]

    def report(what, change):
        m = variant(Gemma3ForCausalLM, model.config, sd, change, embed_scale=es)
        print(f"  [gemma3] chat p{i} ({len(ids)} tokens) max|Δlogits| {what}: "
              f"{max_diff(logits_of(m, ids), want):.3f} (max|logit| {want.abs().max():.2f})")

    print(f"  [gemma3] layer_types {model.config.layer_types}, embed_scale {es} (sqrt(56) = {math.sqrt(56):.6f})")
    report("without the sliding window", lambda c: setattr(c, "sliding_window", 4096))
    report("with simply alternating layers", lambda c: setattr(
        c, "layer_types", ["sliding_attention", "full_attention"] * 2))
    report("without linear rope scaling on global layers", lambda c: c.rope_parameters.update(
        full_attention={"rope_type": "default", "rope_theta": 1000000.0}))
    report("with the global rope_theta on sliding layers", lambda c: c.rope_parameters.update(
        sliding_attention={"rope_type": "default", "rope_theta": 1000000.0}))
    report("without the final soft-cap", lambda c: setattr(c, "final_logit_softcapping", None))
    report("with query_pre_attn_scalar = head_dim", lambda c: setattr(c, "query_pre_attn_scalar", 24))
    m = variant(Gemma3ForCausalLM, model.config, sd, lambda c: None, embed_scale=math.sqrt(56))
    print(f"  [gemma3] ... with the unrounded embed_scale: {max_diff(logits_of(m, ids), want):.4f}")


# ---------------------------------------------------------------------------------------------------------------
# Variants: one snapshot each, with config options the fixtures above leave off (what a config-driven loader
# must also get right on configs it has never seen). Tokenizers are the families' chat tokenizers, copied.

VARIANTS = os.path.join(ASSETS, "tiny-variants")


def family_vocab(family):
    path = os.path.join(ASSETS, f"tiny-{family}", "chat", "tokenizer.json")
    return Tokenizer.from_file(path).get_vocab(with_added_tokens=True)


def write_variant(name, family, model, rewrite, dtype=torch.bfloat16, sharded=True):
    out = os.path.join(VARIANTS, name)
    write_snapshot(model, out, rewrite, dtype=dtype, sharded=sharded)
    src = os.path.join(ASSETS, f"tiny-{family}", "chat")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, f), os.path.join(out, f))
    return out


def tensor_names(snap):
    index = os.path.join(snap, "model.safetensors.index.json")
    if os.path.exists(index):
        return set(json.load(open(index))["weight_map"])
    from safetensors import safe_open
    with safe_open(os.path.join(snap, "model.safetensors"), "pt") as f:
        return set(f.keys())


def variant_reference(name, family, model_cls, src, stop_ids, pad_id, config_keys, dtype=torch.bfloat16,
                      chat_kwargs=None, embed_scale=False, extra=None):
    """The reference from the saved snapshot, checked against the in-memory model it was saved from (its config
    as transformers reads it back, and its logits on every text)."""
    snap = os.path.join(VARIANTS, name)
    loaded = AutoConfig.from_pretrained(snap)
    for k in config_keys:
        got, want = (str(getattr(c, k, None)).removeprefix("torch.") if k == "dtype" else getattr(c, k, None)
                     for c in (loaded, src.config))
        assert got == want, f"{name}: {k} reads back as {got!r}, the in-memory model has {want!r}"
    tokenizer = AutoTokenizer.from_pretrained(snap)
    model = model_cls.from_pretrained(snap, dtype=dtype, attn_implementation="eager")
    assert next(model.parameters()).dtype == dtype
    tensors, meta = reference(model, tokenizer, family, stop_ids, pad_id, chat_kwargs=chat_kwargs,
                              embed_scale=embed_scale, extra=dict({"variant": name}, **(extra or {})))
    check_tokenizer(snap, meta)
    mem = variant(model_cls, src.config, {k: v.to(dtype) for k, v in src.state_dict().items()}, lambda c: None,
                  embed_scale=meta.get("embed_scale"))
    for i, p in enumerate(meta["prompts"]):
        d = max_diff(logits_of(mem, p["ids"]), tensors[f"p{i}.logits"])
        assert d <= 1e-5 * tensors[f"p{i}.logits"].abs().max().item(), (name, i, d)
    save_reference(os.path.join(VARIANTS, "reference"), name, tensors, meta)
    shown = {k: getattr(loaded, k, None) for k in config_keys}
    print(f"  [{name}] reads back as {json.dumps(shown, default=str)}")
    print(f"  [{name}] {len(meta['prompts'])} texts, tokens {[len(p['ids']) for p in meta['prompts']]}, "
          f"greedy p0 {tensors['p0.greedy'].tolist()}, loaded logits == in-memory logits")
    return model, tensors, meta


def effects(name, model_cls, model, tensors, meta, embed_scale=None):
    """report(what, change, state_dict=None): max|Δlogits| on the longest text under a changed config/weights."""
    sd = model.state_dict()
    i = longest(meta)
    ids, want = meta["prompts"][i]["ids"], tensors[f"p{i}.logits"]

    def report(what, change=lambda c: None, state_dict=None):
        m = variant(model_cls, model.config, state_dict if state_dict is not None else sd, change,
                    embed_scale=embed_scale)
        got = logits_of(m, ids)
        print(f"  [{name}] p{i} ({len(ids)} tokens) max|Δlogits| {what}: {max_diff(got, want):.3f} "
              f"(max|logit| {want.abs().max():.2f})")
        return got

    return sd, report


def zeroed(sd, pred):
    return {k: (torch.zeros_like(v) if pred(k) else v) for k, v in sd.items()}


def llama_bias():
    """Llama with attention (q/k/v/o) and MLP biases, tied embeddings, head_dim derived (hidden/heads: no head_dim
    key), plain RoPE, a single float16 model.safetensors."""
    name, family = "llama-bias", "llama"
    print(f"== {name}")
    gen = torch.Generator().manual_seed(5001)
    vocab = family_vocab(family)
    bos, eot, eom, eos = (vocab[t] for t in ("<|begin_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"))
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True, initializer_range=0.08,
        bos_token_id=bos, eos_token_id=[eos, eom, eot], attn_implementation="eager", dtype="float16",
    )
    assert config.head_dim == 8
    model = LlamaForCausalLM(config)
    randomize(model, gen, scale=2.0)
    assert model.lm_head.weight is model.model.embed_tokens.weight

    def old_spelling(cfg):  # Llama-2-style: rope_theta, no rope_scaling, no head_dim, torch_dtype float16
        assert cfg.pop("head_dim") == 8
        rp = cfg.pop("rope_parameters")
        assert rp["rope_type"] == "default", rp
        cfg["rope_theta"] = rp["rope_theta"]
        cfg["torch_dtype"] = cfg.pop("dtype")
        assert cfg["torch_dtype"] == "float16", cfg["torch_dtype"]
        assert "rope_scaling" not in cfg and "layer_types" not in cfg
        return cfg

    snap = write_variant(name, family, model, old_spelling, dtype=torch.float16, sharded=False)
    names = tensor_names(snap)
    assert "lm_head.weight" not in names
    for t in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"model.layers.0.self_attn.{t}.bias" in names, t
    for t in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.0.mlp.{t}.bias" in names, t
    model, tensors, meta = variant_reference(
        name, family, LlamaForCausalLM, model, [eos, eom, eot], eos,
        ["head_dim", "rope_parameters", "attention_bias", "mlp_bias", "tie_word_embeddings", "rms_norm_eps",
         "num_key_value_heads", "dtype"], dtype=torch.float16, chat_kwargs={"date_string": "26 Jul 2024"})
    sd, report = effects(name, LlamaForCausalLM, model, tensors, meta)
    report("without the attention biases (q/k/v/o)",
           state_dict=zeroed(sd, lambda k: "self_attn" in k and "bias" in k))
    report("without the o_proj bias only", state_dict=zeroed(sd, lambda k: "o_proj.bias" in k))
    report("without the MLP biases", state_dict=zeroed(sd, lambda k: "mlp" in k and "bias" in k))
    report("with rope_theta 500000", lambda c: c.rope_parameters.update(rope_theta=500000.0))
    report("with rms_norm_eps 1e-5", lambda c: setattr(c, "rms_norm_eps", 1e-5))
    report("with the weights rounded to bf16 instead of f16",
           state_dict={k: v.to(torch.bfloat16).float() for k, v in sd.items()})


def qwen2_window():
    """Qwen 2 with use_sliding_window true: window 4 on layers >= max_window_layers 1, layer 0 full; layer_types
    left to transformers to derive; untied lm_head."""
    name, family = "qwen2-window", "qwen2"
    print(f"== {name}")
    gen = torch.Generator().manual_seed(5002)
    vocab = family_vocab(family)
    eot, im_end = vocab["<|endoftext|>"], vocab["<|im_end|>"]
    config = Qwen2Config(
        vocab_size=padded(len(vocab)), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=True, sliding_window=4, max_window_layers=1, tie_word_embeddings=False,
        initializer_range=0.08, bos_token_id=eot, eos_token_id=im_end, attn_implementation="eager",
        dtype="bfloat16",
    )
    assert config.sliding_window == 4
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"], config.layer_types
    model = Qwen2ForCausalLM(config)
    randomize(model, gen, scale=2.0)
    quiet_padding_rows(model, len(vocab))
    assert model.lm_head.weight is not model.model.embed_tokens.weight

    def old_spelling(cfg):  # Qwen/Qwen2.5-*'s spelling, with no layer_types: the reader derives them
        assert cfg.pop("layer_types") == ["full_attention", "sliding_attention", "sliding_attention"]
        assert cfg["use_sliding_window"] is True and cfg["sliding_window"] == 4 and cfg["max_window_layers"] == 1
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg["torch_dtype"] = cfg.pop("dtype")
        return cfg

    snap = write_variant(name, family, model, old_spelling)
    names = tensor_names(snap)
    assert "lm_head.weight" in names and "model.layers.0.self_attn.q_proj.bias" in names
    model, tensors, meta = variant_reference(
        name, family, Qwen2ForCausalLM, model, [im_end, eot], eot,
        ["layer_types", "sliding_window", "use_sliding_window", "max_window_layers", "rope_parameters",
         "tie_word_embeddings", "vocab_size", "dtype"])
    assert min(len(p["ids"]) for p in meta["prompts"] if p["kind"] == "chat") > 4
    sd, report = effects(name, Qwen2ForCausalLM, model, tensors, meta)
    report("with use_sliding_window false (every layer full)", lambda c: (
        setattr(c, "use_sliding_window", False), setattr(c, "sliding_window", None),
        setattr(c, "layer_types", ["full_attention"] * 3)))
    report("with the window on layer 0 too (max_window_layers ignored)",
           lambda c: setattr(c, "layer_types", ["sliding_attention"] * 3))
    report("with window 3", lambda c: setattr(c, "sliding_window", 3))
    report("with window 5", lambda c: setattr(c, "sliding_window", 5))
    greedy = [t for n, t in tensors.items() if n.endswith(".greedy")]
    assert all(v < len(vocab) for g in greedy for v in g.tolist())


def gemma3_capped():
    """Gemma 3 with 7 layers and no layer_types/sliding_window_pattern (the default pattern 6: layer 5 full),
    attention and final soft-caps that bite, no rope_scaling and no rope_local_base_freq (default 10000)."""
    name, family = "gemma3-capped", "gemma3"
    print(f"== {name}")
    gen = torch.Generator().manual_seed(5003)
    vocab = family_vocab(family)
    eos, eot, pad = vocab["<eos>"], vocab["<end_of_turn>"], vocab["<pad>"]
    config = Gemma3TextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=5, attn_logit_softcapping=5.0, final_logit_softcapping=20.0, rms_norm_eps=1e-6,
        max_position_embeddings=256,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        initializer_range=0.08, pad_token_id=pad, eos_token_id=[eos, eot], bos_token_id=vocab["<bos>"],
        attn_implementation="eager", dtype="bfloat16",
    )
    layers = ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert config.layer_types == layers, config.layer_types
    model = Gemma3ForCausalLM(config)
    randomize(model, gen, scale=2.0, gemma_norms=True)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.2)
        model.model.norm.weight.add_(GEMMA3_CAPPED_FINAL_NORM)
        for layer in model.model.layers:  # larger q/k norm scales: attention scores past the cap
            layer.self_attn.q_norm.weight.add_(GEMMA3_CAPPED_QK_NORM)
            layer.self_attn.k_norm.weight.add_(GEMMA3_CAPPED_QK_NORM)

    def old_spelling(cfg):  # google/gemma-3-1b-it's spelling less rope_local_base_freq, rope_scaling, the pattern
        rp = cfg.pop("rope_parameters")
        assert rp["sliding_attention"] == {"rope_type": "default", "rope_theta": 10000.0}, rp
        assert rp["full_attention"]["rope_type"] == "default", rp
        cfg["rope_theta"] = rp["full_attention"]["rope_theta"]
        assert cfg.pop("layer_types") == layers
        cfg.pop("_sliding_window_pattern", None)
        assert "sliding_window_pattern" not in cfg and "rope_scaling" not in cfg
        cfg["torch_dtype"] = cfg.pop("dtype")
        return cfg

    snap = write_variant(name, family, model, old_spelling)
    names = tensor_names(snap)
    assert "lm_head.weight" not in names
    model, tensors, meta = variant_reference(
        name, family, Gemma3ForCausalLM, model, [eos, eot], pad,
        ["layer_types", "sliding_window", "rope_parameters", "attn_logit_softcapping", "final_logit_softcapping",
         "query_pre_attn_scalar", "head_dim", "num_key_value_heads", "vocab_size", "dtype"], embed_scale=True,
        extra={"note": "transformers' Gemma 3 attention ignores attn_logit_softcapping (Gemma3Attention passes no "
                       "softcap to its attention function; Gemma 2's does): this reference has no attention cap, "
                       "only the final one"})
    es = meta["embed_scale"]
    sd, report = effects(name, Gemma3ForCausalLM, model, tensors, meta, embed_scale=es)
    i = longest(meta)
    ids = meta["prompts"][i]["ids"]

    # transformers' Gemma 3 attention passes no softcap to its attention function (Gemma 2's does): the config's
    # attn_logit_softcapping is read and ignored, so the reference has no attention cap. What applying it (Gemma
    # 2's rule) would change, and how far the scores go past it (eager attention, visible positions only):
    from transformers.models.gemma3 import modeling_gemma3 as mg
    orig, seen = mg.eager_attention_forward, []

    def spy(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
        assert softcap is None
        cap = module.attn_logit_softcapping
        s = torch.matmul(query, mg.repeat_kv(key, module.num_key_value_groups).transpose(2, 3)) * scaling
        visible = (attention_mask[:, :, :, : key.shape[-2]] == 0).expand_as(s)
        seen.append(((s.abs() * visible).amax().item(),
                     ((s.abs() > cap) & visible).sum().item() / visible.sum().item()))
        return orig(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=cap, **kw)

    want = tensors[f"p{i}.logits"]
    mg.eager_attention_forward = spy
    try:
        capped = logits_of(model, ids)
    finally:
        mg.eager_attention_forward = orig
    assert torch.equal(logits_of(model, ids), want)
    print(f"  [{name}] transformers ignores attn_logit_softcapping for Gemma 3; were it applied "
          f"({config.attn_logit_softcapping}), max|Δlogits| {max_diff(capped, want):.3f}; the scores before it: "
          f"max|s| per layer {[round(m, 1) for m, _ in seen]}, share of visible scores past it "
          f"{[round(f, 2) for _, f in seen]}")
    report("with attn_logit_softcapping None", lambda c: setattr(c, "attn_logit_softcapping", None))
    uncapped = report("without the final soft-cap", lambda c: setattr(c, "final_logit_softcapping", None))
    print(f"  [{name}] ... max|logit| before the final cap {uncapped.abs().max():.2f}, after it "
          f"{tensors[f'p{i}.logits'].abs().max():.2f} (cap {config.final_logit_softcapping})")
    report("with every layer sliding (no default pattern 6)",
           lambda c: setattr(c, "layer_types", ["sliding_attention"] * 7))
    report("with simply alternating layers", lambda c: setattr(
        c, "layer_types", ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(7)]))
    report("without the sliding window", lambda c: setattr(c, "sliding_window", 4096))
    report("with rope_theta 1e6 on sliding layers (no local default)", lambda c: c.rope_parameters.update(
        sliding_attention={"rope_type": "default", "rope_theta": 1000000.0}))


GEMMA3_CAPPED_FINAL_NORM = 8.0
GEMMA3_CAPPED_QK_NORM = 1.0


def qwen3_bias():
    """Qwen 3 with q/k/v/o biases, tied embeddings, and no head_dim key: Qwen 3's default 128, not hidden/heads 16."""
    name, family = "qwen3-bias", "qwen3"
    print(f"== {name}")
    gen = torch.Generator().manual_seed(5004)
    vocab = family_vocab(family)
    eot, im_end = vocab["<|endoftext|>"], vocab["<|im_end|>"]
    config = Qwen3Config(
        vocab_size=padded(len(vocab)), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, hidden_act="silu", max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        attention_bias=True, use_sliding_window=False, max_window_layers=2, tie_word_embeddings=True,
        initializer_range=0.08, bos_token_id=eot, eos_token_id=im_end, attn_implementation="eager",
        dtype="bfloat16",
    )
    assert config.head_dim == 128 != config.hidden_size // config.num_attention_heads
    model = Qwen3ForCausalLM(config)
    randomize(model, gen, scale=2.0)
    quiet_padding_rows(model, len(vocab))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tuple(model.model.layers[0].self_attn.q_proj.weight.shape) == (512, 64)

    def new_spelling(cfg):  # transformers 5's own config.json, less head_dim
        assert cfg.pop("head_dim") == 128
        return cfg

    snap = write_variant(name, family, model, new_spelling)
    names = tensor_names(snap)
    assert "lm_head.weight" not in names
    for t in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"model.layers.0.self_attn.{t}.bias" in names, t
    model, tensors, meta = variant_reference(
        name, family, Qwen3ForCausalLM, model, [im_end, eot], eot,
        ["head_dim", "attention_bias", "tie_word_embeddings", "layer_types", "sliding_window", "rope_parameters",
         "num_key_value_heads", "vocab_size", "dtype"])
    sd, report = effects(name, Qwen3ForCausalLM, model, tensors, meta)
    report("without the attention biases (q/k/v/o)", state_dict=zeroed(sd, lambda k: "bias" in k))
    report("without the o_proj bias only (Qwen 2's rule)", state_dict=zeroed(sd, lambda k: "o_proj.bias" in k))
    report("without the q/k biases only", state_dict=zeroed(sd, lambda k: "q_proj.bias" in k or "k_proj.bias" in k))
    greedy = [t for n, t in tensors.items() if n.endswith(".greedy")]
    assert all(v < len(vocab) for g in greedy for v in g.tolist())


def variants():
    llama_bias()
    qwen2_window()
    gemma3_capped()
    qwen3_bias()
    for name in ("llama-bias", "qwen2-window", "gemma3-capped", "qwen3-bias"):
        snap = os.path.join(VARIANTS, name)
        size = sum(os.path.getsize(os.path.join(snap, f)) for f in os.listdir(snap))
        ref = sum(os.path.getsize(os.path.join(VARIANTS, "reference", f"{name}.{e}"))
                  for e in ("json", "safetensors"))
        print(f"  [{name}] snapshot {size / 1024:.0f} KiB, reference {ref / 1024:.0f} KiB")


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    llama()
    qwen2()
    qwen3()
    gemma3()
    variants()
    print("wrote", ", ".join(os.path.normpath(os.path.join(ASSETS, f"tiny-{f}"))
                             for f in ("llama", "qwen2", "qwen3", "gemma3", "variants")))


if __name__ == "__main__":
    sys.exit(main())
