"""Writes tests/golden/embedded_models.json: transformers' own reading of the embedded GGUF
checkpoints (gemma3-270m, qwen2.5-coder-0.5b), the reference tests/test_embedded_models.py
checks specjax against without loading transformers' copy of the models in every test run.

For each model and prompt: the prompt's token ids (encoded by transformers' GGUF tokenizer), the
top-8 logits (ids and float32 values) at the prompt's last position, and transformers' greedy
continuation. transformers dequantises the GGUF itself (its own code path, float32, eager
attention). Rerun after changing the prompts:

    .venv/bin/python tests/golden/make_embedded_golden.py
"""

import json
import os
import sys

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import registry  # noqa: E402
from models.spm_tokenizer import GEMMA_CHAT_TEMPLATE  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded_models.json")
NEW_TOKENS = 24
TOP = 8
CHATS = {
    "gemma3-270m": [
        "Name three primary colors.",
        "Write one sentence about the sea.",
    ],
    "qwen2.5-coder-0.5b": [
        "Write a Python function that returns the n-th Fibonacci number.",
        "def is_palindrome(s: str) -> bool:\n    \"\"\"Return True if s reads the same backwards."
        "\"\"\"\n",
    ],
}


def main():
    golden = {"new_tokens": NEW_TOKENS, "transformers": transformers.__version__, "models": {}}
    for name, prompts in CHATS.items():
        path = registry.gguf_path(name)
        directory, file = os.path.dirname(path), os.path.basename(path)
        tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=file)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=file, dtype=torch.float32, attn_implementation="eager").eval()
        rows = []
        for i, text in enumerate(prompts):
            if i == 0:  # one chat prompt per model, one raw completion
                # Gemma's GGUF has no template: render it with the one specjax supplies.
                template = tok.chat_template or GEMMA_CHAT_TEMPLATE
                rendered = tok.apply_chat_template([{"role": "user", "content": text}],
                                                   add_generation_prompt=True, tokenize=False,
                                                   chat_template=template)
                ids = tok(rendered, add_special_tokens=False)["input_ids"]
            else:
                ids = tok(text)["input_ids"]
            with torch.no_grad():
                x = torch.tensor([ids])
                logits = model(x).logits[0, -1].numpy()
                out = model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
            top = np.argsort(-logits)[:TOP]
            rows.append({"text": text, "ids": [int(t) for t in ids],
                         "top_ids": [int(t) for t in top],
                         "top_logits": [float(logits[t]) for t in top],
                         "greedy": [int(t) for t in out[0, len(ids):]]})
            print(name, i, tok.decode(out[0, len(ids):]), flush=True)
        golden["models"][name] = rows
        del model
    with open(OUT, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
