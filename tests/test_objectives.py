import importlib.util
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from qua2sedimo.search import objectives as obj
from qua2sedimo.search.objectives import (
    FID_WEIGHTS_FILE,
    DenoiseError,
    DenoiseState,
    FIDObjective,
    ImageDistance,
    StateRecorder,
    TrajectoryStates,
    feature_stats,
    frechet_distance,
    nmse,
    psnr,
    spread_indices,
    ssim,
    states_cache_key,
)

HAS_PYTORCH_FID = importlib.util.find_spec("pytorch_fid") is not None
needs_pytorch_fid = pytest.mark.skipif(
    not HAS_PYTORCH_FID, reason="pytorch-fid is not installed (optional extra: pip install pytorch-fid==0.3.0)"
)


# ================================================================================ denoise error
class ToyDenoiser(nn.Module):
    """x [B, 4, 6, 6], t [B], context [B, 3, 8], extra={"scale": [B], "tag": str}, pooled tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(4, 8, 3, padding=1)
        self.ctx = nn.Linear(8, 8)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x, t, context, extra=None, pooled=(None,)):
        h = self.inp(x) + self.ctx(context).mean(1)[:, :, None, None] * t.reshape(-1, 1, 1, 1)
        if extra is not None:
            h = h * extra["scale"].reshape(-1, 1, 1, 1)
        return self.out(torch.tanh(h))


def perturbed(model: nn.Module, scale: float, seed: int = 1) -> nn.Module:
    import copy

    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return m


def run_sampler(fn, n_traj: int = 2, steps: int = 10, batch: int = 2) -> None:
    g = torch.Generator().manual_seed(0)
    for k in range(n_traj):
        if isinstance(fn, StateRecorder):
            fn.new_trajectory()
        x = torch.randn(batch, 4, 6, 6, generator=g)
        context = torch.randn(batch, 3, 8, generator=g)
        for i in range(steps):
            t = torch.full((batch,), 1.0 - i / steps)
            extra = {"scale": torch.full((batch,), 1.0 + k), "tag": "pos"}
            with torch.no_grad():
                eps = fn(x, t, context=context, extra=extra, pooled=(None,))
            x = x - 0.1 * eps


@pytest.fixture(scope="module")
def recorded():
    torch.manual_seed(0)
    model = ToyDenoiser().eval()
    recs = {}
    for k in (None, 4, 3, 2):
        recs[k] = StateRecorder(model, per_trajectory=k, drop=("transformer_options",))
        run_sampler(recs[k])
    return model, recs


def test_spread_indices():
    assert spread_indices(10, 4) == [1, 3, 6, 8]
    assert spread_indices(10, 1) == [5]
    assert spread_indices(3, 5) == [0, 1, 2]


def test_recorder_subsamples_and_dedupes(recorded):
    _, recs = recorded
    assert len(recs[None].states()) == 20
    states = recs[4].states()
    assert len(states) == 8 and [s.step for s in states] == [1, 3, 6, 8] * 2
    assert [s.trajectory for s in states] == [0] * 4 + [1] * 4
    ctx = [s.cond["context"] for s in states]
    assert all(c is ctx[0] for c in ctx[:4]) and ctx[4] is not ctx[0]  # same context stored once per run
    assert states.has_reference
    for r in recs.values():
        for s in states:  # same calls whatever is kept
            same = [o for o in r.states() if (o.trajectory, o.step) == (s.trajectory, s.step)]
            assert not same or torch.equal(same[0].fp_out, s.fp_out)


def test_recorder_thins_long_runs():
    rec = StateRecorder(lambda x, t, **c: x + t, per_trajectory=3)
    rec.new_trajectory()
    peak = 0
    for i in range(100):
        rec(torch.zeros(1, 2), torch.tensor([float(i)]))
        peak = max(peak, len(rec._run))
    assert peak <= 13 and rec.n_calls == 100
    steps = [s.step for s in rec.states()]
    assert len(steps) == 3 and steps == sorted(steps) and steps[0] < 34 <= steps[1] < 67 <= steps[2]


def test_fp_scores_zero_and_metric_definition(recorded):
    model, recs = recorded
    states = recs[4].states()
    assert DenoiseError(states, reference_fn=model)(model) == {"denoise_error": 0.0, "denoise_error_max": 0.0}
    assert DenoiseError(states)(model)["denoise_error"] < 1e-10  # stored FP outputs, other batching
    q = perturbed(model, 0.05)
    ev = DenoiseError(states, max_batch=8)
    errs = ev.errors(q)
    manual = []
    for s in states:
        with torch.no_grad():
            out = q(s.x, s.t, **s.cond)
        manual.append(float(((out - s.fp_out) ** 2).sum() / (s.fp_out**2).sum()))
    np.testing.assert_allclose(errs.numpy(), manual, rtol=1e-4)
    res = ev(q)
    assert res["denoise_error"] == pytest.approx(float(np.mean(manual)), rel=1e-4)
    assert res["denoise_error_max"] == pytest.approx(max(manual), rel=1e-4)
    assert 0 < res["denoise_error"] < DenoiseError(states)(perturbed(model, 0.3))["denoise_error"]


def test_batching_groups_compatible_states(recorded):
    model, recs = recorded
    states = recs[4].states()
    calls = []

    def counting(x, t, **cond):
        calls.append(x.shape[0])
        return model(x, t, **cond)

    # both runs share extra["tag"]; they differ only in batched tensors, so states of both runs batch together
    ev = DenoiseError(states, max_batch=4)
    ev(counting)
    assert calls == [4, 4, 4, 4] and ev.n_calls == 4
    calls.clear()
    single = DenoiseError(states, max_batch=1)  # a call never splits a state: batch 2 each
    assert single.n_calls == 8
    np.testing.assert_allclose(single.errors(perturbed(model, 0.05)), ev.errors(perturbed(model, 0.05)), rtol=1e-5)
    # states with different non-tensor conditioning are not batched together
    other = [DenoiseState(s.x, s.t, dict(s.cond, extra={**s.cond["extra"], "tag": f"r{s.trajectory}"}), s.fp_out)
             for s in states]
    assert DenoiseError(TrajectoryStates(other), max_batch=16).n_calls == 2


def test_scalar_t_batches_only_equal_t():
    fn = lambda x, t, **c: x * t + 1  # noqa: E731
    xs = [torch.randn(1, 3) for _ in range(4)]
    ts = [torch.tensor(0.5), torch.tensor(0.5), torch.tensor(0.25), torch.tensor(0.5)]
    st = TrajectoryStates([DenoiseState(x, t, {}, fn(x, t)) for x, t in zip(xs, ts, strict=True)])
    ev = DenoiseError(st, max_batch=8)
    assert ev.n_calls == 2 and ev(fn)["denoise_error"] == 0.0


def test_nonfinite_output_scores_inf_and_shape_errors(recorded):
    model, recs = recorded
    ev = DenoiseError(recs[2].states())
    res = ev(lambda x, t, **c: model(x, t, **c) * float("nan"))
    assert res["denoise_error"] == math.inf
    with pytest.raises(ValueError, match="returned shape"):
        ev(lambda x, t, **c: model(x, t, **c)[:, :2])
    with pytest.raises(ValueError, match="expected a tensor"):
        ev(lambda x, t, **c: (model(x, t, **c),))


def test_save_load_roundtrip(recorded, tmp_path):
    model, recs = recorded
    key = states_cache_key("abc123", {"steps": 10, "seeds": [0, 1]})
    assert key == states_cache_key("abc123", {"seeds": [0, 1], "steps": 10}) != states_cache_key("abc124", {})
    base = recs[3].states()
    states = TrajectoryStates(
        [DenoiseState(s.x, s.t, dict(s.cond, nested={"a": [1, 2.5, "s", None, True], "b": (s.x[:, :1].clone(),)}),
                      s.fp_out, s.trajectory, s.step) for s in base],
        meta={"sampler": "euler"}, key=key,
    )
    path = tmp_path / "states.safetensors"
    states.save(path)
    with safe_open(str(path), framework="pt") as f:
        n_tensors = len(list(f.keys()))
    assert n_tensors == 6 * 3 + 2 + 2 + 6  # x, t, out per state; context and scale per run; "b" per state
    back = TrajectoryStates.load(path, key=key)
    assert back.meta == {"sampler": "euler"} and back.key == key and len(back) == len(states)
    for a, b in zip(states, back, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.t, b.t) and torch.equal(a.fp_out, b.fp_out)
        assert (a.trajectory, a.step) == (b.trajectory, b.step)
        assert torch.equal(a.cond["context"], b.cond["context"])
        assert b.cond["extra"]["tag"] == "pos" and b.cond["pooled"] == (None,)
        assert b.cond["nested"]["a"] == [1, 2.5, "s", None, True]
        assert isinstance(b.cond["nested"]["b"], tuple) and torch.equal(a.cond["nested"]["b"][0],
                                                                        b.cond["nested"]["b"][0])
    assert back[1].cond["context"] is back[0].cond["context"]
    assert DenoiseError(back)(lambda x, t, nested, **c: model(x, t, **c))["denoise_error"] < 1e-10
    with pytest.raises(ValueError, match="another model or settings"):
        TrajectoryStates.load(path, key="other")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="damaged or unreadable"):
        TrajectoryStates.load(bad)


def test_load_rejects_tampered_header(tmp_path):
    import json

    from safetensors.torch import save_file

    x = torch.randn(1, 2)
    TrajectoryStates([DenoiseState(x, torch.tensor([1.0]), {}, x + 1)]).save(tmp_path / "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["qua2sedimo"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for mutate, msg in [
        (lambda h: h["states"][0].update(x={"tensor": "t99"}), "bad tensor reference"),
        (lambda h: h["states"][0].update(cond={"dict": {"a": {"pickle": "x"}}}), "malformed conditioning"),
        (lambda h: h.update(version=99), "version"),
    ]:
        h = json.loads(json.dumps(header))
        mutate(h)
        save_file(tensors, str(tmp_path / "m.safetensors"), {"qua2sedimo": json.dumps(h)})
        with pytest.raises(ValueError, match=msg):
            TrajectoryStates.load(tmp_path / "m.safetensors")
    save_file(dict(tensors, extra=torch.zeros(1)), str(tmp_path / "e.safetensors"), {"qua2sedimo": json.dumps(header)})
    with pytest.raises(ValueError, match="no state refers to"):
        TrajectoryStates.load(tmp_path / "e.safetensors")


def test_validation_errors_name_the_problem():
    x, t, fp = torch.randn(2, 4), torch.rand(2), torch.randn(2, 4)
    ctx = torch.randn(2, 5)
    S = DenoiseState
    with pytest.raises(ValueError, match=r"state 1: conditioning cond\['context'\] has shape \(3, 5\).*batch 2"):
        TrajectoryStates([S(x, t, {"context": ctx}, fp), S(x, t, {"context": torch.randn(3, 5)}, fp)])
    TrajectoryStates([S(x, t, {"mask": torch.ones(7, 7)}, fp)], unbatched=["mask"])  # allowed when told
    with pytest.raises(ValueError, match=r"t has shape \(3,\), expected \(\) or \(2,\)"):
        TrajectoryStates([S(x, torch.rand(3), {}, fp)])
    with pytest.raises(ValueError, match=r"state 1: conditioning differs .*cond\['y'\]"):
        TrajectoryStates([S(x, t, {"context": ctx, "y": None}, fp), S(x, t, {"context": ctx, "y": ctx}, fp)])
    with pytest.raises(ValueError, match="conditioning differs"):
        TrajectoryStates([S(x, t, {"context": ctx}, fp), S(x, t, {"context": ctx, "y": ctx}, fp)])
    with pytest.raises(ValueError, match="all states or none"):
        TrajectoryStates([S(x, t, {}, fp), S(x, t, {}, None)])
    with pytest.raises(ValueError, match=r"cond\['fn'\] is a function"):
        TrajectoryStates([S(x, t, {"fn": lambda: 0}, fp)])
    with pytest.raises(ValueError, match="all zeros"):
        TrajectoryStates([S(x, t, {}, torch.zeros(2, 4))])
    with pytest.raises(ValueError, match="FP output must be a tensor with batch 2"):
        TrajectoryStates([S(x, t, {}, torch.randn(3, 4))])
    with pytest.raises(ValueError, match="no trajectory states"):
        TrajectoryStates([])
    with pytest.raises(ValueError, match="no FP outputs"):
        DenoiseError(TrajectoryStates([S(x, t, {})]))
    rec = StateRecorder(lambda x, t, **c: x)
    with pytest.raises(ValueError, match=r"cond\['opts'\]\['patch'\] is a builtin"):
        rec(x, t, opts={"patch": print})
    StateRecorder(lambda x, t, **c: x, drop=["opts"])(x, t, opts={"patch": print})


# ================================================================================ image metrics
def ssim_reference(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Straightforward per-window SSIM (Wang et al. 2004) of [C, H, W] arrays, valid windows only."""
    r = np.arange(11) - 5.0
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for c in range(a.shape[0]):
        for i in range(a.shape[1] - 10):
            for j in range(a.shape[2] - 10):
                pa, pb = a[c, i:i + 11, j:j + 11], b[c, i:i + 11, j:j + 11]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_properties_and_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 16, 18, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert float(ssim(a, a, 1.0)) == pytest.approx(1.0, abs=1e-12)
    assert float(ssim(a, b, 1.0)) == pytest.approx(float(ssim(b, a, 1.0)), abs=1e-12)
    per = ssim(a, b, 1.0, reduction="none")
    ref = [ssim_reference(a[i].numpy(), b[i].numpy(), 1.0) for i in range(2)]
    np.testing.assert_allclose(per.numpy(), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(ssim(a.float(), b.float(), 1.0)), np.mean(ref), atol=1e-5)
    clean = torch.rand(1, 1, 32, 32, generator=g)
    noise = torch.randn(clean.shape, generator=g)
    values = [float(ssim(clean + s * noise, clean, 1.0)) for s in (0.0, 0.02, 0.1, 0.4)]
    assert values[0] == pytest.approx(1.0) and values == sorted(values, reverse=True)
    with pytest.raises(ValueError, match="smaller than the 11-pixel window"):
        ssim(clean[..., :8, :8], clean[..., :8, :8], 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(clean, clean[..., :20], 1.0)


def test_psnr_and_nmse():
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(3, 3, 8, 8, generator=g)
    assert float(psnr(ref, ref, 1.0)) == math.inf
    assert float(psnr(ref + 0.1, ref, 1.0)) == pytest.approx(20.0, abs=1e-4)
    assert float(psnr(ref + 0.1, ref, 2.0)) == pytest.approx(20.0 + 20 * math.log10(2), abs=1e-4)
    expected = (0.01 * 64 * 3) / (ref**2).sum(dim=(1, 2, 3)).double()
    np.testing.assert_allclose(nmse(ref + 0.1, ref, reduction="none").numpy(), expected.numpy(), rtol=1e-5)
    assert float(nmse(ref, ref)) == 0.0
    noise = torch.randn(ref.shape, generator=g)
    p = [float(psnr(ref + s * noise, ref, 1.0)) for s in (0.01, 0.1, 0.3)]
    n = [float(nmse(ref + s * noise, ref)) for s in (0.01, 0.1, 0.3)]
    assert p == sorted(p, reverse=True) and n == sorted(n)


def test_image_distance():
    g = torch.Generator().manual_seed(2)
    fp = torch.rand(2, 3, 12, 12, generator=g)
    dist = ImageDistance(fp, data_range=1.0)
    same = dist(fp.clone())
    assert same["image_nmse"] == 0.0 and same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0)
    noisy = dist(fp + 0.05 * torch.randn(fp.shape, generator=g))
    assert set(noisy) == {"image_nmse", "psnr", "ssim"} and noisy["ssim"] < 1.0 and noisy["psnr"] < math.inf
    small = ImageDistance(torch.rand(1, 4, 8, 8, generator=g))  # latents: window shrinks to 7, range from data
    assert small(small.fp_images)["ssim"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="the FP images"):
        dist(fp[:1])


# ========================================================================================== FID
def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_full_covariances_against_eigh():
    rng = np.random.default_rng(1)
    d = 8
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), with symmetric square roots from eigh
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(inner.clip(0)).sum()
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert fd == pytest.approx(expected, rel=1e-8)
    assert fd == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)
    feats = rng.normal(size=(5, 20))  # N < D: singular covariances still give a finite distance
    m, s = feature_stats(feats)
    assert math.isfinite(frechet_distance(m, s, m + 1, s))
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(mu1, s1, mu2[:4], s2)


def test_feature_stats_and_fid_objective_with_stub_model():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(50, 4)).astype(np.float32)
    mu, sigma = feature_stats(f)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(f[:1])

    torch.manual_seed(0)

    class Stub(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            return self.lin(x.mean(dim=(2, 3)))

    g = torch.Generator().manual_seed(3)
    ref = torch.rand(40, 3, 8, 8, generator=g)
    fid = FIDObjective(Stub(), ref, batch_size=16)
    assert fid(ref)["fid"] == pytest.approx(0.0, abs=1e-6)
    assert fid(ref * 0.5)["fid"] > fid(ref * 0.9)["fid"] > 1e-6


def test_missing_fid_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        obj.load_fid_inception(tmp_path)
    msg = str(e.value)
    assert FID_WEIGHTS_FILE in msg and "pt_inception-2015-12-05-6726825d.safetensors" in msg
    assert str(tmp_path.resolve()) in msg and "never downloaded" in msg


def test_pth_weights_load_without_pickle_code(tmp_path):
    from fractions import Fraction

    torch.save({"w": torch.zeros(2)}, tmp_path / "ok.pth")
    assert set(obj.load_fid_state_dict(tmp_path / "ok.pth")) == {"w"}
    torch.save({"w": Fraction(1, 3)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="cannot read the Inception weights"):
        obj.load_fid_state_dict(tmp_path / "evil.pth")


@pytest.fixture(scope="module")
def random_inception():
    torch.manual_seed(0)
    model = obj.build_fid_inception(resize_input=False)
    return model, {k: v.clone() for k, v in model_state(model).items()}


def model_state(model: obj.FIDInceptionV3) -> dict[str, torch.Tensor]:
    """The torchvision-named state dict (as in pytorch-fid's weights file) behind a FIDInceptionV3."""
    names = {
        "blocks.0.0": "Conv2d_1a_3x3", "blocks.0.1": "Conv2d_2a_3x3", "blocks.0.2": "Conv2d_2b_3x3",
        "blocks.1.0": "Conv2d_3b_1x1", "blocks.1.1": "Conv2d_4a_3x3",
        **{f"blocks.2.{i}": n for i, n in enumerate(
            ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"])},
        **{f"blocks.3.{i}": n for i, n in enumerate(["Mixed_7a", "Mixed_7b", "Mixed_7c"])},
    }
    out = {}
    for k, v in model.state_dict().items():
        prefix = ".".join(k.split(".")[:3])
        out[names[prefix] + k[len(prefix):]] = v
    g = torch.Generator().manual_seed(9)
    out["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.01
    out["fc.bias"] = torch.zeros(1008)
    return out


@needs_pytorch_fid
def test_inception_loads_user_weights_and_matches_pytorch_fid(random_inception, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    model, state = random_inception
    x = torch.rand(1, 3, 75, 75, generator=torch.Generator().manual_seed(4))  # smallest size, no resize
    with torch.no_grad():
        ref = model(x)
    assert ref.shape == (1, 2048)
    save_file(state, str(tmp_path / "pt_inception-2015-12-05-6726825d.safetensors"))
    loaded = obj.load_fid_inception(tmp_path)
    assert loaded.resize_input and not any(p.requires_grad for p in loaded.parameters())
    mine, theirs_sd = loaded.state_dict(), model.state_dict()
    assert mine.keys() == theirs_sd.keys() and all(torch.equal(mine[k], theirs_sd[k]) for k in mine)
    pth_dir = tmp_path / "pth"
    pth_dir.mkdir()
    torch.save(state, pth_dir / FID_WEIGHTS_FILE)
    assert obj.find_fid_weights(pth_dir).name == FID_WEIGHTS_FILE
    from_pth = obj.load_fid_state_dict(pth_dir / FID_WEIGHTS_FILE)
    assert from_pth.keys() == state.keys() and all(torch.equal(from_pth[k], state[k]) for k in state)
    # pytorch-fid's own InceptionV3 with the same weights (its download replaced by our state dict)
    from pytorch_fid import inception as pf

    monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *a, **k: state)
    theirs = pf.InceptionV3([3], resize_input=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x)[0].flatten(1), ref)
    bad = dict(state)
    bad.pop("fc.bias")
    with pytest.raises(ValueError, match="not pytorch-fid's Inception"):
        obj.build_fid_inception(bad)


def test_image_folder_batches_and_stats_files(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, 256, (8, 10, 3), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    Image.fromarray(arrays[0][:, :, 0]).save(tmp_path / "3_gray.png")  # grayscale → RGB
    Image.fromarray(arrays[0][:6]).save(tmp_path / "4_small.png")
    (tmp_path / "notes.txt").write_text("ignored")
    batches = list(obj.image_folder_batches(tmp_path, batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 10), (2, 3, 8, 10), (1, 3, 6, 10)]
    torch.testing.assert_close(batches[0][1], torch.from_numpy(arrays[1]).permute(2, 0, 1).float() / 255)
    assert torch.equal(batches[1][1][0], batches[1][1][2])
    with pytest.raises(ValueError, match="does not exist"):
        list(obj.image_folder_batches(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list(obj.image_folder_batches(tmp_path / "empty"))

    mu, sigma = feature_stats(rng.normal(size=(10, 3)))
    obj.save_stats(tmp_path / "ref.safetensors", mu, sigma, {"folder": "coco"})
    mu2, sigma2, meta = obj.load_stats(tmp_path / "ref.safetensors")
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and meta == {"folder": "coco"}
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a Qua2SeDiMo FID statistics file"):
        obj.load_stats(tmp_path / "other.safetensors")
