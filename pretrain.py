"""Pretraining: next-token prediction on the token memmaps written by prepare_data.py.

    python prepare_data.py demo && python pretrain.py config/tiny.py   # laptop CPU, minutes
    torchrun --nproc_per_node=8 pretrain.py config/1b.py               # 8 GPUs (more nodes: torchrun --nnodes ...)

It minimizes the mean next-token cross-entropy L = -1/N sum_t log p(x_{t+1} | x_{<=t}) over random windows of
data_dir/train.bin, some rows replaced by copy drills if asked. Every eval_interval steps: validation loss, bits
per byte, the copy probe, samples and a checkpoint. Writes out_dir/{ckpt.pt, ckpt_best.pt, tokenizer.model,
config.json, metrics.jsonl}. SIGTERM or Ctrl-C saves and exits; --init_from=resume (or 'auto') continues exactly.
"""
import math
import os
import time

import numpy as np
import torch

from checkpoint import (MetricsLogger, check_model_config, checkpoint_state, die, load_checkpoint, print0,
                        restore_checkpoint, save_checkpoint)
from common import (all_reduce_mean, build_optimizer, catch_signals, copy_probe, generation_context, get_batch, get_lr,
                    grad_sync, measure_matmul_peak, set_lr, setup, shutdown, step_optimizer, stop_requested, unwrap,
                    wrap_model)
from configurator import configure
from data_formats import DataError, check_vocab, load_meta, open_tokens
from model import IGNORE_INDEX, ModelConfig, Transformer
from tokenizer import Tokenizer

# config: defaults train a small model on the demo world; config/*.py and --key=value override
data_dir = "data/demo/pretrain"
out_dir = "out/pretrain"
init_from = "scratch"    # scratch | resume (out_dir/ckpt.pt) | auto (resume if it exists) | an out dir to start from
# model (model.ModelConfig); max_seq_len is also the training window
vocab_size = None        # None: the data's vocabulary size (meta.json)
dim = 256
n_layers = 4
n_heads = 8
n_kv_heads = 4
ffn_dim = None           # None: 8/3 * dim rounded up to a multiple of 64
max_seq_len = 256
rope_theta = 10000.0
norm_eps = 1e-5
tie_embeddings = True
dropout = 0.0
conv_width = 0           # > 1: short convolutions over queries, keys and values (model.Attention.conv)
# batches: tokens per optimizer step = batch_size * grad_accum * world_size * max_seq_len
batch_size = 16          # sequences per micro-step per process
grad_accum = 1           # micro-steps per optimizer step (gradients add up locally, one all-reduce)
doc_mask = False         # attention stops at BOS (each document attends only to itself)
align_docs = False       # a training row starts at a document's BOS where one is in reach (common.get_batch)
# copy drills: steps [copy_start, copy_end) train on drills alone; after copy_end, copy_frac of the rows are drills
copy_start = 0
copy_end = 0             # 0: no drill phase
copy_frac = 0.0
# AdamW and schedule
lr = 2e-3                # peak learning rate
min_lr = 2e-4            # floor of the decay (lr / 10, Chinchilla)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0          # clip the global gradient norm (0: off)
lr_schedule = "cosine"   # cosine | wsd | sgdr | constant (common.get_lr)
warmup_steps = 50
max_steps = 600
wsd_decay_frac = 0.2     # wsd: the last 20% of steps decay linearly to min_lr
sgdr_cycle_steps = 0     # sgdr: first cycle length (0: max_steps)
sgdr_cycle_mult = 1.0    # sgdr: each cycle this many times longer than the last
stop_at_step = 0         # > 0: save and exit after this step, as a preempted job would (max_steps sets the schedule)
# evaluation, logging, checkpoints
eval_interval = 100      # evaluate, sample and checkpoint every this many steps
eval_iters = 10          # validation batches per evaluation (the same windows every time)
log_interval = 20
keep_last = 2            # step checkpoints kept besides ckpt_best.pt
patience = 0             # early stopping: evaluations without a new best val loss before stopping (0: off)
sample_prompts = ("Q: Where does", "问：", "12 + 7 =")
sample_tokens = 40       # tokens generated per prompt at each evaluation (0: no samples)
# system
device = "auto"          # auto | cpu | cuda | cuda:N | mps
dtype = "auto"           # auto (bf16 where fast, else fp16 on GPU / fp32 on CPU) | bfloat16 | float16 | float32
compile = False          # torch.compile the model
parallel = "ddp"         # ddp | fsdp (FSDP2: shard weights, grads and optimizer state across GPUs)
grad_checkpointing = False  # recompute activations in backward: fits 1B on one 24 GB GPU at small batch
peak_tflops = 0.0        # MFU denominator per device; 0: measure a bf16/fp32 matmul at startup
seed = 1337
config = configure(globals())

# data and tokenizer, read before setup() so that the config.json it writes has the data's vocab_size
try:
    meta = load_meta(data_dir)
    train_data, val_data = open_tokens(data_dir, "train", meta), open_tokens(data_dir, "val", meta)
    tok_name = meta["tokenizer"]
    tokenizer = Tokenizer.load(tok_name if tok_name.startswith("tiktoken:") else os.path.join(data_dir, tok_name))
    if vocab_size is None:
        vocab_size = config["vocab_size"] = meta["vocab_size"]
    check_vocab(meta, vocab_size, tokenizer)
    if min(len(train_data), len(val_data)) <= max_seq_len + 1:
        raise DataError(f"{data_dir}: {len(train_data)} train and {len(val_data)} val tokens, too few for windows "
                        f"of max_seq_len={max_seq_len} + 1: use a smaller max_seq_len or more text")
except (DataError, FileNotFoundError) as e:
    die(str(e))
# Bits per byte = val_loss / ln 2 * tokens / bytes, which unlike the loss does not depend on the tokenizer. The
# counts (BOS included) come from meta.json: the val split's own, else the whole corpus's, equal in expectation.
n_tokens, n_bytes = ((meta["val_tokens"], meta["val_bytes"]) if meta.get("val_bytes") else
                     (meta["train_tokens"] + meta["val_tokens"], meta.get("text_bytes")))
tokens_per_byte = n_tokens / n_bytes if n_bytes else None

ctx = setup(config)  # devices, processes, seeds; writes out_dir/config.json
catch_signals()
# model: fresh, resumed from out_dir, or initialized from another run's weights
model_cfg = ModelConfig.from_dict(config)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
resume = init_from == "resume" or (init_from == "auto" and os.path.exists(ckpt_path))
start_from = ckpt_path if resume else None if init_from in ("scratch", "auto") else init_from
ckpt = load_checkpoint(start_from) if start_from else None
if ckpt:
    check_model_config(ckpt["model_config"], model_cfg.to_dict(), start_from)
model = Transformer(model_cfg)
if ckpt and not resume:
    model.load_state_dict(ckpt["model"])
    print0(f"initialized from {init_from} (step {ckpt['step']})")
print0(f"model: {model.num_params() / 1e6:.2f}M parameters, {ctx.world_size} process(es) on {ctx.device}, "
       f"{ctx.dtype}, {parallel if ctx.ddp else 'single process'}")
flops_per_token = model.flops_per_token(max_seq_len)
model = wrap_model(model, ctx, parallel, compile, grad_checkpointing)
raw = unwrap(model)
optimizer = build_optimizer(model, lr, weight_decay, (beta1, beta2), ctx.device_type)
best_val, bad_evals = float("inf"), 0  # early stopping: evaluations in a row without a new best val loss
peak = peak_tflops * 1e12 or measure_matmul_peak(ctx.device, ctx.ptdtype)
start_step, eval_done = 0, False
if resume:
    restore_checkpoint(ctx, raw, optimizer, ckpt)
    best_val, bad_evals = ckpt["early_stop"]["best"], ckpt["early_stop"]["bad_evals"]
    if ckpt.get("scaler"):
        ctx.scaler.load_state_dict(ckpt["scaler"])
    start_step, eval_done = ckpt["step"], ckpt.get("eval_done", False)
    print0(f"resumed from {ckpt_path} at step {start_step}")
ckpt = None
if ctx.master:
    tokenizer.save(out_dir)
ordinary_ids = np.array([i for i in range(vocab_size) if tokenizer.token_bytes(i)])  # copy drills' tokens
logger = MetricsLogger(out_dir, ctx.master, resume_step=start_step if resume else None)
tokens_per_step = batch_size * grad_accum * ctx.world_size * max_seq_len
print0(f"{tokens_per_step:,} tokens per step, {max_steps} steps: {tokens_per_step * max_steps / 1e6:.1f}M tokens "
       f"({tokens_per_step * max_steps / len(train_data):.2f} epochs of {len(train_data) / 1e6:.1f}M); MFU against "
       f"{peak / 1e12:.2f} TFLOP/s per device ({'peak_tflops' if peak_tflops else 'a measured matmul'})")


def batch(data, key, micro_step=0, accum=1):
    x, y = get_batch(data, batch_size, max_seq_len, key, ctx.rank, ctx.world_size, micro_step, accum, ctx.device,
                     bos=tokenizer.bos_id if align_docs and data is train_data else None)
    if data is train_data:
        x, y = copy_drills(x, y, key[-1], micro_step)
    # doc_ids: a new id at every BOS, so attention and RoPE positions restart at each document
    return x, y, torch.cumsum(x == tokenizer.bos_id, dim=1) if doc_mask else None


def copy_drills(x, y, step, micro_step):
    """Replace some rows by copy drills: BOS, then random spans of 8-48 ordinary tokens, each written twice, loss
    on the second copies only. Copying from the context (SFT and RAG lean on it) is done by induction heads, which
    form fast on repeated sequences (Olsson et al. 2022; Bietti et al. 2023). config/tiny.py says when to drill."""
    frac = 1.0 if copy_start <= step < copy_end else copy_frac if step >= copy_end else 0.0
    # seeded like get_batch's rows: one process with grad_accum n draws what n processes draw
    rng = np.random.default_rng((seed, 2, step, micro_step * ctx.world_size + ctx.rank))
    rows = np.flatnonzero(rng.random(x.shape[0]) < frac)
    longest = max(2, min(48, max_seq_len // 4))  # so that every row holds a second copy
    x, y = x.clone(), y.clone()  # get_batch's x and y share memory
    for r in rows:
        toks, targets = [tokenizer.bos_id], [IGNORE_INDEX]  # targets[t]: what toks[t] should be predicted as
        while len(toks) <= max_seq_len:
            span = rng.choice(ordinary_ids, rng.integers(min(8, longest), longest + 1)).tolist()
            toks += span + span
            targets += [IGNORE_INDEX] * len(span) + span
        x[r], y[r] = torch.tensor(toks[:max_seq_len]), torch.tensor(targets[1:max_seq_len + 1])
    return x, y


@torch.no_grad()
def evaluate(step):
    """Log the validation loss over the same eval_iters windows every time, its bits per byte and the copy probe;
    print a few samples (a fixed generator: the training RNG is untouched). Returns the validation loss."""
    model.eval()
    losses = torch.zeros(eval_iters, device=ctx.device)
    for i in range(eval_iters):
        x, y, doc_ids = batch(val_data, (seed, 1, i))
        with ctx.autocast:
            _, losses[i] = model(x, y, doc_ids)
    val_loss = all_reduce_mean(ctx, losses.mean()).item()
    if not math.isfinite(val_loss):
        diverged(f"val loss {val_loss} at step {step}")
    record = {"step": step, "val_loss": val_loss, "copy_probe": copy_probe(raw, tokenizer)}
    if tokens_per_byte:
        record["val_bpb"] = val_loss / math.log(2) * tokens_per_byte
    logger.log(record)
    if sample_tokens:
        stops, out = (tokenizer.bos_id, tokenizer.eos_id), [[] for _ in sample_prompts]
        gen = torch.Generator(device=ctx.device).manual_seed(seed)
        with generation_context(model):  # every rank generates (FSDP); in the weights' dtype (fp32), no autocast
            for toks, active in raw.generate([tokenizer.encode(p, bos=True) for p in sample_prompts], sample_tokens,
                                             temperature=0.8, top_k=50, stop_ids=stops, generator=gen):
                for o, t, a in zip(out, toks.tolist(), active.tolist()):
                    if a and t not in stops:
                        o.append(t)
        for p, o in zip(sample_prompts, out):
            print0(f"  sample: {p + tokenizer.decode(o)!r}")
    model.train()
    return val_loss


def save(step, is_best=False, eval_done=False):
    """Checkpoint after `step` optimizer steps (collective: every rank gathers, rank 0 writes)."""
    ckpt = checkpoint_state(ctx, raw, optimizer, step=step, eval_done=eval_done, config=config,
                            model_config=model_cfg.to_dict(), tokenizer=tokenizer.name,
                            early_stop={"best": best_val, "bad_evals": bad_evals}, scaler=ctx.scaler.state_dict(),
                            data={"seed": seed, "tokens_seen": step * tokens_per_step})
    if ctx.master:
        try:
            save_checkpoint(out_dir, ckpt, keep_last, is_best)
        except OSError as e:
            die(f"stopping: {e}")


def diverged(what):
    good = f"the last good checkpoint is {ckpt_path}, step {last_saved}" if last_saved else "no checkpoint yet"
    die(f"{what}: training diverged, stopping without saving ({good}). Try a lower lr or more warmup_steps.")


# training loop: evaluate and checkpoint every eval_interval steps and at the end (a resumed step's eval is done)
last_saved = start_step if resume else None
t_last, steps_timed = time.perf_counter(), 0
step = start_step
while True:
    if (step % eval_interval == 0 or step == max_steps) and not (step == start_step and eval_done):
        val_loss = evaluate(step)
        is_best = val_loss < best_val
        best_val, bad_evals = (val_loss, 0) if is_best else (best_val, bad_evals + 1)
        if step > 0:
            save(step, is_best, eval_done=True)
            last_saved = step
        if patience > 0 and bad_evals >= patience:
            print0(f"early stopping: val loss has not improved on {best_val:.4f} for {patience} evaluations")
            break
        t_last, steps_timed = time.perf_counter(), 0  # eval time is not training throughput
    if step >= max_steps:
        break

    # one optimizer step over grad_accum micro-batches
    lr_now = get_lr(step, config)
    set_lr(optimizer, lr_now)
    loss_sum = torch.zeros((), device=ctx.device)
    for micro in range(grad_accum):
        x, y, doc_ids = batch(train_data, (seed, 0, step), micro, grad_accum)
        grad_sync(model, micro == grad_accum - 1)  # all-reduce only on the last micro-step
        with ctx.autocast:
            _, loss = model(x, y, doc_ids)
        ctx.scaler.scale(loss / grad_accum).backward()
        loss_sum += loss.detach()
    grad_norm = step_optimizer(model, optimizer, ctx.scaler, grad_clip)
    train_loss = all_reduce_mean(ctx, loss_sum / grad_accum).item()
    if not math.isfinite(train_loss) or (not ctx.scaler.is_enabled() and not torch.isfinite(grad_norm)):
        diverged(f"loss {train_loss}, grad norm {grad_norm.item()} at step {step + 1}")
    step += 1
    steps_timed += 1

    if step % log_interval == 0:
        dt = (time.perf_counter() - t_last) / steps_timed
        tok_per_s = tokens_per_step / dt
        logger.log({"step": step, "max_steps": max_steps, "loss": train_loss, "lr": lr_now,
                    "grad_norm": grad_norm.item(), "tok_per_s": tok_per_s, "step_ms": 1000 * dt,
                    "mfu": flops_per_token * tok_per_s / ctx.world_size / peak, "eta_s": dt * (max_steps - step)})
        t_last, steps_timed = time.perf_counter(), 0
    if stop_requested(ctx) or step == stop_at_step:
        save(step)
        print0(f"stopped after step {step}; continue with --init_from=resume (or init_from='auto')")
        break

model = raw = optimizer = loss = None  # free FSDP/DDP state before leaving the process group (common.shutdown)
shutdown()
