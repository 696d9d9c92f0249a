"""Greedy generation by the ONNX LLM clients users load `unlearn export` directories with, for the
Rust tests; each prompt separately (batch 1, no padding), the new tokens up to the first EOS.

  optimum --onnx DIR --prompts P.json --out OUT.json --max-new-tokens N [--no-cache]
          optimum-onnx's ORTModelForCausalLM.from_pretrained(DIR) and its generate(). optimum-onnx
          supports only transformers < 4.58, so it runs with PYTHONPATH set to the overlay that
          launch/setup.sh installs ($UNLEARN_OPTIMUM_PATH: optimum-onnx and the transformers it
          supports, over the venv's torch and onnxruntime); this script prints which it got.
  genai   --onnx DIR --prompts P.json --out OUT.json --max-new-tokens N
          onnxruntime-genai's og.Model(DIR) (reads DIR/genai_config.json) and its Generator.
          Where the wheel is missing or cannot load, OUT gets {"skipped": "<why>"}.

P.json: a JSON list of token-id lists. OUT.json: a JSON list of new-token lists, or {"skipped": ...}.
The EOS ids are the ones transformers' generate() stops at: generation_config.json over config.json.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def eos_ids(onnx_dir):
    ids = None
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(onnx_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                v = json.load(f).get("eos_token_id")
            if v is not None:
                ids = v
    return ids if isinstance(ids, list) else [ids]


def cut_at_eos(new, eos):
    for i, t in enumerate(new):
        if t in eos:
            return new[:i]
    return new


def cmd_optimum(a, prompts, eos):
    from importlib.metadata import version

    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM

    print(f"optimum-onnx {version('optimum-onnx')}, transformers {transformers.__version__} from {transformers.__file__}",
          file=sys.stderr)
    # As a user loads it: the directory alone; a cache-less export needs use_cache=False (optimum's rule).
    kwargs = {"use_cache": False} if a.no_cache else {}
    model = ORTModelForCausalLM.from_pretrained(a.onnx, **kwargs)
    assert model.can_use_cache == (not a.no_cache), f"optimum sees can_use_cache={model.can_use_cache}"
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens, do_sample=False,
                           eos_token_id=eos, pad_token_id=eos[0])
        out.append(cut_at_eos(g[0, len(p):].tolist(), eos))
    return out


def cmd_genai(a, prompts, eos):
    try:
        import onnxruntime_genai as og
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        return {"skipped": f"onnxruntime-genai does not import here: {type(e).__name__}: {e}"}
    print(f"onnxruntime-genai {og.__version__}", file=sys.stderr)
    model = og.Model(a.onnx)
    out = []
    for p in prompts:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(p) + a.max_new_tokens, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(p)
        while not gen.is_done():
            gen.generate_next_token()
        seq = [int(t) for t in gen.get_sequence(0)]
        assert seq[:len(p)] == p, "onnxruntime-genai changed the prompt"
        out.append(cut_at_eos(seq[len(p):], eos))
    return out


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("optimum", "genai"):
        s = sub.add_parser(name)
        s.add_argument("--onnx", required=True)
        s.add_argument("--prompts", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--max-new-tokens", type=int, default=24)
        if name == "optimum":
            s.add_argument("--no-cache", action="store_true")
    a = ap.parse_args()
    with open(a.prompts) as f:
        prompts = json.load(f)
    eos = eos_ids(a.onnx)
    out = {"optimum": cmd_optimum, "genai": cmd_genai}[a.cmd](a, prompts, eos)
    with open(a.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
