"""The PyTorch side of benches/run.sh's evaluation section: what `unlearn eval tofu` computes per
question, written with transformers as a user would: for each of the four TOFU sets, the mean NLL
of the answer, paraphrase and perturbed answers (teacher-forced, batches of `--batch-size`,
longest first) and a greedy answer with `model.generate` (left-padded batches of
`--gen-batch-size`), scored with ROUGE-L recall (rouge_score, Porter stemmer).

    torch_eval.py --model DIR --data TOFU_DIR --forget forget01 --max-samples 16 --max-new-tokens 32
                  --batch-size 8 --gen-batch-size 32 --threads 2 --out OUT.json

The prompt format is `unlearn`'s (data::batch::qa_prompt): "Question: {q}\\nAnswer:" with the
tokenizer's specials, then " {answer}" + EOS as the scored targets.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

SETS = [("forget", "{f}_perturbed.json", True), ("retain", "retain_perturbed.json", True),
        ("real_authors", "real_authors_perturbed.json", False), ("world_facts", "world_facts_perturbed.json", False)]


def answer_losses(model, rows, batch_size, pad_id):
    """Mean NLL of the target tokens of every (ids, n_context) row, in batches, longest first."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), i))
    out = [None] * len(rows)
    for k in range(0, len(order), batch_size):
        chunk = order[k : k + batch_size]
        t = max(len(rows[i][0]) for i in chunk)
        ids = torch.full((len(chunk), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), t), dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, : len(rows[i][0])] = torch.tensor(rows[i][0])
            mask[r, : len(rows[i][0])] = 1
        lp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        lp = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        for r, i in enumerate(chunk):
            n, c = len(rows[i][0]), rows[i][1]
            out[i] = -lp[r, c - 1 : n - 1].double().mean().item()
    return out


def greedy(model, prompts, max_new, batch_size, pad_id, eos):
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    out = [None] * len(prompts)
    for k in range(0, len(order), batch_size):
        chunk = order[k : k + batch_size]
        t = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), t), dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, t - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, t - len(prompts[i]) :] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=pad_id, eos_token_id=eos)
        for r, i in enumerate(chunk):
            new = gen[r, t:].tolist()
            cut = next((j for j, x in enumerate(new) if x in eos), len(new))
            out[i] = new[:cut]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--forget", default="forget01")
    ap.add_argument("--max-samples", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--gen-batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from rouge_score import rouge_scorer
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(a.model + "/tokenizer.json")
    eos = model.config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else eos[0]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    samples, timings = [], {}
    questions = 0
    total = 0.0
    with torch.no_grad():
        for key, file, has_para in SETS:
            items = json.load(open(f"{a.data}/{file.format(f=a.forget)}"))[: a.max_samples]
            t0 = time.perf_counter()
            rows, owner = [], []
            for i, it in enumerate(items):
                prompt = tok.encode(f"Question: {it['question']}\nAnswer:", add_special_tokens=True).ids
                answers = [it["answer"]] + ([it["paraphrased_answer"]] if has_para else []) + list(it["perturbed_answer"])
                for slot, ans in enumerate(answers):
                    ids = prompt + tok.encode(" " + ans, add_special_tokens=False).ids + [eos[0]]
                    rows.append((ids, len(prompt)))
                    owner.append((i, slot))
            losses = answer_losses(model, rows, a.batch_size, pad_id)
            prompts = [tok.encode(f"Question: {it['question']}\nAnswer:", add_special_tokens=True).ids for it in items]
            gens = greedy(model, prompts, a.max_new_tokens, a.gen_batch_size, pad_id, eos)
            per_item = {}
            for (i, slot), loss in zip(owner, losses):
                per_item.setdefault(i, {})[slot] = loss
            for i, (it, g) in enumerate(zip(items, gens)):
                text = tok.decode(g, skip_special_tokens=True)
                r = scorer.score(it["answer"], text)["rougeL"].recall
                samples.append({"set": key, "index": i, "generation": text, "rouge_l_recall": r, "answer_loss": per_item[i][0]})
            timings[key] = time.perf_counter() - t0
            total += timings[key]
            questions += len(items)
    json.dump({"questions": questions, "eval_s": total, "timings_s": timings, "samples": samples, "threads": a.threads}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
