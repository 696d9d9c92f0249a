"""Independent reference computations with HF transformers / tokenizers, for the Rust tests.

Every subcommand reads and writes files, so the Rust side never depends on Python objects:

  make-model  --out DIR --config JSON [--seed N] [--tokenizer bytebpe|sentencepiece] [--dtype fp32|bf16] [--texts FILE]
              A random causal LM saved with save_pretrained (LlamaForCausalLM, or the family named by a
              "model_type" key in JSON: mistral, qwen2, qwen3, phi3), plus a tokenizer.json trained on TOFU
              text (or on the JSON array of strings in FILE, where the shared data is not at hand).
  logits      --model DIR --inputs IN.safetensors --out OUT.safetensors [--dtype fp32|bf16]
              HF logits for input_ids / attention_mask / (position_ids) in IN.
  tokenize    --model DIR --texts JSON --out OUT.json   token ids (tokenizer(text)) for each text.
  load-check  --model DIR                               loads with AutoModelForCausalLM and prints a summary.
  count-params (--config JSON | --model DIR)           parameter counts of a causal LM built on the meta
              device from its config (LlamaConfig unless JSON has "model_type"), or of DIR's safetensors:
              {"total", "matrices"} (matrices: *proj.weight, fused projections included; biases and norms not).
  score       --model DIR --data FILE --out OUT.jsonl [--max-len N] [--limit N] [--offset N]
              per-sample answer NLL, formatted exactly as unlearn's data pipeline documents, of records
              offset..offset+limit; a text record (a string or {"text"}) scores every token after the first of
              tokenizer(text) cut at max-len.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

SHARED = os.environ.get("UNLEARN_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared"))


def training_texts(path=None):
    if path:
        with open(path) as f:
            return [t for t in json.load(f) if isinstance(t, str)]
    with open(os.path.join(SHARED, "data", "tofu", "forget10.json")) as f:
        recs = json.load(f)
    texts = []
    for r in recs:
        texts.append("Question: " + r["prompt"] + "\nAnswer: " + r["response"])
    return texts


def make_tokenizer(kind, out_dir, vocab_size, texts=None):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "bytebpe":
        # Llama-3 / SmolLM2 style: byte-level BPE, no BOS added, EOS as a special token.
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(training_texts(texts), trainer)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
               "unk_token": "<|endoftext|>", "add_bos_token": False,
               "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048}
        ids = dict(bos=tok.token_to_id("<|im_start|>"), eos=tok.token_to_id("<|im_end|>"))
    else:
        # Llama-2 style: SentencePiece-like BPE with byte fallback, "▁" word marker, BOS prepended.
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
        tok.train_from_iterator(training_texts(texts), trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
               "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048}
        ids = dict(bos=tok.token_to_id("<s>"), eos=tok.token_to_id("</s>"))
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return tok.get_vocab_size(), ids


def config_for(model_type, **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **kw)


def model_for(cfg):
    """The family's ForCausalLM class called directly, as LlamaForCausalLM(cfg) always was."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(cfg)](cfg)


def cmd_make_model(a):
    os.makedirs(a.out, exist_ok=True)
    extra = json.loads(a.config)
    model_type = extra.pop("model_type", "llama")
    tok_vocab, ids = make_tokenizer(a.tokenizer, a.out, extra.pop("tokenizer_vocab", 320), a.texts)
    base = dict(vocab_size=max(tok_vocab, extra.get("vocab_size", 0)), hidden_size=64, intermediate_size=96,
                initializer_range=0.08,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                bos_token_id=ids["bos"], eos_token_id=ids["eos"])
    if model_type != "llama":
        base["pad_token_id"] = None  # Phi3Config's default (32000) is outside a tiny vocabulary
    base.update(extra)
    torch.manual_seed(a.seed)
    cfg = config_for(model_type, **base)
    model = model_for(cfg)
    # Random init uses unit norms and zero biases; perturb both so they matter in tests.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(a.out, safe_serialization=True)
    print(json.dumps({"vocab_size": cfg.vocab_size, "tokenizer_vocab": tok_vocab}))


def load(model_dir, dtype):
    from transformers import AutoModelForCausalLM

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).eval()


def cmd_logits(a):
    from safetensors.torch import load_file, save_file

    inp = load_file(a.inputs)
    model = load(a.model, a.dtype)
    kw = dict(input_ids=inp["input_ids"], attention_mask=inp.get("attention_mask"))
    if "position_ids" in inp:
        kw["position_ids"] = inp["position_ids"]
    with torch.no_grad():
        logits = model(**kw).logits.float()
    save_file({"logits": logits.contiguous()}, a.out)


def hf_tokenizer(model_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))


def cmd_tokenize(a):
    tok = hf_tokenizer(a.model)
    with open(a.texts) as f:
        texts = json.load(f)
    out = [tok(t)["input_ids"] for t in texts]
    with open(a.out, "w") as f:
        json.dump(out, f)


def cmd_load_check(a):
    model = load(a.model, "fp32")
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": n, "layers": model.config.num_hidden_layers}))


def read_records(path):
    with open(path) as f:
        text = f.read()
    try:
        v = json.loads(text)
        vals = v if isinstance(v, list) else [v]
    except json.JSONDecodeError:
        vals = []
        for line in text.splitlines():
            if line.strip():
                x = json.loads(line)
                vals.extend(x if isinstance(x, list) else [x])
    return vals


def cmd_score(a):
    """Answer-only NLL with the documented format: prompt 'Question: {q}\\nAnswer:' (with specials),
    answer ' {a}' (no specials) + EOS."""
    import numpy as np

    model = load(a.model, "fp32")
    tok = hf_tokenizer(a.model)
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    recs = read_records(a.data)
    end = len(recs) if a.limit is None else a.offset + a.limit
    out = []
    for i, r in list(enumerate(recs))[a.offset:end]:
        if isinstance(r, str) or "text" in r:
            ids = tok(r if isinstance(r, str) else r["text"], truncation=True, max_length=a.max_len)["input_ids"]
            n_context = 1
        else:
            q = r.get("question", r.get("prompt"))
            ans = r.get("answer", r.get("response"))
            p_ids = tok("Question: " + q + "\nAnswer:")["input_ids"]
            a_ids = tok(" " + ans, add_special_tokens=False)["input_ids"] + [eos]
            ids = (p_ids + a_ids)[: a.max_len]
            n_context = len(p_ids)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        lp = lp[n_context - 1:].double().numpy()
        k = int(len(lp) * 0.4)
        mink = float(-np.mean(np.sort(lp)[:k])) if k > 0 else None
        out.append({"index": i, "tokens": len(lp), "nll": float(-lp.mean()), "sum_nll": float(-lp.sum()),
                    "min_k_40": mink, "ids": ids})
    with open(a.out, "w") as f:
        for o in out:
            f.write(json.dumps(o) + "\n")


def cmd_generate(a):
    """Greedy generate() for each prompt separately (no padding)."""
    model = load(a.model, "fp32")
    with open(a.prompts) as f:
        prompts = json.load(f)
    eos = model.config.eos_token_id
    out = []
    for p in prompts:
        with torch.no_grad():
            g = model.generate(torch.tensor([p]), max_new_tokens=a.max_new_tokens, do_sample=False,
                               eos_token_id=eos, pad_token_id=eos)
        new = g[0, len(p):].tolist()
        eos_list = eos if isinstance(eos, list) else [eos]
        for i, t in enumerate(new):
            if t in eos_list:
                new = new[:i]
                break
        out.append(new)
    with open(a.out, "w") as f:
        json.dump(out, f)


def cmd_count_params(a):
    if a.model:
        from safetensors import safe_open

        counts = {}
        for f in sorted(os.listdir(a.model)):
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(a.model, f), "pt") as st:
                    for k in st.keys():
                        counts[k] = st.get_slice(k).get_shape()
        numel = {k: int(torch.tensor(v).prod().item()) if v else 1 for k, v in counts.items()}
    else:
        kw = json.loads(a.config)
        with torch.device("meta"):
            model = model_for(config_for(kw.pop("model_type", "llama"), **kw))
        numel = {n: p.numel() for n, p in model.named_parameters()}
    total = sum(numel.values())
    matrices = sum(v for k, v in numel.items() if k.endswith("proj.weight"))
    print(json.dumps({"total": total, "matrices": matrices}))


def cmd_count_flops(a):
    """FLOPs of one forward and one backward of a LlamaForCausalLM (from --config) on a batch of
    --batch x --seq tokens, counted by torch's FlopCounterMode, with only the block matrices
    trainable (model.trainable = "matrices"). Eager attention (FlopCounterMode has no formula
    for the CPU flash kernel): its batched products (bmm) are the full s x s ones, reported
    apart from the weight products (mm)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**json.loads(a.config))
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg)
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("proj.weight"))
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq))

    def split(counter):
        mm = attn = 0
        for op, flops in counter.get_flop_counts()["Global"].items():
            name = str(op)
            if "bmm" in name:
                attn += flops
            elif "mm" in name:
                mm += flops
        return mm, attn

    with FlopCounterMode(display=False) as fwd:
        logits = model(input_ids=ids).logits
    loss = logits.float().logsumexp(-1).mean()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    (fm, fs), (bm, bs) = split(fwd), split(bwd)
    print(json.dumps({"forward_mm": fm, "forward_attention_full": fs, "backward_mm": bm, "backward_attention_full": bs}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("--out", required=True)
    m.add_argument("--config", default="{}")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--tokenizer", default="bytebpe", choices=["bytebpe", "sentencepiece"])
    m.add_argument("--texts", default=None, help="JSON array of strings to train the tokenizer on (default: TOFU forget10)")
    m.set_defaults(f=cmd_make_model)
    lg = sub.add_parser("logits")
    lg.add_argument("--model", required=True)
    lg.add_argument("--inputs", required=True)
    lg.add_argument("--out", required=True)
    lg.add_argument("--dtype", default="fp32")
    lg.set_defaults(f=cmd_logits)
    tk = sub.add_parser("tokenize")
    tk.add_argument("--model", required=True)
    tk.add_argument("--texts", required=True)
    tk.add_argument("--out", required=True)
    tk.set_defaults(f=cmd_tokenize)
    lc = sub.add_parser("load-check")
    lc.add_argument("--model", required=True)
    lc.set_defaults(f=cmd_load_check)
    cp = sub.add_parser("count-params")
    cp.add_argument("--config", default=None)
    cp.add_argument("--model", default=None)
    cp.set_defaults(f=cmd_count_params)
    cf = sub.add_parser("count-flops")
    cf.add_argument("--config", required=True)
    cf.add_argument("--batch", type=int, default=2)
    cf.add_argument("--seq", type=int, default=64)
    cf.set_defaults(f=cmd_count_flops)
    sc = sub.add_parser("score")
    sc.add_argument("--model", required=True)
    sc.add_argument("--data", required=True)
    sc.add_argument("--out", required=True)
    sc.add_argument("--max-len", type=int, default=512)
    sc.add_argument("--limit", type=int, default=None)
    sc.add_argument("--offset", type=int, default=0)
    sc.set_defaults(f=cmd_score)
    ge = sub.add_parser("generate")
    ge.add_argument("--model", required=True)
    ge.add_argument("--prompts", required=True)
    ge.add_argument("--out", required=True)
    ge.add_argument("--max-new-tokens", type=int, default=20)
    ge.set_defaults(f=cmd_generate)
    a = p.parse_args()
    a.f(a)


if __name__ == "__main__":
    main()
