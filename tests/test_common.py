"""common.py and checkpoint.py: schedules, optimizer groups, batches, atomic checkpoints, exact RNG/optimizer
restore, load_model, metrics, signals. Single process, CPU, models of a few thousand parameters."""
import errno
import json
import math
import os
import random
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import checkpoint
import common
from model import ModelConfig, Transformer
from tokenizer import train_tokenizer

TINY = dict(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
CPU = SimpleNamespace(ddp=False, rank=0, world_size=1, master=True, device="cpu", device_type="cpu", cpu_group=None)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **kw}))


def train_steps(model, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x = torch.randint(0, TINY["vocab_size"], (2, 16), generator=g)
        _, loss = model(x, x)
        loss.backward()
        common.step_optimizer(model, opt, torch.amp.GradScaler("cpu", enabled=False), 1.0)
        losses.append(loss.item())
    return losses


# -- learning-rate schedules -----------------------------------------------------------------------

def test_cosine_schedule_at_known_steps():
    f = lambda s: common.get_lr(s, dict(lr_schedule="cosine", lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110))
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)                       # peak right after warmup
    assert f(60) == pytest.approx(0.55)                      # halfway: (lr + min_lr) / 2
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))    # monotone decay


def test_wsd_schedule_at_known_steps():
    f = lambda s: common.get_lr(s, dict(lr_schedule="wsd", lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=100,
                                        wsd_decay_frac=0.2))
    assert f(4) == pytest.approx(0.5)
    assert f(10) == f(50) == f(79) == 1.0                    # stable until the last 20%
    assert f(80) == pytest.approx(1.0) and f(90) == pytest.approx(0.5) and f(95) == pytest.approx(0.25)
    assert f(100) == 0.0 and f(1000) == 0.0


def test_sgdr_schedule_restarts():
    f = lambda s: common.get_lr(s, dict(lr_schedule="sgdr", lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10 ** 6,
                                        sgdr_cycle_steps=10, sgdr_cycle_mult=1.0))
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == 1.0 and f(15) == pytest.approx(0.5)
    g = lambda s: common.get_lr(s, dict(lr_schedule="sgdr", lr=1.0, min_lr=0.0, warmup_steps=5, max_steps=10 ** 6,
                                        sgdr_cycle_steps=10, sgdr_cycle_mult=2.0))
    assert g(2) == pytest.approx(0.6)
    # cycles of 10, 20, 40 steps after 5 warmup steps: restarts at 15 and 35
    assert g(5) == 1.0 and g(15) == 1.0 and g(25) == pytest.approx(0.5) and g(35) == 1.0 and g(55) == pytest.approx(0.5)
    assert g(14) < 0.05 and g(34) < 0.01


def test_get_lr_dispatch():
    c = dict(lr=1.0, min_lr=0.0, warmup_steps=2, max_steps=10)
    assert common.get_lr(6, {**c, "lr_schedule": "cosine"}) == pytest.approx(0.5)
    assert common.get_lr(5, {**c, "lr_schedule": "wsd", "wsd_decay_frac": 0.5}) == 1.0
    assert common.get_lr(2, {**c, "lr_schedule": "sgdr", "sgdr_cycle_steps": 4}) == 1.0
    assert common.get_lr(6, {**c, "lr_schedule": "sgdr", "sgdr_cycle_steps": 4}) == 1.0
    assert common.get_lr(0, {**c, "lr_schedule": "constant"}) == 0.5
    assert common.get_lr(9, {**c, "lr_schedule": "constant"}) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        common.get_lr(0, {**c, "lr_schedule": "linear"})


# -- optimizer --------------------------------------------------------------------------------------

def test_weight_decay_only_on_matrices():
    model = tiny_model()
    opt = common.build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 2 * TINY["n_layers"] + 1  # two norms per block + final norm
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()


def test_step_optimizer_clips_and_refuses_nonfinite_gradients():
    model = tiny_model()
    opt = common.build_optimizer(model, 1e-3, 0.0, (0.9, 0.95), "cpu")
    x = torch.randint(0, 320, (2, 16))
    (model(x, x)[1] * 1000).backward()
    norm = common.step_optimizer(model, opt, torch.amp.GradScaler("cpu", enabled=False), 1.0)
    assert norm > 1.0 and all(p.grad is None for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(x, x)[1].backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    norm = common.step_optimizer(model, opt, torch.amp.GradScaler("cpu", enabled=False), 1.0)
    assert not torch.isfinite(norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights untouched


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 320, (2, 16))
    grads = []
    for flag in (False, True):
        model = common.wrap_model(tiny_model(), CPU, grad_checkpointing=flag)
        assert common.unwrap(model).grad_checkpointing is flag
        model(x, x)[1].backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# -- batches ----------------------------------------------------------------------------------------

def test_get_batch_is_deterministic_and_splits_the_global_batch():
    data = np.arange(10_000, dtype=np.uint16)
    x, y = common.get_batch(data, 4, 16, (1, 0, 7))
    assert x.dtype == torch.int64 and x.shape == (4, 16) and torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal((y - x), torch.ones_like(x))                      # y is x shifted by one
    assert torch.equal(common.get_batch(data, 4, 16, (1, 0, 7))[0], x)  # same key, same batch
    assert not torch.equal(common.get_batch(data, 4, 16, (1, 0, 8))[0], x)
    # 2 ranks x 2 micro-steps see exactly the rows one process sees in 4 micro-steps
    ranks = [common.get_batch(data, 2, 16, (1, 0, 3), rank=r, world_size=2, micro_step=m, grad_accum=2)[0]
             for m in range(2) for r in range(2)]
    single = [common.get_batch(data, 2, 16, (1, 0, 3), micro_step=m, grad_accum=4)[0] for m in range(4)]
    assert torch.equal(torch.cat(ranks), torch.cat(single))
    assert len({tuple(r[:, 0].tolist()) for r in ranks}) == 4            # every rank/micro-step different


def test_get_batch_aligned_rows_start_at_a_document():
    """With bos, a row moves on to the first document start inside its window, else stays where it is."""
    data = np.arange(10_000, dtype=np.uint16)                      # each token is its position...
    data[::50] = 0                                                  # ...but a document starts every 50 (BOS 0)
    start = lambda row: int(row[1]) - 1 if row[1] else int(row[2]) - 2  # noqa: E731 (a row's position in data)
    x, y = common.get_batch(data, 64, 64, (1, 0, 7), bos=0)
    plain = common.get_batch(data, 64, 64, (1, 0, 7))[0]
    assert (x[:, 0] == 0).all() and torch.equal(y[:, :-1], x[:, 1:])
    assert [start(r) for r in x] == [start(p) + int(np.argmax(p.numpy() == 0)) for p in plain]
    data[::50] = 7                                                  # no document start in reach: rows unchanged
    assert torch.equal(common.get_batch(data, 4, 16, (1, 0, 7), bos=0)[0], common.get_batch(data, 4, 16, (1, 0, 7))[0])


# -- checkpoints ------------------------------------------------------------------------------------

def fake_ckpt(step, value=0.0):
    return {"step": step, "model": {"w": torch.full((3,), float(value))}, "model_config": dict(TINY)}


def test_save_checkpoint_keeps_last_k_and_best(tmp_path):
    for step in range(1, 6):
        checkpoint.save_checkpoint(str(tmp_path), fake_ckpt(step, step), keep_last=2, is_best=step == 2)
    files = sorted(os.listdir(tmp_path))
    assert files == ["ckpt.pt", "ckpt_00000004.pt", "ckpt_00000005.pt", "ckpt_best.pt"]
    load = lambda f: torch.load(tmp_path / f, weights_only=True)
    assert load("ckpt.pt")["step"] == 5 and load("ckpt_best.pt")["step"] == 2
    assert not any(f.endswith(".tmp") for f in files)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(str(tmp_path), fake_ckpt(1, 1.0))
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        f.write(b"half a checkpoint")  # some bytes reach the disk, then it fills up
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="previous checkpoint .*ckpt.pt is unchanged"):
        checkpoint.save_checkpoint(str(tmp_path), fake_ckpt(2, 2.0))
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt_00000001.pt"]  # no temp file left behind


def test_load_checkpoint_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        checkpoint.load_checkpoint(str(tmp_path / "missing.pt"))
    assert "no checkpoint" in capsys.readouterr().err
    torch.save({"step": 1, "obj": SimpleNamespace(a=1)}, tmp_path / "pickled.pt")  # not weights_only-safe
    with pytest.raises(SystemExit):
        checkpoint.load_checkpoint(str(tmp_path / "pickled.pt"))
    assert "not a loadable checkpoint" in capsys.readouterr().err
    checkpoint.save_checkpoint(str(tmp_path), fake_ckpt(3))
    with open(tmp_path / "ckpt.pt", "r+b") as f:  # truncate the file under the link
        f.truncate(100)
    with pytest.raises(SystemExit):
        checkpoint.load_checkpoint(str(tmp_path))
    assert "not a loadable checkpoint" in capsys.readouterr().err


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    common.seed_everything(5)
    torch.rand(3), np.random.rand(3), random.random()
    torch.save({"rng": checkpoint.rng_state()}, tmp_path / "r.pt")
    a = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn(3))
    checkpoint.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    b = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and np.array_equal(a[3], b[3])


def test_checkpoint_restore_continues_bit_exactly(tmp_path):
    """Train 3 steps, checkpoint, train 3 more; restoring the checkpoint into a fresh model and
    optimizer and training the same 3 steps gives the same losses and weights, bit for bit."""
    model = tiny_model(dropout=0.1)  # dropout consumes the torch RNG, so its state must come back too
    opt = common.build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), "cpu")
    train_steps(model, opt, 3, seed=1)
    ckpt = checkpoint.checkpoint_state(CPU, model, opt, step=3, model_config=model.cfg.to_dict())
    checkpoint.save_checkpoint(str(tmp_path), ckpt)
    want = train_steps(model, opt, 3, seed=2)
    model2 = tiny_model(seed=99, dropout=0.1)
    opt2 = common.build_optimizer(model2, 1e-2, 0.1, (0.9, 0.95), "cpu")
    torch.rand(10)  # disturb the RNG: restore must undo it
    checkpoint.restore_checkpoint(CPU, model2, opt2, checkpoint.load_checkpoint(str(tmp_path)))
    assert train_steps(model2, opt2, 3, seed=2) == want
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_check_model_config_names_the_difference(capsys):
    saved = ModelConfig(**TINY).to_dict()
    checkpoint.check_model_config(saved, dict(TINY), "x/ckpt.pt")  # same shape: fine
    checkpoint.check_model_config(saved, {**TINY, "max_seq_len": 64}, "x/ckpt.pt")  # context length may change
    with pytest.raises(SystemExit):
        checkpoint.check_model_config(saved, {**TINY, "dim": 64}, "x/ckpt.pt")
    err = capsys.readouterr().err
    assert "x/ckpt.pt" in err and "dim=32" in err and "64" in err and len(err.strip().splitlines()) == 1


def test_restore_into_another_shape_fails_with_one_line(capsys):
    ckpt = checkpoint.checkpoint_state(CPU, tiny_model(), None, step=0)
    with pytest.raises(SystemExit):
        checkpoint.restore_checkpoint(CPU, tiny_model(dim=64, n_heads=4), None, ckpt)
    assert "does not fit" in capsys.readouterr().err


def test_load_model_round_trip(tmp_path):
    r = random.Random(0)
    texts = [f"{r.choice(['Kami', 'Lobo', 'Tina'])} has {r.randint(1, 99)} {r.choice(['apples', 'books', 'cats'])}. 你好，世界。"
             for _ in range(300)]
    tok = train_tokenizer(texts, 320, str(tmp_path / "tokenizer.model"))
    model = tiny_model()
    ckpt = checkpoint.checkpoint_state(CPU, model, common.build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu"),
                                   step=7, model_config=model.cfg.to_dict(), config={"lr": 1e-3})
    checkpoint.save_checkpoint(str(tmp_path), ckpt)
    loaded, tokenizer, meta = checkpoint.load_model(str(tmp_path), "cpu")
    assert not loaded.training and tokenizer.vocab_size == tok.vocab_size
    assert meta["step"] == 7 and meta["config"] == {"lr": 1e-3} and "model" not in meta and "optimizer" not in meta
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


# -- setup, metrics, signals ----------------------------------------------------------------------

def test_setup_single_process_cpu(tmp_path, monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    config = {"out_dir": str(tmp_path / "run"), "device": "cpu", "dtype": "float32", "seed": 3, "betas": (0.9, 0.95)}
    ctx = common.setup(config)
    assert (ctx.device, ctx.ddp, ctx.master, ctx.world_size, ctx.dtype) == ("cpu", False, True, 1, "float32")
    assert not ctx.scaler.is_enabled()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["betas"] == [0.9, 0.95]
    a = torch.rand(2)
    common.setup(config)
    assert torch.equal(torch.rand(2), a)  # seeded
    ctx = common.setup({**config, "dtype": "bfloat16"})
    with ctx.autocast:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(SystemExit):
        common.setup({**config, "dtype": "float16"})  # fp16 + GradScaler is for GPUs


def test_metrics_logger_line_and_resume(tmp_path, capsys):
    log = checkpoint.MetricsLogger(str(tmp_path))
    for step in (10, 20, 30):
        log.log({"step": step, "max_steps": 100, "loss": 2.5, "lr": 3e-4, "grad_norm": 0.5, "tok_per_s": 12345.0,
                 "mfu": 0.61, "eta_s": 130.0})
    line = capsys.readouterr().out.splitlines()[0]
    assert line == "step 10/100 | loss 2.5000 | lr 3.00e-04 | gnorm 0.500 | 12.3k tok/s | MFU 61.0% | ETA 2m10s"
    checkpoint.MetricsLogger(str(tmp_path), resume_step=20)  # a run resumed at step 20 drops step 30
    steps = [json.loads(ln)["step"] for ln in open(tmp_path / "metrics.jsonl")]
    assert steps == [10, 20]
    checkpoint.MetricsLogger(str(tmp_path))  # a fresh run starts a fresh file
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_sigterm_is_turned_into_a_stop_request():
    old_term, old_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        common._signal_received.clear()
        common.catch_signals()
        assert not common.stop_requested(CPU)
        os.kill(os.getpid(), signal.SIGTERM)
        assert common.stop_requested(CPU)
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM (torchrun's, after Ctrl-C) is ignored
        assert common.stop_requested(CPU) and len(common._signal_received) == 1
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 0)  # let the handler run
    finally:
        common._signal_received.clear()
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


def test_measure_matmul_peak_is_positive():
    assert common.measure_matmul_peak("cpu", torch.float32, n=128, seconds=0.01) > 1e6
