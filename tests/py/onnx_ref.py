"""Independent checks of an ONNX export with the onnx package, Python onnxruntime and HF
transformers, for the Rust tests and the export bench. Nothing here imports unlearn code.

  check     --onnx FILE
            onnx.checker.check_model(FILE, full_check=True); prints a JSON summary of the graph
            (inputs, outputs, opset, which initializers are inline/external, data offsets).
  compare   --model DIR --onnx FILE
            transformers (fp32) logits vs onnxruntime logits on a right- and a left-padded batch;
            prints JSON max |diff| over real tokens per batch.
  generate  --onnx FILE --model DIR --prompts JSON --out JSON [--max-new-tokens N]
            greedy continuation of each prompt (token ids, batch of one) driven by onnxruntime:
            with the cache graph, present.* is fed back as past_key_values.*; without, the whole
            sequence is re-run every step. Stops at the model's EOS (excluded).
  strip     --onnx FILE --out DIR
            re-save FILE (weights loaded, inline) into DIR/model.onnx without any metadata, as a
            graph from another exporter would look.
  hf-bench  --model DIR --prompts JSON [--max-new-tokens N] [--threads T] [--repeats R]
            transformers greedy generate() throughput (tokens per wall and per CPU second) on the same
            prompts, fp32 CPU.
"""
import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402


def cmd_check(a):
    import onnx

    onnx.checker.check_model(a.onnx, full_check=True)
    m = onnx.load(a.onnx, load_external_data=False)

    def dims(vi):
        return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]

    inline, external, offsets = [], [], []
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            kv = {e.key: e.value for e in t.external_data}
            external.append(t.name)
            offsets.append(int(kv.get("offset", "0")))
        else:
            inline.append({"name": t.name, "bytes": len(t.raw_data), "dims": list(t.dims)})
    print(json.dumps({
        "ir_version": m.ir_version,
        "opset": {o.domain: o.version for o in m.opset_import},
        "inputs": [{"name": i.name, "elem_type": i.type.tensor_type.elem_type, "dims": dims(i)} for i in m.graph.input],
        "outputs": [{"name": o.name, "elem_type": o.type.tensor_type.elem_type, "dims": dims(o)} for o in m.graph.output],
        "nodes": len(m.graph.node),
        "op_types": sorted({n.op_type for n in m.graph.node}),
        "inline": inline,
        "external": external,
        "offsets_aligned": all(o % 4096 == 0 for o in offsets),
        "metadata": {p.key: p.value for p in m.metadata_props},
    }))


def cmd_strip(a):
    import onnx

    m = onnx.load(a.onnx, load_external_data=True)
    del m.metadata_props[:]
    m.producer_name = "other"
    os.makedirs(a.out, exist_ok=True)
    onnx.save(m, os.path.join(a.out, "model.onnx"))


def session(path, threads=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def past_inputs(sess, batch):
    """Zero-length caches for every past_key_values.* input."""
    feeds = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            dt = np.float16 if i.type == "tensor(float16)" else np.float32
            feeds[i.name] = np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=dt)
    return feeds


def padded_batch(vocab, left):
    """Three rows of 11, 7 and 3 tokens padded with 0 to 11 (the same rows as tests/model_parity.rs)."""
    lens, t = [11, 7, 3], 11
    ids = np.zeros((3, t), dtype=np.int64)
    mask = np.zeros((3, t), dtype=np.int64)
    for r, n in enumerate(lens):
        for j in range(n):
            col = t - n + j if left else j
            ids[r, col] = 3 + (r * 37 + j * 11) % (vocab - 3)
            mask[r, col] = 1
    return ids, mask


def cmd_compare(a):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    sess = session(a.onnx)
    vocab = model.config.vocab_size
    out = {}
    for name, left in [("right_padded", False), ("left_padded", True)]:
        ids, mask = padded_batch(vocab, left)
        if left:
            pos = np.cumsum(mask, 1) - 1
            pos[mask == 0] = 1
        else:
            pos = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))
        with torch.no_grad():
            kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
            if left:
                kw["position_ids"] = torch.tensor(pos)
            ref = model(**kw).logits.float().numpy()
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos.astype(np.int64)}
        feeds.update(past_inputs(sess, ids.shape[0]))
        got = sess.run(["logits"], feeds)[0].astype(np.float32)
        real = mask.astype(bool)
        diff = np.abs(got - ref)[real]
        out[name] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                     "logit_scale": float(np.abs(ref[real]).max()), "finite": bool(np.isfinite(got).all())}
    print(json.dumps(out))


def eos_ids(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        eos = json.load(f).get("eos_token_id")
    return eos if isinstance(eos, list) else [eos]


def onnx_greedy(sess, prompt, max_new, eos):
    """Greedy continuation of one prompt (batch 1) with onnxruntime."""
    names = [i.name for i in sess.get_inputs()]
    cached = any(n.startswith("past_key_values.") for n in names)
    seq = list(prompt)
    new = []
    feeds_past = past_inputs(sess, 1)
    step_ids = list(prompt)
    for _ in range(max_new):
        if cached:
            t = len(seq)
            s = len(step_ids)
            feeds = {"input_ids": np.array([step_ids], dtype=np.int64),
                     "attention_mask": np.ones((1, t), dtype=np.int64),
                     "position_ids": np.arange(t - s, t, dtype=np.int64)[None, :]}
            feeds.update(feeds_past)
            outs = sess.run(None, feeds)
            out_names = [o.name for o in sess.get_outputs()]
            res = dict(zip(out_names, outs))
            feeds_past = {n.replace("present.", "past_key_values."): v for n, v in res.items() if n.startswith("present.")}
            logits = res["logits"]
        else:
            t = len(seq)
            feeds = {"input_ids": np.array([seq], dtype=np.int64), "attention_mask": np.ones((1, t), dtype=np.int64),
                     "position_ids": np.arange(t, dtype=np.int64)[None, :]}
            logits = sess.run(["logits"], feeds)[0]
        tok = int(np.argmax(logits[0, -1].astype(np.float32)))
        if tok in eos:
            break
        new.append(tok)
        seq.append(tok)
        step_ids = [tok]
    return new


def cmd_generate(a):
    sess = session(a.onnx)
    with open(a.prompts) as f:
        prompts = json.load(f)
    eos = eos_ids(a.model)
    out = [onnx_greedy(sess, p, a.max_new_tokens, eos) for p in prompts]
    with open(a.out, "w") as f:
        json.dump(out, f)


def cmd_hf_bench(a):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    with open(a.prompts) as f:
        prompts = json.load(f)
    eos = eos_ids(a.model)
    # Generate exactly max_new_tokens (no early stop) so both sides do the same work.
    kw = dict(max_new_tokens=a.max_new_tokens, min_new_tokens=a.max_new_tokens, do_sample=False,
              pad_token_id=eos[0], eos_token_id=eos[0])
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), **kw)  # warm-up
        best, best_cpu = None, None
        for _ in range(a.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            n = 0
            for p in prompts:
                g = model.generate(torch.tensor([p]), **kw)
                n += g.shape[1] - len(p)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            best = dt if best is None else min(best, dt)
            best_cpu = dc if best_cpu is None else min(best_cpu, dc)
        prefill_tokens = sum(len(p) for p in prompts)
        t0 = time.perf_counter()
        for p in prompts:
            model(torch.tensor([p]))
        prefill = time.perf_counter() - t0
    print(json.dumps({"generated_tokens": n, "seconds": best, "tokens_per_s": n / best,
                      "cpu_seconds": best_cpu, "tokens_per_cpu_s": n / best_cpu,
                      "prefill_tokens": prefill_tokens, "prefill_tokens_per_s": prefill_tokens / prefill,
                      "threads": a.threads, "torch": torch.__version__}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--onnx", required=True)
    c.set_defaults(f=cmd_check)
    c = sub.add_parser("compare")
    c.add_argument("--model", required=True)
    c.add_argument("--onnx", required=True)
    c.set_defaults(f=cmd_compare)
    g = sub.add_parser("generate")
    g.add_argument("--onnx", required=True)
    g.add_argument("--model", required=True)
    g.add_argument("--prompts", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--max-new-tokens", type=int, default=20)
    g.set_defaults(f=cmd_generate)
    c = sub.add_parser("strip")
    c.add_argument("--onnx", required=True)
    c.add_argument("--out", required=True)
    c.set_defaults(f=cmd_strip)
    b = sub.add_parser("hf-bench")
    b.add_argument("--model", required=True)
    b.add_argument("--prompts", required=True)
    b.add_argument("--max-new-tokens", type=int, default=32)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--repeats", type=int, default=2)
    b.set_defaults(f=cmd_hf_bench)
    a = p.parse_args()
    a.f(a)


if __name__ == "__main__":
    main()
