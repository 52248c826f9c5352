"""Make a model organism: a partner fine-tuned from any base, with a known difference to find
(crossdiff/pairs/organism.py has the recipes and the fine-tune).

    python organism.py --base data/SmolLM2-135M-Instruct.Q4_1.gguf --recipe caps --out data/smol-caps
    python train.py --model_names data/SmolLM2-135M-Instruct.Q4_1.gguf,data/smol-caps ...

--base: a hub name, a transformers directory or a GGUF file (dequantized once into data/gguf/).
Conversations default to the chitchat dataset from PyPI (its even conversations; a mix for the
crosscoder should read the odd ones); the domain recipe reads --texts. Ctrl-C saves the state;
the same command resumes.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from crossdiff.pairs.organism import RECIPES

N_CHECK = 8  # user turns the caps partner is asked, to check it answers in capitals


def main(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune a partner from a base model, with a known difference.")
    p.add_argument("--base", required=True, help="a hub name, transformers directory or GGUF file")
    p.add_argument("--recipe", default="caps", choices=sorted(RECIPES), help="what the partner learns (default caps)")
    p.add_argument("--out", required=True, help="the partner's directory (a transformers directory)")
    p.add_argument("--conversations", default=None, help="a .jsonl with a messages column (default: PyPI chitchat)")
    p.add_argument("--texts", default=None, help="the domain recipe's texts: a .jsonl with a text column, or a text file")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the recipe's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    p.add_argument("--batch", type=int, default=4, help="conversations or rows a step (default %(default)s)")
    p.add_argument("--seq_len", type=int, default=256, help="tokens a conversation or row (default %(default)s)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 where this machine runs it faster than fp32, measured (default)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import torch

    from crossdiff.pairs import organism, realpair
    from crossdiff.sources.mix import DataError, read_documents
    from crossdiff.sources.models import SetupError, gguf_cache_dir, gguf_to_transformers, is_gguf, tokenizer_of

    recipe = dict(RECIPES[a.recipe], **{k: v for k, v in (("steps", a.steps), ("lr", a.lr)) if v is not None})
    try:
        base_dir = a.base
        if is_gguf(a.base):  # a quantized model is not serializable: train a dequantized copy
            base_dir = gguf_cache_dir(a.base)
            if not (base_dir / "config.json").is_file():
                print(f"dequantizing {a.base} into {base_dir} ...", flush=True)
                gguf_to_transformers(a.base, base_dir)
        tokenizer = tokenizer_of(str(base_dir))
        conversations, texts = (), ()
        if recipe["style"] is None:
            if a.texts is None:
                p.error("the domain recipe needs --texts")
            texts = read_documents(a.texts, "text")
        elif a.conversations is not None:
            conversations = read_documents(a.conversations, "chat")
        else:
            conversations = realpair.chitchat_conversations(realpair.packages_dir({}))[0::2]
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(a.dtype) or organism.step_dtype()
        print(f"fine-tuning {a.base} ({recipe['steps']} steps of {a.batch}, {str(dtype).split('.')[-1]}) into "
              f"{a.out}; Ctrl-C saves and the same command resumes", flush=True)
        started = time.time()
        first, last = organism.finetune(
            base_dir, tokenizer, a.out, recipe["steps"], recipe["lr"], style=recipe["style"],
            conversations=conversations, texts=texts, batch=a.batch, seq_len=a.seq_len, seed=a.seed, dtype=dtype,
            record={"base": str(a.base), "recipe": a.recipe})
        print(f"loss {first:.3f} (first 5 steps) -> {last:.3f} (last 5); {time.time() - started:.0f} s; "
              f"the partner: {a.out} ({json.loads((Path(a.out) / 'organism.json').read_text())['recipe']} recipe)")
        if a.recipe == "caps":  # the known difference, checked where it should show
            unseen = (realpair.chitchat_conversations(realpair.packages_dir({}))[1::2] if a.conversations is None
                      else conversations[-N_CHECK:])
            prompts = [next(m["content"] for m in c if m["role"] == "user") for c in unseen[:N_CHECK]]
            where = ("chitchat's odd conversations, never trained on" if a.conversations is None
                     else f"the last of {a.conversations}")
            learned, line = organism.caps_check(base_dir, a.out, tokenizer, prompts, where)
            print(line)
            if not learned:
                sys.exit(1)
    except (DataError, SetupError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
