"""The crosscoder of Anthropic's model-diffing paper, as the reference replication defines it.

One sparse dictionary read from and written to the same hook point of several models:
    f      = ReLU( sum_m x_m @ W_enc[m] + b_enc )          (encode)
    x_hat_m = f @ W_dec[:, m] + b_dec[m]                   (decode)
Each latent has one decoder vector per model; the ratio of their norms says whether it is
shared or specific to one model. Model index 0 is the base model, 1 the chat model.

Shape legend: B batch (token positions), M models, D d_in (residual width), F latents (dict_size).
"""
import copy
import json
from pathlib import Path
from typing import NamedTuple

import torch
from einops import einsum, rearrange
from torch import nn

import distributed
import published
from batchtopk import aux_loss, batch_topk_mask, update_threshold
from config import DERIVED_KEYS, SCHEMA, completed, effective
# The latent classes moved to diffing.py; imported here so that existing notebooks keep working.
from diffing import BASE_ONLY_MAX, CHAT_ONLY_MIN, SHARED_RANGE, classify_latents  # noqa: F401
from sharding import init_decoder, shard_rows, sum_over_shards, take_shard
from checkpoint import (CheckpointError, atomic_torch_save, atomic_write_text, checkpoint_files, jsonable,
                        latest_checkpoint, next_version_dir, published_files, read_checkpoint, resolve_version_dir)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HF_REPO_ID = "ckkissane/crosscoder-gemma-2-2b-model-diff"
# The published crosscoder's config names only model A and saved no normalisation factors: its
# authors' notebook used these (mean raw norms ~174 base, ~197 chat at blocks.14.hook_resid_pre).
PUBLISHED_MODEL_NAMES = ("gemma-2-2b", "gemma-2-2b-it")
PUBLISHED_FACTORS = (0.2758961493232058, 0.24422852496546169)
PARAM_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec")
class LossOutput(NamedTuple):
    # The reference's named tuple, fields in the same order.
    l2_loss: torch.Tensor
    l1_loss: torch.Tensor
    l0_loss: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_A: torch.Tensor
    explained_variance_B: torch.Tensor


def resolve_device(device=None):
    """None or "auto" -> "cuda" when available, else "cpu"; anything else is kept."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class CrossCoder(nn.Module):
    def __init__(self, cfg, shard=(0, 1)):
        """shard (index, count): hold only that slice of the latents (sharding.py; the whole
        dictionary's initialisation, sliced)."""
        super().__init__()
        cfg = completed(cfg)  # the reference's own key set works: the other keys take their defaults
        enc_dtype = cfg["enc_dtype"]
        if enc_dtype not in DTYPES:
            raise ValueError(f"enc_dtype must be one of {sorted(DTYPES)}, got {enc_dtype!r}")
        self.cfg = cfg
        self.dtype = DTYPES[enc_dtype]
        self.n_models = cfg["n_models"]
        d_in, dict_size = cfg["d_in"], cfg["dict_size"]
        # A local generator: same seed -> same weights, without touching the global RNG.
        rows = shard_rows(dict_size, shard)
        W_dec_FMD = init_decoder(cfg, rows)
        W_enc_MDF = rearrange(W_dec_FMD, "latent model d_in -> model d_in latent")
        self.W_enc = nn.Parameter(W_enc_MDF.to(self.dtype).contiguous())
        self.W_dec = nn.Parameter(W_dec_FMD.to(self.dtype))
        self.b_enc = nn.Parameter(torch.zeros(rows.stop - rows.start, dtype=self.dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.n_models, d_in, dtype=self.dtype))
        self.architecture = cfg["architecture"]
        if self.architecture == "batchtopk":
            # score threshold used at inference; -1 until training has estimated it
            self.register_buffer("threshold", torch.tensor(-1.0))
        self.score_norms = None  # set by fold_normalisation: BatchTopK scores use the unfolded norms
        # Set by the Trainer under torchrun: BatchTopK training selects over the whole global batch
        # (of data_parallel groups); the latents are split over latent_group (sharding.py).
        self.global_topk, self.data_parallel = False, 1
        self.shard, self.latent_group, self.data_group = shard, None, None
        self.k = cfg.get("k")  # BatchTopK's k now (the trainer anneals it when k_max is set)
        self.to(resolve_device(cfg["device"]))
        self.save_dir = None  # chosen at the first save, never at construction
        self.save_version = 0

    # ---------------------------------------------------------------- forward maths
    def encode(self, x_BMD, apply_relu=True):
        pre_BF = einsum(
            x_BMD.to(self.dtype), self.W_enc,
            "batch model d_in, model d_in latent -> batch latent",
        ) + self.b_enc
        if not apply_relu:
            return pre_BF
        return self._select(torch.relu(pre_BF))[0]

    def _select(self, acts_BF):
        """The architecture's sparsity: ReLU alone for "l1"; for "batchtopk" the k * batch largest
        scores (training) or the scores above the estimated threshold (eval). Returns the
        activations and, in BatchTopK training, the smallest kept score."""
        if self.architecture != "batchtopk":
            return acts_BF, None
        norms_F = self.score_norms if self.score_norms is not None else self.decoder_norms().sum(-1)
        scores_BF = acts_BF * norms_F.detach().to(acts_BF.dtype)
        if self.training or self.threshold < 0:
            group = distributed.group() if self.training and self.global_topk else None
            rows = acts_BF.shape[0] * self.data_parallel  # the global batch
            mask_BF, min_kept = batch_topk_mask(scores_BF, self.k, group, rows)
            return acts_BF * mask_BF, min_kept
        return acts_BF * (scores_BF > self.threshold), None

    def decode(self, acts_BF):
        x_hat_BMD = einsum(
            acts_BF.to(self.dtype), self.W_dec,
            "batch latent, latent model d_in -> batch model d_in",
        )
        return sum_over_shards(x_hat_BMD, self.latent_group) + self.b_dec

    def forward(self, x_BMD):
        return self.decode(self.encode(x_BMD))

    def losses_and_acts(self, x_BMD, dead_F=None, update_threshold_=True):
        """get_losses, plus the latent activations [B, F] (the trainer tracks dead latents) and a
        dict of the other training terms: "aux_loss", for BatchTopK given the dead latents dead_F
        [F] (else 0), and for BatchTopK or recon_loss "norm" "l2_norm_loss", the mean over tokens
        and models of the error's L2 norm (the authors' reconstruction loss). In BatchTopK training, update_threshold_ also updates
        the inference threshold."""
        pre_BF = self.encode(x_BMD, apply_relu=False)
        acts_BF, min_kept = self._select(torch.relu(pre_BF))
        if min_kept is not None and self.training and update_threshold_:
            with torch.no_grad():
                self.threshold.copy_(update_threshold(self.threshold, min_kept.float(), self.cfg["threshold_beta"]))
        x_hat_BMD = self.decode(acts_BF)
        # Loss maths in float32 even when the weights are bf16/fp16.
        x_BMD = x_BMD.float()
        err_BMD = x_BMD - x_hat_BMD.float()
        sq_err_BMD = err_BMD.pow(2)
        sq_err_BM = sq_err_BMD.sum(-1)
        sq_err_B = sq_err_BM.sum(-1)
        var_BM = (x_BMD - x_BMD.mean(0, keepdim=True)).pow(2).sum(-1)
        ev_BM = 1 - sq_err_BM / var_BM
        ev_B = 1 - sq_err_B / var_BM.sum(-1)
        total_dec_norm_F = self.decoder_norms().float().sum(-1)
        # The reference's l1 = (acts * norms).sum(-1).mean(). Summing over the batch first gives
        # the same number without a [B, F] product in the forward and two in the backward.
        l1 = sum_over_shards((acts_BF.float().sum(0) * total_dec_norm_F).sum(), self.latent_group) / acts_BF.shape[0]
        l0_B = sum_over_shards(torch.sign(acts_BF).sum(-1, dtype=torch.float32), self.latent_group)  # acts >= 0
        losses = LossOutput(
            l2_loss=sq_err_B.mean(),
            l1_loss=l1,
            l0_loss=l0_B.mean(),
            explained_variance=ev_B.mean(),
            explained_variance_A=ev_BM[:, 0].mean(),
            explained_variance_B=ev_BM[:, 1].mean(),
        )
        aux = torch.zeros((), device=x_BMD.device)
        if self.architecture == "batchtopk" and dead_F is not None:
            aux = aux_loss(err_BMD, pre_BF, self.W_dec, dead_F, effective(self.cfg, "aux_k"), self.latent_group,
                           norms_F=total_dec_norm_F, normalise=self.cfg["aux_normalise"], data_group=self.data_group)
        terms = {"aux_loss": aux}
        if self.architecture == "batchtopk" or effective(self.cfg, "recon_loss") == "norm":  # (not the reference's)
            terms["l2_norm_loss"] = torch.linalg.vector_norm(err_BMD, dim=-1).mean()
        return losses, acts_BF, terms

    def get_losses(self, x_BMD):
        return self.losses_and_acts(x_BMD)[0]

    # ---------------------------------------------------------------- analysis helpers
    def decoder_norms(self):
        """[F, M]: the norm of each latent's decoder vector in each model."""
        return self.W_dec.norm(dim=-1)

    def relative_decoder_norm(self, model_a=0, model_b=1):
        """[F]: norm_b / (norm_a + norm_b); 0 = only in model a (base), 1 = only in b (chat).
        NaN for a latent whose decoder is zero in both models. Detached, as every analysis helper's."""
        norms_FM = self.decoder_norms().detach().float()
        return norms_FM[:, model_b] / (norms_FM[:, model_a] + norms_FM[:, model_b])

    def decoder_cosine_similarity(self, model_a=0, model_b=1):
        """[F]: cosine similarity between each latent's decoder vectors in models a and b (detached)."""
        W = self.W_dec.detach().float()
        return torch.nn.functional.cosine_similarity(W[:, model_a], W[:, model_b], dim=-1)

    @torch.no_grad()
    def fold_normalisation(self, scaling_factors=None):
        """Return an equivalent crosscoder on raw activations.

        Training sees x_norm[m] = s_m * x[m]. Encoding is linear in x, so W_enc[m] * s_m reads
        raw activations; decoding is divided by s_m to give raw outputs. Relative decoder norms
        should be read from the unfolded weights (folding rescales each model's decoder).
        """
        if scaling_factors is None:
            scaling_factors = self.cfg.get("normalisation_factor")
        if scaling_factors is None:
            raise ValueError("no normalisation factors: pass scaling_factors or train first")
        s_M = torch.as_tensor(scaling_factors, dtype=torch.float32, device=self.W_enc.device)
        if s_M.shape != (self.n_models,):
            raise ValueError(f"need {self.n_models} scaling factors, got shape {tuple(s_M.shape)}")
        score_norms = self.decoder_norms().sum(-1).detach() if self.score_norms is None else self.score_norms
        folded = copy.deepcopy(self)  # same architecture, mode and threshold; new weights below
        folded.cfg = dict(self.cfg, normalisation_factor=None, folded_normalisation_factor=s_M.tolist())
        folded.save_dir, folded.save_version = None, 0
        folded.W_enc.copy_((self.W_enc.float() * s_M[:, None, None]).to(self.dtype))
        folded.W_dec.copy_((self.W_dec.float() / s_M[None, :, None]).to(self.dtype))
        folded.b_dec.copy_((self.b_dec.float() / s_M[:, None]).to(self.dtype))
        folded.score_norms = score_norms  # BatchTopK keeps scoring with the unfolded norms
        return folded

    # ---------------------------------------------------------------- checkpoints
    def save(self, extra_state=None, step=None, weights=None):
        """Write checkpoint k = save_version: weights, config (recording `step` when given) and,
        when extra_state is given, the trainer state; each atomically, the config last, so its
        presence marks the checkpoint complete. weights: the whole dictionary's tensors, when
        this module holds a shard (sharding.gather_weights). Returns the path of the weights file."""
        if self.save_dir is None:
            self.save_dir = next_version_dir(self.cfg)
        for stale in self.save_dir.glob(".*.tmp"):  # left by a save that was killed mid-write
            stale.unlink(missing_ok=True)
        files = checkpoint_files(self.save_dir, self.save_version)
        if weights is None:
            weights = {name: getattr(self, name).detach() for name in PARAM_NAMES}
            if self.architecture == "batchtopk":
                weights["threshold"] = self.threshold.detach()
        atomic_torch_save(weights, files.weights)
        if extra_state is not None:
            atomic_torch_save(extra_state, files.trainer)
        cfg = {k: v for k, v in self.cfg.items() if k != "step"}
        if step is not None:
            cfg["step"] = step
        atomic_write_text(files.cfg, json.dumps(jsonable(cfg), indent=2))
        self.save_version += 1
        return files.weights

    @classmethod
    def load(cls, version_dir, checkpoint_version=None, device=None, shard=(0, 1)):
        """Load checkpoint checkpoint_version of version_dir (the newest complete one when None).
        version_dir is a path, or a name/number under checkpoints/ ("version_3", 3). shard
        (index, count): only that slice of the latents, read from a memory map of the file."""
        version_dir = resolve_version_dir(version_dir)
        if checkpoint_version is None:
            checkpoint_version = latest_checkpoint(version_dir)
        files = checkpoint_files(version_dir, checkpoint_version)
        model = cls._from_files(files.cfg, files.weights, device, shard)
        model.save_dir, model.save_version = version_dir, checkpoint_version + 1
        return model

    @classmethod
    def load_from_hf(cls, repo_id=HF_REPO_ID, path="blocks.14.hook_resid_pre", device=None, model_names=None,
                     hook_point=None):
        """Load a published crosscoder from the Hugging Face hub, or from a local directory given
        in place of repo_id (no network then). Two layouts: the reference's {path}/cfg.json +
        {path}/cc_weights.pt, and dictionary_learning's config.json + model.safetensors (the
        science-of-finetuning crosscoders; published.py: their normalisation is folded, their
        layer read as its hook point). model_names / hook_point: theirs name neither for sure
        (default: the Gemma-2-2b pair, trainer_config.json's layer)."""
        local = Path(repo_id).is_dir()
        if local and published.is_dictionary_learning_dir(repo_id):
            return cls._from_state(*published.read_dictionary_learning(repo_id, model_names, hook_point),
                                   device, where=repo_id)
        cfg_path, weights_path = published_files(repo_id, path)
        if not local:
            from huggingface_hub import hf_hub_download, list_repo_files

            if f"{path}/cc_weights.pt" not in list_repo_files(repo_id):
                return cls.load_from_hf(str(published.download(repo_id)), path, device, model_names, hook_point)
            cfg_path, weights_path = (Path(hf_hub_download(repo_id, f"{path}/{p.name}")) for p in (cfg_path, weights_path))
        return cls._from_files(cfg_path, weights_path, device)

    @classmethod
    def _from_files(cls, cfg_path, weights_path, device, shard=(0, 1)):
        cfg, state = read_checkpoint(cfg_path, weights_path, PARAM_NAMES, mmap=shard[1] > 1)
        if "d_in" not in cfg:  # the first published cfg.json had no d_in: infer it
            cfg["d_in"] = state["W_enc"].shape[1]
        if "n_models" not in cfg:
            cfg["n_models"] = state["W_enc"].shape[0]
        cfg.setdefault("architecture", "l1")  # configs from before BatchTopK, the reference's included
        for key in ("dict_size", "enc_dtype"):
            if key not in cfg:
                raise CheckpointError(f"{cfg_path}: config is missing required key '{key}'")
        if cfg["enc_dtype"] not in DTYPES:
            raise CheckpointError(f"{cfg_path}: unknown enc_dtype {cfg['enc_dtype']!r}, expected one of {sorted(DTYPES)}")
        return cls._from_state(cfg, state, device, shard, where=f"{weights_path} (config {cfg_path})")

    @classmethod
    def _from_state(cls, cfg, state, device, shard=(0, 1), where=""):
        cfg["device"] = resolve_device(device)
        # Build on CPU (cheap to fill), check shapes, then move. model.cfg is the config as saved
        # (keys this version does not know included: they are not validated).
        known = {k: v for k, v in cfg.items() if (k in SCHEMA or k in DERIVED_KEYS) and v is not None}
        model = cls(dict(known, device="cpu"), shard)
        model.cfg = cfg
        if shard[1] > 1:  # this shard's latents only
            rows = shard_rows(cfg["dict_size"], shard)
            state = {name: take_shard(name, t, rows) for name, t in state.items()}
        for name in PARAM_NAMES:
            want, got = tuple(getattr(model, name).shape), tuple(state[name].shape)
            if want != got:
                raise CheckpointError(
                    f"{where}: {name} has shape {got} but the config implies {want} "
                    f"(d_in={cfg['d_in']}, dict_size={cfg['dict_size']}, n_models={cfg['n_models']})")
        if cfg["architecture"] != "batchtopk" and "threshold" in state:
            raise CheckpointError(f"{where}: has a BatchTopK threshold but the config says "
                                  f"architecture {cfg['architecture']!r}")
        if cfg["architecture"] == "batchtopk" and "threshold" not in state:
            raise CheckpointError(f"{where}: a batchtopk crosscoder needs its 'threshold'")
        model.load_state_dict(state)
        return model.eval().to(cfg["device"])  # eval: BatchTopK uses its threshold after loading
