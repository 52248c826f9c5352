"""Token data and the pair: loading tokens (the reference's job here), checking them, and loading a run's models.

Shape legend: N sequences, S seq_len.
"""
import json
from pathlib import Path

import numpy as np
import torch

from crossdiff.config.plan import check_against_model, check_enough_sequences, hooks_of
from crossdiff.config.presets import FAMILY_PRESETS, PILE_LMSYS_DATASET
from crossdiff.io.checkpoint import atomic_torch_save, data_dir, load_mapped
from crossdiff.pairs.crossfamily import prepare as prepare_cross_family
from crossdiff.pairs.realpair import prepare
from crossdiff.pairs.toy import build_toy_pair
from crossdiff.scale import distributed
from crossdiff.sources.aligned_mix import check_aligned_tokenizers, is_aligned, load_aligned_rows
from crossdiff.sources.mix import DataError, check_mix_tokenizer, is_mix, load_mix
from crossdiff.sources.models import SetupError, cast_models, load_pair, model_dtype, resolve_model_keys

load_gemma_pair = load_pair  # the name the pipeline and its tests call (any pair, not only Gemma)


def _dataset_to_tokens(dataset, column, origin, chunk_rows=4096):
    """The column as an int32 [N, S] tensor, converted chunk_rows at a time: the peak is the int32
    result plus one chunk, never the whole column as int64 (8 GB for the reference's dataset)."""
    if column not in dataset.column_names:
        raise DataError(f"{origin}: dataset has no column {column!r} (columns: {dataset.column_names})")
    if len(dataset) == 0:
        raise DataError(f"{origin}: dataset is empty")
    dataset = dataset.with_format("numpy", columns=[column])
    tokens_NS = None
    for start in range(0, len(dataset), chunk_rows):
        block = dataset[start : start + chunk_rows][column]
        if block.dtype == object or block.ndim != 2:  # ragged rows come back as an array of arrays
            lengths = sorted({len(row) for row in block})
            raise DataError(f"{origin}: rows of column {column!r} have different lengths {lengths[:5]}...")
        if tokens_NS is None:
            tokens_NS = torch.empty(len(dataset), block.shape[1], dtype=torch.int32)
        elif block.shape[1] != tokens_NS.shape[1]:
            raise DataError(f"{origin}: rows of column {column!r} have different lengths "
                            f"{sorted({tokens_NS.shape[1], block.shape[1]})}...")
        if block.dtype.kind not in "iu":
            raise DataError(f"{origin}: token ids must be integers, got {block.dtype}")
        tokens_NS[start : start + len(block)] = torch.from_numpy(block.astype(np.int32, copy=False))
    return tokens_NS


def load_tokens(source=PILE_LMSYS_DATASET, cfg=None, column="input_ids", split="train"):
    """All training tokens as an int32 [N, S] tensor.

    source: a tensor; a .pt file holding one; a token mix written by data.py (its train split);
    a directory written by datasets' save_to_disk;
    or a Hugging Face dataset id (the reference's pile + lmsys mix by default), downloaded once
    and cached as a .pt file under cfg["data_dir"] (default data/ beside the code).
    int32 halves the reference's int64 tensor (7.9 GB -> 3.9 GB): every vocabulary fits.
    """
    if isinstance(source, torch.Tensor):
        tokens = source
    elif is_aligned(source):  # data.py's for models of different tokenizers: aligned rows [N, S, 2M]
        return load_aligned_rows(source, split="train")
    elif is_mix(source):  # data.py's: training reads its train split (the rest is held out)
        tokens = load_mix(source, split="train")[0]
    elif Path(str(source)).is_file():
        try:
            tokens = load_mapped(source)
        except Exception as e:  # noqa: BLE001 (a truncated or foreign file raises whatever the unpickler meets)
            raise DataError(f"{source}: cannot read it as a token tensor ({type(e).__name__}: {e}); a .pt dataset "
                            "holds one int tensor [n_sequences, seq_len] saved by torch.save") from None
        if not isinstance(tokens, torch.Tensor):
            raise DataError(f"{source}: expected a token tensor, found {type(tokens).__name__}")
    elif Path(str(source)).is_dir():
        import datasets

        state = Path(str(source)) / "state.json"
        if state.is_file() and json.loads(state.read_text()).get("_data_files") == []:
            raise DataError(f"{source}: dataset is empty")  # datasets cannot even load a 0-shard dataset
        try:
            dataset = datasets.load_from_disk(str(source))
        except Exception as e:
            raise DataError(f"{source}: cannot read the dataset ({type(e).__name__}: {e})") from None
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
        tokens = _dataset_to_tokens(dataset, column, source)
    else:
        cache = data_dir(cfg) / (str(source).replace("/", "__") + ".pt")
        if cache.is_file():
            return load_tokens(cache, cfg, column, split)
        # Under torchrun one process per machine downloads and converts (3.9 GB for the reference's
        # dataset, minutes: longer than a collective's timeout); the others wait for its cache.
        distributed.build_once(lambda: cache.is_file() or _download_tokens(source, cache, column, split), cache,
                               f"downloading the dataset {source}")
        return load_tokens(cache, cfg, column, split)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise DataError(f"{source}: tokens must be a non-empty [n_sequences, seq_len] tensor, got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise DataError(f"{source}: token ids must be integers, got {tokens.dtype}")
    return tokens.to(torch.int32)


def _download_tokens(source, cache, column, split):
    """The hub dataset `source` as an int32 token tensor in the file cache, written atomically (a
    temporary file of its own, renamed)."""
    import datasets

    try:
        dataset = datasets.load_dataset(str(source), split=split)
    except (OSError, ValueError) as e:  # offline, unknown id, no access
        raise SetupError(f"could not download the dataset {source} ({type(e).__name__}: {e}); give a local "
                         "copy with --dataset (a datasets directory or a .pt token tensor)") from None
    tokens = _dataset_to_tokens(dataset, column, source)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(tokens, cache)


def check_heldout(n_sequences, n_heldout, read):
    """A DataError when the last n_heldout of a dataset's n_sequences are not held out: the run
    read `read` sequences from the start (wraps included; None: unknown, which is said)."""
    if read is None:
        print(f"note: the checkpoint does not record how many sequences training read; the last {n_heldout:,} "
              "of the dataset are taken as held out unchecked")
        return
    if read > n_sequences - n_heldout:
        wrapped = " (it wrapped around the dataset)" if read > n_sequences else ""
        raise DataError(f"the last {n_heldout:,} sequences of the dataset's {n_sequences:,} are not held out: training "
                        f"read {read:,}{wrapped}. Give held-out text with --dataset, or fewer with --n_heldout "
                        f"(at most {max(0, n_sequences - read):,} here)")


def check_tokens(tokens_NS, seq_len, vocab_size):
    """Clear errors for tokens the models cannot run on."""
    if tokens_NS.ndim != 2 or tokens_NS.shape[0] == 0:
        raise DataError(f"tokens must be a non-empty [n_sequences, seq_len] tensor, got shape {tuple(tokens_NS.shape)}")
    if tokens_NS.shape[1] < seq_len:
        raise DataError(f"token sequences have length {tokens_NS.shape[1]}, shorter than seq_len={seq_len}")
    lo, hi = int(tokens_NS.min()), int(tokens_NS.max())
    if lo < 0 or hi >= vocab_size:
        raise DataError(f"token ids must lie in [0, {vocab_size}) for the models' vocabulary; found ids in [{lo}, {hi}]")


def prepare_models(cfg):
    """Before anything heavy: what a preset builds (crossdiff/pairs/realpair.py: a built pair, the PyPI mix) in
    place of its names, then the keys that come from the models (d_in, hook_point) filled and
    checked against their configs (models.resolve_model_keys). Updates cfg in place."""
    if cfg["preset"] == "toy":
        return cfg
    cfg.update(prepare_cross_family(cfg) if cfg["preset"] in FAMILY_PRESETS else prepare(cfg))
    return resolve_model_keys(cfg)


def load_models_and_tokens(cfg, fresh=True):
    """The models (index 0 base, 1 chat) and the training tokens of a complete config, after
    prepare_models, checked against each other (context, vocabulary). fresh (not a resume): the
    tokens are checked for enough sequences before any model loads."""
    if cfg["preset"] == "toy":
        base, chat, tokens, _ = distributed.build_once(lambda: build_toy_pair(cfg), data_dir(cfg) / ".toy_pair",
                                                       "building the toy pair")
        models = cast_models([base, chat], model_dtype(cfg))
    else:
        if is_aligned(cfg["dataset"]):
            check_aligned_tokenizers(cfg["dataset"], cfg["model_names"], cfg["min_aligned_fraction"])
        elif is_mix(cfg["dataset"]):
            check_mix_tokenizer(cfg["dataset"], cfg["model_names"])
        tokens = load_tokens(cfg["dataset"], cfg)
        if fresh and cfg["store_dir"] is None:
            local_cfg = dict(cfg, batch_size=distributed.local_batch_size(cfg["batch_size"]))
            check_enough_sequences(cfg, local_cfg, len(tokens[distributed.rank()::distributed.world_size()]),
                                   cfg["num_tokens"] // cfg["batch_size"], world_size=distributed.world_size())
        models = load_gemma_pair(cfg)
    for m, (model, hook) in enumerate(zip(models, hooks_of(cfg))):
        check_against_model(dict(cfg, hook_point=hook), model.cfg)
        check_tokens(tokens[..., m] if tokens.ndim == 3 else tokens, cfg["seq_len"], model.cfg.d_vocab)
    return models, tokens


