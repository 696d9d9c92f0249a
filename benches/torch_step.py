"""The PyTorch side of benches/run.sh: the optimizer step a user would otherwise write with
transformers, in eager mode, timed step by step; and the machine's fp32/bf16 GEMM peak.

    torch_step.py step --method finetune|ngdiff|mean-teacher --model DIR --retain F [--forget F]
                  --limit 4 --max-len 256 --steps 5 --threads 2 --out OUT.json
    torch_step.py gemm --threads 2 [--n 4096] [--dtype float32|bfloat16] [--device cpu|cuda] --out OUT.json

The steps follow algorithms.md (§2.2 NGDiff without AutoLR, §1.2-1.4 mean teacher with NLUL and
the KL penalty), written the way a PyTorch user writes them: `.loss` from `labels`,
`torch.autograd.grad` for the two NGDiff gradients, `.backward()` accumulation for mean teacher,
a deep copy of the model as the teacher, `torch.optim` optimizers. Data: the first `limit` records
of each JSON file, tokenized with the model's tokenizer.json (specials on, as `unlearn` does),
truncated to `max-len` tokens; with limit = batch every step sees the same batch, so the logged
losses must agree with `unlearn run`'s step for step (run.sh checks it).
"""
import argparse
import copy
import json
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def texts(path, limit):
    out = []
    for r in json.load(open(path)):
        out.append(r if isinstance(r, str) else r["text"])
        if len(out) == limit:
            break
    return out


def make_batch(tok, path, limit, max_len, pad_id):
    rows = [tok.encode(t, add_special_tokens=True).ids[:max_len] for t in texts(path, limit)]
    rows = [r for r in rows if len(r) >= 2]
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def target_logprobs(logits, b):
    """log p of every target token (`input_ids[:, 1:]` from `logits[:, :-1]`) and the target mask."""
    lp = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    return lp, (b["labels"][:, 1:] != -100).float()


def global_norm(grads):
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


class Finetune:
    """Token-mean NLL on the retain batch, AdamW on every parameter."""

    def __init__(self, model, a):
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)

    def step(self, bf, br):
        loss = self.model(**br).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss_retain": loss.item()}


class NgDiff:
    """d = g_R/(|g_R|+eps) - g_F/(|g_F|+eps) over the attention/MLP matrices, AdamW (algorithms.md §2.2)."""

    def __init__(self, model, a):
        self.model = model
        self.params = trainable_matrices(model)
        self.opt = torch.optim.AdamW(self.params, lr=a.lr, weight_decay=0.01)
        self.eps = 1e-8

    def step(self, bf, br):
        loss_f = self.model(**bf).loss
        g_f = torch.autograd.grad(loss_f, self.params)
        loss_r = self.model(**br).loss
        g_r = torch.autograd.grad(loss_r, self.params)
        n_f, n_r = global_norm(g_f), global_norm(g_r)
        for p, a, b in zip(self.params, g_f, g_r):
            p.grad = b.div_(n_r + self.eps).sub_(a, alpha=1.0 / (n_f + self.eps))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss_forget": loss_f.item(), "loss_retain": loss_r.item()}


class MeanTeacher:
    """NLUL on the forget batch, KL(teacher || student) on the text batch, clip, proximal pull,
    SGD with momentum, teacher EMA at rate delta*c (algorithms.md §1.2-1.4, mt-unlearn's loop)."""

    def __init__(self, model, a):
        self.model = model
        self.teacher = copy.deepcopy(model).requires_grad_(False)
        self.params = trainable_matrices(model)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        tp = dict(self.teacher.named_parameters())
        self.tparams = [tp[n] for n in names]
        self.opt = torch.optim.SGD(self.params, lr=a.lr, momentum=0.95)
        self.alpha, self.beta, self.delta, self.damp, self.clip, self.tol = 0.05, 1.0, 0.005, 5.0, 1.0, 0.02

    def step(self, bf, br):
        logits = self.model(input_ids=bf["input_ids"], attention_mask=bf["attention_mask"]).logits
        lp, m = target_logprobs(logits, bf)
        n = m.sum()
        p = lp.detach().exp()
        w = p / (1.0 + self.tol - p)
        (self.alpha * (w * lp * m).sum() / n).backward()
        nll_f = (-(lp.detach() * m).sum() / n).item()
        del logits, lp
        with torch.no_grad():
            zt = self.teacher(input_ids=br["input_ids"], attention_mask=br["attention_mask"]).logits
        zs = self.model(input_ids=br["input_ids"], attention_mask=br["attention_mask"]).logits
        kl = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), reduction="none", log_target=True).sum(-1)
        kl = (kl * br["attention_mask"]).sum() / br["attention_mask"].numel()
        (self.beta * kl).backward()
        grads = [q.grad for q in self.params]
        c = min(1.0, self.clip / global_norm(grads))
        torch._foreach_mul_(grads, c)
        with torch.no_grad():
            for q, tq in zip(self.params, self.tparams):
                q.grad.add_(q - tq, alpha=self.damp * c)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            rate = self.delta * c
            torch._foreach_lerp_(self.tparams, [q.detach() for q in self.params], rate)
        return {"loss_forget": nll_f, "loss_retain": kl.item(), "clip": c}


def trainable_matrices(model):
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(any(m in n for m in MATRICES))
        if p.requires_grad:
            params.append(p)
    return params


def cmd_step(a):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    tok = Tokenizer.from_file(a.model + "/tokenizer.json")
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    br = make_batch(tok, a.retain, a.limit, a.max_len, pad_id)
    bf = make_batch(tok, a.forget, a.limit, a.max_len, pad_id) if a.forget else None
    method = {"finetune": Finetune, "ngdiff": NgDiff, "mean-teacher": MeanTeacher}[a.method](model, a)
    steps = []
    # benches/bench.py runs this script and `unlearn run` turn by turn: one byte on the gate
    # (a named pipe) releases one step; each finished step is appended to the progress file.
    gate = open(a.gate, "rb", buffering=0) if a.gate else None
    progress = open(a.progress, "a") if a.progress else sys.stderr
    for i in range(a.steps):
        if gate is not None and len(gate.read(1)) != 1:
            raise SystemExit(f"{a.gate}: closed before step {i + 1}")
        t0 = time.perf_counter()
        logged = method.step(bf, br)
        steps.append({"step": i + 1, "elapsed_s": time.perf_counter() - t0, **logged})
        print(json.dumps(steps[-1]), file=progress, flush=True)
    json.dump(
        {
            "method": a.method,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "batch": list(br["input_ids"].shape),
            "steps": steps,
            "median_s": statistics.median(s["elapsed_s"] for s in steps[a.warmup :]),
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        },
        open(a.out, "w"),
        indent=1,
    )


def cmd_gemm(a):
    """Best of several n x n matmuls: the machine's attainable GEMM rate at this thread count."""
    torch.set_num_threads(a.threads)
    dt = getattr(torch, a.dtype)
    x = torch.randn(a.n, a.n, dtype=dt, device=a.device)
    y = torch.randn(a.n, a.n, dtype=dt, device=a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    torch.matmul(x, y)
    sync()
    best = best_cpu = float("inf")
    for _ in range(a.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(a.inner):
            torch.matmul(x, y)
        sync()
        best = min(best, (time.perf_counter() - t0) / a.inner)
        best_cpu = min(best_cpu, (time.process_time() - c0) / a.inner)
    flop = 2 * a.n**3
    out = {"n": a.n, "dtype": a.dtype, "device": a.device, "threads": a.threads, "best_s": best, "gflops": flop / best / 1e9}
    if a.device == "cpu":
        # Per CPU-second of the `threads` threads: what the cores do when they run, whatever else
        # shares the machine (the wall-clock figure above is only the peak on an idle machine).
        out["gflops_per_thread_cpu_s"] = flop / best_cpu / 1e9
        out["gflops_cpu_normalised"] = out["gflops_per_thread_cpu_s"] * a.threads
    json.dump(out, open(a.out, "w"))
    print(f"GEMM {a.n}^3 {a.dtype} on {a.device} x{a.threads} threads: {out['gflops']:.1f} GFLOP/s wall, "
          f"{out.get('gflops_cpu_normalised', float('nan')):.1f} GFLOP/s per {a.threads} busy threads", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step")
    s.add_argument("--method", required=True, choices=["finetune", "ngdiff", "mean-teacher"])
    s.add_argument("--model", required=True)
    s.add_argument("--forget")
    s.add_argument("--retain", required=True)
    s.add_argument("--limit", type=int, default=4)
    s.add_argument("--max-len", type=int, default=256)
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--lr", type=float, required=True)
    s.add_argument("--threads", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--gate", help="named pipe: read one byte before each step")
    s.add_argument("--progress", help="append one JSON line per finished step here (default: stderr)")
    g = sub.add_parser("gemm")
    g.add_argument("--threads", type=int, required=True)
    g.add_argument("--n", type=int, default=4096)
    g.add_argument("--dtype", default="float32")
    g.add_argument("--device", default="cpu")
    g.add_argument("--reps", type=int, default=5)
    g.add_argument("--inner", type=int, default=1)
    g.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.cmd == "step" and a.method != "finetune" and not a.forget:
        ap.error(f"--method {a.method} needs --forget")
    {"step": cmd_step, "gemm": cmd_gemm}[a.cmd](a)


if __name__ == "__main__":
    main()
