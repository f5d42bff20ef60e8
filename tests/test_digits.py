"""The digits data, the latent = pixels mapping, the rectified-flow objective and the FID/accuracy metric
(``search/digits.py``: plain PyTorch, no ComfyUI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qua2sedimo.search import digits


@pytest.fixture(scope="module")
def data() -> digits.DigitsData:
    return digits.load_digits_data(32, heldout=500, seed=0)


@pytest.fixture(scope="module")
def metric(data) -> digits.DigitsMetric:
    return digits.build_metric(data, seed=0, epochs=15)


def test_split_is_fixed_by_seed_and_disjoint(data):
    assert data.train_images.shape == (1297, 1, 32, 32) and data.heldout_images.shape == (500, 1, 32, 32)
    assert float(data.train_images.min()) >= -1 and float(data.train_images.max()) <= 1
    again = digits.load_digits_data(32, heldout=500, seed=0)
    assert torch.equal(again.train_labels, data.train_labels)
    other = digits.load_digits_data(32, heldout=500, seed=1)
    assert not torch.equal(other.train_labels, data.train_labels)
    flat = {tuple(x.flatten().tolist()) for x in data.heldout_images}
    # the UCI set holds a few exact duplicates; nearly every held-out image is absent from the training split
    assert sum(tuple(x.flatten().tolist()) in flat for x in data.train_images) < 20
    assert set(data.heldout_labels.tolist()) == set(range(10))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="multiple of 4"):
        digits.load_digits_data(30)
    with pytest.raises(ValueError, match="heldout"):
        digits.load_digits_data(32, heldout=0)
    with pytest.raises(ValueError, match="0..10"):
        digits.class_table(8, 4).lookup(torch.tensor([11]))


def test_latent_is_the_pixels(data):
    x = data.train_images[:5]
    z = digits.image_to_latent(x)
    assert z.shape == (5, 16, 8, 8)
    assert torch.equal(digits.latent_to_image(z), x)
    assert torch.equal(z[0, :, 0, 0], x[0, 0, :4, :4].flatten())  # a cell's channels are its 4×4 pixel block
    with pytest.raises(ValueError, match="latents"):
        digits.latent_to_image(torch.zeros(1, 4, 8, 8))


def test_class_table_is_seeded_with_a_zero_unconditional_row():
    a, b = digits.class_table(16, 8, tokens=2, seed=0), digits.class_table(16, 8, tokens=2, seed=0)
    assert torch.equal(a.context, b.context) and a.context.shape == (11, 2, 16) and a.pooled.shape == (11, 8)
    ctx, pooled = a.lookup(torch.tensor([3, digits.NULL_CLASS]))
    assert ctx[1].abs().sum() == 0 and pooled[1].abs().sum() == 0 and ctx[0].abs().sum() > 0
    assert not torch.equal(digits.class_table(16, 8, tokens=2, seed=1).context, a.context)


def test_flow_loss_is_zero_for_the_true_denoiser_and_training_lowers_it(data):
    g = torch.Generator().manual_seed(0)
    x0 = digits.image_to_latent(data.train_images[:8])
    # an oracle that knows x0: its velocity is exactly ε − x0
    loss = digits.flow_loss(lambda x, s, c, p: x0, x0, torch.zeros(8, 1, 4), torch.zeros(8, 4), g)
    assert float(loss) < 1e-10

    class Tiny(torch.nn.Module):  # a per-pixel linear denoiser: enough to see the objective train
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.zeros(16, 1, 1))
            self.b = torch.nn.Parameter(torch.zeros(16, 1, 1))

        def forward(self, x, sigma, context, pooled):
            return self.a * x + self.b

    model = Tiny()
    res = digits.train_flow(model, model, data, digits.class_table(4, 4, 1),
                            digits.TrainSettings(steps=60, batch=32, lr=0.05, warmup=1))
    assert res.steps == 60 and len(res.losses) == 10
    assert res.final_loss < 0.8 * res.losses[0]


def test_classifier_recognises_real_digits_and_fid_ranks_quality(data, metric):
    assert metric.real_accuracy > 0.9  # trained on the held-out split, tested on the training split
    labels = data.train_labels[:500]
    real = metric.score(data.train_images[:500], labels)
    g = torch.Generator().manual_seed(0)
    noisy = metric.score(data.train_images[:500] + 0.6 * torch.randn(500, 1, 32, 32, generator=g), labels)
    noise = metric.score(torch.rand(500, 1, 32, 32, generator=g) * 2 - 1, labels)
    assert real.accuracy > 0.9 and noise.accuracy < 0.3
    assert real.fid < noisy.fid < noise.fid
    wrong = metric.score(data.train_images[:500], (labels + 1) % 10)  # right images, wrong requested class
    assert wrong.accuracy < 0.1 and wrong.fid == pytest.approx(real.fid)
    with pytest.raises(ValueError, match="labels"):
        metric.score(data.train_images[:5], labels[:4])


def test_fid_is_pytorch_fids_frechet_distance():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(0.5, 2.0, size=(200, 6))
    sa = digits.FeatureStats(a.mean(0), np.cov(a, rowvar=False), 200)
    sb = digits.FeatureStats(b.mean(0), np.cov(b, rowvar=False), 200)
    assert digits.frechet_distance(sa, sb) == pytest.approx(
        calculate_frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma))
    assert digits.frechet_distance(sa, sa) == pytest.approx(0, abs=1e-6)


def test_grid_lays_rows_out():
    rows = [torch.full((3, 1, 4, 4), -1.0), torch.ones(2, 1, 4, 4)]
    pic = digits.grid(rows, pad=1)
    assert pic.shape == (2 * 5 + 1, 3 * 5 + 1) and pic.dtype == np.uint8
    assert pic[1, 1] == 0 and pic[6, 1] == 255 and pic[6, 11] == 255  # a missing cell stays background
