"""Writes tests/assets/tokenizer.json: the byte-level BPE (no BOS, EOS `<|im_end|>`) that the
golden-loss test's tiny model uses. Run once; the test itself needs no Python.

    python tests/assets/make_tokenizer.py $UNLEARN_SHARED/data/tofu/forget10.json tests/assets/tokenizer.json
"""
import json
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

src, out = sys.argv[1], sys.argv[2]
with open(src) as f:
    texts = ["Question: " + r["prompt"] + "\nAnswer: " + r["response"] for r in json.load(f)]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(texts, trainer)
tok.post_processor = processors.ByteLevel(trim_offsets=False)
tok.save(out)
