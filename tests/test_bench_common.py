"""Bench helpers (bench/common.py, devtools/perf_table.py): ABBA order, the fields of a time figure,
the worst-backend entry and the README cell. A fake clock, so nothing here depends on real timing."""
from bench import common
from devtools import perf_table


def _fake(monkeypatch, b_durations):
    """Callables A (1 s each) and B (the given durations, in call order) on a fake process clock."""
    clock, calls, b_left = [0.0], [], list(b_durations)
    monkeypatch.setattr(common.time, "process_time", lambda: clock[0])
    # the thread pin is recorded, not applied: it would hold for the rest of this pytest process
    monkeypatch.setattr(common, "pin_threads", lambda n=None: calls.append("pin"))

    def run_a():
        calls.append("A")
        clock[0] += 1.0

    def run_b():
        calls.append("B")
        clock[0] += b_left.pop(0)
    return run_a, run_b, calls


def test_interleaved_ratio_abba_order_and_fields(monkeypatch):
    # B durations by call: warm-up, then pairs 0..3 (B is run first in the odd pairs)
    run_a, run_b, calls = _fake(monkeypatch, [9.0, 1.1, 1.3, 0.9, 1.2])
    res = common.interleaved_ratio(run_a, run_b, pairs=4)
    assert calls == ["pin", "A", "B"] + ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert res["pairs"] == 4
    assert res["a_s"] == [1.0] * 4
    assert [round(t, 6) for t in res["b_s"]] == [1.1, 1.3, 0.9, 1.2]
    assert round(res["ratio"], 6) == 1.15 and round(res["min"], 6) == 0.9 and round(res["max"], 6) == 1.3


def test_interleaved_ratio_without_warmup_and_default_pairs(monkeypatch):
    run_a, run_b, calls = _fake(monkeypatch, [1.0] * common.PAIRS)
    res = common.interleaved_ratio(run_a, run_b, warmup=False)
    assert res["pairs"] == common.PAIRS >= 8
    assert calls[:5] == ["pin", "A", "B", "B", "A"] and len(calls) == 1 + 2 * common.PAIRS
    assert res["ratio"] == res["min"] == res["max"] == 1.0


def test_pin_threads(monkeypatch):
    import torch
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(common, "THREADS", 1)
        common.pin_threads()
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(common, "THREADS", 0)
        common.pin_threads()                                        # 0: torch's default is kept
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_time_figure_and_add_worst_carry_the_spread():
    res = {"ratio": 1.04321, "pairs": 8, "min": 1.012345, "max": 1.07, "a_s": [], "b_s": []}
    f = common.time_figure(res, 1.10, "tiny UNet")
    assert f == {"value": 1.0432, "target": 1.10, "unit": "x", "settings": "tiny UNet, median of 8 ABBA-interleaved pairs",
                 "pairs": 8, "min": 1.0123, "max": 1.07}
    g = common.time_figure(res, 2.0, "s", shift=-1.0)             # an overhead fraction: spread shifted alike
    assert (g["value"], g["min"], g["max"]) == (0.0432, 0.0123, 0.07)
    out = {"t[subquad]": common.time_figure(dict(res, ratio=1.0, min=0.9, max=1.2), 1.10, "a"),
           "t[sdpa]": f, "m[subquad]": {"value": 2.0, "target": 5.0, "unit": "MB", "settings": "b"},
           "m[sdpa]": {"value": 1.0, "target": 5.0, "unit": "MB", "settings": "b"}}
    common.add_worst(out, ["t", "m"])
    assert {k: out["t"][k] for k in ("value", "pairs", "min", "max")} == {"value": 1.0432, "pairs": 8, "min": 1.0123,
                                                                         "max": 1.07}
    assert out["m"] == {"value": 2.0, "target": 5.0, "unit": "MB", "settings": "worst of the two CPU attention backends"}


def test_perf_table_shows_the_spread():
    new = {"value": 1.0432, "target": 1.1, "unit": "x", "settings": "s", "pairs": 8, "min": 1.0123, "max": 1.07}
    old = {"value": 0.64, "target": 5.0, "unit": "MB", "settings": "t"}
    assert perf_table.value_cell(new) == "1.0432 x (1.01-1.07, 8 pairs)"
    assert perf_table.value_cell(old) == "0.64 MB"
    rows = perf_table.table({"a": new, "b": old, "c": dict(old, target=None)}).splitlines()
    assert rows[2] == "| `a` | 1.0432 x (1.01-1.07, 8 pairs) | 1.1 | s |"
    assert rows[3] == "| `b` | 0.64 MB | 5.0 | t |"
    assert rows[4] == "| `c` | 0.64 MB | report | t |"
