import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import qua2sedimo.quant.table as ot
from qua2sedimo.quant import OPTIONS, OptionTable, OptionTableCancelled, option_table


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16), nn.Conv2d(3, 8, 3)).half()


def test_builds_all_options_with_progress():
    seen = []
    table = option_table(tiny(), progress=lambda d, t, label: seen.append((d, t)))
    assert table.options == OPTIONS
    assert seen[-1] == (18, 18) and len(seen) == 19
    errs = table.errors()
    assert set(errs) == {"0", "2", "3"}
    assert all(errs["0"]["kmeans_c-4"] < errs["0"][o] for o in ("uaq-4", "uaq-3", "kmeans_c-3"))
    q = table.get("3", "kmeans_a-3")
    assert q.dequantize().shape == (8, 3, 3, 3)
    with pytest.raises(KeyError, match="no entry"):
        table.get("3", "fp16")


def test_cached_on_disk_and_extended(tmp_path, monkeypatch):
    m = tiny()
    first = option_table(m, options=("uaq-4",), cache_dir=tmp_path)
    calls = []
    real = ot.quantize_weight
    monkeypatch.setattr(ot, "quantize_weight", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k))
    again = option_table(m, options=("uaq-4",), cache_dir=tmp_path)
    assert calls == []
    assert torch.equal(again.get("0", "uaq-4").codes, first.get("0", "uaq-4").codes)
    extended = option_table(m, options=("uaq-4", "kmeans_c-3"), cache_dir=tmp_path)
    assert calls == [("kmeans_c", 3)] * 3
    assert extended.options == ("uaq-4", "kmeans_c-3")
    assert len(list(tmp_path.iterdir())) == 1
    # other weights → another cache file
    with torch.no_grad():
        m[0].weight.add_(1)
    option_table(m, options=("uaq-4",), cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


def test_cancel_keeps_finished_entries_and_resumes(tmp_path):
    n = [0]

    def cancel():
        n[0] += 1
        return n[0] > 4

    m = tiny()
    with pytest.raises(OptionTableCancelled, match="after 4 of 18"):
        option_table(m, cache_dir=tmp_path, cancel=cancel)
    (path,) = tmp_path.iterdir()  # the 4 finished entries, written atomically
    seen = []
    table = option_table(m, cache_dir=tmp_path, progress=lambda d, t, label: seen.append((d, t)))
    assert seen[0] == (4, 18) and seen[-1] == (18, 18)
    fresh = option_table(m)
    for name, entries in fresh.entries.items():
        for option, q in entries.items():
            assert torch.equal(q.codes, table.entries[name][option].codes)


def test_cancel_before_any_entry_writes_nothing(tmp_path):
    with pytest.raises(OptionTableCancelled, match="after 0 of 18"):
        option_table(tiny(), cache_dir=tmp_path, cancel=lambda: True)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_cache_is_rejected(tmp_path):
    m = tiny()
    option_table(m, options=("kmeans_c-3",), cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    # a shape that does not fit the declared layer
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["2/kmeans_c-3/codes"] = tensors["2/kmeans_c-3/codes"][:, :-1].contiguous()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="layer '2' kmeans_c-3: codes are .*expected uint8.*delete"):
        option_table(m, options=("kmeans_c-3",), cache_dir=tmp_path)
    # garbage bytes
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="damaged or unreadable.*delete"):
        option_table(m, options=("kmeans_c-3",), cache_dir=tmp_path)
    # a header from another table
    header = json.loads(meta["qua2sedimo"])
    save_file(tensors, str(path), metadata={"qua2sedimo": json.dumps(dict(header, fingerprint="x"))})
    with pytest.raises(ValueError, match="belongs to other weights"):
        OptionTable.load(path, fingerprint="y")


def test_bad_requests():
    with pytest.raises(ValueError, match="nothing to quantize"):
        option_table(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="'fp16' is not a quantization option"):
        option_table(tiny(), options=("fp16",))


def test_only_computes_the_named_entries():
    table = option_table(tiny(), only={"2": "kmeans_a-3"})
    assert {n: set(o) for n, o in table.entries.items()} == {"2": {"kmeans_a-3"}}
