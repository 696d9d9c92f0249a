"""results.json of benches/bench.py → the Markdown table (figure, peer figure, ratio, target).

    bench_table.py bench-results/results.json > bench-results/results.md
"""
import json
import statistics
import sys


def gib(kib):
    return f"{kib / 1048576:.2f} GiB" if kib else "n/a"


def verdict(ok):
    return "met" if ok else "**missed**"


def render(r):
    m = r.get("machine", {})
    s = r.get("settings", {})
    out = [
        "# unlearn vs PyTorch, one run",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('mem_mib', 0) / 1024:.0f} GiB; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m.get('loadavg_at_start', []))}. Started {r.get('started', '?')}, took {r.get('elapsed_s', 0) / 60:.1f} min.",
        "",
    ]
    steps = r.get("step")
    if steps:
        peak = r["gemm_fp32"]["gflops"]
        out += [
            f"## Optimizer step, SmolLM2-135M, fp32 CPU, {s.get('batch')} × {s.get('max_len')} tokens, {s.get('threads')} threads",
            "",
            f"Both sides started together and ran their steps turn by turn (alternating who goes first); median of "
            f"{s.get('steps', 0) - s.get('warmup', 0)} steps after {s.get('warmup')} warm-up step(s). fp32 GEMM peak measured in the "
            f"same run (4096³ torch.matmul, {s.get('threads')} threads): **{peak:.0f} GFLOP/s** wall-clock, "
            f"**{r['gemm_fp32'].get('gflops_cpu_normalised', float('nan')):.0f} GFLOP/s** per {s.get('threads')} busy threads (CPU time). CPU s/step is user + system time of the "
            f"step (read from /proc around it): on a shared machine it is the steadier figure; wall time is what the target is about.",
            "",
            "| method | unlearn | PyTorch | ratio | target | CPU s/step unlearn / PyTorch (ratio) | page faults/step unlearn / PyTorch | peak RSS unlearn | peak RSS PyTorch | target | GFLOP/s (share of peak) unlearn / PyTorch, wall | the same per busy thread-second | logged losses: max difference, relative (floor 1e-3) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in steps:
            ratio = row["ratio"]
            rss_ok = row["unlearn_peak_rss_kib"] and row["torch_peak_rss_kib"] and row["unlearn_peak_rss_kib"] <= row["torch_peak_rss_kib"]
            out.append(
                f"| {row['method']}{' (round ' + str(row['round'] + 1) + ')' if s.get('rounds', 1) > 1 else ''} "
                f"| {row['unlearn_median_s']:.2f} s | {row['torch_median_s']:.2f} s | {ratio:.3f}× "
                f"(paired {statistics.median(row['paired_ratios']):.3f}×) | ≤ 0.80×: {verdict(ratio <= 0.8)} "
                f"| {row['unlearn_cpu_s']:.1f} / {row['torch_cpu_s']:.1f} ({row['cpu_ratio']:.2f}×) "
                f"| {row['unlearn_minor_faults'] / 1e6:.2f} M / {row['torch_minor_faults'] / 1e6:.2f} M "
                f"| {gib(row['unlearn_peak_rss_kib'])} | {gib(row['torch_peak_rss_kib'])} | ≤ PyTorch: {verdict(rss_ok)} "
                f"| {row['unlearn_gflops']:.0f} ({100 * row['unlearn_peak_share']:.0f}%) / {row['torch_gflops']:.0f} ({100 * row['torch_peak_share']:.0f}%) "
                f"| {row.get('unlearn_gflops_cpu', float('nan')):.0f} ({100 * row.get('unlearn_peak_share_cpu', float('nan')):.0f}%) / "
                f"{row.get('torch_gflops_cpu', float('nan')):.0f} ({100 * row.get('torch_peak_share_cpu', float('nan')):.0f}%) "
                f"| {row['max_rel_loss_diff']:.1e} |"
            )
        out += ["", "Per-step times (s), warm-up first:", ""]
        for row in steps:
            u = ", ".join(f"{x:.2f}" for x in row["unlearn_step_s"])
            t = ", ".join(f"{x:.2f}" for x in row["torch_step_s"])
            out.append(f"- {row['method']}: unlearn [{u}], PyTorch [{t}]")
        out.append("")
    mpi = r.get("mpi")
    if mpi:
        e = mpi["efficiency"]
        out += [
            f"## MPI weak scaling (finetune, ZeRO-{mpi['zero']}, 1 thread per rank, {s.get('batch')} × {s.get('max_len')} tokens per rank)",
            "",
            "| | np=1 | np=2 | figure | target |",
            "|---|---|---|---|---|",
            f"| step time | {mpi['np1']['median_step_s']:.2f} s | {mpi['np2']['median_step_s']:.2f} s | efficiency {e:.3f} | ≥ 0.90: {verdict(e >= 0.9)} |",
            f"| CPU time per rank | {mpi['np1']['median_cpu_per_rank_s']:.2f} s | {mpi['np2']['median_cpu_per_rank_s']:.2f} s | "
            f"CPU-time efficiency {mpi['cpu_efficiency']:.3f} | (busy-machine cross-check) |",
            f"| time in collectives | {mpi['np1']['median_comm_s']:.2f} s ({100 * mpi['np1']['comm_share']:.1f}%) | "
            f"{mpi['np2']['median_comm_s']:.2f} s ({100 * mpi['np2']['comm_share']:.1f}%) | exposed share at np=2 | — |",
            "",
        ]
    ev = r.get("eval")
    if ev:
        rows = ev["rounds"]
        qu = statistics.median(x["unlearn_qps"] for x in rows)
        qt = statistics.median(x["torch_qps"] for x in rows)
        out += [
            f"## TOFU evaluation throughput ({rows[0]['questions']} questions: {ev['max_samples_per_set']} per set × 4 sets, "
            f"scoring answer/paraphrase/perturbed + greedy answer ≤ {ev['max_new_tokens']} new tokens, batch 8 / 32)",
            "",
            "| | unlearn eval tofu | transformers generate + scoring | ratio (higher: unlearn faster) | identical greedy answers | max abs. difference of answer NLL |",
            "|---|---|---|---|---|---|",
            f"| questions/s | {qu:.2f} | {qt:.2f} | {qu / qt:.2f}× | {rows[-1]['identical_generations']} | "
            f"{rows[-1]['max_abs_answer_loss_diff']['max_abs']:.1e} over {rows[-1]['max_abs_answer_loss_diff']['compared']} answers |",
            "",
        ]
    prof = r.get("profile")
    if prof:
        out += ["## Where a finetune step's CPU time goes (perf, cpu-clock samples of one steady-state step)", ""]
        for side in ("unlearn", "torch"):
            out += [f"{'unlearn' if side == 'unlearn' else 'PyTorch'}:", "", "```", prof[side].rstrip(), "```", ""]
    gpu = r.get("gpu")
    if gpu is not None:
        out += ["## GPU (7B-geometry layers, bf16)", ""]
        if "skipped" in gpu:
            out += [f"Skipped: {gpu['skipped']}.", ""]
        else:
            out += [f"bf16 GEMM peak {gpu['gemm_bf16']['gflops'] / 1000:.0f} TFLOP/s; {gpu['layers']} layers of Llama-2-7B width, finetune of the matrices, 4 × 2048 tokens.", "",
                    "| backend | step | tokens/s | TFLOP/s | MFU |", "|---|---|---|---|---|"]
            for b in ("none", "nccl"):
                x = gpu.get(b, {})
                if "step_s" in x:
                    out.append(f"| {b} | {x['step_s']:.3f} s | {x['tokens_per_s']:.0f} | {x['tflops']:.1f} | {100 * x['mfu']:.1f}% |")
                else:
                    out.append(f"| {b} | failed: {x.get('error', '?')[-200:]!r} | | | |")
            if "nccl_world1_overhead" in gpu:
                out += ["", f"NCCL world-1 overhead: {100 * gpu['nccl_world1_overhead']:+.1f}% step time."]
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(json.load(open(sys.argv[1]))))
