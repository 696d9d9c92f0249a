"""Compare the weights of two HF model directories (safetensors), e.g. the same training step run
on CUDA and on the CPU. Prints one JSON object:

  max_abs      max |a - b| over every tensor
  max_rel      max over tensors of max|a - b| / max|b|
  update_rel   with --init C: ||(a - c) - (b - c)|| / ||b - c|| over every tensor that moved,
               the relative difference of the two updates (what a step changed)
  tensors      number of tensors compared

usage: weights_diff.py A B [--init C]
"""
import argparse
import glob
import json
import os

import torch
from safetensors.torch import load_file


def load(d):
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    if not out:
        raise SystemExit(f"{d}: no safetensors files")
    return {k: v.to(torch.float64) for k, v in out.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--init", default=None)
    a = p.parse_args()
    wa, wb = load(a.a), load(a.b)
    if wa.keys() != wb.keys():
        raise SystemExit(f"tensor names differ: {sorted(set(wa) ^ set(wb))[:5]}")
    max_abs = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    max_rel = max(((wa[k] - wb[k]).abs().max() / wb[k].abs().max().clamp_min(1e-30)).item() for k in wa)
    res = {"max_abs": max_abs, "max_rel": max_rel, "tensors": len(wa)}
    if a.init:
        w0 = load(a.init)
        num = den = 0.0
        for k in wa:
            da, db = wa[k] - w0[k], wb[k] - w0[k]
            num += (da - db).pow(2).sum().item()
            den += db.pow(2).sum().item()
        res["update_norm"] = den ** 0.5
        res["update_rel"] = (num ** 0.5) / den ** 0.5 if den > 0 else None
    print(json.dumps(res))


if __name__ == "__main__":
    main()
