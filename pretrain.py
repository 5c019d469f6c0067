"""Pretraining: next-token prediction on the token memmaps written by prepare_data.py.

    python prepare_data.py demo && python pretrain.py config/tiny.py        # laptop CPU, minutes
    torchrun --nproc_per_node=8 pretrain.py config/1b.py                    # one 8-GPU node
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=HOST --master_port=29500 \
        pretrain.py config/1b.py                                            # two nodes (node_rank 1 on the other)

It minimizes the mean cross-entropy of each next token, L = -1/N sum_t log p(x_{t+1} | x_{<=t}),
over random windows of max_seq_len + 1 tokens from data_dir/train.bin (some rows replaced by copy
drills, if asked: copy_drills). Every eval_interval steps it reports the validation loss, bits per
byte and the copy probe (common.copy_probe), prints a few samples and saves a checkpoint.
Reads data_dir/{train.bin, val.bin, meta.json, tokenizer}; writes out_dir/{ckpt.pt, ckpt_best.pt,
tokenizer.model, config.json, metrics.jsonl}. SIGTERM or Ctrl-C saves and exits; rerun with
--init_from=resume (or init_from='auto') and it continues exactly where it stopped.
"""
import math
import os
import time

import numpy as np
import torch

from common import (EarlyStopping, MetricsLogger, all_reduce_mean, build_optimizer, catch_signals,
                    check_model_config, checkpoint_state, copy_probe, die, generation_context, get_batch, get_lr,
                    grad_sync, load_checkpoint, measure_matmul_peak, print0, restore_checkpoint,
                    save_checkpoint, set_lr, setup, shutdown, step_optimizer, stop_requested, unwrap,
                    wrap_model, write_json)
from configurator import configure
from data_formats import DataError, check_vocab, load_meta, open_tokens
from model import IGNORE_INDEX, ModelConfig, Transformer
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------------------------
# config: defaults train a small model on the demo world; config/*.py and --key=value override
# I/O
data_dir = "data/demo/pretrain"
out_dir = "out/pretrain"
init_from = "scratch"    # 'scratch' | 'resume' (out_dir/ckpt.pt) | 'auto' (resume if it exists) | an out dir to start from
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
smear_keys = False       # each key mixed with the previous token's (model.Attention.smear)
# batches: tokens per optimizer step = batch_size * grad_accum * world_size * max_seq_len
batch_size = 16          # sequences per micro-step per process
grad_accum = 1           # micro-steps per optimizer step (gradients add up locally, one all-reduce)
doc_mask = False         # attention stops at BOS (each document attends only to itself)
# copy drills (copy_drills below): rows of random token spans, each written twice. Steps
# [copy_start, copy_end) train on drills alone; after copy_end, copy_frac of the rows are drills.
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
stop_at_step = 0         # > 0: save and exit after this step, as a preempted job would (max_steps still sets the schedule)
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
# -----------------------------------------------------------------------------------------------

ctx = setup(config)
catch_signals()

# data and tokenizer
try:
    meta = load_meta(data_dir)
    train_data, val_data = open_tokens(data_dir, "train", meta), open_tokens(data_dir, "val", meta)
    tok_name = meta["tokenizer"]
    tokenizer = Tokenizer.load(tok_name if tok_name.startswith("tiktoken:") else os.path.join(data_dir, tok_name))
    if vocab_size is None:  # take the data's, and record it in config.json
        vocab_size = config["vocab_size"] = meta["vocab_size"]
        if ctx.master:
            write_json(os.path.join(out_dir, "config.json"), config)
    check_vocab(meta, vocab_size, tokenizer)
    for split, data in (("train", train_data), ("val", val_data)):
        if len(data) <= max_seq_len + 1:
            raise DataError(f"{data_dir}/{split}.bin has {len(data)} tokens, too few for windows of "
                            f"max_seq_len={max_seq_len} + 1: use a smaller max_seq_len or more text")
except (DataError, FileNotFoundError) as e:
    die(str(e))
# Bits per byte = total nats / ln 2 / total UTF-8 bytes of the text: unlike the loss it does not depend
# on the tokenizer. The val loss is the mean nats per predicted token over windows of val.bin, so
# bpb = val_loss / ln 2 * tokens / bytes, where tokens counts every token of the split (one BOS per
# document included) and bytes the UTF-8 bytes of its documents, both from meta.json: the val split's
# own counts when meta has val_bytes, else the whole corpus's (train_tokens + val_tokens) / text_bytes,
# which matches in expectation because documents are assigned to val at random.
if meta.get("val_bytes"):
    tokens_per_byte = meta["val_tokens"] / meta["val_bytes"]
elif meta.get("text_bytes"):
    tokens_per_byte = (meta["train_tokens"] + meta["val_tokens"]) / meta["text_bytes"]
else:
    tokens_per_byte = None

# model: fresh, resumed from out_dir, or initialized from another run's weights
model_cfg = ModelConfig.from_dict(config)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
resume = init_from == "resume" or (init_from == "auto" and os.path.exists(ckpt_path))
ckpt = None
if resume or init_from not in ("scratch", "auto"):
    ckpt = load_checkpoint(ckpt_path if resume else init_from)
    check_model_config(ckpt["model_config"], model_cfg.to_dict(), ckpt_path if resume else init_from)
model = Transformer(model_cfg)
if ckpt is not None and not resume:
    model.load_state_dict(ckpt["model"])
    print0(f"initialized from {init_from} (step {ckpt['step']})")
    ckpt = None
print0(f"model: {model.num_params() / 1e6:.2f}M parameters, {ctx.world_size} process(es) on {ctx.device}, "
       f"{ctx.dtype}, {parallel if ctx.ddp else 'single process'}")
flops_per_token = model.flops_per_token(max_seq_len)
model = wrap_model(model, ctx, parallel, compile, grad_checkpointing)
raw = unwrap(model)
optimizer = build_optimizer(model, lr, weight_decay, (beta1, beta2), ctx.device_type)
stopper = EarlyStopping(patience)
peak = peak_tflops * 1e12 or measure_matmul_peak(ctx.device, ctx.ptdtype)
print0(f"MFU is quoted against {peak / 1e12:.2f} TFLOP/s per device "
       f"({'measured ' + ctx.dtype + ' matmul' if not peak_tflops else 'peak_tflops'})")
start_step, eval_done = 0, False
if resume:
    restore_checkpoint(ctx, model, optimizer, ckpt)
    stopper.load_state_dict(ckpt["early_stop"])
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
       f"({tokens_per_step * max_steps / len(train_data):.2f} epochs of {len(train_data) / 1e6:.1f}M)")


def batch(data, key, micro_step=0, accum=1):
    x, y = get_batch(data, batch_size, max_seq_len, key, ctx.rank, ctx.world_size, micro_step, accum, ctx.device)
    if data is train_data:
        x, y = copy_drills(x, y, key, micro_step)
    # doc_ids: a new id at every BOS, so attention and RoPE positions restart at each document
    doc_ids = torch.cumsum(x == tokenizer.bos_id, dim=1) if doc_mask else None
    return x, y, doc_ids


def copy_drills(x, y, key, micro_step):
    """Replace some rows by copy drills: BOS, then random spans of 8-48 ordinary tokens (at most a quarter
    of the window), each written twice, with loss only on the second copies (the first is noise).
    Copying from the context is the skill every later stage leans on (SFT reads the question, RAG reads
    its sources), and it comes from induction heads, which form fast on repeated sequences (Olsson et al.
    2022; Bietti et al. 2023, "Birth of a Transformer"). Mixed into the corpus from the start they form
    slowly (the corpus rarely rewards them), and drills from step 0 leave less time for the facts: so the
    demo learns from the corpus first, then drills alone for a while (copy probe ~0 -> ~90%), then mostly
    corpus again while the learning rate decays, a few drills keeping the skill."""
    step = key[-1]
    frac = 1.0 if copy_start <= step < copy_end else copy_frac if step >= copy_end else 0.0
    # seeded like get_batch's rows: one process with grad_accum n draws what n processes draw
    rng = np.random.default_rng((seed, 2, step, micro_step * ctx.world_size + ctx.rank))
    rows = np.flatnonzero(rng.random(x.shape[0]) < frac)
    longest = max(2, min(48, max_seq_len // 4))  # so that every row holds a second copy
    x, y = x.clone(), y.clone()  # get_batch's x and y share memory
    for r in rows:
        toks, keep = [tokenizer.bos_id], [False]
        while len(toks) <= max_seq_len:
            span = rng.choice(ordinary_ids, rng.integers(min(8, longest), longest + 1)).tolist()
            toks += span + span
            keep += [False] * len(span) + [True] * len(span)
        row = torch.tensor(toks[:max_seq_len + 1], device=x.device)
        x[r], y[r] = row[:-1], row[1:].masked_fill(~torch.tensor(keep[1:max_seq_len + 1], device=x.device),
                                                   IGNORE_INDEX)
    return x, y


@torch.no_grad()
def evaluate():
    """Mean validation loss over the same eval_iters windows (per rank) every time."""
    model.eval()
    losses = torch.zeros(eval_iters, device=ctx.device)
    for i in range(eval_iters):
        x, y, doc_ids = batch(val_data, (seed, 1, i))
        with ctx.autocast:
            _, losses[i] = model(x, y, doc_ids)
    model.train()
    return all_reduce_mean(ctx, losses.mean()).item()


@torch.no_grad()
def print_samples():
    """A few continuations, sampled with a fixed generator (the training RNG is not touched).
    Under FSDP every rank must run generate; rank 0 prints."""
    if not sample_tokens:
        return
    raw.eval()
    prompts = [tokenizer.encode(p, bos=True) for p in sample_prompts]
    out = [[] for _ in prompts]
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    with generation_context(model):  # weights' dtype (fp32): no autocast needed for a few tokens
        for toks, active in raw.generate(prompts, sample_tokens, temperature=0.8, top_k=50,
                                         stop_ids=(tokenizer.bos_id, tokenizer.eos_id), generator=gen):
            for i, (t, a) in enumerate(zip(toks.tolist(), active.tolist())):
                if a and t not in (tokenizer.bos_id, tokenizer.eos_id):
                    out[i].append(t)
    raw.train()
    for p, o in zip(sample_prompts, out):
        print0(f"  sample: {p + tokenizer.decode(o)!r}")


def save(step, is_best=False, eval_done=False):
    """Checkpoint after `step` optimizer steps (collective: every rank gathers, rank 0 writes)."""
    ckpt = checkpoint_state(ctx, model, optimizer, step=step, eval_done=eval_done, config=config,
                            model_config=model_cfg.to_dict(), tokenizer=tokenizer.name,
                            early_stop=stopper.state_dict(), scaler=ctx.scaler.state_dict(),
                            data={"seed": seed, "tokens_seen": step * tokens_per_step})
    if ctx.master:
        try:
            save_checkpoint(out_dir, ckpt, keep_last, is_best)
        except OSError as e:
            die(f"stopping: {e}")


def last_good():
    return f"the last good checkpoint is {ckpt_path}, step {last_saved}" if last_saved else "no checkpoint yet"


# -----------------------------------------------------------------------------------------------
# training loop
last_saved = start_step if resume else None
t_last, steps_timed = time.perf_counter(), 0
step = start_step
while True:
    # evaluate (and checkpoint) at every eval_interval and at the end; the resumed step was done already
    if (step % eval_interval == 0 or step == max_steps) and not (step == start_step and eval_done):
        val_loss = evaluate()
        if not math.isfinite(val_loss):
            die(f"val loss {val_loss} at step {step}: training diverged, stopping without saving "
                f"({last_good()}). Try a lower lr or more warmup_steps.")
        is_best, early_stop = stopper.update(val_loss)
        raw.eval()
        record = {"step": step, "val_loss": val_loss, "copy_probe": copy_probe(raw, tokenizer)}
        raw.train()
        if tokens_per_byte:
            record["val_bpb"] = val_loss / math.log(2) * tokens_per_byte
        logger.log(record)
        print_samples()
        if step > 0:
            save(step, is_best, eval_done=True)
            last_saved = step
        if early_stop:
            print0(f"early stopping: val loss has not improved on {stopper.best:.4f} for {patience} evaluations")
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
        die(f"loss {train_loss}, grad norm {grad_norm.item()} at step {step + 1}: training diverged, stopping "
            f"without saving ({last_good()}). Try a lower lr or more warmup_steps.")
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
