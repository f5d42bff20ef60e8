"""The trained reference model's data, objective and quality metric, in plain PyTorch (no ComfyUI).

* **Data**: scikit-learn's bundled UCI handwritten digits (1 797 images of 8×8, 10 classes; no download), upscaled
  bilinearly to 32×32 in [-1, 1], split into a training set (the diffusion model) and a held-out set (the
  classifier), fixed by a seed.
* **Latent = pixels**: a 32×32 image is the 16-channel 8×8 latent ``pixel_unshuffle(image, 4)`` (the 4×4 pixel
  block of each latent cell, one channel per pixel): exactly invertible, no VAE. The model works in this space.
* **Class conditioning as text conditioning**: a fixed, seeded embedding table gives each class a context of
  ``tokens`` × ``context_dim`` (the cross-attention input) and a pooled vector; the extra last row (zeros) is the
  unconditional "no class" entry used for classifier-free guidance.
* **Training**: rectified flow (``x_σ = (1 − σ)·x₀ + σ·ε``, target ``ε − x₀``), the objective of flow models'
  ``CONST`` sampling in ComfyUI; the network is any ``denoise(x_σ, σ, context, pooled) → x̂₀`` (the ComfyUI model's
  own ``apply_model``), so the sampler that runs it afterwards is the one it was trained for.
* **Quality**: a small CNN classifier trained on the held-out split; FID on its penultimate features (pytorch-fid's
  Fréchet distance) and the share of class-conditional samples it recognises as the requested class.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_CLASSES = 10
NULL_CLASS = N_CLASSES  # the unconditional row of the class table
LATENT_BLOCK = 4  # pixels per latent cell side: 32×32 pixels ↔ 16 × 8×8 latent


# ------------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class DigitsData:
    """Images ``[N, 1, size, size]`` in [-1, 1] and labels ``[N]`` of both splits."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.train_images.shape[-1])


def load_digits_data(size: int = 32, heldout: int = 500, seed: int = 0) -> DigitsData:
    """The UCI digits bundled with scikit-learn, upscaled to ``size``×``size``, split by ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - a dependency of requirements.txt
        raise ImportError("the reference model needs scikit-learn (it ships the digits data): "
                          "pip install scikit-learn") from e
    if size % LATENT_BLOCK or size < 8:
        raise ValueError(f"size must be a multiple of {LATENT_BLOCK} and >= 8 (got {size})")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    if not 0 < heldout < len(labels):
        raise ValueError(f"heldout must be between 1 and {len(labels) - 1} (got {heldout})")
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images * 2 - 1).clamp(-1, 1)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:heldout], order[heldout:]
    return DigitsData(images[train].contiguous(), labels[train].contiguous(), images[test].contiguous(),
                      labels[test].contiguous())


def image_to_latent(images: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` pixels → ``[N, 16, H/4, W/4]`` latents (each 4×4 block becomes the channels of one cell)."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"expected images [N, 1, H, W], got {tuple(images.shape)}")
    return F.pixel_unshuffle(images, LATENT_BLOCK)


def latent_to_image(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`image_to_latent`: ``[N, 16, h, w]`` → ``[N, 1, 4h, 4w]``."""
    if latents.dim() != 4 or latents.shape[1] != LATENT_BLOCK ** 2:
        raise ValueError(f"expected latents [N, {LATENT_BLOCK ** 2}, h, w], got {tuple(latents.shape)}")
    return F.pixel_shuffle(latents, LATENT_BLOCK)


# ------------------------------------------------------------------------------------- class conditioning
@dataclass(frozen=True)
class ClassTable:
    """Per-class conditioning: ``context [11, tokens, context_dim]``, ``pooled [11, pooled_dim]`` (row 10: none)."""

    context: torch.Tensor
    pooled: torch.Tensor

    def lookup(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) for class indices ``labels`` (``NULL_CLASS`` = unconditional)."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > NULL_CLASS):
            raise ValueError(f"class labels must be in 0..{NULL_CLASS} ({NULL_CLASS} = no class)")
        return self.context[labels], self.pooled[labels]


def class_table(context_dim: int, pooled_dim: int, tokens: int = 4, seed: int = 0) -> ClassTable:
    """A fixed table from ``seed``: N(0, 1) entries per class, zeros for the unconditional row."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(N_CLASSES + 1, tokens, context_dim, generator=g)
    pooled = torch.randn(N_CLASSES + 1, pooled_dim, generator=g)
    context[NULL_CLASS] = 0
    pooled[NULL_CLASS] = 0
    return ClassTable(context, pooled)


# ------------------------------------------------------------------------------------------------ training
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 4000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.0
    ema: float = 0.999
    drop_class: float = 0.1  # share of examples trained unconditionally (classifier-free guidance)
    seed: int = 0


@dataclass(frozen=True)
class TrainResult:
    steps: int
    seconds: float
    final_loss: float  # mean of the last 10 % of steps
    losses: tuple[float, ...]  # mean loss per tenth of training


def flow_loss(denoise: Denoiser, x0: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
              g: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss: ‖(x_σ − x̂₀)/σ − (ε − x₀)‖² at σ = sigmoid(N(0, 1)) (SD3's logit-normal)."""
    n = x0.shape[0]
    sigma = torch.sigmoid(torch.randn(n, generator=g)).clamp(1e-3, 1.0)
    eps = torch.randn(x0.shape, generator=g)
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - s) * x0 + s * eps
    x0_hat = denoise(x_t, sigma, context, pooled)
    v = (x_t - x0_hat) / s
    return F.mse_loss(v, eps - x0)


def train_flow(model: nn.Module, denoise: Denoiser, data: DigitsData, table: ClassTable, settings: TrainSettings,
               progress: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train ``model``'s parameters (used by ``denoise``) in place; they end as their exponential moving average."""
    g = torch.Generator().manual_seed(settings.seed)
    latents = image_to_latent(data.train_images)
    labels = data.train_labels
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters to train")
    for p in params:  # some hosts build their models with requires_grad off
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    ema = [p.detach().clone() for p in params]
    losses: list[float] = []
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        model.train()
        for step in range(settings.steps):
            idx = torch.randint(len(labels), (settings.batch,), generator=g)
            y = labels[idx].clone()
            y[torch.rand(settings.batch, generator=g) < settings.drop_class] = NULL_CLASS
            ctx, pooled = table.lookup(y)
            for group in opt.param_groups:
                group["lr"] = settings.lr * min(1.0, (step + 1) / max(settings.warmup, 1)) * \
                    (0.5 * (1 + math.cos(math.pi * step / settings.steps)))
            loss = flow_loss(denoise, latents[idx], ctx, pooled, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(settings.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema, params, strict=True):
                    e.lerp_(p.detach(), 1 - decay)
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, losses[-1])
        model.eval()
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    chunks = tuple(float(c.mean()) for c in np.array_split(np.asarray(losses), min(10, len(losses))))
    return TrainResult(steps=settings.steps, seconds=time.perf_counter() - t0, final_loss=chunks[-1], losses=chunks)


# ------------------------------------------------------------------------------------------- the classifier
class DigitClassifier(nn.Module):
    """Three stride-2 convolutions and a 64-wide penultimate layer (the FID features) for 32×32 digits."""

    FEATURES = 64

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, self.FEATURES), nn.ReLU())
        self.head = nn.Linear(self.FEATURES, N_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"expected images [N, 1, H, W] in [-1, 1], got {tuple(images.shape)}")
        if images.shape[-1] != 32:
            images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
        return self.conv(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _shift(images: torch.Tensor, g: torch.Generator, max_px: int = 2) -> torch.Tensor:
    """Random translations by up to ``max_px`` pixels (the background is -1)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (max_px,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_px + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_px + 1, (n,), generator=g)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, 1, h, w + 2 * max_px)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, 1, h, w)
    return out.gather(3, cols)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 40, batch: int = 64,
                     seed: int = 0) -> DigitClassifier:
    """A :class:`DigitClassifier` trained (deterministically, with small shifts) on ``images``."""
    torch.manual_seed(seed)  # the layers' initialisation
    g = torch.Generator().manual_seed(seed)
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    with torch.inference_mode(False), torch.enable_grad():
        clf.train()
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=g)
            for i in range(0, len(order), batch):
                idx = order[i:i + batch]
                x = _shift(images[idx], g) + 0.05 * torch.randn(images[idx].shape, generator=g)
                loss = F.cross_entropy(clf(x), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return clf.eval()


# ------------------------------------------------------------------------------------------------ quality
@dataclass(frozen=True)
class FeatureStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int


@dataclass(frozen=True)
class Quality:
    """FID on the classifier's features against the reference set, and class accuracy of the samples."""

    fid: float
    accuracy: float
    n: int

    def to_dict(self) -> dict:
        return {"fid": round(self.fid, 4), "accuracy": round(self.accuracy, 4), "n": self.n}


@torch.no_grad()
def _features(clf: DigitClassifier, images: torch.Tensor, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    feats, preds = [], []
    for i in range(0, len(images), chunk):
        f = clf.features(images[i:i + chunk].float())
        feats.append(f)
        preds.append(clf.head(f).argmax(1))
    return torch.cat(feats).double().numpy(), torch.cat(preds).numpy()


def feature_stats(clf: DigitClassifier, images: torch.Tensor) -> FeatureStats:
    f, _ = _features(clf, images)
    return FeatureStats(f.mean(0), np.cov(f, rowvar=False), len(f))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """pytorch-fid's Fréchet distance between two Gaussian fits."""
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance
        from scipy.linalg import LinAlgWarning
    except ImportError as e:  # pragma: no cover - a dependency of requirements.txt
        raise ImportError("the digits FID needs pytorch-fid: pip install pytorch-fid") from e
    with warnings.catch_warnings():  # pytorch-fid passes SciPy's deprecated `disp`; singular fits are handled there
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", LinAlgWarning)
        return float(calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


@dataclass(frozen=True)
class DigitsMetric:
    """The classifier and the real images' feature statistics: scores any set of generated digits."""

    classifier: DigitClassifier
    reference: FeatureStats
    real_accuracy: float  # the classifier on the reference images (not seen in its training)

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> Quality:
        """FID and accuracy of ``images`` [N, 1, H, W] in [-1, 1] generated for classes ``labels``."""
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(images) < 2:
            raise ValueError("FID needs at least 2 images")
        f, pred = _features(self.classifier, images.clamp(-1, 1))
        stats = FeatureStats(f.mean(0), np.cov(f, rowvar=False), len(f))
        acc = float((pred == np.asarray(labels)).mean())
        return Quality(fid=frechet_distance(stats, self.reference), accuracy=acc, n=len(images))


def build_metric(data: DigitsData, seed: int = 0, epochs: int = 40) -> DigitsMetric:
    """Classifier trained on the held-out split; reference statistics of the training split (the model's data)."""
    clf = train_classifier(data.heldout_images, data.heldout_labels, epochs=epochs, seed=seed)
    _, pred = _features(clf, data.train_images)
    acc = float((pred == data.train_labels.numpy()).mean())
    return DigitsMetric(clf, feature_stats(clf, data.train_images), acc)


def sample_labels(n: int) -> torch.Tensor:
    """The class of sample ``i`` is ``i mod 10`` (every class equally often)."""
    return torch.arange(n) % N_CLASSES


def grid(rows: Iterable[torch.Tensor], pad: int = 2) -> np.ndarray:
    """Rows of images ``[n, 1, H, W]`` in [-1, 1] → one uint8 grey picture (rows × n cells), for saving."""
    rows = [r.clamp(-1, 1) for r in rows]
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[-2:]
    out = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = ((img[0].float().numpy() + 1) * 127.5).round().astype(np.uint8)
    return out
