"""Benchmarks that state their ceilings: every number is printed next to the limit that bounds it, and that
limit is measured on this machine in the same run (on CUDA the datasheet peak is shown beside the measured one).

    python bench.py train       # tokens/s and MFU of a training step vs the measured matmul peak
    python bench.py decode      # batch-1 decode tokens/s vs the memory-bandwidth bound
    python bench.py generate    # batched sampling: tokens/s of 1, 4, 8, 16 samples
    python bench.py serve       # serve.py on loopback: aggregate tokens/s of 1, 4, 8 clients
    python bench.py data        # prepare_data.py tokenization MB/s with 1..all cores
    python bench.py all         # all of the above, eager and compiled, ~5 minutes on a 2-core CPU
    python bench.py rag --n=1000000 --dim=384   # rag.top_k over 1M memory-mapped vectors: latency, memory

Each prints a table and appends one JSON line per measurement to --results; `--help` lists the options.
"""
import argparse
import http.client
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from checkpoint import save_checkpoint
from common import measure_matmul_peak
from model import ModelConfig, Transformer
from rag import normalize, top_k
from tokenizer import Tokenizer

SIZES = {  # name -> model shape (vocab 32768 unless given: a real bilingual vocabulary)
    "15m": dict(vocab_size=4096, dim=384, n_layers=8, n_heads=6, n_kv_heads=6),
    "50m": dict(vocab_size=8192, dim=512, n_layers=12, n_heads=8, n_kv_heads=4),
    "100m": dict(vocab_size=32768, dim=768, n_layers=12, n_heads=12, n_kv_heads=4),
    "1b": dict(vocab_size=32768, dim=2048, n_layers=20, n_heads=16, n_kv_heads=8),
}
DEMO_TOKENIZER = "data/demo/pretrain/tokenizer.model"
# Dense bf16 tensor-core peaks from the datasheets, shown next to the measured peak on CUDA.
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, min_seconds=1.0, min_iters=3):
    """Seconds per call of fn, after one warm-up call, over at least min_seconds."""
    fn()
    sync(device)
    t0, n = time.perf_counter(), 0
    while n < min_iters or time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    sync(device)
    return (time.perf_counter() - t0) / n


def measure_bandwidth(device, nbytes=1 << 30):
    """Bytes/s of streaming reads of a buffer far larger than any cache: the best of a sum and a copy (read +
    write), a few times each. Decode reads every weight once per token, so weight bytes / this bounds it."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    best = 0.0
    for _ in range(3):
        best = max(best, nbytes / timed(lambda: x.sum(), device, 0.3))
        best = max(best, 2 * nbytes / timed(lambda: y.copy_(x), device, 0.3))
    return best


def build(size, seq_len, device, dtype=torch.float32):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**SIZES[size], max_seq_len=max(seq_len, 64))).to(device=device, dtype=dtype)


def compile_modes(a):
    return [False, True] if a.compile == "both" else [a.compile == "on"]


def bench_train(a, out):
    """Training step tokens/s and MFU, held to the higher of the matmul peaks measured just before and just
    after the timing: on a shared machine the peak drifts with the neighbours' load."""
    device = a.device
    for size, dtype, compile_ in itertools.product(a.sizes.split(","), a.dtypes.split(","), compile_modes(a)):
        model = build(size, a.seq_len, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
        fwd = torch.compile(model) if compile_ else model
        amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16")
        x = torch.randint(0, model.cfg.vocab_size, (a.batch_size, a.seq_len + 1), device=device)

        def step():
            with amp:
                _, loss = fwd(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()  # compile happens here
        before = measure_matmul_peak(device, getattr(torch, dtype))
        dt = timed(step, device, a.seconds)
        peak = max(before, measure_matmul_peak(device, getattr(torch, dtype)))
        tok_s = a.batch_size * a.seq_len / dt
        flops = model.flops_per_token(a.seq_len) * tok_s
        row = dict(bench="train", size=size, params=model.num_params(), dtype=dtype, compile=compile_,
                   batch=a.batch_size, seq_len=a.seq_len, step_ms=dt * 1e3, tokens_per_s=tok_s,
                   achieved_tflops=flops / 1e12, peak_tflops=peak / 1e12, mfu=flops / peak)
        if device.startswith("cuda"):
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            sheet = next((v for k, v in DATASHEET_BF16.items() if k in torch.cuda.get_device_name()), None)
            if sheet:
                row["mfu_datasheet"] = flops / sheet
        out(row, f"train {size:>4} {dtype:>8} compile={str(compile_):5}  {tok_s:10,.0f} tok/s  "
                 f"{flops / 1e12:7.3f} TFLOP/s  MFU {row['mfu']:6.1%} of measured {dtype} peak "
                 f"{peak / 1e12:.3f} TFLOP/s (measured just before and after)")
        del model, opt, fwd


def bench_decode(a, out):
    """Batch-1 greedy decode tokens/s after the prompt (prefill is compute-bound and timed apart), held to
    weight bytes / memory bandwidth. The shared machine's bandwidth drifts by tens of percent within a minute,
    so each repeat is held to the higher of the bandwidths measured just before and after it; a row reports
    its median repeat, and its fraction of the run's best bandwidth too."""
    device, rows, run_bws = a.device, [], []
    for dtype, compile_ in itertools.product(a.dtypes.split(","), compile_modes(a)):
        model = build(a.size, 1024, device, getattr(torch, dtype)).eval()
        if compile_:
            model.compile_for_decode()
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        prompt = [list(range(1, a.prompt_len + 1))]

        def run():  # (prefill seconds, seconds per decoded token) of one greedy generation
            t0, times = time.perf_counter(), []
            for _ in model.generate(prompt, a.tokens, temperature=0):
                sync(device)
                times.append(time.perf_counter())
            return times[0] - t0, (times[-1] - times[0]) / (len(times) - 1)
        run()  # warm-up (and compilation)
        reps = []
        run_bws.append(measure_bandwidth(device))
        for _ in range(a.repeats):
            prefill, dt = run()
            run_bws.append(measure_bandwidth(device))
            held = max(run_bws[-2:])
            reps.append(dict(tokens_per_s=1 / dt, prefill_ms=prefill * 1e3, bandwidth_gbs=held / 1e9,
                             fraction_of_bound=wbytes / held / dt))
        med = sorted(reps, key=lambda r: r["fraction_of_bound"])[(len(reps) - 1) // 2]  # (the lower, if even)
        rows.append(dict(bench="decode", size=a.size, params=model.num_params(), dtype=dtype, compile=compile_,
                         weight_mb=wbytes / 1e6, **med, bound_tokens_per_s=med["bandwidth_gbs"] * 1e9 / wbytes,
                         repeats=reps))
        del model
    top = max(run_bws)
    for r in rows:
        r["fraction_of_run_max_bound"] = r["tokens_per_s"] * r["weight_mb"] * 1e6 / top
        each = ", ".join(f"{x['fraction_of_bound']:.0%}" for x in r["repeats"])
        out(r, f"decode {a.size} {r['dtype']:>8} compile={str(r['compile']):5} {r['tokens_per_s']:8.1f} tok/s   "
               f"bound {r['bound_tokens_per_s']:7.1f} tok/s ({r['weight_mb']:.0f} MB weights / "
               f"{r['bandwidth_gbs']:.1f} GB/s)  -> {r['fraction_of_bound']:6.1%} (repeats {each}; "
               f"{r['fraction_of_run_max_bound']:.0%} of the run's best {top / 1e9:.1f} GB/s)")
    print(f"decode: median of {a.repeats} repeats, each held to the higher bandwidth measured around it "
          f"(GB/s, in order: {', '.join(f'{x / 1e9:.0f}' for x in run_bws)})")


def bench_generate(a, out):
    """n samples of one prompt decoded as one batch: the ceiling is n times one sample's tokens/s."""
    model = build(a.size, 1024, a.device).eval()
    prompt, base = [list(range(1, a.prompt_len + 1))], None
    for n in (1, 4, 8, 16):
        g = torch.Generator(device=a.device).manual_seed(0)

        def run():  # no stop ids: every row produces exactly a.tokens tokens
            for _ in model.generate(prompt, a.tokens, temperature=1.0, top_p=0.95, num_samples=n, generator=g):
                pass
        tok_s = n * a.tokens / min(timed(run, a.device, 0) for _ in range(a.repeats))
        base = base or tok_s
        out(dict(bench="generate", size=a.size, samples=n, tokens_per_s=tok_s, speedup_vs_1=tok_s / base),
            f"generate {a.size} samples={n:>2}  {tok_s:8.1f} tok/s  {tok_s / base:5.2f}x of 1 sample")


def demo_tokenizer():
    """The demo's tokenizer path; `prepare_data.py demo` (about a second) makes it if it is missing."""
    if not os.path.isfile(DEMO_TOKENIZER):
        subprocess.run([sys.executable, "prepare_data.py", "demo"], check=True)
    return DEMO_TOKENIZER


def make_out_dir(size, path):
    """A random-weight model of the given size with the demo tokenizer, saved like a training run."""
    tok = Tokenizer.load(demo_tokenizer())
    model = Transformer(ModelConfig(**dict(SIZES[size], vocab_size=tok.vocab_size), max_seq_len=1024))
    save_checkpoint(path, {"model": model.state_dict(), "model_config": model.cfg.to_dict(), "config": {}, "step": 0})
    tok.save(path)


def stream_one(port, max_tokens, i, requests=2):
    """One client's completion tokens (from the final usage chunk) over `requests` streaming chats in a row."""
    n = 0
    for r in range(requests):
        body = json.dumps({"messages": [{"role": "user", "content": f"hello {i} {r}"}],  # no "model": the served one
                           "max_tokens": max_tokens, "temperature": 1.0, "seed": i * 100 + r, "stream": True,
                           "stream_options": {"include_usage": True}, "ignore_eos": True})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        for line in conn.getresponse():
            if line.startswith(b"data: {"):
                usage = json.loads(line[6:]).get("usage")
                n += usage["completion_tokens"] if usage else 0
        conn.close()
    return n


def bench_serve(a, out):
    """Clients stream concurrently and the server batches their decode steps (continuous batching): the
    ceiling for c clients is c times one client's speed, if a decode step cost the same at batch c."""
    with tempfile.TemporaryDirectory() as d:
        make_out_dir(a.size, d)
        cmd = [sys.executable, "serve.py", f"--out_dir={d}", "--port=0", "--max_batch=8", f"--device={a.device}"]
        if a.threads:
            cmd.append(f"--threads={a.threads}")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            url = next((line for line in proc.stdout if "http://127.0.0.1:" in line), None)  # printed when ready
            if url is None:
                raise SystemExit("serve.py did not start")
            port = int(url.split("http://127.0.0.1:")[1].split("/")[0].split()[0])
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its log
            stream_one(port, 8, 0, requests=1)  # warm-up: first-call allocations are not the server's speed
            base = None
            for clients in (1, 4, 8):
                with ThreadPoolExecutor(clients) as pool:
                    t0 = time.perf_counter()
                    tokens = sum(pool.map(lambda i: stream_one(port, a.tokens, i), range(clients)))
                    dt = time.perf_counter() - t0
                tok_s = tokens / dt
                base = base or tok_s
                out(dict(bench="serve", size=a.size, clients=clients, tokens=tokens, tokens_per_s=tok_s,
                         speedup_vs_1=tok_s / base),
                    f"serve {a.size} clients={clients}  {tokens:5d} tokens  {tok_s:8.1f} tok/s  "
                    f"{tok_s / base:5.2f}x of 1 client")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def bench_data(a, out):
    """prepare_data.py pretrain on the demo corpus repeated to ~a.data_mb MB, with 1..all processes (the whole
    command, timed): the ceiling for n processes is n times one process's speed."""
    tokenizer, src = demo_tokenizer(), "data/demo/corpus"
    text = "".join(open(os.path.join(src, f), encoding="utf-8").read() for f in sorted(os.listdir(src)))
    base = None
    with tempfile.TemporaryDirectory() as corpus:
        for i in range(max(1, int(a.data_mb * 1e6 / len(text.encode())))):  # one file per copy, as the demo's
            with open(os.path.join(corpus, f"part{i:03d}.txt"), "w", encoding="utf-8") as f:
                f.write(text)
        for n in range(1, (os.cpu_count() or 1) + 1):
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "prepare_data.py", "pretrain", corpus, "--tokenizer", tokenizer,
                                "--out_dir", d, f"--num_proc={n}"],
                               capture_output=True, text=True, check=True)
                wall = time.perf_counter() - t0
                mb = json.load(open(os.path.join(d, "meta.json")))["text_bytes"] / 1e6
            mbs = mb / wall
            base = base or mbs
            out(dict(bench="data", processes=n, mb=mb, seconds=wall, mb_per_s=mbs, speedup_vs_1=mbs / base),
                f"data processes={n}  {mb:.1f} MB in {wall:.1f} s (whole command)  {mbs:6.2f} MB/s  "
                f"{mbs / base:4.2f}x of 1 (ceiling {n}x)")


def memory_mb(reset_peak=False):
    """Resident MB from /proc (Linux): RssAnon (heap), RssFile (mapped index pages), VmHWM (the peak)."""
    try:
        if reset_peak:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                  # resets VmHWM (Linux >= 4.0)
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) / 1024 for k, _, v in (ln.partition(":") for ln in f)
                    if k in ("RssAnon", "RssFile", "VmHWM")}
    except OSError:
        return {}


def bench_rag(a, out):
    """rag.top_k (k=5, batches of 1 and 64) and resident memory over n random unit vectors, memory-mapped from
    a file as rag.py maps an index: float32, then float16."""
    rng = np.random.default_rng(0)
    os.makedirs(a.dir, exist_ok=True)
    try:
        for dtype in ("float32", "float16"):
            path = os.path.join(a.dir, f"vectors_{dtype}.npy")
            v = np.lib.format.open_memmap(path, "w+", dtype, (a.n, a.dim))
            for lo in range(0, a.n, 65536):
                v[lo:lo + 65536] = normalize(rng.standard_normal((min(65536, a.n - lo), a.dim), dtype=np.float32))
            v.flush()
            del v
            vectors = np.load(path, mmap_mode="r")
            before = memory_mb()
            top_k(vectors, normalize(rng.standard_normal((1, a.dim))), 5)     # first touch pages the file in
            memory_mb(reset_peak=True)
            row = dict(bench="rag", n=a.n, dim=a.dim, dtype=dtype, gib=os.path.getsize(path) / 2**30)
            line = [f"{dtype}: {row['gib']:.2f} GiB on disk"]
            for batch, reps in ((1, 10), (64, 3)):
                times = []  # (wall, CPU): on a shared machine the wall clock includes waiting
                for _ in range(reps):
                    q = normalize(rng.standard_normal((batch, a.dim)))
                    t0, c0 = time.perf_counter(), time.process_time()
                    top_k(vectors, q, 5)
                    times.append((time.perf_counter() - t0, time.process_time() - c0))
                wall, cpu = 1000 * np.median(times, axis=0)
                row.update({f"batch{batch}_ms": wall, f"batch{batch}_cpu_ms": cpu})
                line.append(f"batch {batch}: {wall:.0f} ms ({cpu:.0f} ms CPU)")
            m = memory_mb()
            row.update(rss_peak_mb=m.get("VmHWM"), mapped_mb=m.get("RssFile"), heap_mb=m.get("RssAnon"))
            line.append(f"RSS peak {m.get('VmHWM', 0):.0f} MB = mapped index {m.get('RssFile', 0):.0f} MB "
                        f"+ heap {m.get('RssAnon', 0):.0f} MB (heap before search {before.get('RssAnon', 0):.0f} MB)")
            out(row, f"{a.n:,} x {a.dim}, " + ", ".join(line))
            del vectors
            os.remove(path)
    finally:
        shutil.rmtree(a.dir, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("train", "decode", "generate", "serve", "data", "all", "rag"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="15m", help="train: comma-separated model sizes " + "/".join(SIZES))
    p.add_argument("--size", default="100m", help="decode/generate/serve: model size")
    p.add_argument("--dtypes", default=None, help="comma-separated: float32,bfloat16")
    p.add_argument("--compile", choices=("on", "off", "both"), default=None,
                   help="train/decode (default: off; 'all' runs both, as the targets are about compiled steps)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--seconds", type=float, default=3.0, help="train: seconds timed per configuration")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    p.add_argument("--repeats", type=int, default=3, help="decode: median of, generate: best of, this many runs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--data_mb", type=float, default=40, help="data: MB of text to tokenize")
    p.add_argument("--n", type=int, default=1_000_000, help="rag: vectors in the index")
    p.add_argument("--dim", type=int, default=384, help="rag: their dimension")
    p.add_argument("--dir", default="/tmp/rag_bench", help="rag: where the vectors go (deleted after)")
    p.add_argument("--results", default="bench_results.jsonl")
    a = p.parse_args()
    if a.what in ("decode", "all") and (a.tokens < 2 or a.prompt_len + 2 > 1024):
        p.error("decode needs --tokens of at least 2 (it times the tokens after the first) and --prompt_len "
                "of at most 1022 (the benchmark model's context is 1024)")
    if a.threads:
        torch.set_num_threads(a.threads)
    env = dict(host=platform.node(), cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
               torch=torch.__version__, device=a.device,
               gpu=torch.cuda.get_device_name() if a.device.startswith("cuda") else None)
    where = env["gpu"] or f"{env['threads']} threads"
    print(f"# bench {a.what} on {a.device} ({where}), torch {torch.__version__}")

    def out(row, line):
        print(line, flush=True)
        with open(a.results, "a") as f:
            f.write(json.dumps({**row, **env, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")

    everything = a.what == "all"
    a.compile = a.compile or ("both" if everything else "off")
    for job in ["train", "decode", "generate", "serve", "data"] if everything else [a.what]:
        if job == "train" and a.dtypes is None:
            a.dtypes = "bfloat16" if everything else "bfloat16,float32"  # all: the target's dtype
        if job == "decode" and (everything or not a.dtypes):
            a.dtypes = "float32,bfloat16"
        globals()["bench_" + job](a, out)


if __name__ == "__main__":
    main()
