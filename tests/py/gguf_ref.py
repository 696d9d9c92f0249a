"""Independent GGUF references for tests/gguf_import.rs: transformers' own GGUF loading (which uses
the `gguf` package to read and dequantize), gguf-py's GGUFWriter to craft small GGUF files, and an
emulation of llama.cpp's pre-tokenizer.

  make-gguf  --out FILE [--arch llama|qwen2|qwen3|phi3|OTHER] [--vocab small|FILE.gguf] [--pre NAME]
             [--bad-type Q5_K] [--seed N]
             A tiny random model of the architecture (2 layers, GQA 4/2 heads, untied head; qwen2 with
             q/k/v biases, qwen3 with q/k norms and head_dim 128, phi3 with fused qkv and gate_up; an
             OTHER architecture gets llama's tensors) converted the way llama.cpp's converter does it
             (llama's q/k rows permuted to interleaved RoPE), with mixed tensor types:
             layer 0 quantized (Q4_0, Q4_1, BF16, Q8_0, F16), layer 1 F32. Also writes FILE.orig.safetensors
             (the HF weights before conversion). --bad-type stores blk.0.ffn_down.weight as that type.
             Prints {"f32_tensors": [HF names stored as F32]}.
  weights    --gguf FILE --ours DIR [--orig ST --exact NAMES_JSON]
             Every tensor of DIR vs AutoModelForCausalLM.from_pretrained(gguf_file=...) in fp32;
             with --orig, also the tensors named in --exact vs the original HF weights.
  tokenize   --gguf FILE --ours DIR --texts JSON --out OUT.json
             Per text: ids from transformers' GGUF tokenizer ("hf_gguf"), from an emulation of
             llama.cpp's pre-tokenizer with transformers' BPE model ("llamacpp"), and from our
             tokenizer.json through PreTrainedTokenizerFast and AutoTokenizer ("ours_py", "ours_auto").
"""
import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def split_path(gguf_file):
    return os.path.dirname(os.path.abspath(gguf_file)), os.path.basename(gguf_file)


# ---------------------------------------------------------------------------------------------
# make-gguf


def small_vocab():
    """Byte-level vocabulary: 3 control tokens, the 256 byte symbols, and a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_syms = [bytes_to_unicode()[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = specials + byte_syms + ["Ġt", "he", "Ġthe"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return dict(tokens=tokens, merges=merges, types=types, pre="smollm", bos=1, eos=2, pad=2, unk=0,
                add_bos=False, template=None)


def vocab_from_gguf(path):
    import gguf

    r = gguf.GGUFReader(path)

    def field(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    return dict(tokens=field("tokenizer.ggml.tokens"), merges=field("tokenizer.ggml.merges"),
                types=field("tokenizer.ggml.token_type"), pre=field("tokenizer.ggml.pre"),
                bos=field("tokenizer.ggml.bos_token_id"), eos=field("tokenizer.ggml.eos_token_id"),
                pad=field("tokenizer.ggml.padding_token_id"), unk=field("tokenizer.ggml.unknown_token_id"),
                add_bos=field("tokenizer.ggml.add_bos_token"), template=field("tokenizer.chat_template"))


def llamacpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (rotate-half -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def cmd_make_gguf(a):
    import gguf
    from gguf import GGMLQuantizationType as Q
    from safetensors.numpy import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    voc = small_vocab() if a.vocab == "small" else vocab_from_gguf(a.vocab)
    if a.pre:
        voc["pre"] = a.pre
    n_vocab = len(voc["tokens"])
    hidden, inter, heads, kv, layers = 64, 256, 4, 2, 2
    family = a.arch if a.arch in ("llama", "qwen2", "qwen3", "phi3") else "llama"
    # Qwen3's head_dim is not hidden/heads; transformers' GGUF loader ignores key_length and takes
    # Qwen3Config's default 128 (what every released Qwen3 has), so the reference can only read that.
    head_dim = 128 if family == "qwen3" else hidden // heads
    extra = {"head_dim": head_dim} if family == "qwen3" else {}
    if family != "llama":
        extra["pad_token_id"] = None  # Phi3Config's default is outside a tiny vocabulary
    cfg = AutoConfig.for_model(family, vocab_size=n_vocab, hidden_size=hidden, intermediate_size=inter,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                               max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                               tie_word_embeddings=False, **extra)
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM._model_mapping[type(cfg)](cfg)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(a.seed)
    for k in sd:
        if k.endswith("norm.weight") or k.endswith(".bias"):  # make norms and biases matter
            sd[k] = (sd[k] + 0.1 * rng.standard_normal(sd[k].shape)).astype(np.float32)
    save_file(sd, a.out + ".orig.safetensors")

    # llama.cpp's names (gguf-py's tensor map); Phi-3's fused gate_up is stored as ffn_up.
    block = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    layer0_types = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.BF16, "attn_output": Q.Q8_0,
                    "attn_qkv": Q.Q8_0, "ffn_gate": Q.F16, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0}

    w = gguf.GGUFWriter(a.out, a.arch)
    arch = a.arch
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    if family == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(voc["pre"])
    w.add_token_list(voc["tokens"])
    w.add_token_merges(voc["merges"])
    w.add_token_types([int(t) for t in voc["types"]])
    w.add_bos_token_id(voc["bos"])
    w.add_eos_token_id(voc["eos"])
    w.add_pad_token_id(voc["pad"])
    w.add_unk_token_id(voc["unk"])
    w.add_add_bos_token(bool(voc["add_bos"]))
    if voc["template"]:
        w.add_chat_template(voc["template"])

    f32_names = []

    def put(gguf_name, hf_name, arr, qtype):
        if a.bad_type and gguf_name == "blk.0.ffn_down.weight":
            qtype = Q[a.bad_type]
            n_block, n_bytes = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, size=(arr.shape[0], arr.shape[1] // n_block * n_bytes), dtype=np.uint8)
            w.add_tensor(gguf_name, raw, raw_dtype=qtype)
            return
        if qtype == Q.F32:
            f32_names.append(hf_name)
            w.add_tensor(gguf_name, arr.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(gguf_name, arr.astype(np.float16))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    put("token_embd.weight", "model.embed_tokens.weight", sd["model.embed_tokens.weight"], Q.Q8_0)
    for i in range(layers):
        prefix = f"model.layers.{i}."
        for name in [k for k in sd if k.startswith(prefix)]:
            module, kind = name[len(prefix):].rsplit(".", 1)
            gg = block[module]
            arr = sd[name]
            if family == "llama" and gg == "attn_q":
                arr = llamacpp_permute(arr, heads)
            elif family == "llama" and gg == "attn_k":
                arr = llamacpp_permute(arr, kv)
            qtype = Q.F32 if arr.ndim == 1 or i == 1 else layer0_types[gg]
            put(f"blk.{i}.{gg}.{kind}", name, arr, qtype)
    put("output_norm.weight", "model.norm.weight", sd["model.norm.weight"], Q.F32)
    put("output.weight", "lm_head.weight", sd["lm_head.weight"], Q.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(json.dumps({"f32_tensors": f32_names, "arch": arch}))


# ---------------------------------------------------------------------------------------------
# weights


def cmd_weights(a):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    d, name = split_path(a.gguf)
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    theirs = {k: v.detach() for k, v in ref.state_dict().items()}
    ours = load_file(os.path.join(a.ours, "model.safetensors"))
    with open(os.path.join(a.ours, "config.json")) as f:
        our_cfg = json.load(f)
    tied = bool(ref.config.tie_word_embeddings)
    if tied:
        theirs.pop("lm_head.weight", None)
    per = {}
    for k, v in theirs.items():
        if k in ours and tuple(ours[k].shape) == tuple(v.shape):
            per[k] = float((ours[k].float() - v.float()).abs().max())
    cfg_keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"]
    def ref_value(k):
        # Qwen2Config has no head_dim attribute: its attention uses hidden / heads.
        if k == "head_dim" and getattr(ref.config, k, None) is None:
            return ref.config.hidden_size // ref.config.num_attention_heads
        return getattr(ref.config, k, None)

    cfg_diff = {k: [our_cfg.get(k), ref_value(k)] for k in cfg_keys if our_cfg.get(k) != ref_value(k)}
    theta = ref.config.rope_parameters["rope_theta"] if getattr(ref.config, "rope_parameters", None) else ref.config.rope_theta
    for k, ours_v, theirs_v in [("rope_theta", our_cfg["rope_theta"], theta),
                                ("rms_norm_eps", our_cfg["rms_norm_eps"], ref.config.rms_norm_eps)]:
        if abs(ours_v - theirs_v) > 1e-6 * abs(theirs_v):
            cfg_diff[k] = [ours_v, theirs_v]
    out = {
        "tensors": len(per),
        "missing": sorted(set(theirs) - set(ours)),
        "extra": sorted(set(ours) - set(theirs)),
        "shape_mismatch": sorted(k for k in theirs if k in ours and k not in per),
        "max_abs_diff": max(per.values()) if per else None,
        "worst": max(per, key=per.get) if per else None,
        "value_scale": max(float(v.abs().max()) for v in theirs.values()),
        "config_diff": cfg_diff,
        "tied": tied,
    }
    if a.orig:
        orig = load_file(a.orig)
        exact = json.loads(a.exact)
        out["orig_max_abs_diff"] = max(float((ours[k] - orig[k]).abs().max()) for k in exact)
        out["orig_compared"] = len(exact)
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# tokenize


# llama.cpp's regexes per pre-tokenizer type (src/llama-vocab.cpp), applied one after the other:
# each splits every piece left by the previous one, keeping both matches and the text between them.
# GPT-2's regex ends in `\s+`, which llama.cpp's hand-written GPT-2 matcher also implements.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMACPP_PRE = {"smollm": [r"\p{N}", GPT2], "starcoder": [r"\p{N}", GPT2], "gpt-2": [GPT2],
                "llama-bpe": [LLAMA3], "llama3": [LLAMA3], "llama-v3": [LLAMA3]}


def regex_pieces(text, patterns):
    import regex

    pieces = [text]
    for pat in patterns:
        rx = regex.compile(pat)
        nxt = []
        for p in pieces:
            pos = 0
            for m in rx.finditer(p):
                if m.start() > pos:
                    nxt.append(p[pos:m.start()])
                if m.end() > m.start():
                    nxt.append(m.group())
                pos = m.end()
            if pos < len(p):
                nxt.append(p[pos:])
        pieces = nxt
    return pieces


def llamacpp_ids(backend, specials, patterns, text):
    """Special tokens matched whole first (llama.cpp's special-token partition), then the
    pre-tokenizer regexes, then byte-level BPE of each piece with transformers' BPE model."""
    import regex
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    ids = []
    if specials:
        parts = regex.split("(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")", text)
    else:
        parts = [text]
    for part in parts:
        if not part:
            continue
        if part in specials:
            ids.append(specials[part])
            continue
        for piece in regex_pieces(part, patterns):
            mapped = "".join(b2u[b] for b in piece.encode("utf-8"))
            ids.extend(t.id for t in backend.model.tokenize(mapped))
    return ids


def cmd_tokenize(a):
    import gguf
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    d, name = split_path(a.gguf)
    hf = AutoTokenizer.from_pretrained(d, gguf_file=name)
    r = gguf.GGUFReader(a.gguf)
    pre = r.fields["tokenizer.ggml.pre"].contents()
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}
    ours = PreTrainedTokenizerFast(tokenizer_file=os.path.join(a.ours, "tokenizer.json"))
    ours_auto = AutoTokenizer.from_pretrained(a.ours)
    with open(a.texts) as f:
        texts = json.load(f)
    out = []
    for t in texts:
        out.append({
            "hf_gguf": hf(t)["input_ids"],
            "llamacpp": llamacpp_ids(hf.backend_tokenizer, specials, LLAMACPP_PRE[pre], t),
            "ours_py": ours(t)["input_ids"],
            "ours_auto": ours_auto(t)["input_ids"],
        })
    with open(a.out, "w") as f:
        json.dump({"pre": pre, "ids": out,
                   "ours_auto_specials": [ours_auto.bos_token, ours_auto.eos_token, ours_auto.pad_token,
                                          ours_auto.unk_token],
                   "hf_specials": [hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token]}, f)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-gguf")
    m.add_argument("--out", required=True)
    m.add_argument("--arch", default="llama")
    m.add_argument("--vocab", default="small")
    m.add_argument("--pre", default=None)
    m.add_argument("--bad-type", default=None)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(f=cmd_make_gguf)
    w = sub.add_parser("weights")
    w.add_argument("--gguf", required=True)
    w.add_argument("--ours", required=True)
    w.add_argument("--orig", default=None)
    w.add_argument("--exact", default="[]")
    w.set_defaults(f=cmd_weights)
    t = sub.add_parser("tokenize")
    t.add_argument("--gguf", required=True)
    t.add_argument("--ours", required=True)
    t.add_argument("--texts", required=True)
    t.add_argument("--out", required=True)
    t.set_defaults(f=cmd_tokenize)
    a = p.parse_args()
    a.f(a)


if __name__ == "__main__":
    main()
