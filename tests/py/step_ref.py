"""Independent PyTorch implementation (in fp32, or fp64 as a high-precision yardstick) of a few optimizer steps of NGDiff(+AutoLR), of mean
teacher (NLUL + KL/QKL), of LossNorm and of IT, written from algorithms.md, for the Rust step-equivalence test.

Every step uses the whole forget set and the whole retain set as its batch (the test makes
batch_size equal to the dataset sizes, so the order the Rust loader draws does not matter).

usage: step_ref.py CONFIG.json OUT.safetensors
CONFIG: {model, forget, retain, method, steps, lr, ...}
OUT: flat trainable parameters (`master`), optimizer state, teacher — in HF parameter order.
"""
import json
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def batch(tok, path, eos, max_len):
    recs = json.load(open(path))
    rows, ctx = [], []
    for r in recs:
        q, a = r.get("question", r.get("prompt")), r.get("answer", r.get("response"))
        p = tok("Question: " + q + "\nAnswer:")["input_ids"]
        ids = (p + tok(" " + a, add_special_tokens=False)["input_ids"] + [eos])[:max_len]
        rows.append(ids)
        ctx.append(len(p))
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), eos, dtype=torch.long)
    am = torch.zeros((len(rows), t), dtype=torch.long)
    tm = torch.zeros((len(rows), t - 1), dtype=torch.get_default_dtype())
    for i, (r, c) in enumerate(zip(rows, ctx)):
        ids[i, : len(r)] = torch.tensor(r)
        am[i, : len(r)] = 1
        tm[i, c - 1 : len(r) - 1] = 1
    return ids, am, tm


def token_logp(logits, ids):
    return F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def nll(model, b):
    ids, am, tm = b
    return -(token_logp(model(input_ids=ids, attention_mask=am).logits, ids) * tm).sum() / tm.sum()


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def kl_positions(zs, zt, am):
    """KL(softmax(zt) || softmax(zs)) at every position under the mask, over all B x T positions."""
    per = F.kl_div(F.log_softmax(zs, -1), F.softmax(zt, -1), reduction="none").sum(-1)
    return (per * am).sum() / (am.shape[0] * am.shape[1])


def adamw(params, c):
    return torch.optim.AdamW(params, lr=c["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def adam_state(opt, params, out):
    st = [opt.state[p] for p in params]
    out["optim.exp_avg"] = flat([s["exp_avg"] for s in st])
    out["optim.exp_avg_sq"] = flat([s["exp_avg_sq"] for s in st])


def main(cfg_path, out_path):
    c = json.load(open(cfg_path))
    if c.get("dtype") == "float64":
        torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "float64": torch.float64}[c.get("dtype", "float32")]
    model = AutoModelForCausalLM.from_pretrained(c["model"], dtype=dtype)
    model.eval()  # no dropout anywhere (Llama has none; makes intent explicit)
    tok = PreTrainedTokenizerFast(tokenizer_file=c["model"] + "/tokenizer.json")
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    names = [n for n, _ in model.named_parameters() if any(m in n for m in MATRICES)]
    params = [dict(model.named_parameters())[n] for n in names]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    bf = batch(tok, c["forget"], eos, c["max_len"])
    br = batch(tok, c["retain"], eos, c["max_len"])
    out = {}
    if c["method"] == "lossnorm":
        # NGDiff paper's LossNorm: each task gradient divided by its own (detached) loss.
        opt = adamw(params, c)
        for step in range(1, c["steps"] + 1):
            l_f, l_r = nll(model, bf), nll(model, br)
            g_f = torch.autograd.grad(l_f, params)
            g_r = torch.autograd.grad(l_r, params)
            for p, a, b in zip(params, g_f, g_r):
                p.grad = b / (l_r.item() + 1e-8) - a / (l_f.item() + 1e-8)
            opt.step()
        adam_state(opt, params, out)
    elif c["method"] == "it":
        # mt-unlearn's IT: alpha * KL(small || theta) on the forget text + beta * KL(theta_0 || theta)
        # on the retain text, the sum clipped to norm C, AdamW.
        original = AutoModelForCausalLM.from_pretrained(c["model"], dtype=dtype).eval()
        small = AutoModelForCausalLM.from_pretrained(c["small"], dtype=dtype).eval()
        tparams = [dict(original.named_parameters())[n] for n in names]
        opt = adamw(params, c)
        (ids_f, am_f, _), (ids_r, am_r, _) = bf, br
        for step in range(1, c["steps"] + 1):
            with torch.no_grad():
                z_small = small(input_ids=ids_f, attention_mask=am_f).logits
                z_orig = original(input_ids=ids_r, attention_mask=am_r).logits
            loss_f = c["alpha"] * kl_positions(model(input_ids=ids_f, attention_mask=am_f).logits, z_small, am_f)
            loss_r = c["beta"] * kl_positions(model(input_ids=ids_r, attention_mask=am_r).logits, z_orig, am_r)
            g = [a + b for a, b in zip(torch.autograd.grad(loss_f, params), torch.autograd.grad(loss_r, params))]
            cf = min(1.0, c["clip_norm"] / (flat(g).double().norm().item() + 1e-6))
            for p, gi in zip(params, g):
                p.grad = cf * gi
            opt.step()
            out[f"clip.step{step}"] = torch.tensor([cf])
        out["teacher"] = flat(tparams)
        adam_state(opt, params, out)
    elif c["method"] == "ngdiff":
        opt = adamw(params, c)
        lr = c["lr"]
        for step in range(1, c["steps"] + 1):
            g_f = torch.autograd.grad(nll(model, bf), params)
            g_r = torch.autograd.grad(nll(model, br), params)
            n_f = flat(g_f).double().norm().item()
            n_r = flat(g_r).double().norm().item()
            for p, a, b in zip(params, g_f, g_r):
                p.grad = b / (n_r + 1e-8) - a / (n_f + 1e-8)
            if step % c["autolr_period"] == 0:
                # GeN lr_parabola: probe step, three forwards on a fresh (here: the same) retain batch.
                for g in opt.param_groups:
                    g["lr"] = lr
                w = [p.detach().clone() for p in params]
                opt.step()
                delta = [p.detach() - w0 for p, w0 in zip(params, w)]
                losses = {}
                with torch.no_grad():
                    for r in (-1.0, 1.0, 0.0):
                        for p, w0, d in zip(params, w, delta):
                            p.copy_(w0 + r * d)
                        losses[r] = nll(model, br).item()
                    for p, w0 in zip(params, w):
                        p.copy_(w0)
                lm, lp, l0 = losses[-1.0], losses[1.0], losses[0.0]
                A = (lp + lm - 2 * l0) / lr**2
                B = (lm - lp) / (2 * lr)
                if A > 0 and B > 0:
                    lr = 0.9 * lr + 0.1 * min(max(B / A, lr / 2), 2 * lr)
                out[f"autolr.step{step}"] = torch.tensor([lm, l0, lp, lr])
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
        adam_state(opt, params, out)
    else:
        teacher_model = AutoModelForCausalLM.from_pretrained(c["model"], dtype=dtype).eval()
        tparams = [dict(teacher_model.named_parameters())[n] for n in names]
        for p in teacher_model.parameters():
            p.requires_grad_(False)
        opt = torch.optim.SGD(params, lr=c["lr"], momentum=c["momentum"])
        a, b_, d_, lam, C, tol = c["alpha"], c["beta"], c["delta"], c["damp"], c["clip"], c["tol"]
        ids_f, am_f, tm_f = bf
        ids_r, am_r, _ = br
        for step in range(1, c["steps"] + 1):
            # (1) forget: NLUL surrogate, weights from detached probabilities.
            logits = model(input_ids=ids_f, attention_mask=am_f).logits
            lp = token_logp(logits, ids_f)
            p_ = lp.detach().exp()
            wgt = p_ / (1 + tol - p_)
            loss_f = a * (wgt * lp * tm_f).sum() / tm_f.sum()
            g_f = torch.autograd.grad(loss_f, params)
            # (2) penalty against the teacher on the retain text, all positions under the mask.
            zs = model(input_ids=ids_r, attention_mask=am_r).logits
            with torch.no_grad():
                zt = teacher_model(input_ids=ids_r, attention_mask=am_r).logits
            if c["penalty"] == "kl":
                loss_r = b_ * kl_positions(zs, zt, am_r)
            else:
                delta = zs - zt
                pb = F.softmax(zt, -1)
                dd = delta.detach()
                fd = (pb * dd - pb * (pb * dd).sum(-1, keepdim=True)).detach()
                loss_r = b_ * ((delta * fd).sum(-1) * am_r).sum() / (ids_r.shape[0] * ids_r.shape[1])
            g_r = torch.autograd.grad(loss_r, params)
            # (3) clip the sum, (4) proximal pull after clipping, (5) SGD, (6) EMA at rate d*c.
            g = [x + y for x, y in zip(g_f, g_r)]
            norm = flat(g).double().norm().item()
            cf = min(1.0, C / norm)
            for p, gi, tp in zip(params, g, tparams):
                p.grad = cf * gi + lam * cf * (p.detach() - tp)
            opt.step()
            with torch.no_grad():
                for p, tp in zip(params, tparams):
                    tp.mul_(1 - d_ * cf).add_(p.detach() * (d_ * cf))
            out[f"clip.step{step}"] = torch.tensor([cf])
        out["teacher"] = flat(tparams)
        out["optim.momentum_buffer"] = flat([opt.state[p]["momentum_buffer"] for p in params])
    out["master"] = flat([p.detach() for p in params])
    save_file({k: v.double().contiguous() for k, v in out.items()}, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
