"""Ground truth for crosscoders: activations of two "models" built as sparse sums of known
directions, some shared, some base-only, some chat-only (`PlantedFeatureSource`), and a score of
how many of them a trained crosscoder recovered and classified by relative decoder norm
(`recovery_report`). `python -m tools.planted` runs the benchmark quoted in the README.

Shape legend: B batch, M models, D d_in, F latents, T true features.
"""
import torch

from crossdiff.config.cli import format_help, parse_overrides
from crossdiff.config.schema import DEFAULTS, ConfigError, complete_cfg, effective
from crossdiff.diffing.classes import latent_classes
from crossdiff.diffing.measures import norm_difference
from trainer import Trainer


class PlantedFeatureSource:
    """Activations of two "models" as sparse sums of known unit directions: x_m = sum_t a_t d_{t,m}.

    Shared features have a direction in both models (the chat one rotated from the base one by
    `rotation`, 0 = identical); base-only features have no chat direction, chat-only features no
    base direction. Each feature fires independently with probability l0 / n_features, with a
    magnitude drawn uniformly in [0.5, 1.5], scaled so that the mean squared norm per model is
    about d_in (the normalisation the buffer applies to real activations).
    """

    def __init__(self, cfg, n_shared=96, n_base_only=32, n_chat_only=32, l0=6.0, rotation=0.2, seed=0):
        # A salted seed: the crosscoder's init draws from torch.Generator().manual_seed(cfg seed),
        # and the same stream here would plant features equal to its initial decoder rows.
        g = torch.Generator().manual_seed(7919 * seed + 104729)
        d, self.batch_size = cfg["d_in"], cfg["batch_size"]
        T = n_shared + n_base_only + n_chat_only
        base_TD = torch.nn.functional.normalize(torch.randn(T, d, generator=g), dim=-1)
        noise_TD = torch.nn.functional.normalize(torch.randn(T, d, generator=g), dim=-1)
        chat_TD = torch.nn.functional.normalize(base_TD + rotation * noise_TD, dim=-1)
        # labels: 0 base-only, 1 shared, 2 chat-only; the same classes analysis reads off relative norms
        self.labels_T = torch.cat([torch.ones(n_shared), torch.zeros(n_base_only), torch.full((n_chat_only,), 2.0)]).long()
        base_TD[self.labels_T == 2] = 0
        chat_TD[self.labels_T == 0] = 0
        self.dirs_TMD = torch.stack([base_TD, chat_TD], dim=1)
        self.p = l0 / T
        present_per_model = (self.dirs_TMD.norm(dim=-1) > 0).float().mean(0)  # [M]
        self.scale = (d / (l0 * present_per_model.min() * (13 / 12))) ** 0.5  # E[mag^2] = 13/12 for U[0.5, 1.5]
        self.normalisation_factor = torch.ones(2)
        self.g = torch.Generator().manual_seed(7919 * seed + 104730)

    def next(self):
        B, T = self.batch_size, len(self.labels_T)
        active = torch.rand(B, T, generator=self.g) < self.p
        mags = 0.5 + torch.rand(B, T, generator=self.g)
        a_BT = active * mags * self.scale
        return torch.einsum("bt,tmd->bmd", a_BT, self.dirs_TMD)


@torch.no_grad()
def recovery_report(crosscoder, source, threshold=0.9, counts=None):
    """How many true features a crosscoder recovered, and whether its relative decoder norms
    classify them. A feature is recovered when, in every model it exists in, some latent's
    decoder has cosine >= threshold with it; that latent (the best match) is then classified as
    base-only / shared / chat-only by the analysis thresholds, or with counts = (n_base, n_chat)
    as the authors classify a BatchTopK crosscoder: its n_chat most chat-leaning latents by
    norm_difference are chat-only, its n_base most base-leaning base-only (n: an L1 run's counts)."""

    W_FMD = torch.nn.functional.normalize(crosscoder.W_dec.float().cpu(), dim=-1)
    dirs_TMD = source.dirs_TMD
    present_TM = dirs_TMD.norm(dim=-1) > 0
    cos_TFM = torch.einsum("tmd,fmd->tfm", dirs_TMD, W_FMD)
    # for each feature and latent: the worst cosine over the models the feature exists in
    worst_TF = torch.where(present_TM[:, None, :], cos_TFM, torch.inf).min(-1).values
    best_cos_T, best_latent_T = worst_TF.max(-1)
    recovered_T = best_cos_T >= threshold
    predicted_F = torch.full((W_FMD.shape[0],), -1)
    if counts is None:
        classes = latent_classes(crosscoder)
        predicted_F[classes["base_only"]], predicted_F[classes["shared"]], predicted_F[classes["chat_only"]] = 0, 1, 2
    else:
        predicted_F[:] = 1
        predicted_F[norm_difference(crosscoder, 0, 1).cpu().argsort(stable=True)[:counts[1]]] = 2
        predicted_F[norm_difference(crosscoder, 1, 0).cpu().argsort(stable=True)[:counts[0]]] = 0
    correct_T = predicted_F[best_latent_T] == source.labels_T
    rows = {}
    for label, name in enumerate(("base_only", "shared", "chat_only")):
        m = source.labels_T == label
        rows[name] = {"features": int(m.sum()), "recovered": float(recovered_T[m].float().mean()),
                      "classified": float(correct_T[m & recovered_T].float().mean()) if (m & recovered_T).any() else 0.0}
    rows["all"] = {"features": len(recovered_T), "recovered": float(recovered_T.float().mean()),
                   "classified": float(correct_T[recovered_T].float().mean()) if recovered_T.any() else 0.0}
    return rows


@torch.no_grad()
def false_positives(crosscoder, source, alive_F, threshold=0.9):
    """(model-only latents that fire, those of them matching no true feature of their class): a
    base-only (chat-only) latent, by block where partitioned, matches when its decoder in the base
    (chat) model has cosine >= threshold with a base-only (chat-only) feature's direction."""
    W_FMD = torch.nn.functional.normalize(crosscoder.W_dec.float().cpu(), dim=-1)
    classes = latent_classes(crosscoder)
    n_kept = n_false = 0
    for label, name, model in ((0, "base_only", 0), (2, "chat_only", 1)):
        latents = torch.nonzero(classes[name] & alive_F.cpu()).flatten()
        dirs_TD = source.dirs_TMD[source.labels_T == label, model]
        best = (W_FMD[latents, model] @ dirs_TD.T).max(-1).values if len(dirs_TD) else torch.zeros(len(latents))
        n_kept, n_false = n_kept + len(latents), n_false + int((best < threshold).sum())
    return n_kept, n_false


def format_recovery(rows):
    lines = [f"{'true features':<14} {'count':>5} {'recovered':>10} {'class correct':>14}"]
    for name, r in rows.items():
        lines.append(f"{name:<14} {r['features']:>5} {r['recovered']:>10.1%} {r['classified']:>14.1%}")
    return "\n".join(lines)


def planted_benchmark(d_in=128, dict_size=2048, n_shared=320, n_base_only=96, n_chat_only=96, steps=2000,
                      batch_size=1024, l1_coeff=2.0, lr=1e-3, seed=0, architecture="l1", k=30, checkpoint_dir=None,
                      counts=None, dead_tokens=None, exclusive_fraction=0.0, shared_fraction=0.0, **config):
    """Train a crosscoder on planted features through the normal Trainer and score it: ({how it
    classified: rows of recovery_report}, the last log, the latents per class). With counts, scored
    both by the relative-norm thresholds and by rank (recovery_report). The log gains
    inference_l0, model_only and false_positives (false_positives, on 8 fresh batches). config: any
    further config keys (k_max, dec_init_norm, ...)."""
    import tempfile

    cfg = dict(DEFAULTS, d_in=d_in, dict_size=dict_size, batch_size=batch_size, num_tokens=batch_size * steps,
               lr=lr, l1_coeff=l1_coeff, seed=seed, device="cpu", wandb_mode="disabled", log_every=max(1, steps // 10),
               architecture=architecture, k=k, progress=False, dead_tokens=dead_tokens,
               exclusive_fraction=exclusive_fraction, shared_fraction=shared_fraction,
               checkpoint_dir=checkpoint_dir or tempfile.mkdtemp(prefix="planted_"), **config)
    source = PlantedFeatureSource(cfg, n_shared, n_base_only, n_chat_only, seed=seed)
    trainer = Trainer(cfg, buffer=source)
    log = trainer.train()
    cc = trainer.crosscoder.eval()  # inference: BatchTopK selects by its threshold, token by token
    with torch.no_grad():
        fired_BF = torch.cat([cc.encode(source.next()) > 0 for _ in range(8)])
    log["inference_l0"] = float(fired_BF.sum(-1).float().mean())
    log["model_only"], log["false_positives"] = false_positives(cc, source, fired_BF.any(0))
    classes = latent_classes(cc)
    n_class = {name: int(mask.sum()) for name, mask in classes.items()}
    reports = {"by the relative-norm thresholds": recovery_report(cc, source)}
    if counts is not None:
        reports[f"by rank: the {counts[0]} most base-leaning latents base-only, the {counts[1]} most chat-leaning "
                "chat-only"] = recovery_report(cc, source, counts=counts)
    return reports, log, n_class


# The partitioned crosscoders (crossdiff/arch/partition.py) against the standard one, in the setting where the
# capacity competition bites (Anthropic's Feb 2025 update; the DFC paper's toy data): exclusive
# concepts a few percent per model, a dictionary not much larger than the true features.
VARIANTS = (("standard", False, False), ("designated-shared", False, True), ("dedicated-feature", True, False))
DFC_DEFAULTS = {"exclusive_fraction": 0.05, "shared_fraction": 0.1}  # the DFC paper's


def compare_partitions(kwargs, exclusive_fraction=0.05, shared_fraction=0.1, architectures=("l1", "batchtopk")):
    """planted_benchmark of each architecture as the standard, the designated-shared and the
    dedicated-feature crosscoder, on the same features: one row of figures each."""
    rows = []
    for architecture in architectures:
        for name, exclusive, shared in VARIANTS:
            run = dict(kwargs, architecture=architecture, exclusive_fraction=exclusive_fraction * exclusive,
                       shared_fraction=shared_fraction * shared, counts=None)
            reports, log, _ = planted_benchmark(**run)
            r = reports["by the relative-norm thresholds"]
            n_excl = r["base_only"]["features"] + r["chat_only"]["features"]
            recovered = sum(r[c]["recovered"] * r[c]["features"] for c in ("base_only", "chat_only")) / max(1, n_excl)
            placed = sum(r[c]["recovered"] * r[c]["classified"] * r[c]["features"]
                         for c in ("base_only", "chat_only")) / max(1, n_excl)
            rows.append({"crosscoder": name, "architecture": architecture, "exclusive_recovered": recovered,
                         "exclusive_placed": placed, "shared_recovered": r["shared"]["recovered"],
                         "false_positives": log["false_positives"], "model_only": log["model_only"],
                         "explained_variance": float(log["explained_variance"]),
                         "dead_fraction": float(log["dead_fraction"]), "l0": log["inference_l0"]})
    return rows


def format_comparison(rows):
    lines = ["| crosscoder | architecture | exclusive recovered | ... in its class or block | shared recovered | "
             "false positives / model-only latents | explained variance | dead | L0 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['crosscoder']} | {r['architecture']} | {r['exclusive_recovered']:.1%} | "
                     f"{r['exclusive_placed']:.1%} | {r['shared_recovered']:.1%} | {r['false_positives']} / "
                     f"{r['model_only']} | {r['explained_variance']:.3f} | {r['dead_fraction']:.1%} | {r['l0']:.1f} |")
    return "\n".join(lines)


# The benchmark's settings on the command line: config keys (parsed and checked as train.py's) and
# the planted features' counts.
CLI_KEYS = {"architecture": "l1", "k": 30, "d_in": 128, "dict_size": 2048, "num_tokens": 2000 * 1024,
            "batch_size": 1024, "l1_coeff": 2.0, "lr": 1e-3, "seed": 0, "dead_tokens": None,
            "exclusive_fraction": 0.0, "shared_fraction": 0.0, "k_max": None, "k_annealing_steps": None}
CLI_FLAGS = {"n_shared": "shared true features (default 320)", "n_base_only": "base-only true features (default 96)",
             "n_chat_only": "chat-only true features (default 96)",
             "counts": "N_BASE,N_CHAT: classify by rank as the authors do (an L1 run's class counts)",
             "compare": "the standard, designated-shared and dedicated-feature crosscoders side by side, L1 and "
                        "BatchTopK (fractions of 0: the DFC paper's 0.05 exclusive, 0.1 shared)",
             "help": "print this and exit"}


def parse_cli(argv):
    """(planted_benchmark's keyword arguments, the settings line to print), or a ConfigError naming
    the bad option."""
    options, extras = parse_overrides(argv, CLI_KEYS, flags=tuple(CLI_FLAGS), switches=("compare",))
    if set(options) != set(CLI_KEYS):
        raise ConfigError(f"planted.py takes {sorted(CLI_KEYS)} and --{', --'.join(sorted(CLI_FLAGS))}, not "
                          f"{sorted(set(options) - set(CLI_KEYS))}")
    complete_cfg(options)  # each value checked as train.py checks it
    kwargs = {key: options[key] for key in ("architecture", "k", "d_in", "dict_size", "batch_size", "l1_coeff", "lr",
                                            "seed", "dead_tokens", "exclusive_fraction", "shared_fraction", "k_max",
                                            "k_annealing_steps")}
    kwargs["steps"] = options["num_tokens"] // options["batch_size"]
    for name, default in (("n_shared", 320), ("n_base_only", 96), ("n_chat_only", 96)):
        try:
            kwargs[name] = int(extras.get(name, default))
        except ValueError:
            raise ConfigError(f"--{name} takes an integer, got {extras[name]!r}") from None
        if kwargs[name] < 0:
            raise ConfigError(f"--{name} takes an integer >= 0, got {kwargs[name]}")
    if "counts" in extras:
        try:
            counts = tuple(int(n) for n in extras["counts"].split(","))
        except ValueError:
            counts = ()
        if len(counts) != 2 or min(counts) < 0:
            raise ConfigError(f"--counts takes two integers N_BASE,N_CHAT, got {extras['counts']!r}")
        kwargs["counts"] = counts
    if "compare" in extras:
        kwargs["compare"] = True
    return kwargs, extras.get("help", False)


def main(argv):
    #   python -m tools.planted                                  (the reference's L1 crosscoder)
    #   python -m tools.planted --architecture batchtopk --k 30  (BatchTopK at a chosen L0)
    #   python -m tools.planted --architecture batchtopk --k 30 --counts 96,96
    #        (classified as the authors classify BatchTopK: as many most base- / chat-leaning latents
    #         as the L1 run's base-only / chat-only counts, which `python -m tools.planted` prints)
    try:
        kwargs, show_help = parse_cli(argv)
    except ConfigError as e:
        return f"error: {e}"
    if show_help:
        print(format_help("usage: python -m tools.planted [--architecture l1|batchtopk] [--k K] [--key value ...]",
                          CLI_KEYS, CLI_FLAGS))
        return 0
    n_true = kwargs["n_shared"] + kwargs["n_base_only"] + kwargs["n_chat_only"]
    tokens = kwargs["steps"] * kwargs["batch_size"]
    if kwargs.pop("compare", False):
        fractions = {key: kwargs.pop(key) or default for key, default in DFC_DEFAULTS.items()}
        print(f"planted features, d_in {kwargs['d_in']}, {n_true} true features ({kwargs['n_shared']} shared, "
              f"{kwargs['n_base_only']} base-only, {kwargs['n_chat_only']} chat-only), dict {kwargs['dict_size']}, "
              f"{tokens:,} tokens, BatchTopK k {kwargs['k']}; partitions: exclusive_fraction "
              f"{fractions['exclusive_fraction']}, shared_fraction {fractions['shared_fraction']}", flush=True)
        print(format_comparison(compare_partitions(kwargs, **fractions)))
        return 0
    reports, log, n_class = planted_benchmark(**kwargs)
    if kwargs["architecture"] == "l1":
        dead_rule = "no activation in the last 1,000 steps"
    else:
        dead_rule = f"AuxK's: none in the last {effective(dict(kwargs, num_tokens=tokens), 'dead_tokens'):,} tokens"
    print(f"planted features ({kwargs['architecture']}{', k ' + str(kwargs['k']) if kwargs['architecture'] != 'l1' else ''}"
          f"), d_in {kwargs['d_in']}, {n_true} true features, dict {kwargs['dict_size']}, {tokens:,} tokens: "
          f"L0 {log['l0_loss']:.1f} (inference, on 8 fresh batches: {log['inference_l0']:.1f}), "
          f"explained variance {log['explained_variance']:.3f}, dead {log['dead_fraction']:.1%} ({dead_rule})")
    print("latents per class:", ", ".join(f"{k} {v}" for k, v in n_class.items()),
          f"(model-only latents that fire: {log['model_only']}, matching no true feature of their class: "
          f"{log['false_positives']})")
    for how, rows in reports.items():
        print(f"classified {how}:")
        print(format_recovery(rows))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
