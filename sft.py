"""Supervised fine-tuning (SFT): teach a pretrained model to answer in chat turns.

    python sft.py                                            # demo world on a CPU: out/pretrain -> out/sft, minutes
    torchrun --nproc_per_node=8 sft.py --init_from=out/pretrain-1b --out_dir=out/sft-1b \
        --data=data/chat/sft.jsonl --dev_data=data/chat/sft_dev.jsonl --batch_size=8 --max_steps=3000

Each line of `data` is {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
(OpenAI chat format, multi-turn allowed), rendered with the ChatML template by Tokenizer.render_chat.
Only the assistant replies are learned: with A the set of positions whose next token is an assistant
token or the <|im_end|> that closes a reply,

    L = -1/|A| * sum_{t in A} log p(x_{t+1} | x_{<=t})        (|A| counted over the whole global batch)

Packing, not padding: conversations (about 30 tokens on the demo world) are laid end to end into
rows of max_seq_len tokens, and `doc_ids` make attention block-diagonal with RoPE positions restarting
per conversation, so a packed row computes exactly what its conversations would one by one (a test
checks it) while almost no compute goes to padding. A conversation longer than a row loses its
start (BOS kept), counted and printed.

Evaluation: dev loss, and answer accuracy: the model answers the last user turn of each dev chat
greedily and the reply must equal the reference exactly. Step 0 is the pretrained model prompted the
same way, the baseline. Reads init_from/{ckpt.pt, tokenizer.model}, data and dev_data; writes
out_dir/{ckpt.pt, ckpt_best.pt, tokenizer.model, config.json, metrics.jsonl}. SIGTERM or Ctrl-C saves
and exits; --init_from=resume continues exactly where it stopped.
"""
import random

import torch
import torch.nn.functional as F

from checkpoint import print0
from common import (Run, all_reduce_mean, answer_accuracy, get_lr, grad_sync, read_data, set_lr, setup_stage, shutdown,
                    step_optimizer)
from configurator import configure
from model import IGNORE_INDEX, Transformer

# -----------------------------------------------------------------------------------------------
# config: defaults fine-tune the demo world's tiny model; config files and --key=value override
init_from = "out/pretrain"   # the out dir of a pretraining run, or 'resume' (continue out_dir/ckpt.pt)
data = "data/demo/sft.jsonl"
dev_data = "data/demo/sft_dev.jsonl"
out_dir = "out/sft"
seq_len = 0              # tokens per packed row; 0: the model's max_seq_len
batch_size = 8           # packed rows per micro-step per process
grad_accum = 1
lr = 5e-4                # the peak, after warmup_steps; lr_schedule takes it down to min_lr by max_steps
min_lr = 5e-5
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
lr_schedule = "cosine"   # cosine | wsd | sgdr | constant (common.get_lr)
warmup_steps = 20
max_steps = 600          # the demo world: ~2.2 passes over its chats (3,919: 2,304 of them answer from sources)
dropout = 0.0            # replaces the pretrained model's
eval_interval = 600      # dev loss, answer accuracy and a checkpoint every this many steps (the demo: start, end)
eval_answers = 0         # dev chats whose last reply is generated and scored (0: all)
answer_tokens = 32       # at most this many tokens per reply (demo replies <= 19); the prompt keeps max_seq_len - this
log_interval = 10
keep_last = 1            # step checkpoints kept; ckpt_best.pt holds the lowest dev loss
device = "auto"
dtype = "auto"
compile = False
parallel = "ddp"         # ddp | fsdp
seed = 1337


# -----------------------------------------------------------------------------------------------
# data: rendered conversations, packed into rows

def encode_chat(tokenizer, messages, max_len):
    """(x, y, truncated) for one conversation: inputs x and next-token targets y, with IGNORE_INDEX
    wherever the next token is not part of an assistant reply. A conversation of more than
    max_len + 1 tokens keeps BOS and its last max_len tokens: the replies at the end are what it teaches."""
    ids, mask = tokenizer.render_chat(messages)
    truncated = len(ids) > max_len + 1
    if truncated:
        ids, mask = ids[:1] + ids[-max_len:], mask[:1] + mask[-max_len:]
    y = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    return ids[:-1], y, truncated


def pack(examples, seq_len, pad_id):
    """Lay (x, y) examples end to end into rows of seq_len tokens, starting a new row when the next one
    does not fit. Returns X, Y, D, LongTensors (rows, seq_len): D numbers the examples within a row
    (the tail of padding, with targets IGNORE_INDEX, gets a number of its own)."""
    rows, row = [], []
    for ex in examples:
        if row and sum(len(x) for x, _ in row) + len(ex[0]) > seq_len:
            rows.append(row)
            row = []
        row.append(ex)
    rows += [row] if row else []
    X = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    Y = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    D = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for k, (x, y) in enumerate(row):
            X[r, t:t + len(x)], Y[r, t:t + len(y)], D[r, t:t + len(x)] = torch.tensor(x), torch.tensor(y), k
            t += len(x)
        D[r, t:] = len(row)
    return X, Y, D


# -----------------------------------------------------------------------------------------------
# the loss

def sft_loss(logits, targets, n_tokens):
    """Summed negative log-likelihood of the assistant targets, divided by n_tokens (the number of
    assistant targets in the whole global batch, so micro-steps and ranks add up to the mean):
        L = -1/|A| sum_{t in A} log p(y_t | x_{<=t})        positions with y_t = IGNORE_INDEX are not in A"""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return nll / n_tokens


def main():
    config = configure(globals())
    ctx, ckpt, model_cfg, tokenizer = setup_stage(config, dropout=dropout)
    model = Transformer(model_cfg)
    if init_from != "resume":
        model.load_state_dict(ckpt["model"])
        print0(f"initialized from {init_from} (step {ckpt['step']}), {model.num_params() / 1e6:.2f}M parameters")
    L = seq_len or model_cfg.max_seq_len

    # data: render every conversation, then pack; the rows are reshuffled every epoch
    train_chats, dev_chats = read_data("sft", data, dev_data)
    random.Random(seed).shuffle(train_chats)  # mix the kinds of conversation within each row
    encoded = [encode_chat(tokenizer, c["messages"], L) for c in train_chats]
    cut = sum(e[2] for e in encoded)
    print0(f"{cut} of {len(encoded)} training conversations were longer than {L + 1} tokens and lost their start")
    X, Y, D = pack([e[:2] for e in encoded], L, tokenizer.pad_id)
    DX, DY, DD = pack([encode_chat(tokenizer, c["messages"], L)[:2] for c in dev_chats], L, tokenizer.pad_id)
    rows_per_step = batch_size * grad_accum * ctx.world_size
    print0(f"packed into {len(X)} rows of {L} tokens ({(X != tokenizer.pad_id).float().mean():.0%} filled); "
           f"{(Y != IGNORE_INDEX).sum().item():,} assistant tokens; one epoch = {len(X) / rows_per_step:.1f} steps")

    run = Run(ctx, config, model, ckpt, model_cfg, tokenizer, best="dev_loss")
    model, optimizer, ckpt = run.model, run.optimizer, None

    def step_rows(step):
        """The global batch of step `step`: rows from an endless stream of per-epoch permutations, a pure
        function of the step, so a resumed run reads exactly what it would have."""
        i = torch.arange(step * rows_per_step, (step + 1) * rows_per_step)
        perm = {e: torch.randperm(len(X), generator=torch.Generator().manual_seed(seed + e))
                for e in (i // len(X)).unique().tolist()}
        return torch.stack([perm[e][k] for e, k in zip((i // len(X)).tolist(), (i % len(X)).tolist())])

    @torch.no_grad()
    def evaluate():
        """Mean dev loss over every assistant token of the dev set, and answer accuracy."""
        model.eval()
        nll, count = torch.zeros((), device=ctx.device), (DY != IGNORE_INDEX).sum().item()
        for start in range(0, len(DX), batch_size * ctx.world_size):
            # every rank runs the same number of forwards (FSDP needs that); rows past the end count nothing
            rows = torch.arange(start + ctx.rank * batch_size, start + (ctx.rank + 1) * batch_size)
            x, d, y = DX[rows % len(DX)], DD[rows % len(DX)], DY[rows % len(DX)].clone()
            y[rows >= len(DX)] = IGNORE_INDEX
            with ctx.autocast:
                logits, _ = model(x.to(ctx.device), doc_ids=d.to(ctx.device))
            nll += sft_loss(logits, y.to(ctx.device), count)
        acc, examples = answer_accuracy(model, tokenizer, dev_chats, answer_tokens, eval_answers)
        model.train()
        for question, reply, want in examples[:3]:
            print0(f"  Q: {question!r}\n     reply {reply!r}\n     want  {want!r}")
        return {"dev_loss": all_reduce_mean(ctx, nll).item() * ctx.world_size, "answer_acc": acc,
                "answers": len(examples)}

    # -------------------------------------------------------------------------------------------
    # training loop (run.steps evaluates, checkpoints, and saves and stops on SIGTERM)
    for step in run.steps(evaluate):
        lr_now = get_lr(step, config)
        set_lr(optimizer, lr_now)
        rows = step_rows(step)
        n_tokens = (Y[rows] != IGNORE_INDEX).sum().item()  # |A| of the global batch, known to every rank
        loss_sum = torch.zeros((), device=ctx.device)
        for micro in range(grad_accum):
            mine = rows[(micro * ctx.world_size + ctx.rank) * batch_size:][:batch_size]
            x, y, d = (T[mine].to(ctx.device) for T in (X, Y, D))
            grad_sync(model, micro == grad_accum - 1)
            with ctx.autocast:
                logits, _ = model(x, doc_ids=d)
                loss = sft_loss(logits, y, n_tokens)
            # DDP averages gradients over ranks; scaling by world_size makes that average the global sum
            ctx.scaler.scale(loss * ctx.world_size).backward()
            loss_sum += loss.detach()
        grad_norm = step_optimizer(model, optimizer, ctx.scaler, grad_clip)
        train_loss = all_reduce_mean(ctx, loss_sum).item() * ctx.world_size
        run.log(step, {"loss": train_loss}, lr_now, grad_norm, tokens=rows_per_step * L)
    shutdown()


if __name__ == "__main__":
    main()
