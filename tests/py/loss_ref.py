"""Reference values and logit-gradients of the unlearning losses, written from algorithms.md
§1.3-§1.4 in plain PyTorch (independent of the Rust implementation).

Reads IN.safetensors (logits [b,t,v], teacher [b,t,v], input_ids [b,t], target_mask [b,t-1],
attention_mask [b,t], ref_sums [b]) and JSON hyper-parameters; writes OUT.safetensors with, for
each loss, `<name>.value` and `<name>.grad` (d loss / d logits).
"""
import json
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def main(inp, params_json, out):
    x = load_file(inp)
    hp = json.loads(params_json)
    logits0 = x["logits"].double()
    teacher = x["teacher"].double()
    ids, tmask, amask, ref_sums = x["input_ids"], x["target_mask"].double(), x["attention_mask"].double(), x["ref_sums"].double()
    n_targets, n_seq = hp["n_targets"], hp["n_sequences"]
    b, t, v = logits0.shape
    positions = b * t
    results = {}

    def run(name, fn):
        logits = logits0.clone().requires_grad_(True)
        val = fn(logits)
        (g,) = torch.autograd.grad(val, logits)
        results[name + ".value"] = val.detach().reshape(1)
        results[name + ".grad"] = g

    def token_logp(logits):
        lp = F.log_softmax(logits[:, :-1], -1)
        return lp.gather(-1, ids[:, 1:, None]).squeeze(-1)

    # Token-mean NLL over the targets of the (global) micro-batch.
    run("nll", lambda z: -(token_logp(z) * tmask).sum() / n_targets)

    # NLUL: per-token -log(1 + tol - p); surrogate with detached weight p/(1+tol-p) times log p.
    tol = hp["tol"]

    def nlul(z):
        lp = token_logp(z)
        p = token_logp(z.detach()).exp()
        w = (p / (1 + tol - p)).detach()
        return (w * lp * tmask).sum() / n_targets

    run("nlul", nlul)
    # The true loss, whose gradient the surrogate must have.
    run("nlul_direct", lambda z: -(torch.log(1 + tol - token_logp(z).exp()) * tmask).sum() / n_targets)

    beta = hp["npo_beta"]

    def npo_std(z):
        r = (token_logp(z) * tmask).sum(-1) - ref_sums
        return (-2.0 / beta) * F.logsigmoid(-beta * r).sum() / n_seq

    run("npo_standard", npo_std)

    def npo_mt(z):
        lp = token_logp(z) * tmask
        r = (lp.detach().sum(-1) - ref_sums) / t  # padded length of the batch
        w = 2 * torch.sigmoid(beta * r)
        return (w.detach()[:, None] * lp).sum() / n_targets

    run("npo_mt", npo_mt)

    def kl(z):
        k = F.kl_div(F.log_softmax(z, -1), F.softmax(teacher, -1), reduction="none").sum(-1) * amask
        return k.sum() / positions

    run("kl", kl)

    def qkl(z):
        delta = z - teacher
        pbar = F.softmax(teacher, -1)
        d = delta.detach()
        fd = pbar * d - pbar * (pbar * d).sum(-1, keepdim=True)  # (diag(p) - p p^T) delta
        return ((delta * fd.detach()).sum(-1) * amask).sum() / positions

    run("qkl", qkl)
    save_file({k: v.float().contiguous() for k, v in results.items()}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
