import math

import pytest
import torch
from torch import nn

from qua2sedimo.quant import quantizable_layers
from qua2sedimo.quant.layer_table import layers_fingerprint
from qua2sedimo.search.journal import Journal
from qua2sedimo.search.runner import config_size, pareto_front, run_search
from qua2sedimo.search.sampling import ConfigSampler


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.Linear(256, 64)).half()


def fake_objective(options):
    """Deterministic: more 3-bit layers → larger error."""
    return {"denoise_error": sum(0.1 if o.endswith("-3") else 0.01 for o in options.values()), "aux": 1.0}


def open_journal(path, layers):
    return Journal.open(path, model_fingerprint=layers_fingerprint(layers), objective="denoise_error",
                        settings={"n_states": 8}, layer_names=[la.name for la in layers])


def test_budget_resume_and_sizes(tmp_path):
    layers = quantizable_layers(model())
    sampler = ConfigSampler([la.name for la in layers], seed=3)
    seen = []
    with open_journal(tmp_path / "j.sqlite", layers) as j:
        res = run_search(j, sampler, fake_objective, layers, primary="denoise_error", max_configs=5,
                         progress=seen.append)
        assert (res.status, res.done, res.new) == ("done", 5, 5)
        assert seen[0].done == 0 and seen[-1].done == 5 and seen[-1].eta == 0
        rec = j.records()[0]
        assert (rec.avg_bits, rec.nbytes) == config_size(layers, rec.options)
        assert 3.0 < rec.avg_bits < 5.5 and rec.values["aux"] == 1.0 and "evaluate" in rec.timings
    # a larger budget later: continues with indices 5..7 only
    calls = []
    with open_journal(tmp_path / "j.sqlite", layers) as j:
        res = run_search(j, sampler, lambda o: calls.append(o) or fake_objective(o), layers,
                         primary="denoise_error", max_configs=8)
        assert (res.done, res.new) == (8, 3) and calls == [sampler.config(i) for i in (5, 6, 7)]
        assert res.best.primary == min(r.primary for r in j.records())


def test_cancel_keeps_everything_done(tmp_path):
    layers = quantizable_layers(model())
    sampler = ConfigSampler([la.name for la in layers], seed=1)
    n = [0]

    def evaluate(o):
        n[0] += 1
        return fake_objective(o)

    with open_journal(tmp_path / "j.sqlite", layers) as j:
        res = run_search(j, sampler, evaluate, layers, primary="denoise_error", max_configs=50,
                         cancel=lambda: n[0] >= 4)
        assert res.status == "cancelled" and res.done == 4 == len(j)


def test_time_budget_and_bad_budgets(tmp_path):
    layers = quantizable_layers(model())
    sampler = ConfigSampler([la.name for la in layers])
    with open_journal(tmp_path / "j.sqlite", layers) as j:
        res = run_search(j, sampler, fake_objective, layers, primary="denoise_error", max_seconds=0.3)
        assert res.status == "time" and res.new >= 1
        with pytest.raises(ValueError, match="budget of zero"):
            run_search(j, sampler, fake_objective, layers, primary="denoise_error", max_configs=0)
        for bad in (float("nan"), float("inf"), -1.0):  # NaN used to mean "no time budget", silently
            with pytest.raises(ValueError, match="max_seconds must be a positive finite number"):
                run_search(j, sampler, fake_objective, layers, primary="denoise_error", max_configs=5,
                           max_seconds=bad)
        with pytest.raises(ValueError, match="give a budget"):
            run_search(j, sampler, fake_objective, layers, primary="denoise_error")
        with pytest.raises(ValueError, match="without the primary value 'psnr'"):
            run_search(j, sampler, fake_objective, layers, primary="psnr", max_configs=100)
        before = len(j)
    with open_journal(tmp_path / "j.sqlite", layers) as j:
        assert len(j) == before  # failures left the journal as it was


def test_pareto_front(tmp_path):
    layers = quantizable_layers(model())
    sampler = ConfigSampler([la.name for la in layers], seed=5)
    with open_journal(tmp_path / "j.sqlite", layers) as j:
        run_search(j, sampler, fake_objective, layers, primary="denoise_error", max_configs=30)
        recs = j.records()
    front = pareto_front(recs)
    pairs = zip(front, front[1:], strict=False)
    assert front and all(a.avg_bits <= b.avg_bits and a.primary > b.primary for a, b in pairs)
    for r in recs:  # nothing in the journal dominates a front member
        assert not any(r.avg_bits <= f.avg_bits and r.primary < f.primary for f in front if math.isfinite(r.primary))
