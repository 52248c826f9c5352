"""Crosscoders published by others, and publishing ours: the reference's layout on the hub
(<hook>/cfg.json and <hook>/cc_weights.pt, what CrossCoder.load_from_hf reads, and what
CrossCoder.push_to_hub writes) and dictionary_learning's (config.json + model.safetensors), read
from a hub repo or a local copy, and a training directory of the DFC authors' fork of it
(superkaiba/dfc_learning: config.json + model_final.pt, its partition inside).
"""
import json
import tempfile
from pathlib import Path

import torch

from crossdiff.io.checkpoint import PARAM_NAMES, atomic_torch_save, atomic_write_text, jsonable, read_crosscoder

HF_REPO_ID = "ckkissane/crosscoder-gemma-2-2b-model-diff"  # the reference's published crosscoder
# The published crosscoder's config names only model A and saved no normalisation factors: its
# authors' notebook used these (mean raw norms ~174 base, ~197 chat at blocks.14.hook_resid_pre).
PUBLISHED_MODEL_NAMES = ("gemma-2-2b", "gemma-2-2b-it")
PUBLISHED_FACTORS = (0.2758961493232058, 0.24422852496546169)

def published_files(root, hook_dir):
    """(cfg.json, cc_weights.pt) of the published layout under root/hook_dir."""
    return Path(root) / hook_dir / "cfg.json", Path(root) / hook_dir / "cc_weights.pt"


def published_hook_dir(root):
    """The hook folder of a directory in the published layout, or None."""
    found = sorted(p.parent.name for p in Path(root).glob("*/cc_weights.pt") if (p.parent / "cfg.json").is_file())
    return found[0] if found else None


def write_published(crosscoder, root, path=None):
    """crosscoder in the reference's published layout under root: <path>/cfg.json (its whole
    config: the reference's keys, and ours, the model pair and normalisation factors included)
    and <path>/cc_weights.pt (W_enc, W_dec, b_enc, b_dec, and an architecture's extra state such
    as BatchTopK's threshold). path: the hook point by default. Returns the folder."""
    if tuple(crosscoder.shard) != (0, 1):
        raise ValueError("this module holds one shard of the latents: publish the whole dictionary "
                         "(CrossCoder.load(version_dir) in one process)")
    cfg_path, weights_path = published_files(root, path or crosscoder.cfg["hook_point"])
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    weights = {name: getattr(crosscoder, name).detach().cpu() for name in PARAM_NAMES + crosscoder.EXTRA_STATE}
    atomic_torch_save(weights, weights_path)
    cfg = {k: v for k, v in crosscoder.cfg.items() if k != "step"}
    # The reference's load_from_hf builds CrossCoder(cfg), which moves itself to cfg["device"], and
    # loads the weights with map_location=cfg["device"]: the key must be there (its analysis.py
    # passes no device). A GPU-trained dictionary says cuda:0 as the reference's does.
    cfg["device"] = "cuda:0" if crosscoder.W_enc.device.type == "cuda" else "cpu"
    atomic_write_text(cfg_path, json.dumps(jsonable(cfg), indent=2))
    return cfg_path.parent


def push_to_hub(crosscoder, repo_id, path=None, private=False):
    """Upload crosscoder to the hub repo repo_id (created when missing) in the published layout,
    which CrossCoder.load_from_hf(repo_id, path) reads back. Needs `huggingface-cli login`."""
    from huggingface_hub import HfApi

    api = HfApi()
    with tempfile.TemporaryDirectory() as root:
        folder = write_published(crosscoder, root, path)
        api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(repo_id=repo_id, folder_path=root,
                          commit_message=f"crosscoder {folder.name}: dict_size {crosscoder.cfg['dict_size']}")
    return repo_id


def read_published(repo_id, path, model_names=None, hook_point=None):
    """(cfg, state, where) of a published crosscoder: a hub repo, or a local directory given in
    place of repo_id (no network then). Two layouts: the reference's {path}/cfg.json +
    {path}/cc_weights.pt, and dictionary_learning's config.json + model.safetensors (read below:
    their normalisation folded, their layer read as its hook point)."""
    local = Path(repo_id).is_dir()
    if local and is_dictionary_learning_dir(repo_id):
        return (*read_dictionary_learning(repo_id, model_names, hook_point), repo_id)
    cfg_path, weights_path = published_files(repo_id, path)
    if not local:
        from huggingface_hub import hf_hub_download, list_repo_files

        if f"{path}/cc_weights.pt" not in list_repo_files(repo_id):
            return read_published(str(download(repo_id)), path, model_names, hook_point)
        cfg_path, weights_path = (Path(hf_hub_download(repo_id, f"{path}/{p.name}")) for p in (cfg_path, weights_path))
    return (*read_crosscoder(cfg_path, weights_path), f"{weights_path} (config {cfg_path})")


# dictionary_learning's format (science-of-finetuning's fork; Minder, Dumas et al. 2025's Gemma-2-2b
# crosscoders; docs/design.md lists its files and tensors). Their forward on raw x: x_n = (x - mean)
# * g per model (g = activation_global_scale), the crosscoder on x_n, x_hat = x_hat_n / (g + 1e-8)
# + mean. Ours reads x' = s * x, so we record s = g and fold the mean into the biases:
#     b_enc' = b_enc - sum_m (g_m mean_m) @ W_enc[m],   b_dec'[m] = b_dec[m] + g_m mean_m,
# leaving W_enc and W_dec (relative norms, BatchTopK scores) as trained; only their 1e-8 differs.
# Their "layer L" hooks the output of decoder layer L: TransformerLens's blocks.{L+1}.hook_resid_pre.
# Shape legend: M models, D d_in, F latents.
FILES = ("config.json", "model.safetensors")
TRAINER_FILE = "trainer_config.json"
CODE_NORMALIZATIONS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}
DEFAULT_MODEL_NAMES = ("gemma-2-2b", "gemma-2-2b-it")  # their Gemma runs: base first, as ours


class FormatError(ValueError):
    pass


def weights_file(directory):
    """The state dict of a dictionary_learning directory: model.safetensors (PyTorchModelHubMixin),
    or a training run's model_final.pt, else its newest checkpoint_<step>.pt (their training.py);
    None when there is none."""
    directory = Path(directory)
    for name in (FILES[1], "model_final.pt"):
        if (directory / name).is_file():
            return directory / name
    steps = [p for p in directory.glob("checkpoint_*.pt") if p.stem.split("_", 1)[1].isdigit()]
    return max(steps, key=lambda p: int(p.stem.split("_", 1)[1]), default=None)


def is_dictionary_learning_dir(path):
    return (Path(path) / FILES[0]).is_file() and weights_file(path) is not None


def exclusive_fraction_of(partition, directory):
    """The DFC authors' partition (model_a/b_exclusive_pct, from the state dict's
    _partition_config, the init arguments or the trainer's dict_class_kwargs) as our
    exclusive_fraction; 0 for none."""
    a, b = (float(partition.get(f"model_{m}_exclusive_pct", 0.0)) for m in "ab")
    if a != b:
        raise FormatError(f"{directory}: exclusive blocks of unequal sizes ({a} and {b} of the dictionary); ours "
                          "are one exclusive_fraction per model")
    return a


def hook_point_of_layer(layer):
    """Their layer L (the output of decoder layer L) as a TransformerLens hook name."""
    return f"blocks.{int(layer) + 1}.hook_resid_pre"


def read_dictionary_learning(directory, model_names=None, hook_point=None):
    """(cfg, state) for CrossCoder from a directory holding their files. cfg has the keys a
    CrossCoder needs plus the analysis's (hook_point from trainer_config.json's layer unless given,
    model_names, normalisation_factor); state has W_enc, W_dec, b_enc, b_dec (and threshold)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    trainer = {}
    if (directory / TRAINER_FILE).is_file():
        trainer = json.loads((directory / TRAINER_FILE).read_text()).get("trainer", {})
    if "trainer" in config:  # a training run's directory: its config.json is the trainer's
        trainer, config = config["trainer"], {}
    path = weights_file(directory)
    raw = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                weights_only=True)
    partition = {**trainer.get("dict_class_kwargs", {}), **config, **(raw.pop("_partition_config", None) or {})}
    raw = {k.split("_orig_mod.")[-1]: v for k, v in raw.items()}  # saved under torch.compile
    missing = [k for k in ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias") if k not in raw]
    if missing:
        raise FormatError(f"{path} lacks {missing}: not a dictionary_learning crosscoder")
    W_enc_MDF, W_dec_MFD = raw["encoder.weight"].float(), raw["decoder.weight"].float()
    M, D, F = W_enc_MDF.shape
    if W_dec_MFD.shape != (M, F, D):
        raise FormatError(f"{directory}: decoder.weight has shape {tuple(W_dec_MFD.shape)}, expected {(M, F, D)} "
                          "(a crosscoder whose decoder writes other layers than it reads is not supported)")
    if config.get("encoder_layers") not in (None, list(range(M))):
        raise FormatError(f"{directory}: encoder_layers {config['encoder_layers']} is not supported")
    batchtopk = "threshold" in raw
    norm_id = int(raw["code_normalization_id"]) if "code_normalization_id" in raw else None
    code_norm = CODE_NORMALIZATIONS.get(norm_id) or str(config.get("code_normalization", "CROSSCODER")).upper()
    if batchtopk and code_norm != "CROSSCODER":
        raise FormatError(f"{directory}: a BatchTopK crosscoder with code_normalization {code_norm}; ours scores "
                          "latents by their decoder norms summed over models (their CROSSCODER) only")
    b_enc_F, b_dec_MD = raw["encoder.bias"].float(), raw["decoder.bias"].float()
    factors = [1.0] * M  # their runs without a normaliser read raw activations
    mean_MD, std_MD = raw.get("activation_mean"), raw.get("activation_std")
    if mean_MD is not None and std_MD is not None and not (mean_MD.isnan().any() or std_MD.isnan().any()):
        g_M = raw.get("activation_global_scale")
        if g_M is None:  # NormalizableMixin's default keep_relative_variance: target_rms / total std
            g_M = float(raw.get("target_rms", torch.tensor(1.0))) / (std_MD.float().pow(2).sum(-1) + 1e-8).sqrt()
        g_M, shift_MD = g_M.float(), g_M.float()[:, None] * mean_MD.float()
        b_enc_F = b_enc_F - torch.einsum("md,mdf->f", shift_MD, W_enc_MDF)
        b_dec_MD = b_dec_MD + shift_MD
        factors = g_M.tolist()
    state = {"W_enc": W_enc_MDF.contiguous(), "W_dec": W_dec_MFD.permute(1, 0, 2).contiguous(),
             "b_enc": b_enc_F, "b_dec": b_dec_MD}
    cfg = {"d_in": D, "dict_size": F, "n_models": M, "enc_dtype": "fp32", "seed": config.get("seed", 0),
           "dec_init_norm": config.get("norm_init_scale") or 0.005,
           "architecture": "batchtopk" if batchtopk else "l1",
           "hook_point": hook_point or hook_point_of_layer(trainer.get("layer", 13)),
           "exclusive_fraction": exclusive_fraction_of(partition, directory),
           "model_names": list(model_names or DEFAULT_MODEL_NAMES), "normalisation_factor": factors,
           "source": f"dictionary_learning {config.get('dict_class') or trainer.get('dict_class') or ''} "
                     f"({code_norm}) from {directory}".replace("  ", " ")}
    if batchtopk:
        threshold = raw["threshold"].float()
        if threshold.numel() != 1:
            raise FormatError(f"{directory}: per-model thresholds (DECOUPLED) are not supported")
        state["threshold"] = threshold.reshape(())
        k = raw["k"] if "k" in raw else config.get("k", trainer.get("k"))
        cfg["k"] = None if k is None else int(k)
    return cfg, state


def download(repo_id, revision=None):
    """A local copy of a hub repo's files in their format (huggingface_hub's cache)."""
    from huggingface_hub import hf_hub_download, list_repo_files

    present = set(list_repo_files(repo_id, revision=revision))
    if not set(FILES) <= present:
        raise FormatError(f"{repo_id} has neither our published layout nor dictionary_learning's "
                          f"{list(FILES)}: found {sorted(present)[:10]}")
    wanted = [*FILES, *([TRAINER_FILE] if TRAINER_FILE in present else [])]
    paths = [Path(hf_hub_download(repo_id, name, revision=revision)) for name in wanted]
    return paths[0].parent
