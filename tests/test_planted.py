import pytest
import torch

from conftest import tiny_cfg
from tools.planted import PlantedFeatureSource, recovery_report
from trainer import Trainer


def test_planted_source_has_the_declared_features_and_scale():
    cfg = tiny_cfg(d_in=32, batch_size=4096)
    src = PlantedFeatureSource(cfg, n_shared=10, n_base_only=5, n_chat_only=5, rotation=0.0)
    norms = src.dirs_TMD.norm(dim=-1)
    assert torch.equal(norms[:10] > 0, torch.ones(10, 2, dtype=torch.bool))
    assert (norms[10:15, 1] == 0).all() and (norms[15:, 0] == 0).all()
    assert torch.allclose(src.dirs_TMD[:10, 0], src.dirs_TMD[:10, 1])
    # mean squared norm ~ d_in (exactly so for orthogonal directions; random ones add cross terms)
    x = PlantedFeatureSource(cfg).next()
    assert torch.allclose((x.pow(2).sum(-1)).mean(0), torch.full((2,), 32.0), rtol=0.15)


def test_crosscoder_recovers_and_classifies_planted_features(tmp_path):
    """Far above chance: a random decoder recovers ~0% and classification by chance is ~1/3."""
    cfg = tiny_cfg(tmp_path, d_in=32, dict_size=256, batch_size=256, num_tokens=256 * 1500, lr=1e-3, l1_coeff=2.0)
    src = PlantedFeatureSource(cfg, n_shared=48, n_base_only=16, n_chat_only=16, l0=5.0, seed=0)
    untrained = recovery_report(Trainer(dict(cfg), buffer=src).crosscoder, src)
    assert untrained["all"]["recovered"] < 0.05
    trainer = Trainer(cfg, buffer=src)
    trainer.train()
    rows = recovery_report(trainer.crosscoder, src)
    assert rows["all"]["recovered"] >= 0.8, rows
    assert rows["all"]["classified"] >= 0.8, rows
    assert rows["chat_only"]["recovered"] >= 0.7 and rows["chat_only"]["classified"] >= 0.7, rows


def test_classification_by_rank_takes_the_n_most_leaning_latents_of_each_side():
    """counts = (n_base, n_chat): the authors' rule for BatchTopK. Latents with relative norms
    0.3 (base-leaning, but not base-only by the 0.1 cut), 0.5 and 0.8 matched to a base-only, a
    shared and a chat-only feature: the thresholds call the first and last shared, the rank rule
    with counts (1, 1) gets all three right."""
    import types

    src = types.SimpleNamespace(labels_T=torch.tensor([0, 1, 2]))
    d = torch.eye(3)
    src.dirs_TMD = torch.stack([torch.stack([d[0], torch.zeros(3)]), torch.stack([d[1], d[1]]),
                                torch.stack([torch.zeros(3), d[2]])])
    W_dec = torch.stack([torch.stack([0.7 * d[0], 0.3 * d[0]]), torch.stack([d[1], d[1]]),
                         torch.stack([0.2 * d[2], 0.8 * d[2]])])
    cc = types.SimpleNamespace(W_dec=W_dec, decoder_norms=lambda: W_dec.norm(dim=-1), latent_owner=lambda: torch.full((3,), -1),
                               relative_decoder_norm=lambda: W_dec.norm(dim=-1)[:, 1] / W_dec.norm(dim=-1).sum(-1))
    by_threshold = recovery_report(cc, src, threshold=0.9)
    assert by_threshold["all"]["recovered"] == 1.0 and by_threshold["all"]["classified"] == pytest.approx(1 / 3)
    by_rank = recovery_report(cc, src, threshold=0.9, counts=(1, 1))
    assert by_rank["all"]["classified"] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["--foo", "1"], "unknown config key 'foo'"),
    (["--lr2", "1"], "did you mean 'lr'"),
    (["--model_names", "a,b"], "planted.py takes"),
    (["--dict_size", "0"], "'dict_size' must be a positive number"),
    (["--counts", "1"], "--counts takes two integers"),
    (["--n_shared", "x"], "--n_shared takes an integer"),
])
def test_bad_options_are_an_error_message_not_a_traceback(argv, message):
    """Every bad option ends tools/planted.py with one line naming it (as train.py), before any training."""
    from tools.planted import main

    result = main(argv)
    assert isinstance(result, str) and result.startswith("error: ") and message in result, result


def test_the_command_line_sets_the_benchmark(monkeypatch):
    """The options reach planted_benchmark: the sizes, the architecture, dead_tokens and the
    planted counts (num_tokens // batch_size steps)."""
    from tools import planted

    seen = {}

    def fake_benchmark(**kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(planted, "planted_benchmark", fake_benchmark)
    with pytest.raises(SystemExit):
        planted.main(["--architecture", "batchtopk", "--k", "6", "--dict_size", "256", "--num_tokens", "1.5e6",
                      "--n_shared", "96", "--n_base_only", "32", "--n_chat_only", "32", "--dead_tokens", "1e7"])
    assert seen["steps"] == 1_500_000 // 1024 and seen["dict_size"] == 256 and seen["k"] == 6
    assert seen["dead_tokens"] == 10_000_000 and (seen["n_shared"], seen["n_base_only"], seen["n_chat_only"]) == (96, 32, 32)


def test_false_positives_are_firing_model_only_latents_matching_no_feature_of_their_class():
    """A base-only latent on the base-only feature, a chat-only latent on a shared feature's
    direction (false), a dead chat-only latent on nothing (not counted), a shared latent."""
    import types

    from tools.planted import false_positives

    src = types.SimpleNamespace(labels_T=torch.tensor([0, 1, 2]), dirs_TMD=torch.zeros(3, 2, 4))
    d = torch.eye(4)
    src.dirs_TMD[0, 0], src.dirs_TMD[1, 0], src.dirs_TMD[1, 1], src.dirs_TMD[2, 1] = d[0], d[1], d[1], d[2]
    W_dec = torch.zeros(4, 2, 4)
    W_dec[0, 0] = d[0]  # base-only, right
    W_dec[1, 1] = d[1]  # chat-only on the shared feature's chat direction: false
    W_dec[2, 1] = d[3]  # chat-only, dead
    W_dec[3] = d[1]  # shared
    norms = W_dec.norm(dim=-1)
    cc = types.SimpleNamespace(W_dec=W_dec, latent_owner=lambda: torch.full((4,), -1), decoder_norms=lambda: norms)
    assert false_positives(cc, src, torch.tensor([True, True, False, True])) == (2, 1)


def test_the_partition_comparison_trains_each_crosscoder_and_dedicated_blocks_hold_the_model_only_latents():
    from tools.planted import compare_partitions, main

    kwargs = dict(d_in=16, dict_size=64, n_shared=24, n_base_only=4, n_chat_only=4, steps=30, batch_size=128,
                  k=4, lr=1e-3, l1_coeff=2.0, seed=0, dead_tokens=None)
    rows = compare_partitions(kwargs, exclusive_fraction=0.125, shared_fraction=0.25)
    assert [(r["architecture"], r["crosscoder"]) for r in rows] == [
        (a, c) for a in ("l1", "batchtopk") for c in ("standard", "designated-shared", "dedicated-feature")]
    for r in rows:
        assert 0 <= r["exclusive_placed"] <= r["exclusive_recovered"] <= 1 and 0 < r["explained_variance"] < 1
        if r["crosscoder"] == "dedicated-feature":  # model-only means in a block: 8 + 8 latents
            assert r["model_only"] <= 16
    assert main(["--compare", "--exclusive_fraction", "0.6"]).startswith("error: config key 'exclusive_fraction'")
