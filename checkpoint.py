"""The out dir: what a training run leaves behind, how it is written, and how it is read back.

    model, tokenizer, ckpt = load_model("out/sft")     # sample.py, serve.py, rag.py, export.py
    score = load_reward_fn("out/rm"); score(messages)   # grpo.py's reward model -> float

An out dir (one per run) holds ckpt.pt (the latest checkpoint), ckpt_best.pt (the best evaluation), ckpt_<step>.pt
(the last keep_last; ckpt.pt and ckpt_best.pt are hard links to them), tokenizer.model (or <name>.tiktoken),
config.json (the run's config) and metrics.jsonl (one JSON record a line). Checkpoints hold plain tensors and
builtins only and are loaded with torch.load(weights_only=True): a file from elsewhere cannot run code. Every
write goes to a temp file, is fsynced, then renamed over the old name: a crash or a full disk leaves the previous
file whole. checkpoint_state and restore_checkpoint run on every rank; rank 0 writes. common.py imports this
file, so print0 and die, which both use, live here.
"""
import json
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from model import ModelConfig, Transformer
from tokenizer import Tokenizer


def print0(*args, **kwargs):
    """print() on rank 0 only, flushed: a torchrun job's log shows each line once."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def die(message):
    """Exit with status 1 and a one-line message, printed by rank 0."""
    print0(message, file=sys.stderr)
    sys.exit(1)


# -- atomic writes -------------------------------------------------------------------------------------------
def write_json(path, obj):
    """JSON, written atomically (temp file + os.replace)."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _fsync_dir(path):
    try:  # makes a rename durable (POSIX); not possible on every OS
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _publish(src, dst):
    """Point dst at src's file atomically: a hard link (no copy), or a copy without hard links."""
    tmp = dst + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# -- checkpoints: weights, optimizer, RNG states, exact resume -----------------------------------------------
def rng_state():
    """This process's python, numpy, torch and CUDA RNG states, weights_only-loadable."""
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
    """What a resume needs, as CPU tensors on rank 0 (None elsewhere): full weights of the plain model
    (common.unwrap), optimizer state by name, every rank's RNG states, plus extra (step, config, ...)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    opts = _state_dict_options(cpu_offload=True)
    ckpt = {"model": get_model_state_dict(model, options=opts)}
    if optimizer is not None:
        ckpt["optimizer"] = get_optimizer_state_dict(model, optimizer, options=opts)
    rngs = [rng_state()]
    if ctx.ddp:
        rngs = [None] * ctx.world_size
        dist.all_gather_object(rngs, rng_state(), group=ctx.cpu_group)
    ckpt["rng"] = rngs
    ckpt.update(extra)
    return ckpt if ctx.master else None


def save_checkpoint(out_dir, ckpt, keep_last=2, is_best=False):
    """ckpt as out_dir/ckpt_<step>.pt (temp file, fsync, rename), linked as ckpt.pt (and ckpt_best.pt);
    the newest keep_last step files are kept."""
    path = os.path.join(out_dir, f"ckpt_{ckpt['step']:08d}.pt")
    try:
        with open(path + ".tmp", "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except BaseException as e:  # a full disk: no temp file left, the previous checkpoints untouched
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        if isinstance(e, OSError):
            raise OSError(e.errno, f"could not write {path} ({e.strerror or e}); the previous checkpoint "
                          f"{os.path.join(out_dir, 'ckpt.pt')} is unchanged") from e
        raise
    _fsync_dir(out_dir)
    _publish(path, os.path.join(out_dir, "ckpt.pt"))
    if is_best:
        _publish(path, os.path.join(out_dir, "ckpt_best.pt"))
    steps = sorted(f for f in os.listdir(out_dir) if f.startswith("ckpt_0") and f.endswith(".pt"))
    for f in steps[:-max(1, keep_last)]:
        os.remove(os.path.join(out_dir, f))  # ckpt.pt / ckpt_best.pt keep their own links
    _fsync_dir(out_dir)
    return path


def load_checkpoint(path):
    """torch.load(path or path/ckpt.pt, weights_only=True), memory-mapped on the CPU, with one-line errors."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}: train one first (python pretrain.py config/tiny.py), "
            f"or use init_from='scratch'")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated file, pickle of arbitrary objects, ...
        die(f"{path} is not a loadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})")


def check_model_config(saved, wanted, where):
    """Exit with one line naming them if the saved model shape differs from the wanted one's keys."""
    full = ModelConfig.from_dict(wanted).to_dict()  # fills in the derived ffn_dim
    diff = [f"{k}={saved.get(k)!r} (config says {full[k]!r})" for k in
            ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings")
            if k in wanted and saved.get(k) != full[k]]
    if diff:
        die(f"{where} holds a model of another shape: {', '.join(diff)}; use a new out_dir, "
            f"init_from='scratch', or the config that trained it")


def restore_checkpoint(ctx, model, optimizer, ckpt):
    """Weights, optimizer state and this rank's RNG states from checkpoint_state's dict into the plain model
    (common.unwrap), on every rank."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    try:
        set_model_state_dict(model, ckpt["model"], options=_state_dict_options())
    except RuntimeError as e:
        die(f"checkpoint does not fit this model: {str(e).splitlines()[0]} ...")
    if optimizer is not None and "optimizer" in ckpt:
        set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=_state_dict_options())
    rngs = ckpt.get("rng") or []
    if ctx.rank < len(rngs):
        set_rng_state(rngs[ctx.rank])
    else:
        print(f"[rank {ctx.rank}] checkpoint has no RNG state for this rank (it had {len(rngs)} ranks); "
              f"keeping the seed-based state", flush=True)


# -- trained models as functions -----------------------------------------------------------------------------
def load_model(out_dir, device="cpu", name="ckpt.pt"):
    """(model in eval mode, tokenizer, checkpoint without 'model' and 'optimizer') of a trained out dir."""
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
def generate_replies(model, tokenizer, conversations, max_new_tokens=64, batch_size=64, temperature=0.0,
                     generator=None):
    """The reply to each conversation, greedy unless temperature > 0, by a plain Transformer (under FSDP: on
    every rank, in generation_context). A prompt too long keeps BOS and its last tokens."""
    was_training = model.training
    model.eval()
    limit, replies = model.cfg.max_seq_len - max_new_tokens, []
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
    """score(messages) -> float (or a list of them -> floats) by rm.py's model: reward_head (dim -> 1) on the
    final hidden state of the rendered conversation's last token, as rm.RewardModel computes it."""
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
    model, head, tokenizer = model.to(device).eval(), head.to(device).eval(), Tokenizer.load(out_dir)

    @torch.no_grad()
    def score(conversations):
        single = bool(conversations) and isinstance(conversations[0], dict)
        convs, rewards = [conversations] if single else conversations, []
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


# -- metrics.jsonl -------------------------------------------------------------------------------------------
def format_duration(seconds):
    m, s = divmod(int(max(0, seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


LOG_FORMATS = {"lr": lambda v: f"lr {v:.2e}", "grad_norm": lambda v: f"gnorm {v:.3f}",
               "tok_per_s": lambda v: f"{v / 1000:.1f}k tok/s", "mfu": lambda v: f"MFU {100 * v:.1f}%",
               "step_ms": lambda v: f"{v:.0f}ms/step", "eta_s": lambda v: f"ETA {format_duration(v)}"}


def format_metrics(r):
    """'step 120/2000 | loss 3.1416 | lr 6.0e-04 | gnorm 0.91 | 5.1k tok/s | MFU 58.3% | ETA 4m10s'."""
    parts = []
    for k, v in r.items():
        if k == "step":
            parts.append(f"step {v}" + (f"/{r['max_steps']}" if "max_steps" in r else ""))
        elif k in LOG_FORMATS:
            parts.append(LOG_FORMATS[k](v))
        elif k != "max_steps":
            parts.append(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)


class MetricsLogger:
    """Records appended to out_dir/metrics.jsonl and printed. A resumed run (resume_step) drops the records
    written after its checkpoint; a fresh one starts an empty file."""

    def __init__(self, out_dir, enabled=True, resume_step=None):
        self.enabled, self.path = enabled, os.path.join(out_dir, "metrics.jsonl")
        if not enabled:
            return
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def log(self, record, echo=True):
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if echo:
            print(format_metrics(record), flush=True)
