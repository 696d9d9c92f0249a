"""Driver of benches/run.sh: `unlearn` side by side with the PyTorch script a user would write,
in one run, on this machine. Writes OUT/results.json and OUT/results.md.

Sections (--sections, comma separated; default all):
  step  optimizer-step time and peak RSS of `unlearn run` vs benches/torch_step.py for finetune,
        ngdiff and mean-teacher on SmolLM2-135M, fp32 CPU, batch 4 x 256 tokens of MUSE-News text;
        GFLOP/s and the share of the fp32 GEMM peak measured in the same run.
  mpi   weak scaling np=1 vs np=2 (one thread per rank, same per-rank batch) and the exposed
        communication share (comm_wait_s: time blocked on collectives / step time).
  eval  TOFU evaluation throughput (questions/s) of `unlearn eval tofu` vs benches/torch_eval.py
        (transformers `generate` + the same scoring) on the same questions and batch sizes.
  gpu   7B-geometry layers in bf16 on a CUDA device (tokens/s, MFU against the measured bf16
        GEMM peak, NCCL world-1 overhead); skipped with a message when there is no CUDA device.

Timing on a shared machine: the two sides of a comparison are started together and run their
steps turn by turn (a named pipe per process releases one step at a time: UNLEARN_STEP_GATE for
`unlearn`, --gate for the script), alternating who goes first, so that both see the same machine
load; the figure is the median over the steps after the warm-up. Ratios are the meaningful
numbers when the machine is shared.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MUSE_NEWS = "muse/news"


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes that run their steps one at a time


class Gated:
    """A process whose steps are released one by one through named pipes; it appends one JSON
    line per finished step to `progress`."""

    def __init__(self, name, cmd, env, work, progress, gates, rss=True):
        self.name, self.progress, self.gate_paths = name, Path(progress), gates
        self.log_path = work / f"{name}.log"
        self.rss_path = work / f"{name}.rss"
        for g in gates:
            if not os.path.exists(g):
                os.mkfifo(g)
        # O_RDWR never blocks on a FIFO (O_WRONLY would wait for the reader to open it).
        self.fds = [os.open(g, os.O_RDWR) for g in gates]
        wrap = ["/usr/bin/time", "-f", "%M", "-o", str(self.rss_path)] if rss else []
        self.proc = subprocess.Popen(wrap + cmd, env=env, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, cwd=work)

    def lines(self):
        if not self.progress.exists():
            return []
        return [json.loads(l) for l in self.progress.read_text().splitlines() if l.strip()]

    def cpu_seconds(self):
        """(user, system) CPU seconds and minor page faults so far of the process tree (the real
        process runs under /usr/bin/time or mpirun; /proc/PID/stat counts every thread)."""
        tick = os.sysconf("SC_CLK_TCK")
        user = sys_ = faults = 0.0
        seen, stack = set(), [self.proc.pid]
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            faults += int(fields[7])
            user += int(fields[11]) / tick
            sys_ += int(fields[12]) / tick
            try:
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except OSError:
                tasks = []
            for task in tasks:
                try:
                    stack += [int(c) for c in (task / "children").read_text().split()]
                except OSError:
                    pass
        return user, sys_, faults

    def real_pid(self):
        """The benchmarked process itself (the child of /usr/bin/time)."""
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(kids[0]) if kids else self.proc.pid

    def step(self, i, timeout, perf=None):
        """Release step i and wait for its line; adds the CPU time the step took (the process
        sleeps at its gate otherwise, so everything it used meanwhile belongs to the step).
        With `perf` (a path), the step is sampled by `perf record -e cpu-clock` into it."""
        recorder = None
        if perf:
            recorder = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "499", "-p", str(self.real_pid()), "-o", str(perf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        u0, s0, f0 = self.cpu_seconds()
        for fd in self.fds:
            os.write(fd, b"x")
        t0 = time.time()
        while len(self.lines()) < i:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before step {i}:\n{self.tail()}")
            if time.time() - t0 > timeout:
                raise RuntimeError(f"{self.name}: step {i} took longer than {timeout} s")
            time.sleep(0.2)
        u1, s1, f1 = self.cpu_seconds()
        if recorder:
            recorder.send_signal(2)
            recorder.wait()
        return {**self.lines()[i - 1], "cpu_user_s": u1 - u0, "cpu_sys_s": s1 - s0, "minor_faults": f1 - f0}

    def finish(self, timeout=900):
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            for fd in self.fds:
                os.close(fd)
        if rc != 0:
            raise RuntimeError(f"{self.name} failed ({rc}):\n{self.tail()}")
        if self.rss_path.exists():
            return int(self.rss_path.read_text().split()[-1])
        return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self):
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:]) if self.log_path.exists() else ""


def lockstep(procs, steps, timeout, perf_step=None, perf_dir=None):
    """Release step i of every process in turn (order alternating each step); per-process lines.
    Step `perf_step` of each process is profiled into perf_dir/NAME.perf."""
    out = {p.name: [] for p in procs}
    try:
        for i in range(1, steps + 1):
            order = procs if i % 2 else procs[::-1]
            for p in order:
                perf = perf_dir / f"{p.name}.perf" if i == perf_step else None
                out[p.name].append(p.step(i, timeout, perf))
                log(f"  {p.name} step {i}: {out[p.name][-1]['elapsed_s']:.2f} s")
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return out


def median_after_warmup(lines, warmup):
    xs = [l["elapsed_s"] for l in lines[warmup:]]
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------------
# Model arithmetic


def model_flops(cfg, tokens, kind):
    """Model FLOPs of one pass over `tokens` positions (matmuls and attention; elementwise work
    not counted). kind: "fwd", "bwd_all" (every weight trainable) or "bwd_matrices" (only the
    attention/MLP matrices trainable: the head still needs its input gradient)."""
    d, L, V, I = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    h, g = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    e = cfg.get("head_dim") or d // h
    mat_params = L * (d * h * e + 2 * d * g * e + h * e * d + 3 * d * I)
    f_mat = 2 * mat_params * tokens["n"]
    f_head = 2 * d * V * tokens["n"]
    # Causal attention: QK^T and PV over half the keys on average.
    f_attn = L * 2 * 2 * h * e * (tokens["len"] / 2) * tokens["n"]
    if kind == "fwd":
        return f_mat + f_head + f_attn
    if kind == "bwd_all":
        return 2 * (f_mat + f_head + f_attn)
    return 2 * f_mat + f_head + 2 * f_attn


def step_flops(method, cfg, batch, seq):
    t = {"n": batch * seq, "len": seq}
    fwd = model_flops(cfg, t, "fwd")
    if method == "finetune":
        return fwd + model_flops(cfg, t, "bwd_all")
    one = fwd + model_flops(cfg, t, "bwd_matrices")
    if method == "ngdiff":
        return 2 * one
    return 2 * one + fwd  # mean teacher: + the teacher's forward on the text batch


# ---------------------------------------------------------------------------------------------
# Sections


class Bench:
    def __init__(self, a):
        self.a = a
        self.out = Path(a.out).resolve()
        self.work = self.out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.bin = Path(a.bin).resolve()
        self.py = a.python
        self.model = Path(a.model).resolve()
        self.cfg = json.loads((self.model / "config.json").read_text())
        self.shared = Path(a.shared).resolve()
        self.results = {
            "machine": machine(),
            "settings": {k: v for k, v in vars(a).items() if k not in ("out",)},
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def env(self, threads, **extra):
        e = dict(os.environ)
        e.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "RUST_LOG": "info"})
        e.update({k: str(v) for k, v in extra.items()})
        return e

    def gemm(self, threads, dtype="float32", device="cpu", n=4096):
        out = self.work / f"gemm-{dtype}-{device}-{threads}.json"
        subprocess.run([self.py, str(REPO / "benches/torch_step.py"), "gemm", "--threads", str(threads), "--n", str(n),
                        "--dtype", dtype, "--device", device, "--out", str(out)], check=True, env=self.env(threads))
        return json.loads(out.read_text())

    # -- step -----------------------------------------------------------------------------------

    def unlearn_config(self, name, method, retain, forget, batch, threads_note, extra_train="", dist="backend = \"none\""):
        run_dir = self.work / f"run-{name}"
        if run_dir.exists():
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        lim = self.a.limit
        data = f'retain = "{retain}"\nretain_limit = {lim}\nretain_overflow = "truncate"\nsampling = "shuffle"\n'
        if forget:
            data += f'forget = "{forget}"\nforget_limit = {lim}\nforget_overflow = "truncate"\n'
        meth, optim, trainable = {
            "finetune": ('name = "finetune"', 'name = "adamw"\nlr = 1e-5\nweight_decay = 0.01', "all"),
            "ngdiff": ('name = "ngdiff"\nautolr = false', 'name = "adamw"\nlr = 1e-5\nweight_decay = 0.01', "matrices"),
            "mean-teacher": ('name = "mean-teacher"\nforget_loss = "nlul"\npenalty = "kl"', 'name = "sgd"\nlr = 5e-4\nmomentum = 0.95', "matrices"),
        }[method]
        toml = f"""# {threads_note}
[model]
path = "{self.model}"
dtype = "fp32"
device = "cpu"
trainable = "{trainable}"
[data]
{data}[method]
{meth}
[optim]
{optim}
[train]
steps = {self.a.steps}
batch_size = {batch}
max_len = {self.a.max_len}
out_dir = "{run_dir}"
{extra_train}[dist]
{dist}
"""
        path = self.work / f"{name}.toml"
        path.write_text(toml)
        return path, run_dir

    def section_step(self):
        threads = self.a.threads
        news = self.shared / "data" / MUSE_NEWS
        text = news / "raw/forget.json"
        other = news / "sust/forget_2.json"
        peak = self.gemm(threads)
        log(f"fp32 GEMM peak at {threads} threads: {peak['gflops']:.1f} GFLOP/s wall, {peak['gflops_cpu_normalised']:.1f} per busy thread-second x {threads}")
        rows = []
        methods = [m for m in ["finetune", "ngdiff", "mean-teacher"] if m in self.a.methods.split(",")]
        for method in methods:
            # finetune: MUSE-News text as its data; ngdiff: forget = MUSE-News forget articles,
            # retain = other MUSE-News articles; mean teacher: the same, the second as the KL text.
            forget = None if method == "finetune" else text
            retain = text if method == "finetune" else other
            for rnd in range(self.a.rounds):
                rows.append(self.step_pair(method, forget, retain, threads, peak, rnd))
        self.results["gemm_fp32"] = peak
        self.results["step"] = rows

    def step_pair(self, method, forget, retain, threads, peak, rnd):
        name = f"{method}-r{rnd}"
        log(f"step: {method} (round {rnd + 1}), {self.a.steps} steps each, {threads} threads")
        cfg_path, run_dir = self.unlearn_config(name, method, retain, forget, self.a.batch, f"bench step {method}")
        for f in [self.work / f"{name}-torch.progress"]:
            f.unlink(missing_ok=True)
        u = Gated(f"{name}-unlearn", [str(self.bin), "run", "--config", str(cfg_path)],
                  self.env(threads, UNLEARN_STEP_GATE=self.work / f"{name}-u.gate"), self.work,
                  run_dir / "metrics.jsonl", [str(self.work / f"{name}-u.gate")])
        cmd = [self.py, str(REPO / "benches/torch_step.py"), "step", "--method", method, "--model", str(self.model),
               "--retain", str(retain), "--limit", str(self.a.limit), "--max-len", str(self.a.max_len), "--steps", str(self.a.steps),
               "--lr", "1e-5" if method != "mean-teacher" else "5e-4", "--threads", str(threads),
               "--out", str(self.work / f"{name}-torch.json"), "--gate", str(self.work / f"{name}-t.gate"),
               "--progress", str(self.work / f"{name}-torch.progress")]
        if forget:
            cmd += ["--forget", str(forget)]
        t = Gated(f"{name}-torch", cmd, self.env(threads), self.work, self.work / f"{name}-torch.progress", [str(self.work / f"{name}-t.gate")])
        lines = lockstep([u, t], self.a.steps, self.a.step_timeout)
        rss_t = t.finish()
        rss_u = u.finish()
        lu, lt = lines[u.name], lines[t.name]
        mu, mt = median_after_warmup(lu, self.a.warmup), median_after_warmup(lt, self.a.warmup)
        flops = step_flops(method, self.cfg, self.a.batch, self.a.max_len)
        # Same data, same start, same step: the logged losses must agree step by step (relative
        # to the loss, floored at 1e-3: mean teacher's KL starts at 0 and stays ~1e-7, where
        # only fp32 rounding is left to compare).
        diffs = []
        for a_, b_ in zip(lu, lt):
            for k in ("loss_forget", "loss_retain"):
                if a_.get(k) is not None and b_.get(k) is not None:
                    diffs.append(abs(a_[k] - b_[k]) / max(abs(b_[k]), 1e-3))
        paired = [x["elapsed_s"] / y["elapsed_s"] for x, y in zip(lu[self.a.warmup :], lt[self.a.warmup :])]
        cpu = lambda ls: statistics.median(l["cpu_user_s"] + l["cpu_sys_s"] for l in ls[self.a.warmup :])
        faults = lambda ls: statistics.median(l["minor_faults"] for l in ls[self.a.warmup :])
        row = {
            "method": method,
            "round": rnd,
            "unlearn_step_s": [x["elapsed_s"] for x in lu],
            "torch_step_s": [x["elapsed_s"] for x in lt],
            "unlearn_median_s": mu,
            "torch_median_s": mt,
            "ratio": mu / mt,
            "paired_ratios": paired,
            "unlearn_cpu_s": cpu(lu),
            "torch_cpu_s": cpu(lt),
            "cpu_ratio": cpu(lu) / cpu(lt),
            "unlearn_minor_faults": faults(lu),
            "torch_minor_faults": faults(lt),
            "unlearn_peak_rss_kib": rss_u,
            "torch_peak_rss_kib": rss_t,
            "flops_per_step": flops,
            "unlearn_gflops": flops / mu / 1e9,
            "torch_gflops": flops / mt / 1e9,
            "unlearn_peak_share": flops / mu / 1e9 / peak["gflops"],
            "torch_peak_share": flops / mt / 1e9 / peak["gflops"],
            "max_rel_loss_diff": max(diffs) if diffs else None,
            # The same against CPU time (threads busy for cpu_s / threads seconds): steady on a busy machine.
            "unlearn_gflops_cpu": flops / (cpu(lu) / self.a.threads) / 1e9,
            "torch_gflops_cpu": flops / (cpu(lt) / self.a.threads) / 1e9,
            "unlearn_peak_share_cpu": flops / (cpu(lu) / self.a.threads) / 1e9 / peak["gflops_cpu_normalised"],
            "torch_peak_share_cpu": flops / (cpu(lt) / self.a.threads) / 1e9 / peak["gflops_cpu_normalised"],
            "unlearn_losses": [{k: x.get(k) for k in ("loss_forget", "loss_retain")} for x in lu],
            "torch_losses": [{k: x.get(k) for k in ("loss_forget", "loss_retain")} for x in lt],
        }
        log(f"  {method}: unlearn {mu:.2f} s, torch {mt:.2f} s, ratio {mu / mt:.3f} (CPU time {row['cpu_ratio']:.3f}); RSS {rss_u} vs {rss_t} KiB; max rel loss diff {row['max_rel_loss_diff']}")
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        return row

    # -- profile --------------------------------------------------------------------------------

    def section_profile(self):
        """perf profile of one steady-state finetune step of each side, grouped by perf_breakdown.py."""
        threads = self.a.threads
        news = self.shared / "data" / MUSE_NEWS
        text = news / "raw/forget.json"
        name = "profile"
        cfg_path, run_dir = self.unlearn_config(name, "finetune", text, None, self.a.batch, "bench profile")
        (self.work / f"{name}-torch.progress").unlink(missing_ok=True)
        steps = 3
        u = Gated(f"{name}-unlearn", [str(self.bin), "run", "--config", str(cfg_path), "--set", f"train.steps={steps}"],
                  self.env(threads, UNLEARN_STEP_GATE=self.work / f"{name}-u.gate"), self.work, run_dir / "metrics.jsonl", [str(self.work / f"{name}-u.gate")])
        cmd = [self.py, str(REPO / "benches/torch_step.py"), "step", "--method", "finetune", "--model", str(self.model), "--retain", str(text),
               "--limit", str(self.a.limit), "--max-len", str(self.a.max_len), "--steps", str(steps), "--lr", "1e-5", "--threads", str(threads),
               "--out", str(self.work / f"{name}-torch.json"), "--gate", str(self.work / f"{name}-t.gate"), "--progress", str(self.work / f"{name}-torch.progress")]
        t = Gated(f"{name}-torch", cmd, self.env(threads), self.work, self.work / f"{name}-torch.progress", [str(self.work / f"{name}-t.gate")])
        log("profile: perf record of finetune step 3 on each side")
        lockstep([u, t], steps, self.a.step_timeout, perf_step=steps, perf_dir=self.work)
        t.finish()
        u.finish()
        res = {}
        for p in (u, t):
            rep = subprocess.run(["perf", "report", "-i", str(self.work / f"{p.name}.perf"), "--no-children", "--sort", "dso,symbol", "--stdio"],
                                 capture_output=True, text=True)
            groups = subprocess.run([sys.executable, str(REPO / "benches/perf_breakdown.py"), "--top", "3"], input=rep.stdout, capture_output=True, text=True).stdout
            res["unlearn" if p is u else "torch"] = groups
            log(f"{p.name}:\n{groups}")
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        self.results["profile"] = res

    # -- mpi ------------------------------------------------------------------------------------

    def section_mpi(self):
        news = self.shared / "data" / MUSE_NEWS
        text = news / "raw/forget.json"
        per_rank = self.a.batch
        procs = []
        for np_ in (1, 2):
            name = f"mpi-np{np_}"
            cfg_path, run_dir = self.unlearn_config(
                name, "finetune", text, None, per_rank * np_, f"bench mpi weak scaling np={np_}",
                dist=f'backend = "mpi"\nzero = {self.a.mpi_zero}')
            # Every rank needs its data: raise the record limit to the global batch.
            txt = cfg_path.read_text().replace(f"retain_limit = {self.a.limit}", f"retain_limit = {self.a.limit * np_}")
            cfg_path.write_text(txt)
            gate = str(self.work / f"{name}-{{rank}}.gate")
            gates = [gate.replace("{rank}", str(r)) for r in range(np_)]
            cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(np_), str(self.bin), "run", "--config", str(cfg_path)]
            procs.append((np_, run_dir, Gated(name, cmd, self.env(1, UNLEARN_STEP_GATE=gate), self.work,
                                              run_dir / "metrics.jsonl", gates, rss=False)))
        log(f"mpi: weak scaling np=1 vs np=2, 1 thread per rank, {per_rank} x {self.a.max_len} tokens per rank, ZeRO-{self.a.mpi_zero}")
        lines = lockstep([p for _, _, p in procs], self.a.steps, self.a.step_timeout * 2)
        res = {}
        for np_, run_dir, p in procs:
            p.finish()
            ls = lines[p.name][self.a.warmup :]
            step = statistics.median(l["elapsed_s"] for l in ls)
            comm = statistics.median(l["comm_wait_s"] for l in ls)
            # CPU seconds per rank and step: less sensitive to a busy machine than wall time
            # (but Open MPI polls while it waits, so waiting counts as CPU time too).
            cpu = statistics.median((l["cpu_user_s"] + l["cpu_sys_s"]) / np_ for l in ls)
            res[f"np{np_}"] = {"step_s": [l["elapsed_s"] for l in lines[p.name]], "comm_s": [l["comm_wait_s"] for l in lines[p.name]],
                               "median_step_s": step, "median_comm_s": comm, "comm_share": comm / step, "median_cpu_per_rank_s": cpu}
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        res["efficiency"] = res["np1"]["median_step_s"] / res["np2"]["median_step_s"]
        res["cpu_efficiency"] = res["np1"]["median_cpu_per_rank_s"] / res["np2"]["median_cpu_per_rank_s"]
        res["zero"] = self.a.mpi_zero
        log(f"  np1 {res['np1']['median_step_s']:.2f} s, np2 {res['np2']['median_step_s']:.2f} s: efficiency {res['efficiency']:.3f}; "
            f"exposed comm np2 {100 * res['np2']['comm_share']:.1f}%")
        self.results["mpi"] = res

    # -- eval -----------------------------------------------------------------------------------

    def section_eval(self):
        threads = self.a.threads
        tofu = self.shared / "data/tofu"
        n, k = self.a.eval_samples, self.a.eval_new_tokens
        rows = []
        for rnd in range(self.a.rounds):
            out = self.work / f"eval-unlearn-{rnd}"
            t0 = time.time()
            subprocess.run([str(self.bin), "eval", "tofu", "--model", str(self.model), "--forget", "forget01", "--data", str(tofu),
                            "--out", str(out), "--max-samples", str(n), "--max-new-tokens", str(k), "--batch-size", "8",
                            "--gen-batch-size", "32", "--device", "cpu", "--dist", "none"],
                           check=True, env=self.env(threads), stdout=open(self.work / f"eval-unlearn-{rnd}.log", "w"), stderr=subprocess.STDOUT)
            wall_u = time.time() - t0
            rep = json.loads((out / "report.json").read_text())
            timings = rep.get("run", {}).get("timings_s") or {}
            t_u = sum(timings.values()) if timings else wall_u
            samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines() if l.strip()]
            tj = self.work / f"eval-torch-{rnd}.json"
            subprocess.run([self.py, str(REPO / "benches/torch_eval.py"), "--model", str(self.model), "--data", str(tofu), "--forget", "forget01",
                            "--max-samples", str(n), "--max-new-tokens", str(k), "--batch-size", "8", "--gen-batch-size", "32",
                            "--threads", str(threads), "--out", str(tj)], check=True, env=self.env(threads))
            t = json.loads(tj.read_text())
            questions = t["questions"]
            same, loss_diff = compare_eval(samples, t["samples"])
            rows.append({"questions": questions, "unlearn_s": t_u, "unlearn_wall_s": wall_u, "torch_s": t["eval_s"],
                         "unlearn_qps": questions / t_u, "torch_qps": questions / t["eval_s"], "ratio_time": t_u / t["eval_s"],
                         "identical_generations": same, "max_abs_answer_loss_diff": loss_diff, "unlearn_timings_s": timings,
                         "torch_timings_s": t["timings_s"]})
            log(f"eval round {rnd + 1}: unlearn {questions / t_u:.2f} q/s, transformers {questions / t['eval_s']:.2f} q/s; identical generations {same}")
            subprocess.run(["rm", "-rf", str(out)], check=True)
        self.results["eval"] = {"max_samples_per_set": n, "max_new_tokens": k, "rounds": rows}

    # -- gpu ------------------------------------------------------------------------------------

    def section_gpu(self):
        probe = subprocess.run([self.py, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True)
        if probe.stdout.strip() != "True":
            msg = "no CUDA device on this machine (torch.cuda.is_available() is False)"
            log(f"gpu: skipped: {msg}")
            self.results["gpu"] = {"skipped": msg}
            return
        peak = self.gemm(1, dtype="bfloat16", device="cuda", n=8192)
        log(f"bf16 GEMM peak: {peak['gflops']:.0f} GFLOP/s")
        mdir = self.work / "w7b-l4"
        geometry = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
                    "vocab_size": 32000, "num_hidden_layers": 4, "max_position_embeddings": 4096}
        if not (mdir / "model.safetensors").exists() and not (mdir / "model.safetensors.index.json").exists():
            subprocess.run([self.py, str(REPO / "tests/py/hf_ref.py"), "make-model", "--out", str(mdir), "--config", json.dumps(geometry),
                            "--seed", "1", "--tokenizer", "bytebpe"], check=True, stdout=subprocess.DEVNULL)
        cfg = json.loads((mdir / "config.json").read_text())
        texts = self.work / "gpu-text.json"
        texts.write_text(json.dumps([("The author was born in a small town near the sea. " * 400) + str(i) for i in range(64)]))
        res = {"gemm_bf16": peak, "layers": geometry["num_hidden_layers"]}
        batch, seq = 4, 2048
        for backend in ("none", "nccl"):
            name = f"gpu-{backend}"
            run_dir = self.work / f"run-{name}"
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            toml = f"""[model]
path = "{mdir}"
dtype = "bf16"
device = "cuda"
trainable = "matrices"
[data]
retain = "{texts}"
retain_overflow = "truncate"
[method]
name = "finetune"
[optim]
name = "adamw"
lr = 1e-5
[train]
steps = {self.a.steps + 2}
batch_size = {batch}
max_len = {seq}
out_dir = "{run_dir}"
[dist]
backend = "{backend}"
"""
            p = self.work / f"{name}.toml"
            p.write_text(toml)
            r = subprocess.run([str(self.bin), "run", "--config", str(p)], env=self.env(self.a.threads), capture_output=True, text=True)
            if r.returncode != 0:
                res[backend] = {"error": (r.stdout + r.stderr)[-2000:]}
                log(f"gpu {backend}: failed")
                continue
            lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
            step = statistics.median(l["elapsed_s"] for l in lines[self.a.warmup + 1 :])
            flops = model_flops(cfg, {"n": batch * seq, "len": seq}, "fwd") + model_flops(cfg, {"n": batch * seq, "len": seq}, "bwd_matrices")
            res[backend] = {"step_s": step, "tokens_per_s": batch * seq / step, "tflops": flops / step / 1e12, "mfu": flops / step / 1e9 / peak["gflops"]}
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        if "step_s" in res.get("none", {}) and "step_s" in res.get("nccl", {}):
            res["nccl_world1_overhead"] = res["nccl"]["step_s"] / res["none"]["step_s"] - 1
        self.results["gpu"] = res


def compare_eval(unlearn_samples, torch_samples):
    """How many greedy answers are identical after decoding, and the largest difference of the
    per-answer mean NLL (over how many answers), between the two evaluations (matched by set and
    index)."""
    t = {(s["set"], s["index"]): s for s in torch_samples}
    same, total, diff, n_loss = 0, 0, 0.0, 0
    for s in unlearn_samples:
        o = t.get((s.get("split"), s.get("index")))
        if o is None:
            continue
        total += 1
        same += (s.get("generation") or "") == o["generation"]
        v = (s.get("scores") or {}).get("answer_loss")
        if v is not None:
            n_loss += 1
            diff = max(diff, abs(v - o["answer_loss"]))
    return f"{same}/{total}", {"max_abs": diff, "compared": n_loss}


def machine():
    cpu = ""
    try:
        for l in open("/proc/cpuinfo"):
            if l.startswith("model name"):
                cpu = l.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for l in open("/proc/meminfo"):
            if l.startswith("MemTotal"):
                mem = int(l.split()[1]) // 1024
    except OSError:
        pass
    load = os.getloadavg()
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_mib": mem, "kernel": platform.release(), "loadavg_at_start": load}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench-results"))
    ap.add_argument("--bin", default=os.environ.get("UNLEARN_BIN", str(REPO / "target/release/unlearn")))
    ap.add_argument("--python", default=os.environ.get("UNLEARN_PYTHON", sys.executable))
    ap.add_argument("--model", default=os.path.expanduser(os.environ.get("BENCH_MODEL", "~/.cache/unlearn/models/smollm2-135m-instruct")))
    ap.add_argument("--shared", default=os.environ.get("UNLEARN_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--sections", default="step,mpi,eval,gpu", help="any of step, mpi, eval, gpu, profile (needs perf)")
    ap.add_argument("--methods", default="finetune,ngdiff,mean-teacher")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--limit", type=int, default=4, help="records per data file (= batch: every step sees the same batch)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--mpi-zero", type=int, default=2)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--eval-new-tokens", type=int, default=32)
    ap.add_argument("--step-timeout", type=float, default=600)
    a = ap.parse_args()
    b = Bench(a)
    t0 = time.time()
    for s in a.sections.split(","):
        getattr(b, f"section_{s}")()
        b.results["elapsed_s"] = time.time() - t0
        write(b)
    log(f"done in {time.time() - t0:.0f} s: {b.out / 'results.md'}")


def write(b):
    (b.out / "results.json").write_text(json.dumps(b.results, indent=1))
    import bench_table

    (b.out / "results.md").write_text(bench_table.render(b.results))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
