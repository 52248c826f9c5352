import types

import pytest
import torch

from conftest import run_script
from tools.compare import firing, match_decoders


def test_match_decoders_takes_the_largest_cosine_in_the_chosen_model():
    """Brute force over every pair: for each chosen reference latent, the other's latent with the
    most aligned decoder in model 1, whatever its norm or its decoder in model 0."""
    g = torch.Generator().manual_seed(0)
    ref = types.SimpleNamespace(W_dec=torch.randn(6, 2, 8, generator=g))
    other = types.SimpleNamespace(W_dec=torch.randn(20, 2, 8, generator=g) * torch.rand(20, 1, 1, generator=g))
    other.W_dec[13, 1] = 5 * ref.W_dec[2, 1]  # a scaled copy: cosine 1
    latents = torch.tensor([2, 4, 5])
    index, cosine = match_decoders(ref, other, latents)
    for j, i, c in zip(latents.tolist(), index.tolist(), cosine.tolist()):
        cos = [float(torch.nn.functional.cosine_similarity(ref.W_dec[j, 1], other.W_dec[f, 1], dim=0)) for f in range(20)]
        assert i == max(range(20), key=cos.__getitem__) and abs(c - max(cos)) < 1e-5
    assert index[0] == 13 and abs(float(cosine[0]) - 1) < 1e-5


def test_firing_splits_a_latents_mass_and_firing_rates_by_transcript():
    acts = torch.zeros(2, 3, 4)  # two sequences of three positions, latent 1 studied
    acts[0, :, 1] = torch.tensor([1.0, 0.0, 3.0])  # sequence 0 is a transcript
    acts[1, :, 1] = torch.tensor([0.0, 0.0, 1.0])
    mass, on_chat, on_plain = firing(acts, torch.tensor([True, False]), 1)
    assert (mass, on_chat, on_plain) == pytest.approx((0.8, 2 / 3, 1 / 3))


def test_a_crosscoder_compared_with_itself_matches_each_genuine_latent_to_itself(toy_run):
    _, checkpoints, _ = toy_run
    run = str(checkpoints / "version_0")
    out = run_script("tools/compare.py", "--reference", run, "--other", run, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines()[2:] if line.strip()]
    assert rows and all(r[0] == r[2] and float(r[3]) > 0.999 and float(r[4]) > 0.9 for r in rows)
