"""Reference values for tests/metrics.rs, computed with the libraries MUSE and TOFU use.

usage: metrics_ref.py IN.json OUT.json

IN.json holds the cases the Rust test generated; OUT.json gets, per section, the reference
results. Floats are written as repr() strings so that they round-trip exactly into Rust.
"""

import json
import math
import sys
import warnings

import numpy as np
import scipy
import scipy.stats
import sklearn
from nltk.stem import porter
from rouge_score import rouge_scorer, tokenizers
from scipy.stats import hmean, ks_2samp, kstwo
from scipy.special import smirnov
from sklearn.metrics import auc, roc_auc_score, roc_curve


def f(x):
    """A float as an exact string (json would lose nan/inf)."""
    if x is None:
        return None
    return repr(float(x))


def rouge_section(cases):
    scorers = {s: rouge_scorer.RougeScorer(["rougeL"], use_stemmer=s) for s in (False, True)}
    toks = {s: tokenizers.DefaultTokenizer(use_stemmer=s) for s in (False, True)}
    out = []
    for c in cases:
        row = {}
        for s in (False, True):
            sc = scorers[s].score(c["reference"], c["prediction"])["rougeL"]
            key = "stem" if s else "plain"
            row[key] = {
                "precision": f(sc.precision),
                "recall": f(sc.recall),
                "f1": f(sc.fmeasure),
                "ref_tokens": toks[s].tokenize(c["reference"]),
                "pred_tokens": toks[s].tokenize(c["prediction"]),
            }
        out.append(row)
    return out


def stem_section(words):
    st = porter.PorterStemmer()  # the mode rouge_score uses
    return [st.stem(w) for w in words]


def auc_section(cases):
    out = []
    for c in cases:
        y = np.array(c["labels"], dtype=int)
        s = np.array(c["scores"], dtype=float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = roc_auc_score(y, s)
        fpr, tpr, thr = roc_curve(y, s) if len(np.unique(y)) == 2 else ([], [], [])
        out.append({"auc": f(a), "fpr": [f(x) for x in fpr], "tpr": [f(x) for x in tpr]})
    return out


def muse_auc_section(cases):
    """MUSE's PrivLeak AUC: labels 0 = forget, 1 = holdout, roc_curve on -score, then auc."""
    out = []
    for c in cases:
        forget, holdout = c["forget"], c["holdout"]
        y = [0] * len(forget) + [1] * len(holdout)
        scores = np.array(forget + holdout)
        fpr, tpr, _ = roc_curve(y, -scores)
        a = auc(fpr, tpr)
        out.append({"auc": f(a), "privleak_news": f((a - 0.4772) / 0.4772 * 100),
                    "privleak_books": f((a - 0.5393) / 0.5393 * 100)})
    return out


def ks_section(cases):
    out = []
    for c in cases:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            r = ks_2samp(np.array(c["a"]), np.array(c["b"]))
        out.append({"statistic": f(r.statistic), "pvalue": f(r.pvalue),
                    "warnings": [str(x.message) for x in w]})
    return out


def kstwo_section(cases):
    return [f(kstwo.sf(c["d"], c["n"])) for c in cases]


def smirnov_section(cases):
    return [f(smirnov(c["n"], c["d"])) for c in cases]


def hmean_section(cases):
    out = []
    for c in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(f(hmean(np.array(c, dtype=float))))
    return out


def mink_section(cases):
    out = []
    for c in cases:
        lp = np.array(c["logprobs"], dtype=float)
        k = c["k"]
        # MUSE (swj0419/muse_bench eval): k_length = int(len*ratio); -mean(sorted[:k_length]).
        n_muse = int(len(lp) * k)
        muse = float(-np.mean(np.sort(lp)[:n_muse])) if n_muse > 0 else None
        # open-unlearning: at least one token.
        n_ou = max(1, int(len(lp) * k))
        ou = float(-np.mean(np.sort(lp)[:n_ou])) if len(lp) > 0 else None
        out.append({"floor": f(muse), "at_least_one": f(ou)})
    return out


def tofu_section(cases):
    """Legacy locuslab/tofu aggregate_eval_stat.py formulas on per-question mean losses."""
    out = []
    for c in cases:
        res = {}
        stats = {}
        for model in ("unlearn", "retain"):
            m = c[model]
            para = np.array(m["para"])
            pert = np.array(m["pert"]).mean(axis=-1)
            stat = np.exp(pert - para)
            stats[model] = stat
            res[model] = {
                "stat": [f(x) for x in stat],
                "forget_tr": f(np.mean(np.minimum(stat, 1 / stat))),
                "utility_tr": f(np.mean(np.maximum(0, 1 - 1 / stat))),
                "prob": f(np.mean(np.exp(-1 * np.array(m["para"])))),
            }
            true_p = np.exp(-1 * np.array(m["para"]))
            false_p = np.exp(-1 * np.array(m["pert"]))
            all_p = np.concatenate([np.expand_dims(true_p, axis=-1), false_p], axis=1).sum(-1)
            res[model]["norm_prob"] = f(np.mean(true_p / all_p))
        fq = ks_2samp(stats["unlearn"], stats["retain"])
        res["forget_quality"] = f(fq.pvalue)
        res["model_utility"] = f(hmean(np.array(c["utility9"])))
        out.append(res)
    return out


def main():
    inp, outp = sys.argv[1], sys.argv[2]
    with open(inp) as fh:
        cases = json.load(fh)
    out = {
        "versions": {"scipy": scipy.__version__, "sklearn": sklearn.__version__, "numpy": np.__version__},
        "rouge": rouge_section(cases["rouge"]),
        "stem": stem_section(cases["stem"]),
        "auc": auc_section(cases["auc"]),
        "muse_auc": muse_auc_section(cases["muse_auc"]),
        "ks": ks_section(cases["ks"]),
        "kstwo": kstwo_section(cases["kstwo"]),
        "smirnov": smirnov_section(cases["smirnov"]),
        "hmean": hmean_section(cases["hmean"]),
        "mink": mink_section(cases["mink"]),
        "tofu": tofu_section(cases["tofu"]),
    }
    with open(outp, "w") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main()
