"""Token data, model loading and small shared helpers.

Shape legend: N sequences, S seq_len.
"""
import json
import os
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = REPO_DIR / "data"
PILE_LMSYS_DATASET = "ckkissane/pile-lmsys-mix-1m-tokenized-gemma-2"


class DataError(ValueError):
    """Training tokens that are missing, malformed or do not fit the models."""


class SetupError(RuntimeError):
    """The environment cannot run the requested job (no GPU, no hub access)."""


def data_dir(cfg=None):
    d = (cfg or {}).get("data_dir")
    return Path(d) if d else DEFAULT_DATA_DIR


def _dataset_to_tokens(dataset, column, origin):
    if column not in dataset.column_names:
        raise DataError(f"{origin}: dataset has no column {column!r} (columns: {dataset.column_names})")
    if len(dataset) == 0:
        raise DataError(f"{origin}: dataset is empty")
    dataset = dataset.with_format("torch", columns=[column])
    tokens = dataset[column]
    if not isinstance(tokens, (torch.Tensor, list)):  # datasets >= 4 returns a lazy Column
        tokens = tokens[:]
    if isinstance(tokens, list):  # ragged rows come back as a list of tensors
        lengths = sorted({len(t) for t in tokens})
        raise DataError(f"{origin}: rows of column {column!r} have different lengths {lengths[:5]}...")
    return tokens


def load_tokens(source=PILE_LMSYS_DATASET, cfg=None, column="input_ids", split="train"):
    """All training tokens as an int32 [N, S] tensor.

    source: a tensor; a .pt file holding one; a directory written by datasets' save_to_disk;
    or a Hugging Face dataset id (the reference's pile + lmsys mix by default), downloaded once
    and cached as a .pt file under cfg["data_dir"] (default data/ beside the code).
    int32 halves the reference's int64 tensor (7.9 GB -> 3.9 GB): every vocabulary fits.
    """
    if isinstance(source, torch.Tensor):
        tokens = source
    elif Path(str(source)).is_file():
        tokens = torch.load(source, map_location="cpu", weights_only=True)
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
        import datasets

        dataset = datasets.load_dataset(str(source), split=split)
        tokens = _dataset_to_tokens(dataset, column, source).to(torch.int32)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".pt.tmp")
        torch.save(tokens, tmp)
        os.replace(tmp, cache)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise DataError(f"{source}: tokens must be a non-empty [n_sequences, seq_len] tensor, got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise DataError(f"{source}: token ids must be integers, got {tokens.dtype}")
    return tokens.to(torch.int32)


def check_tokens(tokens_NS, seq_len, vocab_size):
    """Clear errors for tokens the models cannot run on."""
    if tokens_NS.ndim != 2 or tokens_NS.shape[0] == 0:
        raise DataError(f"tokens must be a non-empty [n_sequences, seq_len] tensor, got shape {tuple(tokens_NS.shape)}")
    if tokens_NS.shape[1] < seq_len:
        raise DataError(f"token sequences have length {tokens_NS.shape[1]}, shorter than seq_len={seq_len}")
    lo, hi = int(tokens_NS.min()), int(tokens_NS.max())
    if lo < 0 or hi >= vocab_size:
        raise DataError(f"token ids must lie in [0, {vocab_size}) for the models' vocabulary; found ids in [{lo}, {hi}]")


def load_gemma_pair(cfg):
    """The reference's models: Gemma-2-2b (base, index 0) and Gemma-2-2b-it (chat, index 1).

    Only the blocks up to the hook point are loaded (first_n_layers): the later layers are
    never run. Fails with a message that says what is needed when the hub is unreachable.
    """
    from transformer_lens import HookedTransformer

    from buffer import hook_layer

    layer = hook_layer(cfg["hook_point"])
    n_layers = None if layer is None else layer + 1
    models = []
    for name in cfg["model_names"]:
        try:
            model = HookedTransformer.from_pretrained(name, device=cfg["device"], first_n_layers=n_layers)
        except Exception as e:
            raise SetupError(
                f"could not load {name} from the Hugging Face hub ({type(e).__name__}: {e}).\n"
                "The Gemma replication needs network access to the hub, an accepted Gemma licence "
                "and `huggingface-cli login`, and a CUDA GPU. To see the whole pipeline on a CPU "
                "instead, run: python train.py --preset toy") from None
        model.eval()
        models.append(model)
    return models
