"""Reference chat-template renderings with transformers' apply_chat_template, for tests/templates.rs.

  make-models --out DIR     tiny random Llamas with tokenizers and the real chat templates in their
                            tokenizer_config.json: llama2 (Meta's Llama-2-chat template, SentencePiece-style
                            BPE), llama3 (Meta's Llama-3-Instruct template), llama32 (Llama-3.2-Instruct's,
                            with strftime_now and {% generation %} blocks), chatml (plain ChatML).
  render --model DIR --data JSON --out OUT.json [--shots K]
                            for each [question, answer] pair: the prompt ([user q] with the generation
                            prompt) and the conversation ([user q, assistant a]) as text and as ids
                            (apply_chat_template(tokenize=True)), and the prompt after the first K pairs
                            as earlier turns.
  score --model DIR --data JSON --out OUT.jsonl --eot TOKEN
                            answer NLL of each pair: ids = the conversation's ids cut after the first TOKEN
                            after the prompt, targets = every id after the prompt's ids.
"""
import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

SHARED = os.environ.get("UNLEARN_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared"))

# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json `chat_template`.
LLAMA2 = (r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
          r"{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          r"{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
          r"{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          r"{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

# meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json `chat_template`.
LLAMA3 = (r"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + "
          r"'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          r"{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# meta-llama/Llama-3.2-1B-Instruct's template with the {% generation %} markers transformers'
# assistant masks use (multi-line, whitespace control, strftime_now, tools checks, tojson).
LLAMA32 = r"""{{- bos_token }}
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
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
        {%- if message['role'] == 'assistant' %}
            {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
        {%- else %}
            {{- message['content'] | trim + '<|eot_id|>' }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Plain ChatML, as Qwen/OpenHermes-style tokenizer configs write it without a default system prompt.
CHATML = (r"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def training_texts():
    with open(os.path.join(SHARED, "data", "tofu", "forget10.json")) as f:
        return [r["prompt"] + "\n" + r["response"] for r in json.load(f)]


def byte_bpe(specials, bos):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_texts(), trainer)
    if bos:
        # Llama-3 adds BOS to plain text (what phi-qa relies on); chat templates write it themselves.
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def sentencepiece_bpe():
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(training_texts(), trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def save_model(out, tok, template, bos, eos, eos_ids, pad=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {"bos_token": bos, "eos_token": eos, "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048,
           "chat_template": template}
    if pad:
        cfg["pad_token"] = pad
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                       initializer_range=0.08, tie_word_embeddings=False, bos_token_id=tok.token_to_id(bos),
                       eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0])
    LlamaForCausalLM(conf).save_pretrained(out, safe_serialization=True)


def cmd_make_models(a):
    sp = sentencepiece_bpe()
    save_model(os.path.join(a.out, "llama2"), sp, LLAMA2, "<s>", "</s>", [sp.token_to_id("</s>")])
    l3 = byte_bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>")
    eos3 = [l3.token_to_id("<|end_of_text|>"), l3.token_to_id("<|eot_id|>")]
    save_model(os.path.join(a.out, "llama3"), l3, LLAMA3, "<|begin_of_text|>", "<|eot_id|>", eos3)
    save_model(os.path.join(a.out, "llama32"), l3, LLAMA32, "<|begin_of_text|>", "<|eot_id|>", eos3)
    cm = byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None)
    save_model(os.path.join(a.out, "chatml"), cm, CHATML, "<|im_start|>", "<|im_end|>", [cm.token_to_id("<|im_end|>")], pad="<|im_end|>")


def ids_of(enc):
    # transformers 5 returns a BatchEncoding by default.
    return list(enc["input_ids"]) if not isinstance(enc, list) else enc


def cmd_render(a):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    with open(a.data) as f:
        pairs = json.load(f)
    shots = [m for q, ans in pairs[: a.shots] for m in ({"role": "user", "content": q}, {"role": "assistant", "content": ans})]
    out = []
    for q, ans in pairs:
        user = [{"role": "user", "content": q}]
        chat = user + [{"role": "assistant", "content": ans}]
        out.append({
            "prompt_text": tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True),
            "prompt_ids": ids_of(tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True)),
            "full_text": tok.apply_chat_template(chat, tokenize=False),
            "full_ids": ids_of(tok.apply_chat_template(chat, tokenize=True)),
            "few_shot_text": tok.apply_chat_template(shots + user, tokenize=False, add_generation_prompt=True),
        })
    with open(a.out, "w") as f:
        json.dump(out, f)


def cmd_score(a):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    eot = tok.convert_tokens_to_ids(a.eot)
    with open(a.data) as f:
        recs = json.load(f)
    with open(a.out, "w") as f:
        for i, r in enumerate(recs):
            q, ans = r["question"], r["answer"]
            user = [{"role": "user", "content": q}]
            p = ids_of(tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True))
            full = ids_of(tok.apply_chat_template(user + [{"role": "assistant", "content": ans}], tokenize=True))
            assert full[: len(p)] == p
            ids = full[: full.index(eot, len(p)) + 1]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0][len(p) - 1:].double()
            f.write(json.dumps({"index": i, "tokens": len(lp), "nll": float(-lp.mean()), "ids": ids}) + "\n")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-models")
    m.add_argument("--out", required=True)
    r = sub.add_parser("render")
    r.add_argument("--model", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--shots", type=int, default=2)
    s = sub.add_parser("score")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--eot", required=True)
    a = ap.parse_args()
    {"make-models": cmd_make_models, "render": cmd_render, "score": cmd_score}[a.cmd](a)


if __name__ == "__main__":
    main()
