"""Reward model: the chat model plus a scalar head, trained on preference pairs (Bradley-Terry).

    python rm.py                                             # demo world on a CPU: out/sft -> out/rm, minutes
    torchrun --nproc_per_node=8 rm.py --init_from=out/sft-1b --out_dir=out/rm-1b \
        --data=data/prefs/pairs.jsonl --dev_data=data/prefs/pairs_dev.jsonl --batch_size=8 --max_steps=2000

Each line of `data` is {"prompt": str or messages, "chosen": str, "rejected": str}. A conversation
(prompt turns, then the reply as the assistant's turn) is rendered with ChatML, the transformer reads
it, and a Linear(dim, 1) head turns the final hidden state of its last token into a reward r. The
loss is the Bradley-Terry negative log-likelihood of the human choice (Ouyang et al. 2022, eq. 1),
with an optional margin m (Llama 2, Touvron et al. 2023) and an optional reward-centering term
(Eisenstein et al. 2023) that keeps rewards near 0:

    L = -log sigmoid(r_chosen - r_rejected - m) + center_coef * (r_chosen + r_rejected)^2
        + lm_coef * NLL(chosen reply tokens)

The last term (GRM, Yang et al. 2024) keeps the language-model head predicting the chosen replies
while the backbone learns to score: the pair loss alone lets the backbone forget the facts that
separate a right reply from a fluent wrong one, and the reward can then only judge style.

Logs pair accuracy (r_chosen > r_rejected) and the mean margin r_chosen - r_rejected, on training
batches and on the held-out dev pairs. Pairs whose chosen and rejected are identical (reported by
data_formats line by line) or that do not fit max_seq_len are counted and skipped. Reads
init_from/{ckpt.pt, tokenizer.model}, data, dev_data; writes out_dir/{ckpt.pt (transformer + reward_head),
ckpt_best.pt, tokenizer.model, config.json, metrics.jsonl}. grpo.py scores replies with it through
common.load_reward_fn(out_dir) -> score(messages) -> float. SIGTERM or Ctrl-C saves and exits;
--init_from=resume continues exactly where it stopped.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import die, print0
from common import (Run, all_reduce_mean, check_pairs, dev_means, epoch_batches, get_lr, read_data, set_lr, setup_stage,
                    shutdown, step_optimizer)
from configurator import configure
from model import IGNORE_INDEX, Transformer

# -----------------------------------------------------------------------------------------------
# config
init_from = "out/sft"    # the chat model to start from, or 'resume' (continue out_dir/ckpt.pt)
data = "data/demo/pairs.jsonl"
dev_data = "data/demo/pairs_dev.jsonl"
out_dir = "out/rm"
batch_size = 16          # pairs per micro-step per process (2 * batch_size sequences)
grad_accum = 1
margin = 0.0             # m in the loss: demand r_chosen - r_rejected > m (0: plain Bradley-Terry)
center_coef = 0.0        # reward centering weight (Eisenstein et al. use 0.01; 0: off)
lm_coef = 1.0            # weight of the chosen replies' next-token loss (GRM regularizer; 0: off)
lr = 3e-4                # one lr for the backbone and the fresh reward head
min_lr = 3e-5
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
lr_schedule = "cosine"
warmup_steps = 10
max_steps = 1200         # the demo world: ~1.5 passes over its pairs
dropout = 0.0
eval_interval = 200
log_interval = 10
keep_last = 1            # step checkpoints kept; ckpt_best.pt holds the highest dev accuracy
device = "auto"
dtype = "auto"
compile = False
parallel = "ddp"
seed = 1337


class RewardModel(Transformer):
    """The transformer with a scalar head: r = w . h_last + b, where h_last is the final (normed) hidden
    state of each sequence's last real token. Padding sits after it, so causal attention keeps it out.
    With lm_head=True the LM head also trains (the lm_coef term); otherwise an untied one is frozen."""

    def __init__(self, cfg, lm_head=False):
        super().__init__(cfg)
        self.reward_head = nn.Linear(cfg.dim, 1)
        nn.init.normal_(self.reward_head.weight, std=1 / math.sqrt(cfg.dim + 1))  # Stiennon et al. 2020
        nn.init.zeros_(self.reward_head.bias)
        if not cfg.tie_embeddings and not lm_head:
            self.output.weight.requires_grad_(False)  # the LM head is unused here (DDP wants every trained param used)

    def forward(self, idx, lengths, targets=None):
        """idx (B, T) right-padded, lengths (B,) real lengths -> rewards (B,) float32; with targets
        (B', T) for the first B' rows (IGNORE_INDEX where not scored) -> (rewards, their mean NLL)."""
        h = self.hidden_states(idx)
        last = h[torch.arange(idx.shape[0], device=idx.device), lengths - 1]
        rewards = self.reward_head(last).squeeze(-1).float()
        if targets is None:
            return rewards
        logits = self.output(h[:targets.shape[0]]).float()
        return rewards, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def rm_loss(r_chosen, r_rejected, margin=0.0, center_coef=0.0):
    """Bradley-Terry loss over a batch of pairs, with accuracy and mean margin for the logs:
        L = mean[ -log sigmoid(r_c - r_r - m) + center_coef * (r_c + r_r)^2 ]"""
    loss = -F.logsigmoid(r_chosen - r_rejected - margin)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    accuracy = (r_chosen > r_rejected).float().mean()
    return loss.mean(), accuracy, (r_chosen - r_rejected).mean()


def encode_pairs(tokenizer, pairs, max_len):
    """[(chosen_ids, rejected_ids, chosen_mask)]: each reply rendered as the assistant turn after the
    prompt; chosen_mask marks the chosen reply's tokens and its <|im_end|> (render_chat's mask). Pairs
    longer than max_len tokens are skipped; returns (encoded, number skipped)."""
    out, too_long = [], 0
    for p in pairs:
        (c, mask), (r, _) = (tokenizer.render_chat(p["prompt"] + [{"role": "assistant", "content": p[k]}])
                             for k in ("chosen", "rejected"))
        if max(len(c), len(r)) > max_len:
            too_long += 1
        else:
            out.append((c, r, mask))
    return out, too_long


def collate(pairs, pad_id):
    """One right-padded batch of 2B sequences (the chosen ones, then the rejected ones), their lengths,
    and next-token targets for the B chosen rows: the reply's tokens, IGNORE_INDEX elsewhere."""
    seqs = [c for c, _, _ in pairs] + [r for _, r, _ in pairs]
    lengths = torch.tensor([len(s) for s in seqs])
    idx = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s)
    targets = torch.full((len(pairs), idx.shape[1]), IGNORE_INDEX, dtype=torch.long)
    for i, (c, _, mask) in enumerate(pairs):
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        targets[i, :len(c) - 1][keep] = torch.tensor(c[1:])[keep]
    return idx, lengths, targets


def main():
    config = configure(globals())
    ctx, ckpt, model_cfg, tokenizer = setup_stage(config, dropout=dropout)
    model = RewardModel(model_cfg, lm_head=lm_coef > 0)
    if init_from != "resume":  # the chat model's weights; the head starts fresh
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        if unexpected or set(missing) - {"reward_head.weight", "reward_head.bias"}:
            die(f"{init_from} does not fit this model: missing {missing}, unexpected {unexpected}")
        print0(f"initialized from {init_from} (step {ckpt['step']}), {model.num_params() / 1e6:.2f}M parameters")

    (train, long_train), (dev, long_dev) = (encode_pairs(tokenizer, p, model_cfg.max_seq_len)
                                            for p in read_data("pairs", data, dev_data))
    check_pairs(train, dev, (long_train, long_dev), model_cfg.max_seq_len)
    run = Run(ctx, config, model, ckpt, model_cfg, tokenizer, best="dev_accuracy", maximize=True)
    model, optimizer, ckpt = run.model, run.optimizer, None

    def rewards(batch, lm=False):
        """(r_chosen, r_rejected, NLL of the chosen replies or None unless lm)."""
        idx, lengths, targets = collate(batch, tokenizer.pad_id)
        with ctx.autocast:
            out = model(idx.to(ctx.device), lengths.to(ctx.device), targets.to(ctx.device) if lm else None)
        r, nll = out if lm else (out, None)
        return r[:len(batch)], r[len(batch):], nll

    def evaluate():
        """Loss, accuracy and mean margin over every dev pair."""
        def stats(batch):
            r_c, r_r, _ = rewards(batch)
            return torch.stack(rm_loss(r_c, r_r, margin, center_coef))
        return dict(zip(("dev_loss", "dev_accuracy", "dev_margin"), dev_means(model, ctx, dev, batch_size, stats)))

    # -------------------------------------------------------------------------------------------
    # training loop (run.steps evaluates, checkpoints, and saves and stops on SIGTERM)
    for step in run.steps(evaluate):
        lr_now = get_lr(step, config)
        set_lr(optimizer, lr_now)
        stats = torch.zeros(4, device=ctx.device)
        for batch in epoch_batches(model, train, step, batch_size, grad_accum, ctx, seed):
            r_c, r_r, nll = rewards(batch, lm=lm_coef > 0)
            loss, acc, mar = rm_loss(r_c, r_r, margin, center_coef)
            nll = nll if nll is not None else torch.zeros((), device=ctx.device)
            ctx.scaler.scale((loss + lm_coef * nll) / grad_accum).backward()
            stats += torch.stack([loss.detach(), acc, mar.detach(), nll.detach()]) / grad_accum
        grad_norm = step_optimizer(model, optimizer, ctx.scaler, grad_clip)
        train_loss, train_acc, train_margin, train_nll = all_reduce_mean(ctx, stats).tolist()
        run.log(step, {"loss": train_loss, "accuracy": train_acc, "margin": train_margin,
                       **({"lm_loss": train_nll} if lm_coef else {})}, lr_now, grad_norm)
    shutdown()


if __name__ == "__main__":
    main()
