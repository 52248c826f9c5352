"""The crosscoder of Anthropic's model-diffing paper as the reference replication defines it, and
its BatchTopK variant: one class per architecture, CrossCoder (L1), BatchTopKCrossCoder and the
diff-SAE baseline (DiffSAE); `CrossCoder(cfg)` builds the one cfg["architecture"] names.

One sparse dictionary read from and written to the same hook point of several models:
    f      = ReLU( sum_m x_m @ W_enc[m] + b_enc )          (encode)
    x_hat_m = f @ W_dec[:, m] + b_dec[m]                   (decode)
Each latent has one decoder vector per model; the ratio of their norms says whether it is shared
or specific to one model. Model 0 is the base, 1 the chat model. The model holds no process group:
training passes a distributed.Mesh to the methods whose sums span processes.

Shape legend: B batch (token positions), M models, D d_in (residual width), F latents (dict_size).
"""
import copy
from typing import NamedTuple

import torch
from einops import einsum, rearrange
from torch import nn

from crossdiff.arch import diff_sae, widths
from crossdiff.arch.batchtopk import aux_loss, aux_loss_kept, batch_topk_mask, k_at, update_threshold
from crossdiff.arch.partition import (
    DESIGNATED,
    allowed_mask,
    check_violations,
    constrained,
    impose_,
    k_shares,
    l1_weights,
    latent_owner,
    partition_of,
    project_decoder_grad,
    project_encoder_grad,
    shard_latents,
    violations,
)
from crossdiff.arch.shards import any_over_shards, init_decoder, sum_over_shards, take_shard
from crossdiff.arch.sparse import fired_latents, kept_activations, kept_entries, kept_preactivations, sparse_decode
from crossdiff.config.schema import (
    DERIVED_KEYS,
    SCHEMA,
    ConfigError,
    check_diff_sae,
    check_partition,
    completed,
    effective,
)
from crossdiff.io.checkpoint import (
    PARAM_NAMES,
    CheckpointError,
    checkpoint_files,
    latest_checkpoint,
    next_version_dir,
    read_crosscoder,
    resolve_version_dir,
    write_checkpoint,
)
from crossdiff.io.hub import HF_REPO_ID, push_to_hub, read_published
from crossdiff.scale.distributed import Mesh, resolve_device

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONE_PROCESS = Mesh()
FOLD_CHUNK = 2**14  # latents folded at a time (fold_normalisation)


class LossOutput(NamedTuple):
    # The reference's named tuple, fields in the same order.
    l2_loss: torch.Tensor
    l1_loss: torch.Tensor
    l0_loss: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_A: torch.Tensor
    explained_variance_B: torch.Tensor


def l1_coeff_at(step, total_steps, l1_coeff):
    """Linear warm-up from 0 to l1_coeff over the first 5% of steps, then constant (reference)."""
    if step < 0.05 * total_steps:
        return l1_coeff * step / (0.05 * total_steps)
    return l1_coeff


class CrossCoder(nn.Module):
    """The reference's crosscoder: ReLU latents, loss = l2 + l1_coeff(t) * sum_j f_j sum_m ||W_dec[j, m]||."""
    architecture = "l1"
    reconstructs = "each model"  # (the explained variance's subject, for reports)
    EXTRA_STATE = ()  # tensors saved beside the parameters (replicated over latent shards)
    # Step memory beyond weights, gradients and Adam, per phase: (fp32 [rows, f] copies, copies of
    # W_dec's shard); costs.memory_per_rank. L1: pre-activations, activations and a temporary, or two
    # and the decoder norms' gradient. Measured with torch's MemTracker (tests/test_costs.py).
    STEP_PHASES = ((3, 0), (2, 1))

    def __new__(cls, cfg=None, shard=(0, 1), initialise=True):
        if cls is CrossCoder and cfg is not None:  # (cfg None: copy.deepcopy and pickle)
            cls = ARCHITECTURES[completed(cfg)["architecture"]]
        return super().__new__(cls)

    def __init__(self, cfg, shard=(0, 1), initialise=True):
        """shard (index, count): hold only that slice of the latents (crossdiff/scale/distributed.py; the whole
        dictionary's initialisation, sliced). initialise False: uninitialised weights, for a load
        to fill (a 2^20-latent dictionary's random draw alone takes minutes)."""
        super().__init__()
        cfg = completed(cfg)  # the reference's own key set works: the other keys take their defaults
        if cfg["architecture"] != self.architecture:
            raise ConfigError(f"{type(self).__name__} is architecture {self.architecture!r}, the config says "
                              f"{cfg['architecture']!r}: build CrossCoder(cfg)")
        self.cfg = cfg
        self.dtype = DTYPES[cfg["enc_dtype"]]
        self.n_models = cfg["n_models"]
        # crossdiff/arch/partition.py: the blocks of a partitioned dictionary (one free block for a standard one)
        if cfg["exclusive_fraction"] or cfg["shared_fraction"]:
            check_partition(cfg)
        device = resolve_device(cfg["device"])
        # The partition's bookkeeping and the seeded draw run on the CPU (the same weights on any
        # device), whatever torch's default device; the weights are then made on cfg's device.
        with torch.device("cpu"):
            self.partition = partition_of(cfg)
            latents_f = shard_latents(self.partition, shard)
            owner_f = latent_owner(self.partition, latents_f)
            allowed_fM, tied_f = allowed_mask(owner_f, self.n_models), owner_f == DESIGNATED
            if initialise:
                W_dec_FMD = init_decoder(cfg, latents_f)  # a local generator: same seed, same weights
                W_enc_MDF = rearrange(W_dec_FMD, "latent model d_in -> model d_in latent").contiguous()
                impose_(W_enc_MDF, W_dec_FMD, allowed_fM, tied_f)  # (init_decoder left the padding 0)
        if not initialise:  # made where they will live: a load fills them
            W_dec_FMD = torch.empty(len(latents_f), self.n_models, cfg["d_in"], dtype=self.dtype, device=device)
            W_enc_MDF = torch.empty(self.n_models, cfg["d_in"], len(latents_f), dtype=self.dtype, device=device)
        self.W_enc = nn.Parameter(W_enc_MDF.to(device, self.dtype))
        self.W_dec = nn.Parameter(W_dec_FMD.to(device, self.dtype))
        self.b_enc = nn.Parameter(torch.zeros(len(latents_f), dtype=self.dtype, device=device))
        # not saved: the config rebuilds them
        self.register_buffer("latents", latents_f.to(device), persistent=False)  # [f] global indices held here
        self.register_buffer("owner_f", owner_f.to(device), persistent=False)  # a model's index, DESIGNATED or FREE
        self.register_buffer("allowed_fM", allowed_fM.to(device), persistent=False)
        self.register_buffer("tied_f", tied_f.to(device), persistent=False)
        # the two top-k groups of a designated block as index lists (boolean column indexing would
        # be a host sync each step): [the rest, the designated block]
        for name, m in (("rest_f", ~tied_f), ("designated_f", tied_f)):
            self.register_buffer(name, torch.nonzero(m).flatten().to(device), persistent=False)
        self.b_dec = nn.Parameter(torch.zeros(self.n_models, cfg["d_in"], dtype=self.dtype, device=device))
        # models of different widths (crossdiff/arch/widths.py): [M, D] each model's own coordinates
        valid_MD = widths.valid_mask(widths.widths_of(cfg), cfg["d_in"], device) if widths.is_padded(cfg) else None
        self.register_buffer("valid_MD", valid_MD, persistent=False)
        self.shard = shard
        self.save_dir = None  # chosen at the first save, never at construction
        self.save_version = 0

    # ---------------------------------------------------------------- forward maths
    def encoder_weight(self):
        """W_enc as the maths use it: of a partitioned dictionary or of models of different widths,
        with its gradient projected (crossdiff/arch/partition.py, widths.py: forbidden weights and
        the padding get none)."""
        if not self.partition.exclusive and self.valid_MD is None:
            return self.W_enc
        return constrained(self.W_enc, self._encoder_grad)

    def _encoder_grad(self, grad_MDf):
        if self.partition.exclusive:
            grad_MDf = project_encoder_grad(grad_MDf, self.allowed_fM)
        return grad_MDf if self.valid_MD is None else widths.project_encoder_grad(grad_MDf, self.valid_MD)

    def decoder_weight(self):
        """W_dec as the maths use it, its gradient projected likewise (forbidden rows get none, tied
        rows the sum over models, the padding none)."""
        if not self.partition.active and self.valid_MD is None:
            return self.W_dec
        return constrained(self.W_dec, self._decoder_grad)

    def _decoder_grad(self, grad_fMD):
        if self.partition.active:
            grad_fMD = project_decoder_grad(grad_fMD, self.allowed_fM, self.tied_f)
        return grad_fMD if self.valid_MD is None else widths.project_decoder_grad(grad_fMD, self.valid_MD)

    def decoder_bias(self):
        """b_dec as the maths use it (the padding of a narrower model gets no gradient)."""
        if self.valid_MD is None:
            return self.b_dec
        return constrained(self.b_dec, lambda g: widths.project_bias_grad(g, self.valid_MD))

    def encode(self, x_BMD, apply_relu=True):
        pre_BF = einsum(x_BMD.to(self.dtype), self.encoder_weight(),
                        "batch model d_in, model d_in latent -> batch latent")
        b_F = self.b_enc.to(pre_BF.dtype)  # under bf16 autocast the [B, F] terms stay bf16
        # In place without a graph (the sparse step's selection): one [B, F]. With one, autograd's
        # in-place add on the matmul's output view would keep a copy of its own.
        pre_BF = pre_BF + b_F if torch.is_grad_enabled() else pre_BF.add_(b_F)
        if not apply_relu:
            return pre_BF
        return self.select(torch.relu(pre_BF))[0]

    def select(self, acts_BF, mesh=ONE_PROCESS):
        """The architecture's sparsity on the ReLU activations: (activations, the smallest kept
        score or None). L1: the ReLU alone."""
        return acts_BF, None

    def decode(self, acts_BF, mesh=ONE_PROCESS):
        x_hat_BMD = einsum(acts_BF.to(self.dtype), self.decoder_weight(),
                           "batch latent, latent model d_in -> batch model d_in")
        return sum_over_shards(x_hat_BMD, mesh.latent) + self.decoder_bias()

    def forward(self, x_BMD):
        return self.decode(self.encode(x_BMD))

    def target(self, x_BMD):
        """What the architecture reconstructs from a pair's activations: the pair itself (the
        diff-SAE: its difference). Training, its first batch's median and analysis's explained
        variance compare against it."""
        return x_BMD

    def losses_and_acts(self, x_BMD, dead_F=None, update_threshold_=True, mesh=ONE_PROCESS):
        """get_losses, the latent activations [B, F] and the architecture's other terms (extra_terms).
        dead_F [F]: latents dead unless they fire in this batch (AuxK); update_threshold_: BatchTopK
        updates its threshold."""
        pre_BF = self.encode(x_BMD, apply_relu=False)
        acts_BF, min_kept = self.select(torch.relu(pre_BF), mesh)
        self._track_threshold(min_kept, update_threshold_)
        x_hat_BMD = self.decode(acts_BF, mesh)
        l0_B = sum_over_shards(torch.sign(acts_BF).sum(-1, dtype=torch.float32), mesh.latent)  # acts >= 0
        norms_FM = self.decoder_norms().float()
        return self._losses(x_BMD, x_hat_BMD, acts_BF.float().sum(0), l0_B, norms_FM, mesh), acts_BF, \
            self.extra_terms(x_BMD.float() - x_hat_BMD.float(), pre_BF, acts_BF, norms_FM.sum(-1), dead_F, mesh)

    def _track_threshold(self, min_kept, update_threshold_):
        if min_kept is not None and self.training and update_threshold_:
            with torch.no_grad():
                self.threshold.copy_(update_threshold(self.threshold, min_kept.float(), self.cfg["threshold_beta"]))

    def _losses(self, x_BMD, x_hat_BMD, acts_sum_F, l0_B, norms_FM, mesh):
        """LossOutput from the inputs, their reconstruction, each latent's activation summed over
        the batch, each row's L0 and the decoder norms [F, M]."""
        # Loss maths in float32 even when the weights are bf16/fp16.
        x_BMD = x_BMD.float()
        err_BMD = x_BMD - x_hat_BMD.float()
        sq_err_BM = err_BMD.pow(2).sum(-1)
        sq_err_B = sq_err_BM.sum(-1)
        var_BM = (x_BMD - x_BMD.mean(0, keepdim=True)).pow(2).sum(-1)
        ev_BM = 1 - sq_err_BM / var_BM
        ev_B = 1 - sq_err_B / var_BM.sum(-1)
        l1_weight_F = norms_FM.sum(-1)
        if self.partition.shared:  # the designated block pays for its one tied vector, reduced
            l1_weight_F = l1_weights(norms_FM, self.tied_f, self.cfg["shared_l1_scale"])
        # The reference's l1 = (acts * norms).sum(-1).mean(). Summing over the batch first gives
        # the same number without a [B, F] product in the forward and two in the backward.
        l1 = sum_over_shards((acts_sum_F * l1_weight_F).sum(), mesh.latent) / x_BMD.shape[0]
        return LossOutput(l2_loss=sq_err_B.mean(), l1_loss=l1, l0_loss=l0_B.mean(), explained_variance=ev_B.mean(),
                          explained_variance_A=ev_BM[:, 0].mean(), explained_variance_B=ev_BM[:, 1].mean())

    def extra_terms(self, err_BMD, pre_BF, acts_BF, total_dec_norm_F, dead_F, mesh):
        """"aux_loss" (0 here) and, with recon_loss "norm", "l2_norm_loss": the error's L2 norm,
        mean over tokens and models (the BatchTopK authors' reconstruction loss)."""
        terms = {"aux_loss": torch.zeros((), device=err_BMD.device)}
        if effective(self.cfg, "recon_loss") == "norm":  # (not the reference's)
            terms["l2_norm_loss"] = torch.linalg.vector_norm(err_BMD, dim=-1).mean()
        return terms

    def get_losses(self, x_BMD):
        return self.losses_and_acts(x_BMD)[0]

    # ---------------------------------------------------------------- the training recipe
    def step_inputs(self, step, steps_since_fired_F):
        """losses_and_acts's keyword arguments at this step. L1: none."""
        return {}

    def training_loss(self, losses, terms, step, total_steps):
        """(loss, L1 coefficient): reconstruction (the reference's squared error summed over models
        and d_in, or with recon_loss "norm" the mean L2 norm) + l1_coeff(step) * l1."""
        l1_coeff = l1_coeff_at(step, total_steps, self.cfg["l1_coeff"])
        return self._reconstruction(losses, terms) + l1_coeff * losses.l1_loss, l1_coeff

    def _reconstruction(self, losses, terms):
        return terms["l2_norm_loss"] if effective(self.cfg, "recon_loss") == "norm" else losses.l2_loss

    def step_log(self, terms):
        """The architecture's own numbers for the training log."""
        return {"l2_norm_loss": terms["l2_norm_loss"].detach()} if "l2_norm_loss" in terms else {}

    def dead_window(self, step):
        """Steps without firing after which a latent counts dead (L1: logged only; since the start)."""
        return min(self.cfg["dead_window"], max(step, 1))

    # ---------------------------------------------------------------- analysis helpers
    def decoder_norms(self):
        """[F, M]: the norm of each latent's decoder vector in each model."""
        return self.decoder_weight().norm(dim=-1)

    def latent_owner(self):
        """[F] (CPU) each latent's block: the model it is exclusive to, partition.DESIGNATED (tied,
        shared by construction) or partition.FREE (a standard crosscoder's latents)."""
        return self.owner_f.cpu()

    def verify_partition(self, where="this crosscoder"):
        """{"forbidden": the largest weight the partition or a narrower model's padding forbids,
        "tied": the largest relative difference between tied decoder rows}; raises
        partition.PartitionError unless forbidden is exactly 0 and tied rows agree (to 1e-6)."""
        found = {"forbidden": 0.0, "tied": 0.0}
        if self.partition.active:
            found = violations(self.W_enc, self.W_dec, self.allowed_fM, self.tied_f)
        if self.valid_MD is not None:
            padding = widths.padding_violation(self.W_enc, self.W_dec, self.b_dec, self.valid_MD)
            found["forbidden"] = max(found["forbidden"], padding)
        return check_violations(found, where)

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
        """An equivalent crosscoder on raw activations. Training sees x_norm[m] = s_m * x[m]:
        W_enc[m] * s_m reads raw activations, decoding divided by s_m gives raw outputs. Read
        relative decoder norms from the unfolded weights (folding rescales each model's decoder)."""
        if scaling_factors is None:
            scaling_factors = self.cfg.get("normalisation_factor")
        if scaling_factors is None:
            raise ValueError("no normalisation factors: pass scaling_factors or train first")
        s_M = torch.as_tensor(scaling_factors, dtype=torch.float32, device=self.W_enc.device)
        if s_M.shape != (self.n_models,):
            raise ValueError(f"need {self.n_models} scaling factors, got shape {tuple(s_M.shape)}")
        folded = copy.deepcopy(self)  # same architecture, mode and threshold; new weights below
        folded.cfg = dict(self.cfg, normalisation_factor=None, folded_normalisation_factor=s_M.tolist())
        folded.save_dir, folded.save_version = None, 0
        # In place on the copy, FOLD_CHUNK latents at a time: the peak is the two crosscoders and a
        # chunk in fp32, not a third whole copy (64 GiB of temporaries at 2^20 latents in fp32).
        for W_enc_MDf in folded.W_enc.split(FOLD_CHUNK, dim=-1):
            W_enc_MDf.copy_((W_enc_MDf.float() * s_M[:, None, None]).to(self.dtype))
        for W_dec_fMD in folded.W_dec.split(FOLD_CHUNK, dim=0):
            W_dec_fMD.copy_((W_dec_fMD.float() / s_M[None, :, None]).to(self.dtype))
        folded.b_dec.copy_((self.b_dec.float() / s_M[:, None]).to(self.dtype))
        return folded

    # ---------------------------------------------------------------- checkpoints
    def save(self, extra_state=None, step=None, weights=None):
        """Write checkpoint k = save_version: weights, config (recording `step`) and the trainer's
        extra_state when given. weights: the whole dictionary's, when this module holds a shard
        (distributed.gather_weights). Returns the weights file's path."""
        if self.save_dir is None:
            self.save_dir = next_version_dir(self.cfg)
        if weights is None:
            weights = {name: getattr(self, name).detach() for name in PARAM_NAMES + self.EXTRA_STATE}
        cfg = {k: v for k, v in self.cfg.items() if k != "step"}
        if step is not None:
            cfg["step"] = step
        path = write_checkpoint(self.save_dir, self.save_version, weights, cfg, extra_state)
        self.save_version += 1
        return path

    @classmethod
    def load(cls, version_dir, checkpoint_version=None, device=None, shard=(0, 1), verify=True):
        """Checkpoint checkpoint_version (None: the newest complete) of version_dir, a path or a
        name/number under checkpoints/ ("version_3", 3). shard (index, count): only that slice of
        the latents, read from a memory map. verify: the weights' bytes against the sha256 the
        checkpoint recorded (False skips reading them twice)."""
        version_dir = resolve_version_dir(version_dir)
        if checkpoint_version is None:
            checkpoint_version = latest_checkpoint(version_dir)
        files = checkpoint_files(version_dir, checkpoint_version)
        cfg, state = read_crosscoder(files.cfg, files.weights, mmap=shard[1] > 1, verify=verify)
        model = cls._from_state(cfg, state, device, shard, where=f"{files.weights} (config {files.cfg})")
        model.save_dir, model.save_version = version_dir, checkpoint_version + 1
        return model

    @classmethod
    def load_from_hf(cls, repo_id=HF_REPO_ID, path="blocks.14.hook_resid_pre", device=None, model_names=None,
                     hook_point=None):
        """A published crosscoder from the hub, or a local directory given as repo_id: the
        reference's layout or dictionary_learning's (hub.read_published). model_names /
        hook_point: theirs name neither for sure (default: the Gemma-2-2b pair, their layer)."""
        cfg, state, where = read_published(repo_id, path, model_names, hook_point)
        return cls._from_state(cfg, state, device, where=where)

    def push_to_hub(self, repo_id, path=None, private=False):
        """Publish in the layout load_from_hf reads (hub.push_to_hub; hub.write_published writes
        the same files into a local directory)."""
        return push_to_hub(self, repo_id, path, private)

    @classmethod
    def _from_state(cls, cfg, state, device, shard=(0, 1), where=""):
        if cfg["enc_dtype"] not in DTYPES:
            raise CheckpointError(f"{where}: unknown enc_dtype {cfg['enc_dtype']!r}, expected one of {sorted(DTYPES)}")
        cfg["device"] = resolve_device(device)
        # Built on CPU, checked, then moved; model.cfg is the config as saved (unknown keys kept).
        known = {k: v for k, v in cfg.items() if (k in SCHEMA or k in DERIVED_KEYS) and v is not None}
        model = CrossCoder(dict(known, device="cpu"), shard, initialise=False)  # the state fills it
        model.cfg = cfg
        if shard[1] > 1:  # this shard's latents only
            state = {name: take_shard(name, t, model.latents) for name, t in state.items()}
        for name in PARAM_NAMES:
            want, got = tuple(getattr(model, name).shape), tuple(state[name].shape)
            if want != got:
                raise CheckpointError(
                    f"{where}: {name} has shape {got} but the config implies {want} "
                    f"(d_in={cfg['d_in']}, dict_size={cfg['dict_size']}, n_models={cfg['n_models']})")
        if set(state) - set(PARAM_NAMES) != set(model.EXTRA_STATE):
            raise CheckpointError(f"{where}: holds {sorted(set(state) - set(PARAM_NAMES)) or 'no extra state'} but "
                                  f"a {cfg['architecture']!r} crosscoder needs {list(model.EXTRA_STATE) or 'none'}")
        model.load_state_dict(state)
        model.verify_partition(where)
        return model.eval().to(cfg["device"])  # eval: BatchTopK uses its threshold after loading


class BatchTopKCrossCoder(CrossCoder):
    """BatchTopK (Bussmann et al. 2024) with the recipe of Minder, Dumas et al. 2025 ("Overcoming
    Sparsity Artifacts in Crosscoders"; science-of-finetuning/dictionary_learning,
    BatchTopKCrossCoderTrainer). The k * B largest scores of the batch are kept instead of an L1
    penalty (score: activation x the decoder norms summed over models); at inference a threshold
    estimated in training replaces the batch's choice. AuxK (Gao et al. 2024, appendix B.1) asks
    the aux_k most active dead latents to reconstruct the error."""
    architecture = "batchtopk"
    EXTRA_STATE = ("threshold",)
    STEP_PHASES = ((6, 0),)  # the L1 temporaries plus the scores, the selection and AuxK's ranking

    def __init__(self, cfg, shard=(0, 1), initialise=True):
        super().__init__(cfg, shard, initialise)
        # the score threshold used at inference; -1 until training has estimated it. With a
        # designated shared block, which keeps its own k share: [the rest's, the block's].
        shape = (2,) if self.partition.shared else ()
        self.register_buffer("threshold", torch.full(shape, -1.0, device=self.W_enc.device))
        self.score_norms = None  # set by fold_normalisation: scores use the unfolded norms
        self.k = self.cfg["k"]  # k now (step_inputs anneals it when k_max is set)

    def select(self, acts_BF, mesh=ONE_PROCESS):
        """The k * batch largest scores (training: over the global batch of mesh.world) or the
        scores above the estimated threshold (eval); and, training, the smallest kept score."""
        mask_BF, min_kept = self.selection(acts_BF * self.score_norms_F().to(acts_BF.dtype), mesh)
        return acts_BF * mask_BF, min_kept

    def score_norms_F(self):
        """What an activation is weighted by in its score: the decoder norms summed over models."""
        return (self.score_norms if self.score_norms is not None else self.decoder_norms().sum(-1)).detach()

    def selection(self, scores_BF, mesh=ONE_PROCESS):
        """(mask of the kept scores [B, F], the smallest kept score in training, else None)."""
        if self.training or (self.threshold < 0).any():
            group = mesh.world if self.training else None
            rows = scores_BF.shape[0] * (mesh.data_parallel if self.training else 1)  # the global batch
            if not self.partition.shared:
                return batch_topk_mask(scores_BF, self.k, group, rows)
            # the designated shared block keeps its own (larger) share of k (partition.k_shares)
            ks = k_shares(self.k, self.partition.shared, self.partition.dict_size, self.cfg["shared_k_multiplier"])
            mask_BF = torch.zeros_like(scores_BF, dtype=torch.bool)
            min_kept = []
            for block_f, k in zip((self.rest_f, self.designated_f), ks):
                block_mask, block_min = batch_topk_mask(scores_BF.index_select(1, block_f), k, group, rows)
                mask_BF.index_copy_(1, block_f, block_mask)
                min_kept.append(block_min)
            return mask_BF, torch.stack(min_kept)
        threshold_F = self.threshold[self.tied_f.long()] if self.partition.shared else self.threshold
        return scores_BF > threshold_F, None

    def losses_and_acts(self, x_BMD, dead_F=None, update_threshold_=True, mesh=ONE_PROCESS):
        """With sparse_step (training): the same losses, activations and terms, but the decoder,
        its gradient, the encoder's weight gradient and AuxK computed from the kept entries only
        (crossdiff/arch/sparse.py); the dense path (the parent's) is the reference it equals."""
        if not (self.training and self.cfg["sparse_step"]):
            return super().losses_and_acts(x_BMD, dead_F, update_threshold_, mesh)
        W_enc = self.encoder_weight()
        with torch.no_grad():  # the dense forward only selects: no graph, no [B, F] backward
            pre_BF = self.encode(x_BMD, apply_relu=False)
            # beside pre_BF, one float [B, F] (the scores, freed once selected) and boolean masks
            scores_BF = torch.relu(pre_BF).mul_(self.score_norms_F().to(pre_BF.dtype))
            mask_BF, min_kept = self.selection(scores_BF, mesh)
            del scores_BF
            kept = kept_entries(mask_BF.logical_and_(pre_BF > 0))  # what select keeps active
            del mask_BF
        self._track_threshold(min_kept, update_threshold_)
        values_N = torch.relu(kept_preactivations(pre_BF, x_BMD, W_enc, self.b_enc, kept))
        x_hat_BMD = sum_over_shards(sparse_decode(values_N, kept, self.decoder_weight()), mesh.latent) + self.decoder_bias()
        B, F = pre_BF.shape
        acts_sum_F = torch.zeros(F, dtype=torch.float32, device=pre_BF.device).index_add(0, kept.cols, values_N.float())
        l0_B = torch.zeros(B, device=pre_BF.device).index_add_(0, kept.rows, (values_N > 0).float())
        norms_FM = self.decoder_norms().float()
        losses = self._losses(x_BMD, x_hat_BMD, acts_sum_F, sum_over_shards(l0_B, mesh.latent), norms_FM, mesh)
        err_BMD = x_BMD.float() - x_hat_BMD.float()
        aux = torch.zeros((), device=err_BMD.device)
        acts_BF = kept_activations(values_N, kept, (B, F))
        dead_F = self._dead_now(dead_F, fired_latents(acts_BF), mesh)
        if dead_F is not None and bool(any_over_shards(dead_F.any(), mesh.latent)):  # (a host sync)
            aux = aux_loss_kept(err_BMD, pre_BF, x_BMD, W_enc, self.b_enc, self.decoder_weight(), dead_F,
                                effective(self.cfg, "aux_k"), mesh.latent, norms_F=norms_FM.sum(-1),
                                normalise=self.cfg["aux_normalise"], data_group=mesh.data)
        terms = {"aux_loss": aux, "l2_norm_loss": torch.linalg.vector_norm(err_BMD, dim=-1).mean()}
        return losses, acts_BF, terms

    def extra_terms(self, err_BMD, pre_BF, acts_BF, total_dec_norm_F, dead_F, mesh):
        """AuxK over the latents of dead_F that did not fire in this batch (else 0), and always the
        authors' "l2_norm_loss"."""
        aux = torch.zeros((), device=err_BMD.device)
        dead_F = self._dead_now(dead_F, fired_latents(acts_BF), mesh)
        if dead_F is not None:
            aux = aux_loss(err_BMD, pre_BF, self.decoder_weight(), dead_F, effective(self.cfg, "aux_k"), mesh.latent,
                           norms_F=total_dec_norm_F, normalise=self.cfg["aux_normalise"], data_group=mesh.data)
        return {"aux_loss": aux, "l2_norm_loss": torch.linalg.vector_norm(err_BMD, dim=-1).mean()}

    @staticmethod
    def _dead_now(stale_F, fired_F, mesh):
        """The latents of stale_F that fired nowhere in this global batch: the authors'
        BatchTopKTrainer resets a latent's counter when it fires, before AuxK picks the dead ones.
        Under data parallelism one all-reduce of F flags over the data groups (no host sync)."""
        if stale_F is None:
            return None
        return stale_F & ~any_over_shards(fired_F, mesh.data)

    def step_inputs(self, step, steps_since_fired_F):
        """k annealed (k_at); the latents that are dead unless they fire in this batch (dead for
        dead_window steps counting this one; losses_and_acts drops those that fire); and whether
        the threshold is estimated yet (after threshold_start_step, as the authors)."""
        cfg = self.cfg
        self.k = k_at(step, cfg["k"], effective(cfg, "k_max"), effective(cfg, "k_annealing_steps"))
        # Before dead_window steps no latent can be dead: AuxK (a decode, its backward and a top-k)
        # is skipped then, known on the host (checking the mask later would be a host sync).
        can_die = step + 1 >= self.dead_window(step)
        return {"dead_F": steps_since_fired_F + 1 >= self.dead_window(step) if can_die else None,
                "update_threshold_": step > cfg["threshold_start_step"]}

    def training_loss(self, losses, terms, step, total_steps):
        """reconstruction + aux_coeff * AuxK: no L1 penalty (sparsity is the top-k; AuxK revives
        dead latents)."""
        return self._reconstruction(losses, terms) + self.cfg["aux_coeff"] * terms["aux_loss"], 0.0

    def step_log(self, terms):
        threshold = self.threshold.detach().clone()
        log = {"l2_norm_loss": terms["l2_norm_loss"].detach(), "aux_loss": terms["aux_loss"].detach(),
               "threshold": threshold[0] if threshold.dim() else threshold,
               "k": torch.full((), float(self.k), device=threshold.device)}  # (filled: a literal is a host copy)
        if threshold.dim():
            log["threshold_shared"] = threshold[1]
        return log

    def dead_window(self, step):
        """dead_tokens worth of batches, as the authors count for AuxK."""
        return -(-effective(self.cfg, "dead_tokens") // self.cfg["batch_size"])

    @torch.no_grad()
    def fold_normalisation(self, scaling_factors=None):
        folded = super().fold_normalisation(scaling_factors)
        # scores keep the unfolded norms: the same latents are selected on raw activations
        folded.score_norms = self.decoder_norms().sum(-1).detach() if self.score_norms is None else self.score_norms
        return folded


class DiffSAE(BatchTopKCrossCoder):
    """The diff-SAE baseline (Aranguri, Drori, Nanda 2025): a BatchTopK SAE, with the BatchTopK
    crosscoder's recipe, on the chat - base difference, in the crosscoder's layout
    (crossdiff/arch/diff_sae.py): the base encoder is the chat one's negative, the base decoder and
    decoder bias are zero. So encode(x) reads the difference, decode gives [0, its reconstruction],
    and every tool that reads a crosscoder (the KL test's patch, Latent Scaling, the dashboard)
    reads it. Normalisation: one factor for both models (norm_scale "difference")."""
    architecture = "diff_sae"
    reconstructs = "the chat - base difference"

    def __init__(self, cfg, shard=(0, 1), initialise=True):
        check_diff_sae(completed(cfg))  # before the partition's checks: it takes none
        super().__init__(cfg, shard, initialise)
        if initialise:
            diff_sae.impose_(self.W_enc.data, self.W_dec.data)

    def target(self, x_BMD):
        return diff_sae.difference_target(x_BMD)

    def encoder_weight(self):
        return constrained(self.W_enc, diff_sae.project_encoder_grad)

    def decoder_weight(self):
        return constrained(self.W_dec, diff_sae.project_decoder_grad)

    def losses_and_acts(self, x_BMD, dead_F=None, update_threshold_=True, mesh=ONE_PROCESS):
        """The BatchTopK losses on the difference (a pair or a target: target is idempotent)."""
        return super().losses_and_acts(self.target(x_BMD), dead_F, update_threshold_, mesh)

    def _losses(self, x_BMD, x_hat_BMD, acts_sum_F, l0_B, norms_FM, mesh):
        # the base slot is 0 in target and reconstruction (0/0 explained variance): both per-model
        # numbers report the difference's
        losses = super()._losses(x_BMD, x_hat_BMD, acts_sum_F, l0_B, norms_FM, mesh)
        return losses._replace(explained_variance_A=losses.explained_variance_B)

    def verify_partition(self, where="this diff-SAE"):
        """The layout: base decoder and decoder bias exactly 0, base encoder the chat one's negative."""
        return check_violations(diff_sae.violations(self.W_enc, self.W_dec, self.b_dec), where)

    @torch.no_grad()
    def fold_normalisation(self, scaling_factors=None):
        s = self.cfg.get("normalisation_factor") if scaling_factors is None else scaling_factors
        if s is not None and len(set(torch.as_tensor(s).tolist())) > 1:
            raise ValueError(f"a diff-SAE folds one factor for both models (norm_scale 'difference'); got {list(s)}")
        return super().fold_normalisation(scaling_factors)


ARCHITECTURES = {cls.architecture: cls for cls in (CrossCoder, BatchTopKCrossCoder, DiffSAE)}
