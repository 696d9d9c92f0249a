"""mt-unlearn's text chunking, re-implemented with transformers for the Rust tests.

usage: chunk_ref.py MODEL_DIR TEXTS.json MAX_LEN OUT.json

Reads a JSON array of strings and writes {"chunk": [...], "chunk_exact": [...], "truncate": [...]},
each a list of token-id lists in document order:
  chunk_exact  preparation/tokenize_webtext.py: `tokenizer(batch, return_overflowing_tokens=True,
               max_length=MAX_LEN, truncation=True)` over batches of 1000 documents (datasets.map's
               default), then only rows of exactly MAX_LEN tokens;
  chunk        dataset.py with chunking=True (MUSE-Books): the same rows, none filtered;
  truncate     dataset.py with chunking=False (MUSE-News forget): `truncation=True` only.
Rows with fewer than two tokens (no next-token target) are dropped from `chunk` and `truncate`,
as the trainer drops them.
"""
import json
import sys

from transformers import AutoTokenizer


def main(model_dir, texts_path, max_len, out):
    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(texts_path) as f:
        texts = json.load(f)
    chunks, truncated = [], []
    for i in range(0, len(texts), 1000):
        batch = texts[i : i + 1000]
        chunks += tok(batch, return_overflowing_tokens=True, max_length=max_len, truncation=True)["input_ids"]
        truncated += tok(batch, max_length=max_len, truncation=True)["input_ids"]
    res = {
        "chunk": [c for c in chunks if len(c) >= 2],
        "chunk_exact": [c for c in chunks if len(c) == max_len],
        "truncate": [c for c in truncated if len(c) >= 2],
        "tokenizer_class": type(tok).__name__,
    }
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
