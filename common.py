"""What the training stages share: processes and precision (setup), DDP/FSDP2 (wrap_model), AdamW and the
LR schedule, batches, probes, greedy replies, and a fine-tuning stage's plumbing (setup_stage, Run). The out
dir (checkpoints, metrics.jsonl) is checkpoint.py's. Stages import both; neither reads sys.argv.

Collectives (wrap_model, all_reduce_mean, stop_requested, Run) run on every rank; rank 0 writes the files.
"""
import math
import os
import random
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from checkpoint import (MetricsLogger, checkpoint_state, die, generate_replies, load_checkpoint, print0,
                        restore_checkpoint, save_checkpoint, write_json)
from data_formats import DataError, read_jsonl
from model import ModelConfig
from tokenizer import Tokenizer


# -- processes, devices, precision ---------------------------------------------------------------------------
def _cpu_has_fast_bf16():
    """Native bf16 dot products (AVX512-BF16, AMX): bf16 ~870 GFLOP/s vs fp32 ~215 here; emulated, slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def setup(config):
    """This process from torchrun's env (none: one process) and config device, dtype, seed, out_dir: joins the
    process group (NCCL on CUDA, gloo on CPU), seeds with seed + rank, writes out_dir/config.json. Returns ctx
    (device, dtype, autocast, scaler, rank, world_size, ddp, master, cpu_group, ...)."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = config.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = device.split(":")[0]
    if device_type == "cuda":
        if not torch.cuda.is_available():
            die("config asks device=cuda but torch sees no GPU; use --device=cpu")
        device = f"cuda:{local_rank}" if device == "cuda" else device  # one GPU per process
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (Ampere+)
        torch.backends.cudnn.allow_tf32 = True
    cpu_group = None
    if world_size > 1:
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=torch.device(device) if device_type == "cuda" else None)
        # host-side flags (stop requested?) go over gloo so they never wait on the GPU stream
        cpu_group = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD

    dtype = config.get("dtype", "auto")
    if dtype == "auto":
        if device_type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "bfloat16" if device_type == "cpu" and _cpu_has_fast_bf16() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        die(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    if dtype == "float16" and device_type != "cuda":
        die("dtype=float16 (with a GradScaler) is for GPUs without bf16; on CPU use bfloat16 or float32")
    ptdtype = getattr(torch, dtype)
    # mixed precision: weights, grads and optimizer state stay float32; matmuls run in bf16/fp16
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")

    seed = int(config.get("seed", 1337))
    seed_everything(seed + rank)  # each rank its own stream (dropout); wrap_model syncs the weights
    out_dir = config.get("out_dir")
    if out_dir and rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, "config.json"), config)
    return SimpleNamespace(device=device, device_type=device_type, dtype=dtype, ptdtype=ptdtype,
                           autocast=autocast, scaler=scaler, rank=rank, local_rank=local_rank,
                           world_size=world_size, ddp=world_size > 1, master=rank == 0, seed=seed,
                           out_dir=out_dir, cpu_group=cpu_group)


def shutdown():
    """Leave the process group, if any. gc first (FSDP/DDP state freed at exit can abort gloo); the barrier
    keeps every rank's connections up until all are done."""
    if dist.is_available() and dist.is_initialized():
        import gc
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def all_reduce_mean(ctx, x):
    """Mean of a tensor over ranks (a copy; x itself on one process)."""
    if not ctx.ddp:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / ctx.world_size


_signal_received = []


def catch_signals():
    """SIGTERM (preemption) and SIGINT (Ctrl-C) become a stop request for stop_requested(). A second Ctrl-C
    stops at once; later SIGTERMs are ignored: torchrun sends one after Ctrl-C, and the save must finish."""
    def handler(signum, frame):
        _signal_received.append(signum)
        print(f"\n[rank {os.environ.get('RANK', '0')}] got {signal.Signals(signum).name}: saving a "
              "checkpoint after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def stop_requested(ctx):
    """True if any rank got SIGTERM/SIGINT: all ranks agree, so they save and stop after the same step."""
    flag = torch.tensor([len(_signal_received)], dtype=torch.int32)
    if ctx.ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
    return bool(flag.item())


# -- model wrapping: DDP / FSDP2, activation checkpointing, torch.compile ------------------------------------
def wrap_model(model, ctx, parallel="ddp", compile=False, grad_checkpointing=False):
    """The model on ctx.device, ready to train: "ddp" all-reduces gradients; "fsdp" (FSDP2) shards weights,
    grads and optimizer state per block; grad_checkpointing recomputes blocks in backward."""
    model.to(ctx.device)
    if grad_checkpointing:
        if not hasattr(model, "grad_checkpointing"):
            raise TypeError(f"{type(model).__name__} has no grad_checkpointing flag")
        model.grad_checkpointing = True
    if parallel not in ("ddp", "fsdp"):
        die(f"parallel must be ddp or fsdp, not {parallel!r}")
    if ctx.ddp and parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        for t in list(model.parameters()) + list(model.buffers()):  # DDP broadcasts rank 0's init; FSDP does not
            dist.broadcast(t.data, src=0)
        mesh = init_device_mesh(ctx.device_type, (ctx.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if compile:
        model = torch.compile(model)
    if ctx.ddp and parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[ctx.local_rank] if ctx.device_type == "cuda" else None)
    return model


def unwrap(model):
    """The plain module inside DDP and torch.compile wrappers (an FSDP2 module is its own)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def is_fsdp(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(unwrap(model), FSDPModule)


def grad_sync(model, enabled):
    """False on all but the last accumulation micro-step: gradients add up locally, are reduced once."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = enabled  # what DDP.no_sync() toggles
    elif is_fsdp(model):
        unwrap(model).set_requires_gradient_sync(enabled)


@contextmanager
def generation_context(model):
    """Where unwrap(model).generate() works: under FSDP2 the root's parameters are gathered (call on ALL ranks)."""
    raw = unwrap(model) if is_fsdp(model) else None
    if raw is not None:
        raw.unshard()
    try:
        yield
    finally:
        if raw is not None:
            raw.reshard()


# -- optimizer and learning-rate schedules -------------------------------------------------------------------
def build_optimizer(model, lr, weight_decay, betas, device_type, eps=1e-8):
    """AdamW decaying matrices only (not norms or biases), as GPT-3/Llama; fused: 8 ms vs 51 ms for 16M params."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=device_type in ("cuda", "cpu"))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def step_optimizer(model, optimizer, scaler, grad_clip):
    """Unscale (fp16), clip to grad_clip (0: off), step, zero grads; returns the norm before clipping. A
    non-finite norm in fp32/bf16 skips the step (a divergence): the caller sees it and stops."""
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips the step when fp16 gradients overflowed, and lowers the scale
        scaler.update()
    elif torch.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def get_lr(step, config):
    """The lr at `step`, a pure function of the step: linear warmup to lr over warmup_steps, then lr_schedule:
    cosine: half a cosine down to min_lr at max_steps (GPT-3, Chinchilla).
    wsd: warmup-stable-decay (MiniCPM, Hu et al. 2024): lr, then linear to min_lr over the last wsd_decay_frac
        (a 20% cooldown matches cosine, Hägele et al. 2024); the stable phase extends from any checkpoint.
    sgdr: cosine cycles lr -> min_lr, each sgdr_cycle_mult times the last's length (Loshchilov & Hutter 2017).
    constant: lr."""
    c, schedule = config, config.get("lr_schedule", "cosine")
    if schedule not in ("cosine", "wsd", "sgdr", "constant"):
        raise ValueError(f"lr_schedule must be cosine, wsd, sgdr or constant, not {schedule!r}")
    lr, min_lr, warmup_steps, max_steps = c["lr"], c["min_lr"], c["warmup_steps"], c["max_steps"]
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "sgdr":
        t, length = step - warmup_steps, c.get("sgdr_cycle_steps") or max_steps
        while t >= length:
            t -= length
            length = max(1, round(length * c.get("sgdr_cycle_mult", 1.0)))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * t / length)) * (lr - min_lr)
    if step >= max_steps:
        return min_lr
    if schedule == "wsd":
        decay_steps = max(1, int(c.get("wsd_decay_frac", 0.2) * max_steps))
        decay_start = max_steps - decay_steps
        return lr if step < decay_start else lr + (min_lr - lr) * (step - decay_start) / decay_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# -- batches -------------------------------------------------------------------------------------------------
def get_batch(data, batch_size, seq_len, key, rank=0, world_size=1, micro_step=0, grad_accum=1, device="cpu",
              bos=None):
    """(x, y) int64 windows of a token array, y = x shifted by one. key seeds the step's global batch; rank
    r's micro-step m takes its rows from (m * world_size + r) * batch_size: a resume reads the same. With bos,
    a window moves on to the first document start inside it, if any, so a question shares its row with the
    passage before it (cf. nanochat's BOS-aligned rows; Zhao et al. 2024, "Analysing the Impact of Sequence...")."""
    n_rows = world_size * grad_accum * batch_size
    if len(data) <= seq_len + 1:
        raise ValueError(f"{len(data)} tokens are too few for windows of seq_len={seq_len}")
    last = len(data) - seq_len - 1
    starts = np.random.default_rng(key).integers(0, last, size=n_rows, endpoint=True)
    row0 = (micro_step * world_size + rank) * batch_size
    starts = starts[row0:row0 + batch_size]
    if bos is not None:
        for i, s in enumerate(starts):
            hit = np.flatnonzero(data[s:s + seq_len] == bos)
            starts[i] = min(last, s + int(hit[0])) if hit.size else s
    xy = torch.from_numpy(np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64))
    xy = xy.pin_memory().to(device, non_blocking=True) if str(device).startswith("cuda") else xy.to(device)
    return xy[:, :-1], xy[:, 1:]


def epoch_batches(model, examples, step, batch_size, grad_accum, ctx, seed):
    """This rank's micro-batches of step `step`, gradients synced on the last only, from an endless stream of
    per-epoch shuffles (random.Random(seed + epoch)): a pure function of the step, so a resume reads the same."""
    per_step, ids = batch_size * grad_accum * ctx.world_size, []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, k = divmod(i, len(examples))
        if k == 0 or not ids:
            order = list(range(len(examples)))
            random.Random(seed + epoch).shuffle(order)
        ids.append(order[k])
    for micro in range(grad_accum):
        grad_sync(model, micro == grad_accum - 1)
        yield [examples[i] for i in ids[(micro * ctx.world_size + ctx.rank) * batch_size:][:batch_size]]


# -- metrics -------------------------------------------------------------------------------------------------
@torch.no_grad()
def copy_probe(model, tok, n=16, length=40, seed=0):
    """Share of the second copy of a random sequence (BOS, seq, seq) an eval-mode model predicts greedily (its
    first token left out): induction heads (Olsson et al. 2022), ~0 for a model that cannot copy, ~1 if it can."""
    length = min(length, (model.cfg.max_seq_len - 1) // 2)
    if length < 2:
        raise ValueError(f"max_seq_len {model.cfg.max_seq_len} is too short for the copy probe (needs 5)")
    vocab = min(tok.vocab_size, model.cfg.vocab_size)
    ordinary = torch.tensor([i for i in range(vocab) if tok.token_bytes(i)])  # no special ids
    seq = ordinary[torch.randint(len(ordinary), (n, length), generator=torch.Generator().manual_seed(seed))]
    x = torch.cat([torch.full((n, 1), tok.bos_id), seq, seq], 1)
    logits, _ = model(x.to(model.tok_embeddings.weight.device))
    # logits at p predict token p + 1: the copy's tokens 1.. sit at length + 2.., so positions length + 1..
    return (logits[:, length + 1:-1].argmax(-1).cpu() == seq[:, 1:]).float().mean().item()


def measure_matmul_peak(device, dtype, n=None, seconds=0.5):
    """FLOP/s of a big square matmul in dtype on device, timed here: the peak MFU is quoted against."""
    n = n or (8192 if str(device).startswith("cuda") else 2048)
    g = torch.Generator(device="cpu").manual_seed(0)  # leaves the global RNG untouched
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds or k < 3:
        a @ b
        k += 1
        if k % 4 == 0:
            sync()
    sync()
    return 2 * n ** 3 * k / (time.perf_counter() - t0)


# -- a fine-tuning stage's plumbing: sft.py, rm.py and dpo.py ------------------------------------------------
def setup_stage(config, **model_config):
    """setup(config), signals caught, and where the stage starts: the checkpoint of init_from (out_dir's own
    when init_from='resume'), its ModelConfig with model_config changed, and its tokenizer."""
    ctx = setup(config)
    catch_signals()
    src = config["out_dir"] if config["init_from"] == "resume" else config["init_from"]
    ckpt = load_checkpoint(src)
    return ctx, ckpt, ModelConfig.from_dict({**ckpt["model_config"], **model_config}), Tokenizer.load(src)


def read_data(kind, *paths):
    """read_jsonl(path, kind) for each path (data_formats), or exit with its one-line error."""
    try:
        return [read_jsonl(path, kind, log=print0) for path in paths]
    except DataError as e:
        die(str(e))


def check_pairs(train, dev, too_long, max_len):
    """Say how many preference pairs are used and how many (train, dev) were too long; exit if none are left."""
    print0(f"pairs: {len(train)} train, {len(dev)} dev; skipped as longer than {max_len} tokens: {too_long[0]} "
           f"train, {too_long[1]} dev (identical pairs are counted in the 'lines skipped' above)")
    if not train or not dev:
        die("no usable pairs left; raise max_seq_len or check the data")


def answer_accuracy(model, tokenizer, chats, max_new_tokens, limit=0):
    """Share of the chats ending with an assistant reply (the first `limit`; 0: all) that the model answers
    greedily with exactly that reply, and (question, reply, reference) triples. Call it on every rank."""
    qa = [(c["messages"][:-1], c["messages"][-1]["content"]) for c in chats if c["messages"][-1]["role"] == "assistant"]
    qa = qa[:limit or None]
    with generation_context(model):
        replies = generate_replies(unwrap(model), tokenizer, [m for m, _ in qa], max_new_tokens)
    correct = sum(r.strip() == a.strip() for r, (_, a) in zip(replies, qa))
    return correct / max(1, len(qa)), [(m[-1]["content"], r, a) for r, (m, a) in zip(replies, qa)]


@torch.no_grad()
def dev_means(model, ctx, dev, batch_size, stats):
    """Means over all dev examples of stats(batch), a 1-D tensor of batch means, in eval mode. Rank r takes
    every world_size-th batch; past the end it runs example 0 with weight 0 (FSDP needs equal forward counts)."""
    model.eval()
    sums = 0
    for start in range(0, len(dev), batch_size * ctx.world_size):
        real = dev[start + ctx.rank * batch_size:start + (ctx.rank + 1) * batch_size]
        sums = sums + stats(real or dev[:1]) * len(real)
    model.train()
    return (all_reduce_mean(ctx, sums) * ctx.world_size / len(dev)).tolist()


class Run:
    """The books of a stage's loop (sft, rm, dpo, grpo): run.model wrapped, its AdamW run.optimizer, both restored
    with the GradScaler when init_from='resume'. steps() evaluates and checkpoints (extra goes into each; the best
    has the lowest record[best], the highest with maximize); log() logs a training step."""

    def __init__(self, ctx, config, model, ckpt, model_cfg, tokenizer, best="dev_loss", maximize=False, **extra):
        c = self.config = config
        self.ctx, self.best_key, self.maximize, self.resume = ctx, best, maximize, c["init_from"] == "resume"
        self.model = wrap_model(model, ctx, c.get("parallel", "ddp"), c["compile"])
        self.optimizer = build_optimizer(self.model, c["lr"], c["weight_decay"], (c["beta1"], c["beta2"]),
                                         ctx.device_type)
        self.start_step, self.best, self.eval_done = 0, -math.inf if maximize else math.inf, False
        if self.resume:
            restore_checkpoint(ctx, unwrap(self.model), self.optimizer, ckpt)
            if ckpt.get("scaler"):
                ctx.scaler.load_state_dict(ckpt["scaler"])
            self.start_step, self.best, self.eval_done = ckpt["step"], ckpt["best"], ckpt.get("eval_done", True)
            print0(f"resumed from {c['out_dir']} at step {self.start_step}")
        if ctx.master:
            tokenizer.save(c["out_dir"])
        self.logger = MetricsLogger(c["out_dir"], ctx.master, resume_step=self.start_step if self.resume else None)
        self.meta = dict(config=config, model_config=model_cfg.to_dict(), tokenizer=tokenizer.name, **extra)

    def save(self, step, is_best=False, eval_done=False):
        ckpt = checkpoint_state(self.ctx, unwrap(self.model), self.optimizer, step=step, eval_done=eval_done,
                                **self.meta, best=self.best, scaler=self.ctx.scaler.state_dict())
        if self.ctx.master:
            save_checkpoint(self.config["out_dir"], ckpt, self.config["keep_last"], is_best)

    def steps(self, evaluate):
        """The steps to train, start_step to max_steps - 1. Before every eval_interval-th and after the last (once:
        not again on resuming from the checkpoint saved after it), evaluate() -> dev metrics ({}: none) are logged
        and checkpointed. SIGTERM, or config's stop_at_step (as a preempted job): save and stop."""
        c, start = self.config, self.start_step
        self.t0, self.timed = time.perf_counter(), 0
        for step in range(start, c["max_steps"] + 1):
            if (step % c["eval_interval"] == 0 or step == c["max_steps"]) and not (step == start and self.eval_done):
                record = evaluate()
                if record:
                    self.logger.log({"step": step, **record})
                value = record.get(self.best_key, self.best)
                is_best = value > self.best if self.maximize else value < self.best
                self.best = max(self.best, value) if self.maximize else min(self.best, value)
                if step > start:
                    self.save(step, is_best, eval_done=True)
                self.t0, self.timed = time.perf_counter(), 0  # evaluation time is not training throughput
            if step == c["max_steps"]:
                return
            yield step
            if stop_requested(self.ctx) or step + 1 == c.get("stop_at_step"):
                self.save(step + 1)
                print0(f"stopped after step {step + 1}; continue with --init_from=resume")
                return

    def log(self, step, record, lr, grad_norm, tokens=0):
        """After step `step`: exit on a non-finite record['loss']; every log_interval steps (and the first) log
        record with lr, gradient norm, time per step, and tokens/s given the tokens of a step."""
        if not math.isfinite(record["loss"]):
            die(f"loss {record['loss']} at step {step + 1}: training diverged; try a lower lr")
        self.timed += 1
        if (step + 1) % self.config["log_interval"] == 0 or step == self.start_step:
            dt = (time.perf_counter() - self.t0) / self.timed
            speed = {"tok_per_s": tokens / dt} if tokens else {}
            self.logger.log({"step": step + 1, "max_steps": self.config["max_steps"], **record, "lr": lr,
                             "grad_norm": grad_norm.item(), **speed, "step_ms": 1000 * dt})
            self.t0, self.timed = time.perf_counter(), 0
