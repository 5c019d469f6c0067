"""pretrain.py end to end on a tiny synthetic data dir: DDP and FSDP2 (2 processes, gloo) against one
process, exact resume, SIGTERM, and the bad inputs. Models have dim 32 and 2 layers."""
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
TINY = ["--dim=32", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--max_seq_len=32", "--batch_size=2",
        "--device=cpu", "--dtype=float32", "--peak_tflops=1", "--eval_iters=2", "--log_interval=1",
        "--warmup_steps=2", "--lr=3e-3", "--sample_tokens=4"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A pretraining data dir as prepare_data.py writes it: train.bin/val.bin (uint16, BOS before each
    document), meta.json and the tokenizer.model that made them (a 320-piece SentencePiece BPE)."""
    from tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("data")
    r = random.Random(0)
    names, things = ["Kami", "Lobo", "Tina", "Sava", "Mika"], ["apples", "books", "cats", "tea", "pens"]
    docs = [" ".join(f"{r.choice(names)} has {r.randint(1, 99)} {r.choice(things)}." for _ in range(r.randint(2, 8)))
            + " 你好，世界。" for _ in range(600)]
    tok = train_tokenizer(docs, 320, str(d / "tokenizer.model"))
    meta = {"vocab_size": tok.vocab_size, "dtype": "uint16", "tokenizer": tok.name,
            "tokenizer_sha256": tok.fingerprint, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "text_bytes": 0}
    for split, part in (("train", docs[:540]), ("val", docs[540:])):
        ids = np.concatenate([np.array([tok.bos_id] + tok.encode(t), dtype=np.uint16) for t in part])
        ids.tofile(d / f"{split}.bin")
        meta[f"{split}_tokens"], meta[f"{split}_docs"] = len(ids), len(part)
        meta["text_bytes"] += sum(len(t.encode()) for t in part)
    (d / "meta.json").write_text(json.dumps(meta))
    return str(d)


def pretrain(args, nproc=1, check=True):
    cmd = [sys.executable, os.path.join(ROOT, "pretrain.py"), *args]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def records(out_dir, key="loss"):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["step"], r[key]) for r in map(json.loads, f) if key in r]


def params(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


# -- bad input (fast: they fail before training) -------------------------------------------------------

def test_unknown_key_fails_naming_the_closest(tmp_path):
    p = pretrain(["--batchsize=3"], check=False)
    assert p.returncode != 0
    assert "batchsize" in p.stderr.strip().splitlines()[-1] and "batch_size" in p.stderr


def test_no_prepared_data_names_the_command(tmp_path):
    p = pretrain([f"--data_dir={tmp_path}/nothing", f"--out_dir={tmp_path}/out"], check=False)
    assert p.returncode == 1
    assert "python prepare_data.py demo" in p.stderr and "Traceback" not in p.stderr


def test_vocab_mismatch_between_data_and_model(tmp_path, data_dir):
    p = pretrain(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}/out", "--vocab_size=100"], check=False)
    assert p.returncode == 1
    assert "vocab" in p.stderr and "320" in p.stderr and "Traceback" not in p.stderr


# -- training ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_trains_writes_a_complete_out_dir_and_rejects_other_shapes(tmp_path, data_dir):
    out = str(tmp_path / "run")
    pretrain(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_steps=40", "--eval_interval=20",
                     "--lr=1e-2", "--batch_size=8"])
    assert {"ckpt.pt", "ckpt_best.pt", "tokenizer.model", "config.json", "metrics.jsonl"} <= set(os.listdir(out))
    val = records(out, "val_loss")
    assert [s for s, _ in val] == [0, 20, 40] and val[2][1] < val[0][1] - 1.0  # clearly learning
    bpb = records(out, "val_bpb")
    assert 0 < bpb[2][1] < bpb[0][1]
    assert json.load(open(os.path.join(out, "config.json")))["max_steps"] == 40
    from checkpoint import load_model
    model, tok, ckpt = load_model(out)
    assert ckpt["step"] == 40 and model.cfg.dim == 32 and tok.vocab_size == 320
    # init_from another run: its weights at step 0 (same validation windows, so the same val loss)
    pretrain(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}/next", f"--init_from={out}", "--max_steps=0",
                     "--batch_size=8"])
    assert records(f"{tmp_path}/next", "val_loss")[0][1] == pytest.approx(val[2][1], abs=1e-5)
    # resuming with another model shape fails with one line that names the difference
    p = pretrain(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume", "--dim=64"], check=False)
    assert p.returncode == 1 and "another shape" in p.stderr and "dim=32" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_configs_run_on_the_demo_world(tmp_path):
    """config/tiny.py on the real demo data (few steps, small batch); config/1b.py parses and stops
    at the missing corpus with the command that prepares one."""
    p = subprocess.run([sys.executable, "prepare_data.py", "demo", f"--out_dir={tmp_path}/demo"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = str(tmp_path / "run")
    pretrain(["config/tiny.py", f"--data_dir={tmp_path}/demo/pretrain", f"--out_dir={out}", "--max_steps=4",
              "--batch_size=4", "--eval_iters=2", "--eval_interval=4", "--sample_tokens=8", "--peak_tflops=1"])
    val = records(out, "val_loss")
    assert [s for s, _ in val] == [0, 4] and val[1][1] < val[0][1]
    assert json.load(open(os.path.join(out, "config.json")))["dim"] == 256
    p = pretrain(["config/1b.py", "--device=cpu", f"--data_dir={tmp_path}/nothing"], check=False)
    assert p.returncode == 1 and "prepare_data.py" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_exact_resume(tmp_path, data_dir):
    """N steps straight == N/2 steps, stop, resume N/2: same losses, val losses and final weights, bit
    for bit (dropout on, so the RNG state must survive the checkpoint too; copy drills on from step 3,
    so the stop falls in their phase)."""
    args = TINY + [f"--data_dir={data_dir}", "--max_steps=8", "--eval_interval=3", "--dropout=0.1",
                   "--conv_width=2", "--copy_start=3", "--copy_end=6", "--copy_frac=0.5"]
    straight, parts = str(tmp_path / "straight"), str(tmp_path / "parts")
    pretrain(args + [f"--out_dir={straight}"])
    pretrain(args + [f"--out_dir={parts}", "--stop_at_step=4"])
    assert torch.load(os.path.join(parts, "ckpt.pt"), weights_only=True)["step"] == 4
    pretrain(args + [f"--out_dir={parts}", "--init_from=resume"])
    assert records(straight) == records(parts) and len(records(straight)) == 8
    assert records(straight, "val_loss") == records(parts, "val_loss")
    a, b = params(straight), params(parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint_and_exits_cleanly(tmp_path, data_dir):
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "pretrain.py"), *TINY, f"--data_dir={data_dir}", f"--out_dir={out}",
           "--max_steps=100000", "--eval_interval=100000", "--sample_tokens=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait until training has really started: the log line of step 3
        lines.append(line)
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output[-3000:]
    assert "got SIGTERM" in output and "stopped after step" in output
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] >= 3 and f"stopped after step {ckpt['step']};" in output
    from checkpoint import load_model
    model, _, _ = load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    out = str(tmp_path / "run")
    args = TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=2", "--sample_tokens=0"]
    pretrain(args + ["--max_steps=2"])
    good = params(out)
    p = pretrain(args + ["--max_steps=20", "--init_from=resume", "--lr=1e30", "--lr_schedule=constant"], check=False)
    assert p.returncode == 1 and "diverged" in p.stderr and "last good checkpoint" in p.stderr
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 2 and all(torch.equal(good[k], ckpt["model"][k]) for k in good)


@pytest.mark.slow
def test_early_stopping_on_val_loss(tmp_path, data_dir):
    out = str(tmp_path / "run")
    p = pretrain(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_steps=50", "--eval_interval=2",
                         "--patience=2", "--lr=0", "--min_lr=0", "--sample_tokens=0"])  # lr 0: no progress
    assert "early stopping" in p.stdout
    assert [s for s, _ in records(out, "val_loss")] == [0, 2, 4]  # best at 0, then 2 evaluations without
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 4


# -- distributed: 2 processes on CPU with gloo ---------------------------------------------------------

DIST_ARGS = TINY + ["--max_steps=4", "--eval_interval=2", "--conv_width=2", "--copy_start=1", "--copy_end=2",
                    "--copy_frac=0.5"]  # copy drills too: each row's drill must not depend on who draws it


@pytest.fixture(scope="module")
def one_process_run(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one"))
    pretrain(DIST_ARGS + [f"--data_dir={data_dir}", f"--out_dir={out}", "--grad_accum=2"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, data_dir, one_process_run, parallel):
    """torchrun with 2 processes x grad_accum 1 vs 1 process x grad_accum 2: the same windows per step,
    so the same losses and weights up to float summation order. The 2-process run also stops after
    step 2 and resumes (checkpoints gathered from the shards under FSDP, and loaded back into them)."""
    two = str(tmp_path / "two")
    args = DIST_ARGS + [f"--data_dir={data_dir}", f"--out_dir={two}", f"--parallel={parallel}"]
    pretrain(args + ["--stop_at_step=2"], nproc=2)
    assert torch.load(os.path.join(two, "ckpt.pt"), weights_only=True)["step"] == 2
    pretrain(args + ["--init_from=resume"], nproc=2)
    losses, want = records(two), records(one_process_run)
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert np.allclose([v for _, v in losses], [v for _, v in want], rtol=0, atol=1e-5)
    a, b = params(two), params(one_process_run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


WORKER = r'''
import sys, numpy as np, torch, torch.distributed as dist
import common
from model import ModelConfig, Transformer
out = sys.argv[1]
ctx = common.setup({"device": "cpu", "dtype": "float32", "seed": 7})
data = np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16)
accum = 4 // ctx.world_size
for parallel in ("ddp", "fsdp"):
    torch.manual_seed(7 + ctx.rank)  # a different init on each rank: wrap_model must make them equal
    model = common.wrap_model(Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                                      max_seq_len=16)), ctx, parallel)
    opt = common.build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), "cpu")
    for step in range(3):
        for micro in range(accum):
            x, y = common.get_batch(data, 2, 16, (0, 0, step), ctx.rank, ctx.world_size, micro, accum)
            common.grad_sync(model, micro == accum - 1)
            _, loss = model(x, y)
            (loss / accum).backward()
            if step == 0 and micro == 0 and ctx.ddp and parallel == "ddp":  # no all-reduce happened yet
                g = common.unwrap(model).layers[0].attention.wq.weight.grad.sum().reshape(1)
                both = [torch.zeros(1) for _ in range(ctx.world_size)]
                dist.all_gather(both, g)
                assert not torch.equal(both[0], both[1]), "gradients were synced on an accumulation micro-step"
        common.step_optimizer(model, opt, ctx.scaler, 1.0)
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in common.unwrap(model).state_dict().items()}
    torch.save(state, f"{out}/{parallel}_rank{ctx.rank}.pt")
    del model, opt
common.shutdown()
'''


@pytest.mark.slow
def test_both_ranks_hold_identical_parameters(tmp_path):
    """DDP, then FSDP2: each rank writes the full parameters it holds (FSDP2: its shards gathered)
    after 3 steps of 2 ranks x 2 micro-steps. They are identical on both ranks and equal to one
    process doing 4 micro-steps per step on the same global batch."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    (tmp_path / "one").mkdir()
    run = lambda cmd: subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    p = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
             str(tmp_path)])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = run([sys.executable, str(script), str(tmp_path / "one")])
    assert p.returncode == 0, p.stderr[-3000:]
    for parallel in ("ddp", "fsdp"):
        r0, r1, one = (torch.load(tmp_path / f, weights_only=True)
                       for f in (f"{parallel}_rank0.pt", f"{parallel}_rank1.pt", f"one/{parallel}_rank0.pt"))
        for k in r0:
            assert torch.equal(r0[k], r1[k]), (parallel, k)
            torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=1e-5, msg=f"{parallel} {k}")
