"""Measurement: how bf16 weight storage changes the mean-teacher trajectory (issue 14, item 5).

Runs the mean-teacher update of algorithms.md §1.2 (the arithmetic of tests/py/step_ref.py, which
the Rust step-equivalence test holds our trainer to) at the recipe's step sizes, in several
precision set-ups, on identical batches, and records per step how many weights the forward passes
actually see change, the forget/penalty losses, and how far each trajectory drifts from fp32's.

bf16 is *emulated*: weights are rounded to bf16 (round-to-nearest-even, or stochastically) and
held in fp32 tensors; all arithmetic is fp32. That isolates the effect of bf16 weight storage
(the question here) from bf16 activation rounding, which real bf16 matmuls add on top, and keeps
the study runnable on a CPU where bf16 matmuls are ~300x slower.

Set-ups:
  fp32          fp32 master, student and teacher replicas fp32 (the reference trajectory)
  bf16-both     fp32 master and EMA teacher; student and teacher replicas rounded to bf16
                (today's design with model.dtype = bf16, dist.teacher = replica or gather)
  bf16-student  fp32 master and EMA teacher; student replica bf16, teacher replica fp32
  bf16-master   no fp32 master: student and teacher weights stored in bf16 (round to nearest)
  bf16-sr       as bf16-master, every stored update stochastically rounded

Why the step sizes matter: the per-weight change per step is about lr/(1-momentum)·|g|/sqrt(N)
with |g| ≈ 0.2 in the paper's 7B logs, i.e. ~1e-4 of a bf16 unit in the last place at 7B. A
slice of SmolLM2 (first K layers, ~3.5 M matrix weights per layer) is in the same regime, unlike
a tiny random model, so the study uses one, first fine-tuned to memorise its forget texts (the
paper's forget NLL starts at ~0.6; an unmemorised text gives NLUL no gradient).

usage:
  bf16_mt_study.py memorize --model DIR --data MUSE_NEWS_DIR --out DIR [--layers 2 --n-forget 16]
  bf16_mt_study.py run --model MEMORIZED_DIR --data MUSE_NEWS_DIR --out DIR --setups fp32,bf16-both
  bf16_mt_study.py summary --out DIR          (table of every set-up run into DIR, vs fp32)
"""
import argparse
import copy
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rne(x):
    return x.to(torch.bfloat16).to(torch.float32)


def stochastic(x, gen):
    """fp32 -> bf16 with stochastic rounding: add uniform bits below bf16's last bit, truncate."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, generator=gen)
    return ((bits + noise) & -65536).view(torch.float32)


def texts(path):
    with open(path) as f:
        return [t if isinstance(t, str) else t["text"] for t in json.load(f)]


def data(tok, muse, seq, n_forget):
    """Forget: the first n MUSE-News forget articles cut to `seq` tokens (all are longer, so no
    padding). Penalty text: MUSE-News retain2 articles as exact `seq`-token overflow chunks
    (mt-unlearn's pretraining-text preparation); the last 8 are held out for evaluation."""
    forget = [c for c in tok(texts(f"{muse}/raw/forget.json"), max_length=seq, truncation=True)["input_ids"] if len(c) == seq]
    chunks = tok(texts(f"{muse}/privleak/retain2.json"), return_overflowing_tokens=True, max_length=seq, truncation=True)["input_ids"]
    pre = [c for c in chunks if len(c) == seq]
    return torch.tensor(forget[:n_forget]), torch.tensor(pre[:-8]), torch.tensor(pre[-8:])


def token_logp(logits, ids):
    return F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def nll(model, ids):
    with torch.no_grad():
        return -token_logp(model(input_ids=ids).logits, ids).mean().item()


def cmd_memorize(a):
    """The first K layers of the model, fine-tuned (fp32, AdamW, all weights) on n forget texts
    until they are memorised: the 'target' the study unlearns from."""
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.model.layers = model.model.layers[: a.layers]
    model.config.num_hidden_layers = a.layers
    forget, _, held = data(tok, a.data, a.seq, a.n_forget)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    for step in range(1, a.steps + 1):
        loss = -token_logp(model(input_ids=forget).logits, forget).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            print(json.dumps({"step": step, "forget_nll": loss.item(), "heldout_nll": nll(model, held)}), flush=True)
        if loss.item() < a.target_nll:
            break
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    print(json.dumps({"saved": a.out, "forget_nll": nll(model, forget), "heldout_nll": nll(model, held)}))


def cmd_run(a):
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    names = [n for n, _ in base.named_parameters() if any(m in n for m in MATRICES)]
    for n, p in base.named_parameters():
        p.requires_grad_(n in names)  # mt-unlearn: embeddings, head and norms frozen
    n_train = sum(dict(base.named_parameters())[n].numel() for n in names)
    forget, pre, held = data(tok, a.data, a.seq, a.n_forget)
    g = torch.Generator().manual_seed(0)
    order_f = torch.randint(0, len(forget), (a.steps, a.batch), generator=g)
    order_p = torch.randint(0, len(pre), (a.steps, a.batch), generator=g)
    theta0 = [dict(base.named_parameters())[n].detach().clone() for n in names]
    os.makedirs(a.out, exist_ok=True)
    snaps = set(int(s) for s in a.snap_steps.split(","))

    for setup in a.setups.split(","):
        student, teacher = copy.deepcopy(base), copy.deepcopy(base)
        for p in teacher.parameters():
            p.requires_grad_(False)
        sp = [dict(student.named_parameters())[n] for n in names]
        tp = [dict(teacher.named_parameters())[n] for n in names]
        bf16_store = setup in ("bf16-master", "bf16-sr")
        sr = torch.Generator().manual_seed(1)
        store = (lambda x: stochastic(x, sr)) if setup == "bf16-sr" else rne
        master = [rne(t) if bf16_store else t.clone() for t in theta0]
        tmaster = [m.clone() for m in master]
        mom = [torch.zeros_like(t) for t in theta0]
        s_bf16 = setup != "fp32"
        t_bf16 = setup in ("bf16-both", "bf16-master", "bf16-sr")

        def sync():
            with torch.no_grad():
                for m, p in zip(master, sp):
                    p.copy_(rne(m) if s_bf16 else m)
                for m, p in zip(tmaster, tp):
                    p.copy_(rne(m) if t_bf16 else m)

        sync()
        log, snap = [], {}
        t0 = time.time()
        for step in range(1, a.steps + 1):
            prev_s = [p.detach().clone() for p in sp]
            prev_t = [p.detach().clone() for p in tp]
            ids_f = forget[order_f[step - 1]]
            lp = token_logp(student(input_ids=ids_f).logits, ids_f)
            pr = lp.detach().exp()
            loss_f = a.alpha * (pr / (1 + a.tol - pr) * lp).sum() / lp.numel()  # NLUL surrogate
            g_f = torch.autograd.grad(loss_f, sp)
            ids_p = pre[order_p[step - 1]]
            zs = student(input_ids=ids_p).logits
            with torch.no_grad():
                zt = teacher(input_ids=ids_p).logits
            kl = F.kl_div(F.log_softmax(zs, -1), F.softmax(zt, -1), reduction="none").sum(-1).mean()
            g_p = torch.autograd.grad(a.beta * kl, sp)
            with torch.no_grad():
                gs = [x + y for x, y in zip(g_f, g_p)]
                norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in gs))
                c = min(1.0, a.clip / norm)
                for i in range(len(master)):
                    d = c * gs[i] + a.damp * c * (master[i] - tmaster[i])  # damping after clipping
                    mom[i].mul_(a.momentum).add_(d)  # torch SGD momentum, no dampening
                    new = master[i] - a.lr * mom[i]
                    master[i] = store(new) if bf16_store else new
                    ema = tmaster[i] * (1 - a.delta * c) + master[i] * (a.delta * c)  # EMA after the step
                    tmaster[i] = store(ema) if bf16_store else ema
                sync()
                ch_s = sum(int((p != q).sum()) for p, q in zip(sp, prev_s)) / n_train
                ch_t = sum(int((p != q).sum()) for p, q in zip(tp, prev_t)) / n_train
            row = {"step": step, "forget_nll": -lp.detach().mean().item(), "kl": kl.item(), "grad_norm": norm, "clip": c,
                   "changed_student": ch_s, "changed_teacher": ch_t}
            if step % a.eval_every == 0 or step == a.steps:
                # The saved model is the master weights, evaluated in fp32.
                ev = copy.deepcopy(base)
                with torch.no_grad():
                    for n, m in zip(names, master):
                        dict(ev.named_parameters())[n].copy_(m)
                row["eval_forget_nll"] = nll(ev, forget)
                row["eval_pretrain_nll"] = nll(ev, held)
                row["displacement"] = math.sqrt(sum(float(((m - t) ** 2).sum()) for m, t in zip(master, theta0)))
                row["teacher_displacement"] = math.sqrt(sum(float(((m - t) ** 2).sum()) for m, t in zip(tmaster, theta0)))
                print(json.dumps({"setup": setup, "s_per_step": round((time.time() - t0) / step, 2), **row}), flush=True)
            if step in snaps:
                for i, (m, t) in enumerate(zip(master, tmaster)):
                    snap[f"s{step}.master.{i}"] = m.contiguous()
                    snap[f"s{step}.teacher.{i}"] = t.contiguous()
            log.append(row)
        save_file(snap, f"{a.out}/{setup}.safetensors")
        with open(f"{a.out}/{setup}.json", "w") as f:
            json.dump({"setup": setup, "model": a.model, "trainable": n_train, "seq": a.seq, "batch": a.batch,
                       "recipe": {k: getattr(a, k) for k in ("alpha", "beta", "delta", "damp", "clip", "tol", "lr", "momentum")},
                       "log": log}, f)
    save_file({f"theta0.{i}": t.contiguous() for i, t in enumerate(theta0)}, f"{a.out}/theta0.safetensors")


def rel_dist(snap, ref, theta0, step, which, bf16_start):
    """‖(θ − θ_start) − (θ_fp32 − θ₀)‖ / ‖θ_fp32 − θ₀‖: how far a set-up's displacement is from
    the fp32 run's, relative to the fp32 displacement. A bf16-stored run starts from θ₀ rounded
    to bf16; that one-off rounding is not trajectory drift, so it is subtracted."""
    keys = sorted((k for k in ref if k.startswith(f"s{step}.{which}.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    d = r = 0.0
    for k in keys:
        t0 = theta0[f"theta0.{k.rsplit('.', 1)[1]}"]
        start = rne(t0) if bf16_start else t0
        ref_disp = (ref[k] - t0).double()
        d += float((((snap[k] - start).double() - ref_disp) ** 2).sum())
        r += float((ref_disp**2).sum())
    return math.sqrt(d / r)


def cmd_summary(a):
    setups = [s for s in ("fp32", "bf16-both", "bf16-student", "bf16-master", "bf16-sr") if os.path.exists(f"{a.out}/{s}.json")]
    ref = load_file(f"{a.out}/fp32.safetensors")
    theta0 = load_file(f"{a.out}/theta0.safetensors")
    steps = sorted({int(k[1:].split(".")[0]) for k in ref})
    runs = {s: json.load(open(f"{a.out}/{s}.json")) for s in setups}
    meta = runs["fp32"]
    lines = [f"model {meta['model']} ({meta['trainable']} trainable matrix weights), seq {meta['seq']}, batch {meta['batch']}, recipe {meta['recipe']}", ""]
    hdr = "| set-up | student replica weights changed / step | teacher replica weights changed / step | mean KL | mean abs. gap in batch forget NLL to fp32 | " + " | ".join(
        f"step {s}: forget NLL / pretrain NLL / ‖θ−θ_fp32‖/‖θ_fp32−θ₀‖ / teacher same" for s in steps) + " |"
    lines += [hdr, "|" + "---|" * (5 + len(steps))]
    ref_log = runs["fp32"]["log"]
    out = {"steps": steps, "setups": {}}
    for s in setups:
        log = runs[s]["log"]
        snap = load_file(f"{a.out}/{s}.safetensors")
        mean = lambda k: sum(r[k] for r in log) / len(log)
        gap = sum(abs(r["forget_nll"] - q["forget_nll"]) for r, q in zip(log, ref_log)) / len(log)
        cells, rec = [], {"changed_student": mean("changed_student"), "changed_teacher": mean("changed_teacher"), "kl": mean("kl"), "forget_nll_gap": gap, "at": {}}
        for st in steps:
            row = next(r for r in log if r["step"] == st)
            bf = s in ("bf16-master", "bf16-sr")
            ds, dt = rel_dist(snap, ref, theta0, st, "master", bf), rel_dist(snap, ref, theta0, st, "teacher", bf)
            rec["at"][st] = {"eval_forget_nll": row["eval_forget_nll"], "eval_pretrain_nll": row["eval_pretrain_nll"], "dist": ds, "teacher_dist": dt}
            cells.append(f"{row['eval_forget_nll']:.4f} / {row['eval_pretrain_nll']:.4f} / {ds:.3f} / {dt:.3f}")
        out["setups"][s] = rec
        lines.append(f"| {s} | {rec['changed_student']:.2e} | {rec['changed_teacher']:.2e} | {rec['kl']:.2e} | {gap:.1e} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    with open(f"{a.out}/summary.md", "w") as f:
        f.write(text + "\n")
    with open(f"{a.out}/summary.json", "w") as f:
        json.dump(out, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memorize")
    r = sub.add_parser("run")
    s = sub.add_parser("summary")
    for p in (m, r):
        p.add_argument("--model", required=True)
        p.add_argument("--data", required=True, help="MUSE-News directory (raw/forget.json, privleak/retain2.json)")
        p.add_argument("--seq", type=int, default=64)
        p.add_argument("--n-forget", type=int, default=16)
    for p in (m, r, s):
        p.add_argument("--out", required=True)
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--steps", type=int, default=300)
    m.add_argument("--lr", type=float, default=1e-3)
    m.add_argument("--target-nll", type=float, default=0.5)
    r.add_argument("--setups", default="fp32,bf16-both,bf16-student,bf16-master,bf16-sr")
    r.add_argument("--steps", type=int, default=150)
    r.add_argument("--batch", type=int, default=2)
    r.add_argument("--eval-every", type=int, default=25)
    r.add_argument("--snap-steps", default="50,100,150")
    r.add_argument("--threads", type=int, default=2)
    # The recipe (algorithms.md §1.6, news/mt/mt-kl).
    for k, v in (("alpha", 0.05), ("beta", 1.0), ("delta", 0.005), ("damp", 5.0), ("clip", 1.0), ("tol", 0.02), ("lr", 5e-4), ("momentum", 0.95)):
        r.add_argument(f"--{k}", type=float, default=v)
    a = ap.parse_args()
    {"memorize": cmd_memorize, "run": cmd_run, "summary": cmd_summary}[a.cmd](a)


if __name__ == "__main__":
    main()
