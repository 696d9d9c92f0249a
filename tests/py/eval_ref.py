"""Independent re-computation of `unlearn eval muse|tofu` outputs with transformers, rouge_score,
numpy, scipy and scikit-learn, for tests/eval.rs.

  overfit     --model DIR --out DIR [--steps N] [--per-file K] [--prompt-tokens N]
              fine-tune a tiny model on a few TOFU and MUSE QA pairs (so that generations and
              probabilities are not pure noise); saves an HF directory with the tokenizer.
  check-tofu  --run DIR --model DIR --data DIR [--retain-run DIR] [--n-gen K] [--n-nll K]
  check-muse  --run DIR --model DIR --data DIR --mmlu DIR [--retain-run DIR] [--n-gen K] [--n-nll K]
              print one JSON object of differences / mismatch counts (the Rust test asserts on it).

Everything that the benchmark defines is rebuilt here from the data files and the documented
procedures (prompts, references, stop strings, letter parsing, Min-K, AUC, KS, hmean), not read
back from the Rust side; only the per-sample generations and losses are taken from samples.jsonl,
and those are themselves re-derived for the first K samples of each split with transformers.
"""
import argparse
import json
import math
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_ref import hf_tokenizer, load, read_records as read_json_any  # noqa: E402

torch.set_num_threads(1)

SHARED = os.environ.get("UNLEARN_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared"))
STOPS = ["\n\n", "\nQuestion", "Question:"]


def load_run(d):
    with open(os.path.join(d, "report.json")) as f:
        report = json.load(f)
    samples = [json.loads(l) for l in open(os.path.join(d, "samples.jsonl")) if l.strip()]
    return report, samples


def by_split(samples):
    out = {}
    for s in samples:
        out.setdefault(s["split"], []).append(s)
    for v in out.values():
        v.sort(key=lambda s: s["index"])
    return out


def hf(model_dir):
    return load(model_dir, "fp32"), hf_tokenizer(model_dir)


def eos_ids(model):
    e = model.config.eos_token_id
    return e if isinstance(e, list) else [e]


def greedy(model, ids, max_new):
    """transformers generate (greedy, one prompt, no padding); new tokens up to the first EOS."""
    eos = eos_ids(model)
    with torch.no_grad():
        g = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                           eos_token_id=eos, pad_token_id=eos[0])
    new = g[0, len(ids):].tolist()
    for i, t in enumerate(new):
        if t in eos:
            return new[:i]
    return new


def decode(tok, ids, clean_up):
    text = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    # transformers 5 refuses clean-up for BPE tokenizers; MUSE ran with 4.x, which applied it.
    return tok.clean_up_tokenization(text) if clean_up else text


def cut(text, stops=STOPS):
    for w in stops:
        text = text.split(w)[0]
    return text


def lead_count(tok):
    return len(tok("a")["input_ids"]) - len(tok("a", add_special_tokens=False)["input_ids"])


def fit_prompt(ids, max_tokens, lead):
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    lead = min(lead, max_tokens)
    return ids[:lead] + ids[len(ids) - (max_tokens - lead):]


def token_logprobs(model, ids, first_target):
    """log p of ids[first_target:] given the prefix, float64 from fp32 log-softmax."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return lp[first_target - 1:].double().numpy()


def rel(a, b):
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b) / max(1e-300, abs(b)) if b != 0 else abs(a)


def print_comparison(res, agg, report):
    """Compare the independently computed aggregates with report.json and print the result."""
    for k, v in agg.items():
        ours = report["metrics"][k]["value"]
        res["agg_max_rel_diff"] = max(res["agg_max_rel_diff"], rel(ours, float(v)))
        res["agg_checked"].append(k)
    res["values"] = {k: float(v) for k, v in agg.items()}
    print(json.dumps(res))


# --------------------------------------------------------------------------------------- overfit

def cmd_overfit(a):
    """Teach a tiny model a few evaluation items, each in exactly the token layout the evaluation
    will present (TOFU QA format; MUSE prompts fitted to --prompt-tokens), so that the outputs
    of the evaluation are not pure noise and ROUGE / accuracy checks compare non-trivial values."""
    model, tok = hf(a.model)
    eos = eos_ids(model)[0]
    lead = lead_count(tok)
    tofu = os.path.join(SHARED, "data", "tofu")
    muse = os.path.join(SHARED, "data", "muse")
    k = a.per_file
    no_sp = lambda t: tok(t, add_special_tokens=False)["input_ids"]
    fit = lambda text: fit_prompt(tok(text)["input_ids"], a.prompt_tokens, lead)
    seqs = []
    for f in ["forget01_perturbed.json", "retain_perturbed.json", "real_authors_perturbed.json",
              "world_facts_perturbed.json"]:
        for r in read_json_any(os.path.join(tofu, f))[:k]:
            seqs.append(tok("Question: " + r["question"] + "\nAnswer:")["input_ids"] + no_sp(" " + r["answer"]) + [eos])
    for stem in ["forget_qa", "retain2_qa"]:
        icl = read_json_any(os.path.join(muse, f"news/knowmem/{stem}_icl.json"))
        prefix = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in icl)
        for d in read_json_any(os.path.join(muse, f"news/knowmem/{stem}.json"))[:k]:
            seqs.append(fit(prefix + f"Question: {d['question']}\nAnswer: ") + no_sp(d["answer"] + "\n\n"))
    for d in read_json_any(os.path.join(muse, "news/verbmem/forget.json"))[:k]:
        seqs.append(fit(d["prompt"]) + no_sp(d["gt"])[:24])
    icl = read_json_any(os.path.join(muse, "mmlu_subsample/mmlu_icl.json"))[0]["text"]
    for d in read_json_any(os.path.join(muse, "mmlu_subsample/mmlu_all_val.json"))[:k]:
        prompt = icl + "\n" + f"Quesion: {d['question']}\n\nChoices:\n" + \
            "\n".join(f"{l}. {c}" for c, l in zip(d["choices"], "ABCD")) + "\n\nCorrect answer:"
        seqs.append(fit(prompt) + no_sp(" " + "ABCD"[int(d["answer"])] + "\n\n"))
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    model.train()
    for step in range(a.steps):
        batch = [seqs[(step * 8 + j) % len(seqs)] for j in range(min(8, len(seqs)))]
        width = max(len(s) for s in batch)
        ids = torch.tensor([s + [eos] * (width - len(s)) for s in batch])
        labels = torch.tensor([s + [-100] * (width - len(s)) for s in batch])
        mask = (labels != -100).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(a.model, f), os.path.join(a.out, f))
    print(json.dumps({"final_loss": float(loss.detach()), "sequences": len(seqs)}))


# ------------------------------------------------------------------------------------------ TOFU

TOFU_FILES = {"retain": "retain_perturbed.json", "real_authors": "real_authors_perturbed.json",
              "world_facts": "world_facts_perturbed.json"}


def cmd_check_tofu(a):
    from rouge_score import rouge_scorer
    from scipy.stats import hmean, ks_2samp

    report, samples = load_run(a.run)
    splits = by_split(samples)
    limits = report["limits"]
    forget = report["truth_stats"]["split"]
    files = dict(TOFU_FILES, forget=forget + "_perturbed.json")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    model, tok = hf(a.model)
    eos = eos_ids(model)[0]
    res = {"rouge_max_diff": 0.0, "nll_max_diff": 0.0, "nll_checked": 0, "gen_checked": 0, "gen_mismatch": 0,
           "prompt_mismatch": 0, "agg_max_rel_diff": 0.0, "agg_checked": [], "n": {}}

    def nll(q, ans):
        p = tok("Question: " + q + "\nAnswer:")["input_ids"]
        ids = (p + tok(" " + ans, add_special_tokens=False)["input_ids"] + [eos])[: limits["max_len"]]
        return float(-token_logprobs(model, ids, len(p)).mean())

    agg = {}
    for key, fname in files.items():
        data = read_json_any(os.path.join(a.data, fname))
        rows = splits[key]
        res["n"][key] = len(rows)
        assert [r["index"] for r in rows] == list(range(len(rows))), key
        for i, s in enumerate(rows):
            d = data[i]
            if s["prompt"] != "Question: " + d["question"] + "\nAnswer:" or s["reference"] != d["answer"]:
                res["prompt_mismatch"] += 1
            r = scorer.score(d["answer"], s["generation"])["rougeL"].recall
            res["rouge_max_diff"] = max(res["rouge_max_diff"], abs(r - s["scores"]["rouge_l_recall"]))
            if i < a.n_nll:
                sc = s["scores"]
                ours = [sc["answer_loss"]] + ([sc["paraphrased_loss"]] if key in ("forget", "retain") else []) + sc["perturbed_losses"]
                ref = [nll(d["question"], d["answer"])]
                if key in ("forget", "retain"):
                    ref.append(nll(d["question"], d["paraphrased_answer"]))
                ref += [nll(d["question"], p) for p in d["perturbed_answer"]]
                res["nll_max_diff"] = max(res["nll_max_diff"], max(abs(x - y) for x, y in zip(ours, ref)))
                res["nll_checked"] += len(ref)
            if i < a.n_gen:
                ids = tok("Question: " + d["question"] + "\nAnswer:")["input_ids"]
                g = decode(tok, greedy(model, ids, limits["max_new_tokens"]), False)
                res["gen_checked"] += 1
                res["gen_mismatch"] += int(g != s["generation"])
        # Aggregates from the per-sample losses with numpy, as legacy aggregate_eval_stat does.
        la = np.array([s["scores"]["answer_loss"] for s in rows])
        lpert = [np.array(s["scores"]["perturbed_losses"]) for s in rows]
        base = np.array([s["scores"]["paraphrased_loss"] for s in rows]) if key in ("forget", "retain") else la
        stat = np.array([np.exp(p.mean() - b) for p, b in zip(lpert, base)])
        if key in ("forget", "retain"):
            prob = np.mean(np.exp(-la))
        else:
            prob = np.mean([np.exp(-t) / (np.exp(-t) + np.exp(-p).sum()) for t, p in zip(la, lpert)])
        rouge = np.mean([s["scores"]["rouge_l_recall"] for s in rows])
        if key == "forget":
            agg["forget_prob"] = prob
            agg["forget_rouge"] = rouge
            agg["forget_truth_ratio"] = np.mean(np.minimum(stat, 1 / stat))
            forget_stats = stat
            res["forget_stats_max_rel_diff"] = max(rel(x, y) for x, y in zip(report["truth_stats"]["values"], stat))
        else:
            agg[key + "_prob"] = prob
            agg[key + "_rouge"] = rouge
            agg[key + "_truth_ratio"] = np.mean(np.maximum(0, 1 - 1 / stat))
    agg["model_utility"] = hmean([agg[f"{k}_{m}"] for k in ["real_authors", "world_facts", "retain"]
                                  for m in ["rouge", "prob", "truth_ratio"]])
    if a.retain_run:
        rrep, rsamples = load_run(a.retain_run)
        rstats = [s["scores"]["truth_stat"] for s in by_split(rsamples)["forget"]]
        agg["forget_quality"] = ks_2samp(forget_stats, rstats).pvalue
    print_comparison(res, agg, report)


# ------------------------------------------------------------------------------------------ MUSE

def muse_auc(forget, holdout):
    """MUSE's sweep(): labels 0 = forget, 1 = holdout, roc_curve(y, -score), sklearn auc."""
    from sklearn.metrics import auc as sk_auc, roc_curve

    ppl = np.array(forget + holdout)
    y = np.array([0] * len(forget) + [1] * len(holdout))
    fpr, tpr, _ = roc_curve(y, -ppl)
    return float(sk_auc(fpr, tpr))


def cmd_check_muse(a):
    from rouge_score import rouge_scorer

    report, samples = load_run(a.run)
    splits = by_split(samples)
    lim = report["limits"]
    variant = report["variant"]
    ou = variant == "open-unlearning"
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=ou)
    model, tok = hf(a.model)
    lead = lead_count(tok)
    nmax = lim["max_samples"]
    res = {"rouge_max_diff": 0.0, "prompt_mismatch": 0, "reference_mismatch": 0, "gen_checked": 0,
           "gen_mismatch": 0, "mink_max_diff": 0.0, "mink_checked": 0, "agg_max_rel_diff": 0.0,
           "agg_checked": [], "parts": sorted(splits)}
    agg = {}

    def check_gen(s, prompt, max_new, finish):
        ids = fit_prompt(tok(prompt)["input_ids"], lim["max_prompt_tokens"], lead)
        g = finish(greedy(model, ids, max_new))
        res["gen_checked"] += 1
        res["gen_mismatch"] += int(g != s["generation"])

    if "verbmem_f" in splits:
        data = read_json_any(os.path.join(a.data, "verbmem/forget.json"))[:nmax]
        rows = splits["verbmem_f"]
        n = lim["max_new_tokens_verbmem"]
        f1 = []
        for i, (s, d) in enumerate(zip(rows, data)):
            if ou:
                ref = d["gt"].strip()
            else:
                ref = decode(tok, tok(d["gt"])["input_ids"][:n], True)
            res["prompt_mismatch"] += int(s["prompt"] != d["prompt"])
            res["reference_mismatch"] += int(s["reference"] != ref)
            sc = scorer.score(ref, s["generation"])["rougeL"].fmeasure
            res["rouge_max_diff"] = max(res["rouge_max_diff"], abs(sc - s["scores"]["rouge_l_f1"]))
            f1.append(sc)
            if i < a.n_gen:
                fin = (lambda g: decode(tok, g, True).strip()) if ou else (lambda g: decode(tok, g, True))
                check_gen(s, d["prompt"], n, fin)
        agg["verbmem_f"] = sum(f1) / len(f1) * 100
    for key, stem in [("knowmem_f", "forget_qa"), ("knowmem_r", "retain2_qa")]:
        if key not in splits:
            continue
        qa = read_json_any(os.path.join(a.data, f"knowmem/{stem}.json"))[:nmax]
        icl = read_json_any(os.path.join(a.data, f"knowmem/{stem}_icl.json"))
        prefix = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in icl)
        rows = splits[key]
        f1 = []
        for i, (s, d) in enumerate(zip(rows, qa)):
            prompt = prefix + f"Question: {d['question']}\nAnswer: "
            res["prompt_mismatch"] += int(s["prompt"] != prompt)
            res["reference_mismatch"] += int(s["reference"] != d["answer"])
            sc = scorer.score(d["answer"], s["generation"])["rougeL"].fmeasure
            res["rouge_max_diff"] = max(res["rouge_max_diff"], abs(sc - s["scores"]["rouge_l_f1"]))
            f1.append(sc)
            if i < a.n_gen:
                fin = (lambda g: cut(decode(tok, g, True)).strip()) if ou else (lambda g: cut(decode(tok, g, True)))
                check_gen(s, prompt, lim["max_new_tokens_knowmem"], fin)
        agg[key] = sum(f1) / len(f1) * 100
    if "privleak_forget" in splits:
        scores = {}
        for part in ["forget", "holdout"]:
            texts = [t if isinstance(t, str) else t["text"] for t in read_json_any(os.path.join(a.data, f"privleak/{part}.json"))][:nmax]
            rows = splits["privleak_" + part]
            for i, (s, text) in enumerate(zip(rows, texts)):
                res["prompt_mismatch"] += int(s["prompt"] != text)
                if i < a.n_nll:
                    ids = tok(text)["input_ids"]
                    if lim["max_text_tokens"] is not None:
                        ids = ids[: lead + lim["max_text_tokens"]]
                    lp = token_logprobs(model, ids, 1)
                    k = int(len(lp) * 0.4)
                    if ou:
                        k = max(1, k)
                    mink = float(-np.mean(np.sort(lp)[:k]))
                    res["mink_max_diff"] = max(res["mink_max_diff"], abs(mink - s["scores"]["min_k_40"]))
                    res["mink_checked"] += 1
            scores[part] = [s["scores"]["min_k_40"] for s in rows]
        auc = muse_auc(scores["forget"], scores["holdout"])
        agg["privleak_auc"] = auc
        ref = a.retain_auc
        if a.retain_run:
            rsplits = by_split(load_run(a.retain_run)[1])
            ref = muse_auc(*[[s["scores"]["min_k_40"] for s in rsplits["privleak_" + p]] for p in ["forget", "holdout"]])
            res["retain_auc"] = ref
        if ref is not None:
            agg["privleak"] = (auc - ref) / ref * 100
    if "mmlu" in splits:
        items = read_json_any(os.path.join(a.mmlu, "mmlu_all_val.json"))[:nmax]
        icl = read_json_any(os.path.join(a.mmlu, "mmlu_icl.json"))[0]["text"]
        letters = ["A", "B", "C", "D"]
        rows = splits["mmlu"]
        correct = []
        for i, (s, d) in enumerate(zip(rows, items)):
            prompt = icl + "\n" + f"Quesion: {d['question']}\n\n" + "Choices:\n" + \
                "\n".join(f"{l}. {c}" for c, l in zip(d["choices"], letters)) + "\n\nCorrect answer:"
            res["prompt_mismatch"] += int(s["prompt"] != prompt)
            out = s["generation"]
            try:
                pred = letters.index(out[0])
            except (ValueError, IndexError):
                pred = -1
            correct.append(int(pred == int(d["answer"])))
            if i < a.n_gen:
                check_gen(s, prompt, lim["max_new_tokens_mmlu"], lambda g: cut(decode(tok, g, False)).strip())
        agg["mmlu"] = sum(correct) / len(correct) * 100
    print_comparison(res, agg, report)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("overfit")
    o.add_argument("--model", required=True)
    o.add_argument("--out", required=True)
    o.add_argument("--steps", type=int, default=150)
    o.add_argument("--per-file", type=int, default=2)
    o.add_argument("--prompt-tokens", type=int, default=64)
    o.add_argument("--lr", type=float, default=1e-2)
    o.set_defaults(f=cmd_overfit)
    for name, fn in [("check-tofu", cmd_check_tofu), ("check-muse", cmd_check_muse)]:
        c = sub.add_parser(name)
        c.add_argument("--run", required=True)
        c.add_argument("--model", required=True)
        c.add_argument("--data", required=True)
        c.add_argument("--mmlu", default=None)
        c.add_argument("--retain-run", default=None)
        c.add_argument("--retain-auc", type=float, default=None)
        c.add_argument("--n-gen", type=int, default=2)
        c.add_argument("--n-nll", type=int, default=3)
        c.set_defaults(f=fn)
    a = p.parse_args()
    a.f(a)


if __name__ == "__main__":
    sys.exit(main())
