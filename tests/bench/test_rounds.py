"""bench/rounds.py: A B / B A order, median and spread cells, one table with a title row
per transport and ratios to Go derper, and JSON that keeps every round."""

from __future__ import annotations

from bench.rounds import Group, Result, Row, cell, median_note, render, round_order, spread, to_json


def test_round_order_alternates() -> None:
    assert [round_order("AB", r) for r in range(4)] == [["A", "B"], ["B", "A"], ["A", "B"], ["B", "A"]]


def test_spread_and_cell() -> None:
    s = spread([3.0, None, 1.0, 2.0])
    assert s is not None and (s.median, s.lo, s.hi, s.n) == (2.0, 1.0, 3.0, 3)
    assert cell(s, "{:.1f}", 4) == "2.0 (1.0–3.0) [3/4 rounds]"
    assert cell(spread([5.0]), "{:.1f}", 1) == "5.0"
    assert cell(spread([None]), "{:.1f}", 2) == "n/a"


def test_median_note_comes_from_the_median_round() -> None:
    rs = [Result({"x": v}, {"x": f"round {i}"}) for i, v in enumerate([10.0, 30.0, 20.0])]
    assert median_note(rs, "x", "x") == "round 2"


def _group(title: str, dk: list[float], go: list[float]) -> Group:
    return Group(title, [Row("pps", "peak packets/s", "{:,.0f}", "pps")],
                 {"derpkit": [Result({"pps": v}, {"pps": "n"}) for v in dk],
                  "Go derper": [Result({"pps": v}) for v in go]})


def test_render_one_table_ratios_to_the_reference() -> None:
    g1 = _group("plain HTTP", [200.0, 180.0, 220.0], [100.0, 90.0, 110.0])
    g2 = _group("TLS 1.3", [90.0, 95.0, 100.0], [100.0, 100.0, 100.0])
    g2.absent["hyperderp"] = "does not serve tls"
    out = render([g1, g2], ["derpkit", "Go derper"], "Go derper", 3).splitlines()
    assert out[0].startswith("| figure | derpkit | Go derper | derpkit / Go derper | notes")
    assert sum(1 for line in out if line.startswith("| figure")) == 1  # ONE table
    assert out[2].startswith("| **plain HTTP** |") and out[4].startswith("| **TLS 1.3** |")
    assert out[3] == ("| peak packets/s | 200 (180–220) | 100 (90–110) | 2.00 | derpkit: n |")
    assert "| 95 (90–100) | 100 (100–100) | 0.95 |" in out[5]
    assert out[6].startswith("| (hyperderp: does not serve tls) |")


def test_to_json_keeps_every_round() -> None:
    g = _group("plain HTTP", [1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    j = to_json({"http": g}, {"rounds": 3})
    s = j["transports"]["http"]["servers"]["derpkit"]
    assert [r["figures"]["pps"] for r in s["rounds"]] == [1.0, 2.0, 3.0]
    assert s["summary"]["pps"] == {"median": 2.0, "min": 1.0, "max": 3.0, "rounds": 3}
    assert j["rounds"] == 3
