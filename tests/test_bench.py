"""bench.py: each number is held to the limit measured right around it (a shared machine's bandwidth
and matmul peak drift within a minute). The measurements are replaced by fixed sequences, so the
arithmetic of the ratios is checked exactly; the model and its timing are real (a tiny model).
`bench.py rag` runs on a small index."""
import subprocess
import sys
import types

import pytest

import bench

TINY = dict(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1)


@pytest.fixture(autouse=True)
def tiny_size(monkeypatch):
    monkeypatch.setitem(bench.SIZES, "tiny", TINY)


def test_decode_repeat_is_held_to_the_higher_bandwidth_measured_around_it(monkeypatch):
    measured = iter([10e9, 40e9, 20e9, 30e9])   # before repeat 1, after 1, after 2, after 3
    monkeypatch.setattr(bench, "measure_bandwidth", lambda device: next(measured))
    a = types.SimpleNamespace(device="cpu", dtypes="float32", compile="off", size="tiny", prompt_len=4, tokens=8,
                              repeats=3)
    rows = []
    bench.bench_decode(a, lambda row, line: rows.append(row))
    (r,) = rows
    assert [x["bandwidth_gbs"] for x in r["repeats"]] == [40, 40, 30]
    wbytes = r["weight_mb"] * 1e6
    for x in r["repeats"]:
        assert x["fraction_of_bound"] == pytest.approx(x["tokens_per_s"] * wbytes / (x["bandwidth_gbs"] * 1e9))
        assert x["prefill_ms"] > 0
    assert r["fraction_of_bound"] == sorted(x["fraction_of_bound"] for x in r["repeats"])[1]   # the median
    assert r["fraction_of_run_max_bound"] == pytest.approx(r["tokens_per_s"] * wbytes / 40e9)


@pytest.mark.parametrize("before, after", [(2e9, 3e9), (3e9, 2e9)])
def test_train_step_is_held_to_the_higher_peak_measured_around_it(monkeypatch, before, after):
    measured = iter([before, after])             # just before and just after the timed steps
    monkeypatch.setattr(bench, "measure_matmul_peak", lambda device, dtype: next(measured))
    a = types.SimpleNamespace(device="cpu", sizes="tiny", dtypes="float32", compile="off", batch_size=2, seq_len=16,
                              seconds=0.05)
    rows = []
    bench.bench_train(a, lambda row, line: rows.append(row))
    (r,) = rows
    assert r["peak_tflops"] == pytest.approx(3e-3)
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] * 1e12 / 3e9)


def test_decode_times_the_tokens_after_the_prompt(monkeypatch):
    """A fake clock: the prompt takes 100 s, every later token 0.5 s; tokens/s must be 2, prefill 100 s."""
    now = [0.0]

    def generate(self, prompts, max_new_tokens, **kw):
        now[0] += 100.0                          # prefill and the first token
        for i in range(max_new_tokens):
            if i:
                now[0] += 0.5
            yield None, None
    monkeypatch.setattr(bench.Transformer, "generate", generate)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(bench, "measure_bandwidth", lambda device: 1e9)
    a = types.SimpleNamespace(device="cpu", dtypes="float32", compile="off", size="tiny", prompt_len=4, tokens=8,
                              repeats=3)
    rows = []
    bench.bench_decode(a, lambda row, line: rows.append(row))
    assert [(x["tokens_per_s"], x["prefill_ms"]) for x in rows[0]["repeats"]] == [(2.0, 100000.0)] * 3


@pytest.mark.parametrize("flag", ["--tokens=1", "--prompt_len=1023"])
def test_decode_refuses_settings_it_cannot_time(tmp_path, flag):
    p = subprocess.run([sys.executable, bench.__file__, "decode", flag, f"--results={tmp_path}/r.jsonl"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "decode needs --tokens of at least 2" in p.stderr


def test_rag_search_bench_times_both_dtypes_and_deletes_its_vectors(tmp_path):
    a = types.SimpleNamespace(n=3000, dim=8, dir=str(tmp_path / "vectors"))
    rows, lines = [], []

    def out(row, line):
        rows.append(row)
        lines.append(line)
    bench.bench_rag(a, out)
    assert [r["dtype"] for r in rows] == ["float32", "float16"]
    assert lines[0].startswith("3,000 x 8, float32: ") and "batch 64: " in lines[0] and "RSS peak" in lines[0]
    assert all(r["batch1_ms"] > 0 and r["batch64_ms"] > 0 for r in rows)
    assert not (tmp_path / "vectors").exists()
