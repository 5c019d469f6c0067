"""What every stage shares: device and distributed setup, precision, optimizer, LR schedules,
atomic checkpoints with exact resume, memmap batches, metrics, early stopping, loading a trained model.

Stages (pretrain.py, sft.py, rm.py, dpo.py, grpo.py) use it like this, and keep their own data,
loss and loop in view:

    config = configure(globals())                        # configurator.py
    ctx = setup(config)                                  # torchrun env, device, dtype, seed, out_dir
    catch_signals()                                      # SIGTERM/SIGINT -> stop_requested(ctx)
    model = wrap_model(Transformer(cfg), ctx, parallel, compile, grad_checkpointing)
    optimizer = build_optimizer(model, lr, weight_decay, betas, ctx.device_type)
    for step in range(start, max_steps):
        set_lr(optimizer, get_lr(step, config))
        for micro in range(grad_accum):
            grad_sync(model, micro == grad_accum - 1)    # no all-reduce on accumulation micro-steps
            with ctx.autocast:
                _, loss = model(x, y)
            ctx.scaler.scale(loss / grad_accum).backward()
        grad_norm = step_optimizer(model, optimizer, ctx.scaler, grad_clip)
        ...
        if stop_requested(ctx):                          # every rank gathers, rank 0 writes
            ckpt = checkpoint_state(ctx, model, optimizer, step=step + 1, ...)
            if ctx.master: save_checkpoint(out_dir, ckpt)
            break

Nothing here reads sys.argv. Collective functions (wrap_model, checkpoint_state,
restore_checkpoint, all_reduce_mean, stop_requested) must be called on every rank; everything that
writes files does so on rank 0 only. Later stages and sample.py/serve.py read a finished run with
load_model(out_dir). An output dir holds ckpt.pt (the latest checkpoint), ckpt_best.pt (best on
validation), ckpt_<step>.pt (the last keep_last), tokenizer.model, config.json and metrics.jsonl.
"""
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from model import ModelConfig, Transformer
from tokenizer import Tokenizer


# -----------------------------------------------------------------------------------------------
# processes, devices, precision

def is_master():
    """True on rank 0 of a torchrun job, and in a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs):
    """print() on rank 0 only, flushed (logs of a torchrun job show one copy of each line)."""
    if is_master():
        print(*args, **kwargs, flush=True)


def die(message):
    """Stop the program with a one-line message (printed once, by rank 0) and exit status 1."""
    if is_master():
        print(message, file=sys.stderr, flush=True)
    sys.exit(1)


def _cpu_has_fast_bf16():
    """bf16 matmuls beat fp32 on CPUs with native bf16 dot products (AVX512-BF16, AMX); without them
    oneDNN emulates bf16 and is slower than fp32. This box: bf16 ~870 GFLOP/s vs fp32 ~215."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return " avx512_bf16" in flags or " amx_bf16" in flags
    except OSError:
        return False


def setup(config):
    """Set up this process from torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE; absent = one
    process) and the config keys device ('auto'|'cpu'|'cuda'|'cuda:1'|'mps'), dtype
    ('auto'|'bfloat16'|'float16'|'float32'), seed and out_dir (all optional).

    Joins the process group (NCCL on CUDA, gloo on CPU), pins one GPU per local rank, seeds python,
    numpy and torch with seed + rank, creates out_dir and writes config.json there (rank 0, atomic).
    Returns a namespace: device, device_type, dtype (str), ptdtype, autocast (a reusable context
    manager: bf16/fp16 autocast or a no-op), scaler (GradScaler, enabled only for float16), rank,
    local_rank, world_size, ddp (world_size > 1), master, seed, out_dir, cpu_group (a gloo group
    for small host-side collectives)."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = config.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = device.split(":")[0]
    if device_type == "cuda" and not torch.cuda.is_available():
        die("config asks device=cuda but torch sees no GPU; use --device=cpu")
    if device == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per process; a single process uses GPU 0
    if device_type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (Ampere+)
        torch.backends.cudnn.allow_tf32 = True
    cpu_group = None
    if world_size > 1:
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=torch.device(device) if device_type == "cuda" else None)
        # Host-side flags (stop requested?) go over gloo so they never wait on the GPU stream.
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
    # Mixed precision: weights, grads and optimizer state stay float32; matmuls run in bf16/fp16.
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
    """Leave the process group (call once at the end of a stage; harmless without one). Drop your
    references to the wrapped model and optimizer first (del model, optimizer): FSDP/DDP state holds
    the process group and its last communication handles, and freeing those during interpreter
    shutdown instead can abort the process (gloo). The barrier makes sure no rank tears down its
    connections while another still talks to it."""
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


# -----------------------------------------------------------------------------------------------
# SIGTERM / SIGINT: finish the step, save, exit cleanly

_signal_received = []


def catch_signals():
    """Turn SIGTERM (cluster preemption, torchrun shutting its workers down) and SIGINT (Ctrl-C) into
    a request that stop_requested() reports at the next step boundary. A second Ctrl-C stops at once
    (KeyboardInterrupt); further SIGTERMs are ignored, because torchrun sends one to every worker
    right after the terminal's Ctrl-C reached them, and that must not cut the save short."""
    def handler(signum, frame):
        _signal_received.append(signum)
        print(f"\n[rank {os.environ.get('RANK', '0')}] got {signal.Signals(signum).name}: saving a "
              "checkpoint after this step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def stop_requested(ctx):
    """True if any rank got SIGTERM/SIGINT. All ranks agree (one tiny all-reduce), so they all
    save and stop after the same step instead of waiting on each other forever."""
    flag = torch.tensor([len(_signal_received)], dtype=torch.int32)
    if ctx.ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
    return bool(flag.item())


# -----------------------------------------------------------------------------------------------
# model wrapping: DDP / FSDP2, activation checkpointing, torch.compile

def wrap_model(model, ctx, parallel="ddp", compile=False, grad_checkpointing=False):
    """Move the model to ctx.device and prepare it for training; returns the model to call.

    parallel="ddp": every rank holds the whole model, gradients are all-reduced (default).
    parallel="fsdp": FSDP2 fully_shard on each block, then on the root: parameters, gradients and
    optimizer state are sharded across ranks (for models whose optimizer state does not fit one GPU).
    grad_checkpointing: each block's activations are recomputed in backward (model.grad_checkpointing).
    compile: torch.compile the model. unwrap(returned) gives the plain Transformer back."""
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
        # DDP broadcasts rank 0's weights when it wraps; fully_shard keeps each rank's own slice, so
        # make every rank start from rank 0's initialization first.
        for t in list(model.parameters()) + list(model.buffers()):
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
    """Whether the next backward reduces gradients across ranks. Set it False on all but the last
    micro-step of gradient accumulation: the gradients then add up locally and are reduced once."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = enabled  # what DDP.no_sync() toggles
    elif is_fsdp(model):
        unwrap(model).set_requires_gradient_sync(enabled)


def generation_context(model):
    """A context in which unwrap(model).generate() works on every rank: under FSDP2 it gathers the
    root's sharded parameters first (the blocks gather their own). Call generate on ALL ranks."""
    raw = unwrap(model)
    if not is_fsdp(model):
        return nullcontext()

    class _Unsharded:
        def __enter__(self):
            raw.unshard()

        def __exit__(self, *exc):
            raw.reshard()
    return _Unsharded()


# -----------------------------------------------------------------------------------------------
# optimizer and learning-rate schedules

def build_optimizer(model, lr, weight_decay, betas, device_type, eps=1e-8):
    """AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only (>= 2-D: linear layers,
    embeddings) and none on norms' gains or biases, as in GPT-3/Llama. The fused kernel on CUDA and
    CPU (one pass over the state instead of a dozen: 8 ms instead of 51 ms per step for 16M
    parameters on one core here)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=device_type in ("cuda", "cpu"))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def step_optimizer(model, optimizer, scaler, grad_clip):
    """Unscale (fp16), clip the global gradient norm to grad_clip (0 = no clipping), step, update the
    scaler, zero the gradients. Returns the norm before clipping (a 0-d tensor). Without a scaler, a
non-finite norm skips the step (weights unchanged): check the returned norm and stop."""
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips the step when the fp16 gradients overflowed, and lowers the scale
        scaler.update()
    elif torch.isfinite(norm):
        optimizer.step()
    # else: NaN/inf gradients in fp32/bf16 are a real divergence; the weights stay as they were and
    # the caller sees the non-finite norm and stops.
    optimizer.zero_grad(set_to_none=True)
    return norm


def _warmup(step, lr, warmup_steps):
    # linear warmup: lr * (step + 1) / warmup_steps, reaching lr at step warmup_steps - 1
    return lr * (step + 1) / warmup_steps


def lr_cosine(step, lr, min_lr, warmup_steps, max_steps):
    """Linear warmup, then half a cosine from lr down to min_lr at max_steps (GPT-3, Chinchilla);
    min_lr after that."""
    if step < warmup_steps:
        return _warmup(step, lr, warmup_steps)
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def lr_wsd(step, lr, min_lr, warmup_steps, max_steps, decay_frac=0.2):
    """Warmup-stable-decay (MiniCPM, Hu et al. 2024): linear warmup, constant lr, then a linear decay
    to min_lr over the last decay_frac of max_steps (Hägele et al. 2024 find a 20% linear cooldown
    matches cosine). The stable phase can be extended and decayed from any checkpoint."""
    decay_steps = max(1, int(decay_frac * max_steps))
    decay_start = max_steps - decay_steps
    if step < warmup_steps:
        return _warmup(step, lr, warmup_steps)
    if step < decay_start:
        return lr
    if step >= max_steps:
        return min_lr
    return lr + (min_lr - lr) * (step - decay_start) / decay_steps


def lr_sgdr(step, lr, min_lr, warmup_steps, cycle_steps, cycle_mult=1.0):
    """SGDR (Loshchilov & Hutter 2017): linear warmup, then cosine cycles from lr to min_lr that
    restart at lr; the first cycle lasts cycle_steps, each next one cycle_mult times longer."""
    if step < warmup_steps:
        return _warmup(step, lr, warmup_steps)
    t, length = step - warmup_steps, cycle_steps
    while t >= length:
        t -= length
        length = max(1, round(length * cycle_mult))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * t / length)) * (lr - min_lr)


def get_lr(step, config):
    """The learning rate at `step` from the config keys lr, min_lr, warmup_steps, max_steps and
    lr_schedule: 'cosine', 'wsd' (uses wsd_decay_frac), 'sgdr' (sgdr_cycle_steps, sgdr_cycle_mult)
    or 'constant' (after warmup). A pure function of the step, so a resumed run gets the same lrs."""
    c = config
    schedule = c.get("lr_schedule", "cosine")
    if schedule == "cosine":
        return lr_cosine(step, c["lr"], c["min_lr"], c["warmup_steps"], c["max_steps"])
    if schedule == "wsd":
        return lr_wsd(step, c["lr"], c["min_lr"], c["warmup_steps"], c["max_steps"], c.get("wsd_decay_frac", 0.2))
    if schedule == "sgdr":
        return lr_sgdr(step, c["lr"], c["min_lr"], c["warmup_steps"], c.get("sgdr_cycle_steps") or c["max_steps"],
                       c.get("sgdr_cycle_mult", 1.0))
    if schedule == "constant":
        return _warmup(step, c["lr"], c["warmup_steps"]) if step < c["warmup_steps"] else c["lr"]
    raise ValueError(f"lr_schedule must be cosine, wsd, sgdr or constant, not {schedule!r}")


# -----------------------------------------------------------------------------------------------
# data: random windows of the token memmaps written by prepare_data.py

def get_batch(data, batch_size, seq_len, key, rank=0, world_size=1, micro_step=0, grad_accum=1, device="cpu"):
    """(x, y) int64 tensors (batch_size, seq_len) of windows from a 1-D token array, y = x shifted by 1.

    key: tuple of ints (e.g. (seed, 0, step)) seeding numpy's generator for this step's global batch
    of world_size * grad_accum * batch_size windows; rank r's micro-step m takes rows
    (m * world_size + r) * batch_size onwards. So every rank reads different data, a run resumed at
    step s reads exactly what it would have, and one process with grad_accum * world_size micro-steps
    sees the same global batch as world_size processes."""
    n_rows = world_size * grad_accum * batch_size
    if len(data) <= seq_len + 1:
        raise ValueError(f"{len(data)} tokens are too few for windows of seq_len={seq_len}")
    starts = np.random.default_rng(key).integers(0, len(data) - seq_len - 1, size=n_rows, endpoint=True)
    row0 = (micro_step * world_size + rank) * batch_size
    rows = np.stack([data[s:s + seq_len + 1] for s in starts[row0:row0 + batch_size]]).astype(np.int64)
    xy = torch.from_numpy(rows)
    if str(device).startswith("cuda"):
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    return xy[:, :-1], xy[:, 1:]


def epoch_indices(step, per_step, n, seed):
    """Indices into n examples for step `step`'s global batch of per_step, read from an endless stream of
    per-epoch shuffles (epoch e shuffled by random.Random(seed + e)): a pure function of the step, so a
    resumed run reads exactly what it would have. The example-level stages (rm.py, dpo.py) use it."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, k = divmod(i, n)
        if k == 0 or not out:
            order = list(range(n))
            random.Random(seed + epoch).shuffle(order)
        out.append(order[k])
    return out

# -----------------------------------------------------------------------------------------------
# checkpoints: plain tensors and builtins, atomic writes, exact resume

def write_json(path, obj):
    """Write JSON atomically (temp file + os.replace); tuples become lists."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def atomic_save(obj, path):
    """torch.save to path + '.tmp', fsync, os.replace onto path. If anything fails (a full disk),
    the temp file is removed and whatever was at path before is untouched."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path) or ".")


def _fsync_dir(path):
    try:  # make the rename itself durable (POSIX); not possible on every OS
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _publish(src, dst):
    """Make dst name the same file as src, atomically: a hard link (no copy), or a copy where the
    filesystem has no hard links."""
    tmp = dst + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def rng_state():
    """This process's python, numpy, torch and CUDA RNG states as tensors, lists and numbers
    (weights_only-loadable)."""
    py = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def checkpoint_state(ctx, model, optimizer=None, **extra):
    """Everything a resume needs, gathered to rank 0 as plain CPU tensors: model weights (full, also
    under FSDP), optimizer state keyed by parameter name, every rank's RNG states, plus the extra
    items (step, config, model_config, data position, ...). Collective: call on every rank.
    Returns the dict on rank 0 and None elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    raw = unwrap(model)
    opts = _state_dict_options(cpu_offload=True)
    ckpt = {"model": get_model_state_dict(raw, options=opts)}
    if optimizer is not None:
        ckpt["optimizer"] = get_optimizer_state_dict(raw, optimizer, options=opts)
    rngs = [rng_state()]
    if ctx.ddp:
        rngs = [None] * ctx.world_size
        dist.all_gather_object(rngs, rng_state(), group=ctx.cpu_group)
    ckpt["rng"] = rngs
    ckpt.update(extra)
    return ckpt if ctx.master else None


def save_checkpoint(out_dir, ckpt, keep_last=2, is_best=False):
    """Write ckpt (from checkpoint_state; needs ckpt['step']) as out_dir/ckpt_<step>.pt atomically,
    then point ckpt.pt (and ckpt_best.pt if is_best) at it and delete all but the newest keep_last
    step files. On rank 0 only. If the write fails (disk full), the previous checkpoints are intact
    and the error says so."""
    path = os.path.join(out_dir, f"ckpt_{ckpt['step']:08d}.pt")
    try:
        atomic_save(ckpt, path)
    except OSError as e:
        raise OSError(e.errno, f"could not write {path} ({e.strerror or e}); the previous checkpoint "
                      f"{os.path.join(out_dir, 'ckpt.pt')} is unchanged") from e
    _publish(path, os.path.join(out_dir, "ckpt.pt"))
    if is_best:
        _publish(path, os.path.join(out_dir, "ckpt_best.pt"))
    steps = sorted(f for f in os.listdir(out_dir) if f.startswith("ckpt_0") and f.endswith(".pt"))
    for f in steps[:-max(1, keep_last)]:
        os.remove(os.path.join(out_dir, f))  # ckpt.pt / ckpt_best.pt keep their own links
    _fsync_dir(out_dir)
    return path


def load_checkpoint(path):
    """torch.load(path, weights_only=True) onto the CPU (memory-mapped), with one-line errors."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}: train one first (python pretrain.py config/tiny.py), "
            f"or use init_from='scratch'")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated file, pickle of arbitrary objects, ...
        die(f"{path} is not a loadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})")


MODEL_SHAPE_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings")


def check_model_config(saved, wanted, where):
    """die() with one line listing the differences if the model shape in a checkpoint (saved, a dict)
    differs from the one the config asks for (wanted, a dict); keys absent from wanted are ignored."""
    full = ModelConfig.from_dict(wanted).to_dict()  # fills in the derived ffn_dim
    diff = [f"{k}={saved.get(k)!r} (config says {full[k]!r})"
            for k in MODEL_SHAPE_KEYS if k in wanted and saved.get(k) != full[k]]
    if diff:
        die(f"{where} holds a model of another shape: {', '.join(diff)}; use a new out_dir, "
            f"init_from='scratch', or the config that trained it")


def restore_checkpoint(ctx, model, optimizer, ckpt):
    """Load weights, optimizer state and this rank's RNG states from a checkpoint_state dict into a
    wrapped model (DDP or FSDP2; every rank passes the full checkpoint). Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    raw = unwrap(model)
    try:
        set_model_state_dict(raw, ckpt["model"], options=_state_dict_options())
    except RuntimeError as e:
        die(f"checkpoint does not fit this model: {str(e).splitlines()[0]} ...")
    if optimizer is not None and "optimizer" in ckpt:
        set_optimizer_state_dict(raw, optimizer, ckpt["optimizer"], options=_state_dict_options())
    rngs = ckpt.get("rng") or []
    if ctx.rank < len(rngs):
        set_rng_state(rngs[ctx.rank])
    else:
        print(f"[rank {ctx.rank}] checkpoint has no RNG state for this rank (it had {len(rngs)} ranks); "
              f"keeping the seed-based state", flush=True)


def load_model(out_dir, device="cpu", name="ckpt.pt"):
    """A trained model from an output dir, for later stages (init_from), sample.py and serve.py.
    Returns (model in eval mode on device, Tokenizer from out_dir, checkpoint dict without the
    'model' and 'optimizer' tensors: step, config, model_config, ...)."""
    path = os.path.join(out_dir, name)
    ckpt = load_checkpoint(path)
    if "model_config" not in ckpt:
        die(f"{path} has no model_config: not a checkpoint written by this codebase")
    model = Transformer(ModelConfig.from_dict(ckpt["model_config"]))
    try:
        model.load_state_dict(ckpt.pop("model"))
    except RuntimeError as e:
        die(f"{path} does not match its own model_config: {str(e).splitlines()[0]}")
    ckpt.pop("optimizer", None)
    try:
        tokenizer = Tokenizer.load(out_dir)
    except (FileNotFoundError, OSError) as e:
        die(f"{out_dir} has a checkpoint but no tokenizer ({e}); copy the data dir's tokenizer.model there")
    return model.to(device).eval(), tokenizer, ckpt


@torch.no_grad()
def copy_probe(model, tok, n=16, length=40, seed=0):
    """How well a model copies from its context: the share of the second copy of a repeated random
    sequence (BOS, then `length` random ordinary tokens, twice) that it predicts greedily, leaving out the
    copy's first token (nothing before it says what comes next). That is the signature of induction heads
    (Olsson et al. 2022), the circuit that reads a value out of a source: ~0 for a model that cannot copy
    from its context, near 1 for one that can. pretrain.py logs it at every evaluation.
    Run it on a model in eval mode (dropout off), as load_model returns it."""
    length = min(length, (model.cfg.max_seq_len - 1) // 2)
    if length < 2:
        raise ValueError(f"max_seq_len {model.cfg.max_seq_len} is too short for the copy probe (needs 5)")
    vocab = min(tok.vocab_size, model.cfg.vocab_size)
    ordinary = torch.tensor([i for i in range(vocab) if tok.token_bytes(i)])  # no special ids
    g = torch.Generator().manual_seed(seed)
    seq = ordinary[torch.randint(len(ordinary), (n, length), generator=g)]
    x = torch.cat([torch.full((n, 1), tok.bos_id), seq, seq], 1)
    logits, _ = model(x.to(model.tok_embeddings.weight.device))
    # logits at position p predict token p + 1: the copy's tokens 1.. sit at length + 2.., so positions length + 1..
    return (logits[:, length + 1:-1].argmax(-1).cpu() == seq[:, 1:]).float().mean().item()


# -----------------------------------------------------------------------------------------------
# metrics, throughput, early stopping

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


def format_duration(seconds):
    seconds = int(max(0, seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Appends one JSON object per call to out_dir/metrics.jsonl (rank 0) and prints a readable line.
    A fresh run truncates the file; a resumed run (resume_step) keeps the records up to that step and
    drops the ones a killed run wrote after its last checkpoint."""

    def __init__(self, out_dir, enabled=True, resume_step=None):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if not enabled:
            return
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def log(self, record, echo=True):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if echo:
            print(format_metrics(record), flush=True)


def format_metrics(r):
    """'step 120/2000 | loss 3.1416 | lr 6.0e-04 | gnorm 0.91 | 5.1k tok/s | MFU 58.3% | ETA 4m10s'
    from a record dict; keys it does not know are shown as 'key value'."""
    parts = []
    for k, v in r.items():
        if k == "step":
            parts.append(f"step {v}" + (f"/{r['max_steps']}" if "max_steps" in r else ""))
        elif k == "max_steps":
            continue
        elif k == "lr":
            parts.append(f"lr {v:.2e}")
        elif k == "grad_norm":
            parts.append(f"gnorm {v:.3f}")
        elif k == "tok_per_s":
            parts.append(f"{v / 1000:.1f}k tok/s")
        elif k == "mfu":
            parts.append(f"MFU {100 * v:.1f}%")
        elif k == "step_ms":
            parts.append(f"{v:.0f}ms/step")
        elif k == "eta_s":
            parts.append(f"ETA {format_duration(v)}")
        elif isinstance(v, float):
            parts.append(f"{k} {v:.4f}")
        else:
            parts.append(f"{k} {v}")
    return " | ".join(parts)


class EarlyStopping:
    """Tracks the best validation loss. update(loss) -> (is_best, should_stop): should_stop once
    `patience` evaluations in a row failed to beat the best by more than min_delta (patience 0:
    never stop). state_dict()/load_state_dict() carry it through a resume."""

    def __init__(self, patience=0, min_delta=0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.bad_evals = float("inf"), 0

    def update(self, loss):
        if loss < self.best - self.min_delta:
            self.best, self.bad_evals = loss, 0
            return True, False
        self.bad_evals += 1
        return False, self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self):
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, d):
        self.best, self.bad_evals = d["best"], d["bad_evals"]


# -----------------------------------------------------------------------------------------------
# chat models as functions: greedy replies (sft.py, dpo.py evals) and a reward model (rm.py -> grpo.py)

@torch.no_grad()
def generate_replies(model, tokenizer, conversations, max_new_tokens=64, batch_size=64, temperature=0.0,
                     generator=None):
    """The model's reply (text) to each conversation, a list of messages ending with a user turn;
    greedy unless temperature > 0. model is a plain Transformer (unwrap(model); under FSDP call it on
    every rank inside generation_context). A prompt too long for max_seq_len - max_new_tokens keeps
    BOS and its last tokens."""
    was_training = model.training
    model.eval()
    limit = model.cfg.max_seq_len - max_new_tokens
    replies = []
    for i in range(0, len(conversations), batch_size):
        prompts = [tokenizer.render_chat(m, add_generation_prompt=True)[0] for m in conversations[i:i + batch_size]]
        prompts = [p if len(p) <= limit else p[:1] + p[len(p) - limit + 1:] for p in prompts]
        out = [[] for _ in prompts]
        for toks, active in model.generate(prompts, max_new_tokens, temperature=temperature,
                                           stop_ids=tokenizer.stop_ids, generator=generator):
            for r, (t, a) in enumerate(zip(toks.tolist(), active.tolist())):
                if a and t not in tokenizer.stop_ids:
                    out[r].append(t)
        replies += [tokenizer.decode(o) for o in out]
    model.train(was_training)
    return replies


def load_reward_fn(out_dir, device="cpu", batch_size=32):
    """score(conversations) for a reward model trained by rm.py: a list of messages (prompt turns and
    the assistant reply to judge, last) -> float, or a list of such conversations -> list of floats.

    rm.py stores the transformer's weights plus reward_head.weight (1, dim) and reward_head.bias (1,);
    the reward is reward_head(h) where h is the final hidden state at the last token of the rendered
    conversation (render_chat without a generation prompt). A conversation longer than max_seq_len
    keeps BOS and its last tokens."""
    path = os.path.join(out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path)
    state = dict(ckpt["model"])
    if "reward_head.weight" not in state:
        die(f"{path} has no reward head: it is not a reward model; train one with `python rm.py`")
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    head = nn.Linear(cfg.dim, 1)
    head.load_state_dict({"weight": state.pop("reward_head.weight"), "bias": state.pop("reward_head.bias")})
    model = Transformer(cfg)
    model.load_state_dict(state)
    model, head = model.to(device).eval(), head.to(device).eval()
    tokenizer = Tokenizer.load(out_dir)

    @torch.no_grad()
    def score(conversations):
        single = bool(conversations) and isinstance(conversations[0], dict)
        convs = [conversations] if single else conversations
        rewards = []
        for i in range(0, len(convs), batch_size):
            seqs = [tokenizer.render_chat(m)[0] for m in convs[i:i + batch_size]]
            seqs = [s if len(s) <= cfg.max_seq_len else s[:1] + s[len(s) - cfg.max_seq_len + 1:] for s in seqs]
            lengths = torch.tensor([len(s) for s in seqs], device=device)
            idx = torch.full((len(seqs), int(lengths.max())), tokenizer.pad_id, dtype=torch.long, device=device)
            for r, s in enumerate(seqs):
                idx[r, :len(s)] = torch.tensor(s)
            h = model.hidden_states(idx)[torch.arange(len(seqs), device=device), lengths - 1]
            rewards += head(h).squeeze(-1).float().tolist()
        return rewards[0] if single else rewards
    return score
