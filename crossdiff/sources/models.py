"""The models of a pair: any model TransformerLens knows, by hub name, as a local transformers
directory (a fine-tune, named anything) or as a GGUF file (dequantized once and cached); the
facts a config needs from them (width, layer count, context) read without loading weights; and
the default hook, the reference's relative depth.

A local directory's architecture comes from its config.json: its TransformerLens model is the
one whose architecture and shapes it has, or, for the architectures TransformerLens builds from
a config.json itself (Llama, Qwen, Mistral, ...), that file; `model_archs` names it explicitly.
"""
import functools
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

from crossdiff.config.plan import check_against_model, hooks_of, layers_needed
from crossdiff.config.schema import ConfigError
from crossdiff.io.checkpoint import data_dir, staging_dir, swap_in

REFERENCE_DEPTH = (14, 26)  # the reference diffs blocks.14.hook_resid_pre of Gemma-2-2b's 26 layers


class SetupError(RuntimeError):
    """The environment cannot run the requested job (no GPU, no hub access, unreadable weights)."""


def default_hook(n_layers):
    """The residual stream entering the block at the reference's relative depth (14 of 26)."""
    return f"blocks.{round(n_layers * REFERENCE_DEPTH[0] / REFERENCE_DEPTH[1])}.hook_resid_pre"


def is_gguf(name):
    return str(name).endswith(".gguf")


def is_local(name):
    return (Path(str(name)) / "config.json").is_file()


# ---------------------------------------------------------------- GGUF files
def gguf_header(path):
    """(architecture, {key: value}) of a GGUF file's metadata, read without its tensors; a
    SetupError for a file transformers cannot read."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    path = Path(str(path))
    if not path.is_file():
        raise SetupError(f"{path}: no such GGUF file")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    except ImportError:
        raise SetupError("reading a GGUF file needs the gguf package: pip install gguf") from None
    except Exception as e:  # noqa: BLE001 (the reader raises ValueError, KeyError, struct errors ...)
        raise SetupError(f"{path}: not a GGUF file transformers can read ({type(e).__name__}: {e})") from None
    arch = fields.get("general.architecture")
    supported = sorted(set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"})
    if arch not in supported:
        raise SetupError(f"{path}: transformers cannot read a GGUF of architecture {arch!r} "
                         f"(it reads {', '.join(supported)})")
    return arch, fields


def gguf_cache_dir(path, cfg=None):
    """Where the dequantized copy of a GGUF file is cached: keyed by its name, size and mtime."""
    p = Path(str(path)).resolve()
    st = p.stat()
    return data_dir(cfg) / "gguf" / f"{p.stem}-{st.st_size:x}-{int(st.st_mtime):x}"


def gguf_to_transformers(path, out_dir, chat_template=None):
    """Dequantize a GGUF file into a transformers directory (fp32 weights, config, tokenizer).
    transformers' gguf_file support reads it; its quantizer record is dropped, or TransformerLens
    (and save_pretrained) would treat the dequantized weights as quantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_header(path)
    path, out_dir = Path(str(path)), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if chat_template is not None and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    work = staging_dir(out_dir, r".*")  # beside out_dir, swapped in whole: complete or absent
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    return swap_in(work, out_dir)


def local_dir(name, cfg=None):
    """The transformers directory a model name stands for: itself, or a GGUF's cached copy
    (dequantized here the first time: a minute for Gemma-3-270m); None for a hub name."""
    if is_gguf(name):
        out = gguf_cache_dir(name, cfg)
        if not (out / "config.json").is_file():
            print(f"dequantizing {name} into {out} (once)")
            gguf_to_transformers(name, out)
        return out
    return Path(str(name)) if is_local(name) else None


# ---------------------------------------------------------------- architecture
def read_hf_config(directory):
    """A model directory's config.json, or a SetupError naming it."""
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SetupError(f"{path}: cannot read the model's config ({type(e).__name__}: {e})") from None


def _config_value(hf, key, directory):
    if key not in hf:
        raise SetupError(f"{Path(directory) / 'config.json'} has no {key!r}: it is not a transformers model config "
                         "(save the model with save_pretrained), or give a GGUF file or a TransformerLens name")
    return hf[key]


def _shape(tl_cfg):
    return (tl_cfg.get("original_architecture"), tl_cfg.get("d_model"), tl_cfg.get("n_heads"),
            tl_cfg.get("d_head"), tl_cfg.get("d_mlp"), tl_cfg.get("n_key_value_heads"))


def hf_shape(hf):
    heads = hf.get("num_attention_heads")
    kv = hf.get("num_key_value_heads")
    return ((hf.get("architectures") or [None])[0], hf.get("hidden_size"), heads,
            hf.get("head_dim") or (hf["hidden_size"] // heads if heads else None), hf.get("intermediate_size"),
            kv if kv != heads else None)


def tl_name_for(directory, arch=None):
    """The model name to give TransformerLens for a local directory: arch when given; the
    directory's own name when it is a TransformerLens name; else the TransformerLens model of the
    same architecture and shapes (TransformerLens configures Gemma and some Llamas by name, not
    from a config.json); else a path TransformerLens reads the config.json from."""
    from transformer_lens import loading_from_pretrained as tl_loading

    if arch:
        return arch
    path = Path(directory)
    try:
        return tl_loading.get_official_model_name(path.name)
    except ValueError:
        pass
    want = hf_shape(read_hf_config(path))
    official = next((name for name, shape in name_configured_shapes() if shape == want), None)
    if official is not None:
        return official
    # TransformerLens configures any path whose text contains "gemma" or "llama" by name: give it
    # a link with a neutral name to read the config.json instead.
    link = Path(tempfile.mkdtemp(prefix="crosscoder-model-")) / "model"
    link.symlink_to(path.resolve(), target_is_directory=True)
    return str(link)


@functools.lru_cache(maxsize=1)
def name_configured_shapes():
    """[(name, shape)] of the Gemma and Llama models TransformerLens configures by name (offline):
    the ones a local directory's config.json is matched against. TransformerLens's AutoConfig is
    made to fail at once for the others, which it would read from the hub."""
    from transformer_lens import loading_from_pretrained as tl_loading

    def no_hub(*args, **kwargs):
        raise OSError("configured from the hub, not by name")

    out = []
    with mock.patch.object(tl_loading.AutoConfig, "from_pretrained", no_hub):
        for name in tl_loading.OFFICIAL_MODEL_NAMES:
            if "gemma" in name.lower() or "llama" in name.lower():
                try:
                    out.append((name, _shape(tl_loading.convert_hf_model_config(name))))
                except Exception:  # noqa: BLE001 (configured from the hub)
                    continue
    return out


def model_facts(name, cfg=None, arch=None):
    """(d_model, n_layers, n_ctx) of a model without loading its weights: a GGUF's header, a local
    directory's config.json, or TransformerLens's config of a hub name."""
    if is_gguf(name):
        arch_name, fields = gguf_header(name)
        return (int(fields[f"{arch_name}.embedding_length"]), int(fields[f"{arch_name}.block_count"]),
                int(fields.get(f"{arch_name}.context_length", 2048)))
    if is_local(name):
        hf = read_hf_config(name)
        hf = hf.get("text_config", hf)
        return (_config_value(hf, "hidden_size", name), _config_value(hf, "num_hidden_layers", name),
                hf.get("max_position_embeddings", 2048))
    if Path(str(name)).is_dir():
        raise SetupError(f"{name} is a directory but not a model: it has no config.json (a transformers model "
                         "directory holds config.json, the weights and the tokenizer: save_pretrained writes them)")
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    try:
        tl_cfg = get_pretrained_model_config(arch or name)
    except (OSError, ValueError) as e:
        raise SetupError(load_failure(name, e)) from None
    return tl_cfg.d_model, tl_cfg.n_layers, tl_cfg.n_ctx


def resolve_model_keys(cfg):
    """Fill the keys that come from the models (in place, before any weights load): d_in (none:
    their width) and hook_point (none: the reference's relative depth), then check the config
    against each model: the hook within its layers, seq_len within its context, equal widths."""
    archs = list(cfg.get("model_archs") or [])
    facts = []
    for i, name in enumerate(cfg["model_names"]):
        d_model, n_layers, n_ctx = model_facts(name, cfg, archs[i] if i < len(archs) else None)
        facts.append(SimpleNamespace(d_model=d_model, n_layers=n_layers, n_ctx=n_ctx))
    widths = [f.d_model for f in facts]
    if len(set(widths)) > 1:
        if not cfg.get("pad_widths"):
            raise ConfigError(f"the models have different widths {widths}: --pad_widths true lets them share one "
                              "crosscoder, each padded with zeros to the largest (crossdiff/arch/widths.py)")
        if cfg.get("d_in") not in (None, max(widths)):
            raise ConfigError(f"config key 'd_in' = {cfg['d_in']} but the models' widths are {widths}: under "
                              f"pad_widths d_in is the largest, {max(widths)} (or none)")
        cfg["d_in"], cfg["model_widths"] = max(widths), widths
    if cfg.get("d_in") is None:
        cfg["d_in"] = facts[0].d_model
    depths = [f.n_layers for f in facts]
    if cfg.get("hook_point") is None and len(set(depths)) > 1 and not cfg.get("hook_points"):
        cfg["hook_points"] = [default_hook(n) for n in depths]  # each model at the reference's relative depth
        print(f"hook_points: {', '.join(cfg['hook_points'])} (the reference's relative depth 14/26 of "
              f"{', '.join(map(str, depths))} layers)")
    if cfg.get("hook_point") is None:
        cfg["hook_point"] = (cfg.get("hook_points") or [default_hook(depths[0])])[0]
        if not cfg.get("hook_points"):
            print(f"hook_point: {cfg['hook_point']} (the reference's relative depth 14/26 of {depths[0]} layers)")
    for f, hook in zip(facts, hooks_of(cfg)):
        check_against_model(dict(cfg, hook_point=hook), f)
    return cfg


# ---------------------------------------------------------------- loading
def load_pair(cfg, full=False):
    """The models of cfg["model_names"] (index 0 base, 1 chat) as HookedTransformers on
    cfg["device"], in eval mode.

    A name is a TransformerLens / hub name, a local directory saved by transformers'
    save_pretrained (weights, config and tokenizer; no network), or a GGUF file. For training
    (full=False) only what the hook needs is kept: the blocks before it (layers_needed: 14 of
    Gemma-2-2b's 26 for blocks.14.hook_resid_pre) and the embedding; the unembedding
    TransformerLens builds (a 256k x 2304 matrix, 2.4 GB in fp32 per model) is freed, so such a
    model can only be run with stop_at_layer. full=True (the analysis: the splice-in loss needs
    logits) loads every block and the unembedding. A failure says what is needed.
    """
    archs, hooks = list(cfg.get("model_archs") or []), hooks_of(cfg)
    models, loaded = [], {}
    for i, name in enumerate(cfg["model_names"]):
        n_layers = None if full else layers_needed(hooks[i])
        key = (name, archs[i] if i < len(archs) else None, n_layers)
        if key in loaded:  # a model against itself (the null pair): one copy, run once (run_models)
            models.append(loaded[key])
            continue
        try:
            # transformers and TransformerLens build on torch's default device, then move to cfg's
            with torch.device("cpu"):
                model = load_one(name, archs[i] if i < len(archs) else None, n_layers, cfg)
        except SetupError:
            raise
        except (OSError, ValueError, RuntimeError, ImportError, KeyError, AttributeError) as e:
            raise SetupError(load_failure(name, e, cfg["device"])) from None
        if not full and n_layers is not None:
            drop_unembedding(model)
        models.append(model.eval())
        loaded[key] = models[-1]
    return cast_models(models, model_dtype(cfg))  # processed in fp32 (folding), then cast


def model_dtype(cfg):
    """The models' weight dtype: cfg's model_dtype, auto resolved by its device (bf16 on CUDA)."""
    value = cfg.get("model_dtype") or "auto"
    if value == "auto":
        value = "bf16" if str(cfg.get("device") or "cpu").startswith("cuda") else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[value]


def cast_models(models, dtype):
    """The models' weights in dtype, in place, their cfg.dtype with them."""
    for model in dict.fromkeys(models):  # a model listed twice (the null pair) is cast once
        if next(model.parameters()).dtype != dtype:
            model.to(dtype, print_details=False)  # (TransformerLens's: it sets cfg.dtype too)
    return models


def load_one(name, arch, n_layers, cfg):
    """One HookedTransformer on cfg["device"]: a TransformerLens / hub name, or a local directory
    (or GGUF) with its own weights; n_layers: the first blocks only (None: all)."""
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = local_dir(name, cfg)
    if directory is None:
        return HookedTransformer.from_pretrained(name, device=cfg["device"], first_n_layers=n_layers)
    hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    local_layers = hf_model.config.num_hidden_layers
    kwargs = {"hf_model": hf_model, "tokenizer": AutoTokenizer.from_pretrained(directory),
              "first_n_layers": local_layers if n_layers is None else min(n_layers, local_layers)}
    tl_name = tl_name_for(directory, arch)
    if Path(tl_name).is_dir():  # configured from its config.json
        return from_config_json(tl_name, device=cfg["device"], **kwargs)
    return HookedTransformer.from_pretrained(tl_name, device=cfg["device"], **kwargs)


def from_config_json(path, hf_model, tokenizer, device=None, first_n_layers=None):
    """A HookedTransformer of the model a directory's config.json describes, with hf_model's
    weights, processed as HookedTransformer.from_pretrained processes them (which takes only
    TransformerLens's names): layer norms folded, writing weights and unembedding centred."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as tl_loading
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    tl_cfg = tl_loading.get_pretrained_model_config(str(path), fold_ln=True, device=device, dtype=torch.float32,
                                                    first_n_layers=first_n_layers)
    post_norm = tl_cfg.original_architecture in POST_NORM_ARCHITECTURES
    softcap = bool(getattr(tl_cfg, "output_logits_soft_cap", 0) and tl_cfg.output_logits_soft_cap > 0)
    state = tl_loading.get_pretrained_state_dict(str(path), tl_cfg, hf_model, dtype=torch.float32)
    model = HookedTransformer(tl_cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=not post_norm, center_writing_weights=not post_norm,
                                      center_unembed=not softcap, fold_value_biases=True,
                                      refactor_factored_attn_matrices=False)
    model.move_model_modules_to_device()
    return model


def tokenizer_of(name, cfg=None):
    """A model's tokenizer, read alone (seconds): a GGUF's from its cached copy, or from the file."""
    from transformers import AutoTokenizer

    if is_gguf(name):
        cached = gguf_cache_dir(name, cfg)
        if (cached / "config.json").is_file():
            return AutoTokenizer.from_pretrained(cached)
        gguf_header(name)
        return AutoTokenizer.from_pretrained(Path(name).parent, gguf_file=Path(name).name)
    return AutoTokenizer.from_pretrained(name)


def load_failure(name, error, device=None):
    """What failed when model `name` did not load, and what to do: the error itself, with the hint
    that fits it (hub access, memory, weights that do not fit the architecture), never a guess."""
    text = f"could not load {name} ({type(error).__name__}: {error})"
    message = str(error).lower()
    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
        hub_errors = (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled)
    except ImportError:
        hub_errors = ()
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or "not enough memory" in message:
        return (f"{text}.\nThe device ({device or 'default'}) ran out of memory: free it, use a device with more "
                "memory, or pass a smaller pair with --model_names")
    if "size mismatch" in message or "shape" in message:
        return (f"{text}.\nIts weights do not fit the architecture TransformerLens has for it (a resized "
                "vocabulary or another model's weights?): name its architecture with --model_archs")
    if isinstance(error, hub_errors) or any(w in message for w in ("offline", "connect", "gated", "401", "403",
                                                                  "huggingface.co", "hf_hub", "repository not found")):
        return (f"{text}.\nThe weights come from the Hugging Face hub: this needs network access, the model's "
                "licence accepted on its page and `huggingface-cli login` (Gemma's are gated), or local copies "
                "(--model_names DIR_A,DIR_B, or GGUF files). To see the whole pipeline on a CPU instead: "
                "python train.py --preset toy")
    return text


def drop_unembedding(model):
    """Free the unembedding of a model that is only run up to a hook (stop_at_layer)."""
    d_model = model.cfg.d_model
    model.unembed.W_U = torch.nn.Parameter(torch.empty(d_model, 0, device=model.unembed.W_U.device), requires_grad=False)
    model.unembed.b_U = torch.nn.Parameter(torch.empty(0, device=model.unembed.b_U.device), requires_grad=False)
    return model
