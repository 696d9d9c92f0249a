"""Group a `perf record -e cpu-clock` profile into the categories the step-time analysis needs.

    perf report -i FILE --no-children --sort dso,symbol --stdio | perf_breakdown.py [--top N]

Prints each category's share of the samples (CPU time of the profiled process, so the split does
not depend on how busy the machine was) and, with --top, the heaviest symbols of each category.
"""
import re
import sys
from collections import defaultdict

# First match wins; patterns are tried against "dso symbol".
CATEGORIES = [
    ("GEMM (MKL sgemm/sbgemm + packing)", r"mkl_blas|sgemm|gemm_|mkl_serv"),
    ("attention (SDPA flash kernels)", r"flash_attention|_scaled_dot_product"),
    ("log-softmax / softmax (+ backward)", r"softmax"),
    ("page faults, zeroing, unmap (kernel)", r"\[k\] .*(clear_page|fault|_mm_|mm_fault|anonymous_page|unmap|memcg|folio|lruvec|pte|page|rmap|vma|mas_|alloc_pages|rmqueue|freelist|mpol|nodemask|tlb|zap|lru|madvise|munmap|mmap)"),
    ("scheduler / waits (kernel)", r"\[k\] .*(switch|spin|sched|futex|irq|softirq|idle|wake|rcu|hrtimer|tick|schedule)"),
    ("other kernel", r"\[k\]"),
    ("OpenMP runtime (spin/barrier)", r"libgomp|libiomp|kmp_"),
    ("copies / casts / fills", r"copy_kernel|direct_copy|copy_impl|cast|fill_kernel|memcpy|memset|memmove|__memcpy|zero_"),
    ("reductions (sum/mean/norm)", r"sum_kernel|reduce|Reduce|inner_sum|norm_kernel|mean_kernel|cascade_sum"),
    ("elementwise math (mul/add/div/exp/silu/...)", r"VectorizedLoop2d|loop_2d_from_1d|vml_kernel|Sleef|unary|binary|silu|lerp|addcmul|addcdiv|sqrt|exp|log|rsqrt|pow|where|masked|neg|clamp"),
    ("gather / index / embedding", r"gather|scatter|index|embedding"),
    ("allocator (libc/c10)", r"libc\.so|malloc|free|c10::alloc|CPUAllocator|libc10"),
    ("Python interpreter", r"libpython|libtorch_python"),
]


def main():
    top = 0
    if "--top" in sys.argv:
        top = int(sys.argv[sys.argv.index("--top") + 1])
    totals = defaultdict(float)
    symbols = defaultdict(lambda: defaultdict(float))
    line_re = re.compile(r"^\s*([0-9.]+)%\s+(\S+)\s+(\[[.k]\])\s+(.*?)\s*(?:-\s+-\s*)?$")
    for line in sys.stdin:
        m = line_re.match(line)
        if not m:
            continue
        pct, dso, kind, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4)
        key = f"{dso} {kind} {sym}"
        cat = next((name for name, pat in CATEGORIES if re.search(pat, key)), "other user code")
        totals[cat] += pct
        symbols[cat][sym[:110]] += pct
    for cat, pct in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{pct:6.1f}%  {cat}")
        for sym, p in sorted(symbols[cat].items(), key=lambda kv: -kv[1])[:top]:
            print(f"          {p:5.2f}%  {sym}")


if __name__ == "__main__":
    main()
