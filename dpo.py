"""Direct Preference Optimization (DPO): learn from preference pairs without a reward model.

    python dpo.py                                            # demo world on a CPU: out/sft -> out/dpo, minutes
    torchrun --nproc_per_node=8 dpo.py --init_from=out/sft-1b --out_dir=out/dpo-1b \
        --data=data/prefs/pairs.jsonl --dev_data=data/prefs/pairs_dev.jsonl --answer_data=data/chat/sft_dev.jsonl

Each line of `data` is {"prompt": str or messages, "chosen": str, "rejected": str}. The policy and a
frozen reference both start as the SFT model (the reference stays in eval mode, without gradients;
dropout is off in both so their log-probabilities compare like with like). With lp = the summed
log-probability of the reply's tokens and its <|im_end|> given the prompt (prompt tokens excluded),
for the policy and ref for the reference, the DPO loss (Rafailov et al. 2023, eq. 7) is

    L = -log sigmoid(beta * ((lp_chosen - ref_chosen) - (lp_rejected - ref_rejected)))

beta (default 0.1) sets how far the policy may move from the reference. label_smoothing eps > 0 gives
conservative DPO (Mitchell 2023), for labels that are wrong with probability eps; loss_type=ipo gives
IPO (Azar et al. 2023), a squared loss that does not push the margin to infinity; rpo_alpha > 0 (1 by
default) adds the chosen reply's per-token NLL (RPO, Pang et al. 2024; Llama 3's DPO stage has this
term too): DPO alone also lowers the chosen replies' likelihood, and with it the answers.

On-policy negatives (self_play = n > 0, SPIN: Chen et al. 2024): before training, the reference samples
n replies (temperature 1) to every distinct (prompt, chosen) of the training pairs, and each sample
that differs from chosen joins the data as (prompt, chosen, sample). Written pairs say which replies
lose in general; these say which mistakes THIS model makes, and pushing those down is what carries
over to questions it never trained on. The
assumption, as in SPIN, is that a sample unlike the chosen reply is worse: true for short factual
answers, not for open-ended ones, where self_play=0 is the safe setting. The pairs are written to
out_dir/self_play.jsonl, and a resumed run reads them back.

The implicit reward of a reply is beta * (lp - ref); like TRL we log rewards/chosen, rewards/rejected,
rewards/accuracies (chosen reward > rejected) and rewards/margins, on training batches and dev pairs.
On the dev data also: likelihood_acc (the policy alone prefers chosen, lp_c > lp_r; at step 0 the SFT
model's, the baseline), answer_acc (greedy replies to answer_data's chats matched exactly: preference
training must not hurt answering) and refusal_acc (the same on refusal_data; the demo: "I don't know." to
strangers held out of the pairs, what its pairs teach). Identical and over-long pairs are counted and skipped.
Reads init_from/{ckpt.pt, tokenizer.model}, data, dev_data, answer_data; writes out_dir/{ckpt.pt,
ckpt_best.pt, tokenizer.model, config.json, metrics.jsonl, self_play.jsonl}. SIGTERM or Ctrl-C saves
and exits; --init_from=resume continues exactly where it stopped, against the same reference.
"""
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from checkpoint import die, generate_replies, load_checkpoint, print0
from common import (Run, all_reduce_mean, answer_accuracy, check_pairs, dev_means, epoch_batches, get_lr, read_data,
                    set_lr, setup_stage, shutdown, step_optimizer)
from configurator import configure
from model import IGNORE_INDEX, Transformer

# -----------------------------------------------------------------------------------------------
# config
init_from = "out/sft"    # the SFT run that gives both policy and reference, or 'resume' (continue out_dir)
data = "data/demo/pairs.jsonl"  # one file, or several separated by commas (the demo adds pairs_grounded.jsonl)
dev_data = "data/demo/pairs_dev.jsonl"
answer_data = "data/demo/sft_dev.jsonl"  # chats whose last reply is generated and scored ('' : skip)
refusal_data = "data/demo/refuse_dev.jsonl"  # the same, for questions the model should decline ('' : skip)
out_dir = "out/dpo"
beta = 0.1
label_smoothing = 0.0    # conservative DPO: eps, the assumed probability that a label is flipped
loss_type = "sigmoid"    # sigmoid (DPO) | ipo
rpo_alpha = 1.0          # > 0: add the chosen reply's per-token NLL with this weight (RPO), keeps it likely
self_play = 2            # > 0: this many replies sampled from the reference per distinct (prompt, chosen)
                         # become extra rejected replies where they differ from chosen (SPIN); 0: data only
batch_size = 16          # pairs per micro-step per process
grad_accum = 1
lr = 5e-5                # the demo: refusals to held-out strangers +25 to +40 points, answers -5 to -7 (it declines some)
min_lr = 5e-6
weight_decay = 0.0
beta1 = 0.9              # AdamW's betas (DPO's is `beta` above)
beta2 = 0.95
grad_clip = 1.0
lr_schedule = "cosine"
warmup_steps = 10
max_steps = 100
eval_interval = 100      # the demo: at the start and the end (an evaluation generates ~600 replies)
eval_answers = 0         # answer_data chats to score (0: all)
answer_tokens = 32       # as sft.py
log_interval = 10
keep_last = 1            # step checkpoints kept; ckpt_best.pt holds the highest dev rewards/accuracies
device = "auto"
dtype = "auto"
compile = False
parallel = "ddp"
seed = 1337


def encode_pair(tokenizer, pair, max_len):
    """(x_chosen, y_chosen, x_rejected, y_rejected): inputs and next-token targets of prompt + reply,
    where the prompt is rendered with the generation prompt and the reply is its tokens and <|im_end|>
    (exactly what render_chat marks as the assistant's). Targets inside the prompt are IGNORE_INDEX,
    so only the reply's tokens are scored. None if a sequence has more than max_len inputs."""
    prompt = tokenizer.render_chat(pair["prompt"], add_generation_prompt=True)[0]
    out = []
    for reply in (pair["chosen"], pair["rejected"]):
        ids = prompt + tokenizer.encode(reply) + [tokenizer.im_end_id]
        if len(ids) - 1 > max_len:
            return None
        out += [ids[:-1], [IGNORE_INDEX] * (len(prompt) - 1) + ids[len(prompt):]]
    return tuple(out)


def collate(examples, pad_id):
    """Right-padded (x, y) of 2B rows: the chosen sequences, then the rejected ones."""
    rows = [(e[0], e[1]) for e in examples] + [(e[2], e[3]) for e in examples]
    T = max(len(x) for x, _ in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (xi, yi) in enumerate(rows):
        x[i, :len(xi)], y[i, :len(yi)] = torch.tensor(xi), torch.tensor(yi)
    return x, y


def sequence_logprobs(logits, targets):
    """log pi(reply | prompt) = sum_t log pi(y_t | x_{<=t}) over the positions whose target is not
    IGNORE_INDEX (the reply's tokens), per row: (B,) float32."""
    logp = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="none")
    return logp.view(targets.shape).sum(-1)


def dpo_loss(lp_c, lp_r, ref_c, ref_r, beta=0.1, label_smoothing=0.0, loss_type="sigmoid", rpo_alpha=0.0,
             chosen_tokens=None):
    """The preference loss over a batch of pairs, and TRL's reward statistics.
        h = (lp_c - ref_c) - (lp_r - ref_r)                      (difference of policy/reference log-ratios)
        sigmoid (DPO, cDPO): L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        ipo:                 L = (h - 1 / (2 beta))^2
        rpo_alpha > 0 (RPO, Pang et al. 2024) adds  alpha * (-lp_c / |y_c|),  the chosen reply's NLL per token
    The implicit rewards are beta * (lp - ref); accuracies counts pairs whose chosen reward is higher."""
    h = (lp_c - ref_c) - (lp_r - ref_r)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be sigmoid or ipo, not {loss_type!r}")
    if rpo_alpha:
        losses = losses + rpo_alpha * -lp_c / chosen_tokens
    chosen, rejected = beta * (lp_c - ref_c).detach(), beta * (lp_r - ref_r).detach()
    return losses.mean(), {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                           "rewards/accuracies": (chosen > rejected).float().mean(),
                           "rewards/margins": (chosen - rejected).mean()}


def self_play_pairs(ref, tokenizer, pairs, n, max_new_tokens, ctx, seed):
    """SPIN's negatives: n replies sampled (temperature 1) from the reference for each distinct
    (prompt, chosen) among pairs; each reply that differs from chosen makes a pair. The ranks split the
    prompts and gather the pairs, so every rank ends up with the same list."""
    distinct = list({(json.dumps(p["prompt"], ensure_ascii=False), p["chosen"]): p for p in pairs}.values())
    mine = distinct[ctx.rank::ctx.world_size]
    g = torch.Generator(device=ctx.device).manual_seed(seed + ctx.rank)
    out = []
    for _ in range(n):
        with ctx.autocast:
            replies = generate_replies(ref, tokenizer, [p["prompt"] for p in mine], max_new_tokens, temperature=1.0,
                                       generator=g)
        out += [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": r.strip()}
                for p, r in zip(mine, replies) if r.strip() != p["chosen"].strip()]
    if ctx.ddp:
        parts = [None] * ctx.world_size
        dist.all_gather_object(parts, out, group=ctx.cpu_group)
        out = [p for part in parts for p in part]
    return out, len(distinct) * n


def main():
    config = configure(globals())
    ctx, ckpt, model_cfg, tokenizer = setup_stage(config, dropout=0.0)  # dropout off in policy and reference
    resume = init_from == "resume"
    model, ref = Transformer(model_cfg), Transformer(model_cfg)  # both the SFT model
    ref_src = ckpt["reference"] if resume else init_from  # a resumed run keeps the reference it started from
    ref.load_state_dict(load_checkpoint(ref_src)["model"] if resume else ckpt["model"])
    ref.to(ctx.device).eval().requires_grad_(False)
    if not resume:
        model.load_state_dict(ckpt["model"])
        print0(f"policy and reference from {init_from} (step {ckpt['step']}), "
               f"{model.num_params() / 1e6:.2f}M parameters each")

    *parts, dev_pairs = read_data("pairs", *data.split(","), dev_data)
    train_pairs = [p for part in parts for p in part]
    answer_paths = {key: path for key, path in (("answer_acc", answer_data), ("refusal_acc", refusal_data)) if path}
    chats = dict(zip(answer_paths, read_data("sft", *answer_paths.values())))
    if self_play:
        path = os.path.join(out_dir, "self_play.jsonl")
        if resume:
            if not os.path.isfile(path):
                die(f"{path} is missing: the run being resumed did not use self-play; resume it with --self_play=0")
            extra = read_data("pairs", path)[0]
        else:
            t0 = time.perf_counter()
            extra, drawn = self_play_pairs(ref, tokenizer, train_pairs, self_play, answer_tokens, ctx, seed)
            print0(f"self-play: {drawn} replies sampled from the reference in {time.perf_counter() - t0:.0f}s, "
                   f"{len(extra)} differ from the chosen reply and become rejected ones")
            if ctx.master:
                os.makedirs(out_dir, exist_ok=True)
                with open(path + ".tmp", "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in extra)
                os.replace(path + ".tmp", path)
        train_pairs = train_pairs + extra
    train, dev = ([e for e in (encode_pair(tokenizer, p, model_cfg.max_seq_len) for p in ps) if e]
                  for ps in (train_pairs, dev_pairs))
    check_pairs(train, dev, (len(train_pairs) - len(train), len(dev_pairs) - len(dev)), model_cfg.max_seq_len)
    run = Run(ctx, config, model, ckpt, model_cfg, tokenizer, best="dev_rewards/accuracies", maximize=True,
              reference=ref_src)
    model, optimizer, ckpt = run.model, run.optimizer, None

    def forward(batch):
        """The pairs' DPO loss and statistics, from the summed reply log-probs of the policy (with
        grad) and of the reference (without); plus the policy's own preference lp_c > lp_r."""
        x, y = (t.to(ctx.device) for t in collate(batch, tokenizer.pad_id))
        with ctx.autocast:
            lp = sequence_logprobs(model(x)[0], y)
            with torch.no_grad():
                ref_lp = sequence_logprobs(ref(x)[0], y)
        n = len(batch)
        loss, stats = dpo_loss(lp[:n], lp[n:], ref_lp[:n], ref_lp[n:], beta, label_smoothing, loss_type, rpo_alpha,
                               chosen_tokens=(y[:n] != IGNORE_INDEX).sum(-1))
        return loss, stats, (lp[:n] > lp[n:]).float().mean()

    def evaluate():
        """DPO statistics and likelihood_acc over every dev pair; answer and refusal accuracy."""
        def dev_stats(batch):
            loss, stats, likelihood_acc = forward(batch)
            return torch.stack([loss, *stats.values(), likelihood_acc])
        keys = ["dev_loss", "dev_rewards/chosen", "dev_rewards/rejected", "dev_rewards/accuracies",
                "dev_rewards/margins", "dev_likelihood_acc"]
        record = dict(zip(keys, dev_means(model, ctx, dev, batch_size, dev_stats)))
        for key, cs in chats.items():
            record[key] = answer_accuracy(model, tokenizer, cs, answer_tokens, eval_answers)[0]
        return record

    # -------------------------------------------------------------------------------------------
    # training loop (run.steps evaluates, checkpoints, and saves and stops on SIGTERM)
    for step in run.steps(evaluate):
        lr_now = get_lr(step, config)
        set_lr(optimizer, lr_now)
        sums = torch.zeros(5, device=ctx.device)
        for batch in epoch_batches(model, train, step, batch_size, grad_accum, ctx, seed):
            loss, stats, _ = forward(batch)
            ctx.scaler.scale(loss / grad_accum).backward()
            sums += torch.stack([loss.detach(), *stats.values()]) / grad_accum
        grad_norm = step_optimizer(model, optimizer, ctx.scaler, grad_clip)
        run.log(step, dict(zip(["loss", *stats], all_reduce_mean(ctx, sums).tolist())), lr_now, grad_norm)
    shutdown()


if __name__ == "__main__":
    main()
