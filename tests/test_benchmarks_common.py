"""benchmarks/common.py: the scaffolding every benchmark shares (last line, JSON, machine label, timing in turns)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"
_spec = importlib.util.spec_from_file_location("benchmarks_common", PATH)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

ENV = {"captioning": "0.1.0", "git_commit": "abc1234", "torch": "2.4.1", "torchvision": "0.19.1", "python": "3.11.7",
       "device": "cpu", "cpu_flags": {"model": "AMD EPYC", "avx2": True, "avx512": True, "avx512_bf16": True,
                                      "amx": False}, "gpu": None, "precision": "bf16", "threads": 2}


def test_the_last_line_is_name_then_the_figures_in_order(capsys):
    line = common.finish("decode", {"speedup_vs_reference": "9.5", "rss_mb": "1304", "precision": "bf16"})
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == line == "decode: speedup_vs_reference=9.5 rss_mb=1304 precision=bf16"


def test_the_json_holds_the_same_figures_as_numbers_with_the_machine_and_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/scst.py", "--steps", "5", "--json", str(tmp_path / "r.json")])
    figures = {"step_ratio_vs_xe": "2.59", "peak_rss_mb": "3053", "rows": 160, "cache_engine": "torch",
               "ort_rss_mb": "n/a", "offset": "-0.50"}
    line = common.finish("scst", figures, ENV, tmp_path / "out" / "r.json")   # its folder made on the way
    record = json.loads((tmp_path / "out" / "r.json").read_text())
    assert record["figures"] == {"step_ratio_vs_xe": 2.59, "peak_rss_mb": 3053, "rows": 160, "cache_engine": "torch",
                                 "ort_rss_mb": "n/a", "offset": -0.5}
    assert record["name"] == "scst" and record["line"] == line == capsys.readouterr().out.strip()
    assert record["machine"] == "cpu2-avx512bf16" and record["env"] == ENV
    assert record["command"] == f"python benchmarks/scst.py --steps 5 --json {tmp_path / 'r.json'}"
    assert record["date"].endswith("UTC")


def test_no_json_is_written_without_a_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common.finish("x", {"a": "1"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, threads, gpu, expected", [
    ({"avx2": True, "avx512": True, "avx512_bf16": True, "amx": False}, 2, None, "cpu2-avx512bf16"),
    ({"avx2": True, "avx512": False, "avx512_bf16": False, "amx": False}, 2, None, "cpu2-avx2"),
    ({"avx2": True, "avx512": True, "avx512_bf16": True, "amx": True}, 16, None, "cpu16-amx"),
    ({"avx2": None, "avx512": None, "avx512_bf16": None, "amx": None}, 8, None, "cpu8"),      # no /proc/cpuinfo
    ({"avx2": True}, 16, "NVIDIA H100 80GB HBM3", "cuda-nvidia-h100-80gb-hbm3"),
])
def test_the_machine_label_comes_from_env_json(flags, threads, gpu, expected):
    assert common.label({**ENV, "cpu_flags": flags, "threads": threads, "gpu": gpu}) == expected


def test_jobs_are_timed_in_turns_round_after_round_after_the_warm_up():
    calls = []
    jobs = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = common.in_turns(jobs, 3, warmup=2, sync=lambda: calls.append("sync"))
    assert calls == ["a", "sync", "b", "sync"] * 5                      # 2 warm-up rounds, then 3
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}


def test_prepare_runs_untimed_before_each_call_and_hands_its_result_over(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    made, got = [], []

    def fresh():                                                        # 50 s of building, not counted
        now[0] += 50
        made.append(len(made))
        return made[-1]

    def a(state):
        now[0] += 1
        got.append(state)

    times = common.in_turns({"a": a, "b": lambda: None}, 2, warmup=1, prepare={"a": fresh})
    assert made == got == [0, 1, 2]                                      # once before each of a's calls, in order
    assert times == {"a": [1, 1], "b": [0, 0]}


def test_medians_are_each_jobs_median_of_its_rounds(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    costs = {"slow": iter([100, 3, 1, 2]), "fast": iter([100, 0.5, 0.1, 0.2])}   # the warm-up's 100 left out

    def job(name):
        def call():
            now[0] += next(costs[name])
        return call

    assert common.medians({name: job(name) for name in costs}, 3) == {"slow": 2, "fast": pytest.approx(0.2)}


def test_the_parser_takes_the_docstrings_first_line_and_json(tmp_path):
    parser = common.parser("\nOne decoding step, timed.\n\nMore words.\n")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(["--json", str(tmp_path / "a.json")])
    assert parser.description == "One decoding step, timed." and args.json == tmp_path / "a.json"
    assert parser.parse_args([]).json is None and args.rounds == 40


def test_machine_prints_env_json_s_fields_as_the_env_line(capsys):
    env = common.machine("cpu", "fp32")
    line = capsys.readouterr().out.strip()
    assert line.startswith("env: ") and json.loads(line[len("env: "):]) == env
    assert env["device"] == "cpu" and env["precision"] == "fp32" and common.label(env).startswith("cpu")
