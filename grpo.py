"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) with verifiable rewards, a reward
model, or both.

    python grpo.py --init_from=out/sft --reward=rule:1.0,format:0.1,rm:out/rm:0.5   # demo world, CPU, minutes
    torchrun --nproc_per_node=8 grpo.py --init_from=out/sft --data=gsm8k_train.jsonl \
        --eval_data=gsm8k_test.jsonl --max_new_tokens=256 --lr=1e-6                 # GPUs

Each step samples G completions for each prompt of a batch, scores them, turns each group's scores into advantages
relative to the group, and takes mu gradient steps on the clipped surrogate minus beta times a KL estimate to the
frozen starting model; greedy pass@1 on held-out prompts every eval_interval steps. Reads init_from (sft or dpo),
data and eval_data (jsonl {"prompt", "answer"} or GSM8K); writes out_dir/{ckpt.pt, ckpt_best.pt (best pass@1),
tokenizer.model, config.json, metrics.jsonl}. SIGTERM or Ctrl-C saves; --init_from=resume continues exactly.
"""
import copy
import functools
import time

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import die, generate_replies, load_checkpoint, load_model, load_reward_fn, print0
from common import (Run, all_reduce_mean, catch_signals, get_lr, grad_sync, read_data, set_lr, setup, shutdown,
                    step_optimizer)
from configurator import configure
from data_formats import extract_answer, is_correct
from model import IGNORE_INDEX

# config: defaults work on the demo world; config/*.py and --key=value override
init_from = "out/sft"      # policy and reference start here (an sft or dpo out dir); 'resume': continue out_dir
out_dir = "out/grpo"
data = "data/demo/grpo.jsonl"           # training prompts with answers
eval_data = "data/demo/grpo_dev.jsonl"  # held-out prompts for greedy pass@1 ('' : none)
# reward: comma-separated terms NAME[:ARG][:WEIGHT] (weight 1 if absent), summed: rule (1 if the reply's final
# number equals the answer), format (1 if the reply ended by itself and has a final number), rm:DIR (rm.py's score)
reward = "rule"
num_tol = 1e-6             # numbers match if |pred - answer| <= num_tol * max(1, |answer|)
# rollouts
prompts_per_step = 16      # prompts per process per step
group_size = 8             # G completions per prompt
max_new_tokens = 32
temperature = 1.0          # sampling temperature; log-probs are computed at this temperature too
top_p = 1.0
# objective (see grpo_loss)
mu = 1                     # optimization passes over each batch of rollouts (1: fully on-policy)
micro_batch = 64           # completions per forward/backward (gradients add up)
eps_low = 0.2              # ratio clipped below at 1 - eps_low ...
eps_high = 0.2             # ... and above at 1 + eps_high (DAPO clip-higher: 0.28)
beta = 0.04                # KL penalty weight (0: no reference model is kept at all)
scale_rewards = True       # divide advantages by the group's std (False: Dr. GRPO)
loss_norm = "sequence"     # sequence (GRPO) | token (DAPO) | constant (Dr. GRPO)
adv_eps = 1e-4
# AdamW and schedule
lr = 1e-4
min_lr = 1e-4
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
lr_schedule = "constant"
warmup_steps = 0
max_steps = 50              # the demo: held-out pass@1 +12 to +22 points in 1 to 2.5 minutes
stop_at_step = 0           # > 0: save and exit after this step, as a preempted job would
# evaluation, logging, checkpoints
eval_interval = 50         # greedy pass@1 on eval_data and a checkpoint every this many steps
eval_batch = 128           # held-out prompts per generation batch
log_interval = 1
keep_last = 2
# system
device = "auto"            # auto | cpu | cuda | cuda:N | mps
dtype = "auto"             # auto | bfloat16 | float16 | float32
compile = False
seed = 1337


# the method (tests import these pieces): rewards, advantages, loss
def parse_reward(spec):
    """'rule:1.0,rm:out/rm:0.5' -> [('rule', None, 1.0), ('rm', 'out/rm', 0.5)] (see the reward option)."""
    terms = []
    for term in spec.split(","):
        parts, weight = term.strip().split(":"), 1.0
        if len(parts) > 1:
            try:
                weight, parts = float(parts[-1]), parts[:-1]
            except ValueError:
                pass
        name, arg = parts[0], ":".join(parts[1:]) or None
        if name not in ("rule", "format", "rm") or (name == "rm") != (arg is not None):
            raise ValueError(f"reward term {term!r}: expected rule, format or rm:DIR, each with an optional :WEIGHT")
        terms.append((name, arg, weight))
    return terms


def build_batch(prompts, completions):
    """(idx, targets) (N, T), right-padded; targets[t] = idx[t + 1] on completion tokens, else IGNORE_INDEX."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    idx = torch.zeros(len(seqs), max(map(len, seqs)) - 1, dtype=torch.long)
    targets = torch.full_like(idx, IGNORE_INDEX)
    for i, (s, c) in enumerate(zip(seqs, completions)):
        idx[i, :len(s) - 1] = torch.tensor(s[:-1])
        targets[i, len(s) - 1 - len(c):len(s) - 1] = torch.tensor(c)
    return idx, targets


def group_advantages(rewards, group_size, scale=True, eps=1e-4):
    """Outcome supervision (DeepSeekMath sec. 4.1.2): A_i = (r_i - mean(r)) / (std(r) + eps) over a prompt's G
    completions, exactly 0 where all are equal. scale=False is Dr. GRPO (Liu et al. 2025), A_i = r_i - mean(r): the
    std up-weights prompts that are nearly always right or wrong. Returns (A (N,), zero_std (N/G,) bool)."""
    r = rewards.view(-1, group_size).float()
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    zero_std = (r == r[:, :1]).all(dim=1)
    return adv.masked_fill(zero_std[:, None], 0.0).flatten(), zero_std


def logprobs_and_entropy(logits, targets, temperature=1.0):
    """log pi(targets[t]) under softmax(logits / temperature), 0 where targets is IGNORE_INDEX (what
    Transformer.token_logprobs gives, here from the DDP-wrapped forward), and the entropy (no gradient, for the log)."""
    logits = logits.float() / temperature
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    with torch.no_grad():
        logq = F.log_softmax(logits, dim=-1)
        entropy = -(logq.exp() * logq).sum(-1)
    return -nll.view(targets.shape), entropy


# DeepSeekMath (Shao et al. 2024), eq. 3, which we maximize:
#   J(theta) = E_{q, {o_i} ~ pi_old(.|q)} 1/G sum_i 1/|o_i| sum_t {
#                 min(rho_it A_it, clip(rho_it, 1 - eps, 1 + eps) A_it) - beta D_KL[pi_theta || pi_ref] }
#   rho_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)
#   D_KL   = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1       (k3 estimator, eq. 4: unbiased, always >= 0)
# With mu = 1, rho = 1 and the gradient is that of -A log pi_theta (REINFORCE with a group baseline); clipping
# bounds the later passes of mu > 1. eps_high > eps_low (DAPO clip-higher, Yu et al. 2025) lets unlikely tokens
# grow faster, so entropy does not collapse early. loss_norm: "sequence" is the 1/|o_i| above, under which long
# replies weigh less per token and drift longer (Dr. GRPO's length bias); "token" (DAPO) weighs every token of the
# batch the same; "constant" (Dr. GRPO) divides by completions x max_new_tokens, which no reply's length changes.
def grpo_loss(logp, old_logp, ref_logp, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0, loss_norm="sequence",
              n_seqs=None, n_tokens=None, max_len=None):
    """-J for a (micro-)batch: logp (B, T), old_logp, ref_logp (None if beta == 0), adv (B,), mask (B, T). n_seqs,
    n_tokens: the whole batch's counts (all micro-batches and ranks). Returns (loss, sums of KL and clipped tokens)."""
    mask = mask.float()
    n_seqs = logp.shape[0] if n_seqs is None else n_seqs
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surrogate = torch.min(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
    clipped = ((ratio > 1 + eps_high) & (a > 0)) | ((ratio < 1 - eps_low) & (a < 0))  # zero-gradient tokens
    objective, kl = surrogate, torch.zeros_like(logp)
    if ref_logp is not None:
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1
        objective = surrogate - beta * kl
    per_token = -objective * mask
    if loss_norm == "sequence":
        loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    elif loss_norm == "token":
        loss = per_token.sum() / (mask.sum() if n_tokens is None else n_tokens)
    else:  # "constant" (main() checks the name)
        loss = per_token.sum() / (n_seqs * max_len)
    return loss, {"kl": (kl.detach() * mask).sum(), "clipped": (clipped * mask).sum()}


def main():
    config = configure(globals())
    ctx = setup(config)
    catch_signals()
    try:
        terms = parse_reward(reward)
    except ValueError as e:
        die(str(e))
    if group_size < 2:
        die("group_size must be at least 2: advantages compare the completions of one prompt")
    if loss_norm not in ("sequence", "token", "constant"):
        die(f"loss_norm must be sequence, token or constant, not {loss_norm!r}")

    # models: the policy, and a frozen copy of where it started (the reference for the KL term)
    ckpt = load_checkpoint(out_dir) if init_from == "resume" else None
    start_dir = ckpt["ref_from"] if ckpt else init_from  # the reference stays the run's starting model
    policy, tokenizer, _ = load_model(start_dir, ctx.device)
    ref = copy.deepcopy(policy).requires_grad_(False) if beta > 0 else None

    def load(path):  # prompts rendered in the chat template, ending with the assistant generation prompt
        recs = [dict(r, ids=tokenizer.render_chat(r["prompt"], add_generation_prompt=True)[0])
                for r in read_data("prompts", path)[0]]
        kept = [r for r in recs if len(r["ids"]) + max_new_tokens <= policy.cfg.max_seq_len]
        if len(kept) < len(recs):
            print0(f"{path}: {len(recs) - len(kept)} prompts skipped, too long for max_seq_len - max_new_tokens")
        if not kept:
            die(f"{path}: no prompt fits max_seq_len={policy.cfg.max_seq_len} with max_new_tokens={max_new_tokens}")
        return kept
    train_set = load(data)
    eval_set = load(eval_data) if eval_data else []

    run = Run(ctx, config, policy, ckpt, policy.cfg, tokenizer, best="eval_pass@1", maximize=True, stage="grpo",
              ref_from=start_dir)
    model, optimizer, ckpt = run.model, run.optimizer, None  # model: policy, wrapped for DDP (and torch.compile)
    reward_fns = {arg: load_reward_fn(arg, ctx.device) for name, arg, _ in terms if name == "rm"}
    print0(f"policy: {policy.num_params() / 1e6:.2f}M parameters from {start_dir}; reward {terms}; "
           f"{ctx.world_size} process(es) on {ctx.device}, {ctx.dtype}")

    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch):  # a fresh shuffle per epoch, a function of the seed: a resumed run sees the same
        return np.random.default_rng((seed, epoch)).permutation(len(train_set))

    def evaluate():  # greedy pass@1: the share of held-out prompts whose greedy reply the verifier accepts
        if not eval_set:
            return {}
        mine = eval_set[ctx.rank::ctx.world_size]
        replies = generate_replies(policy, tokenizer, [r["prompt"] for r in mine], max_new_tokens, eval_batch)
        if mine:
            print0(f"  eval: {mine[0]['prompt'][-1]['content']!r} -> {replies[0]!r} (answer {mine[0]['answer']})")
        right = torch.tensor([sum(is_correct(t, r["answer"], num_tol) for t, r in zip(replies, mine)), len(mine)],
                             dtype=torch.float32, device=ctx.device)
        right = all_reduce_mean(ctx, right) * ctx.world_size
        return {"eval_pass@1": (right[0] / right[1]).item()}

    model.eval()  # throughout: no dropout, so the log-probs we train on are those of the sampling policy
    for step in run.steps(evaluate):  # evaluates, checkpoints; saves and stops on SIGTERM or at stop_at_step
        # 1. this rank's prompts, consecutive ones of the epoch's shuffle, and G completions of each in one batched
        # generation (in the weights' dtype, as the KV cache is), seeded by (seed, step, rank)
        t0 = time.perf_counter()
        first, n = (step * ctx.world_size + ctx.rank) * prompts_per_step, len(train_set)
        recs = [train_set[epoch_order(i // n)[i % n]] for i in range(first, first + prompts_per_step)]
        gen = torch.Generator(ctx.device).manual_seed(int(np.random.SeedSequence([seed, step, ctx.rank])
                                                          .generate_state(1)[0]))
        steps = list(policy.generate([r["ids"] for r in recs], max_new_tokens, temperature, top_p=top_p,
                                     stop_ids=tokenizer.stop_ids, num_samples=group_size, generator=gen))
        tokens, active = (torch.stack(seq, dim=1) for seq in zip(*steps))  # a row is padding after its stop token
        completions = [row[m].tolist() for row, m in zip(tokens, active)]
        t_gen = time.perf_counter() - t0

        # 2. rewards: the weighted sum of the reward terms; accuracy is always the rule verifier's
        texts = [tokenizer.decode(c) for c in completions]
        rec_of = [recs[i // group_size] for i in range(len(texts))]
        correct = torch.tensor([float(is_correct(t, r["answer"], num_tol)) for t, r in zip(texts, rec_of)])
        rewards = torch.zeros(len(texts))
        for name, arg, weight in terms:
            if name == "rule":
                rewards += weight * correct
            elif name == "format":  # the reply ended by itself and has a final number
                rewards += weight * torch.tensor([float(c[-1] in tokenizer.stop_ids and extract_answer(t) is not None)
                                                  for c, t in zip(completions, texts)])
            else:  # the reward model judges the conversation: prompt turns + this reply
                rewards += weight * torch.tensor(reward_fns[arg](
                    [r["prompt"] + [{"role": "assistant", "content": t}] for t, r in zip(texts, rec_of)]))

        # 3. advantages within each group of G, and the batch of prompt + completion tokens
        adv, zero_std = group_advantages(rewards, group_size, scale_rewards, adv_eps)
        idx, targets = (t.to(ctx.device) for t in build_batch([r["ids"] for r in rec_of], completions))
        adv, mask = adv.to(ctx.device), targets != IGNORE_INDEX
        n_tokens = all_reduce_mean(ctx, mask.sum().float()) * ctx.world_size  # over all ranks
        n_seqs = len(completions) * ctx.world_size
        chunks = [slice(i, i + micro_batch) for i in range(0, len(completions), micro_batch)]

        # 4. mu passes of gradient steps on the loss, measured against the reference's log-probs and the rollout
        # policy's (with mu = 1 those are the current ones, detached: ratio = 1)
        t1 = time.perf_counter()
        with torch.no_grad(), ctx.autocast:
            ref_lp = None if ref is None else torch.cat([ref.token_logprobs(idx[c], targets[c], temperature=temperature)
                                                         for c in chunks])
            old_lp = None if mu == 1 else torch.cat([policy.token_logprobs(idx[c], targets[c], temperature=temperature)
                                                     for c in chunks])
        lr_now = get_lr(step, config)
        set_lr(optimizer, lr_now)
        sums = torch.zeros(4, device=ctx.device)  # loss, KL, clipped tokens, entropy: summed over the mu passes
        for _ in range(mu):
            for k, c in enumerate(chunks):
                grad_sync(model, k == len(chunks) - 1)  # all-reduce once per optimizer step
                with ctx.autocast:
                    logits, _ = model(idx[c])
                logp, entropy = logprobs_and_entropy(logits, targets[c], temperature)
                loss, st = grpo_loss(logp, logp.detach() if old_lp is None else old_lp[c],
                                     None if ref_lp is None else ref_lp[c], adv[c], mask[c], eps_low, eps_high,
                                     beta, loss_norm, n_seqs, n_tokens, max_new_tokens)
                # the loss is normalized by counts over all ranks, and DDP averages gradients over ranks
                ctx.scaler.scale(loss * ctx.world_size).backward()
                sums += torch.stack([loss.detach(), st["kl"], st["clipped"], (entropy * mask[c]).sum()])
            grad_norm = step_optimizer(model, optimizer, ctx.scaler, grad_clip)
        t_train = time.perf_counter() - t1

        if (step + 1) % log_interval == 0 or step == run.start_step:  # sums over ranks, then ratios
            stats = torch.tensor([rewards.sum(), (rewards ** 2).sum(), correct.sum(), zero_std.sum(), len(zero_std),
                                  sum(map(len, completions)), idx.numel(), t_gen, t_train], dtype=torch.float64)
            stats = all_reduce_mean(ctx, stats.to(ctx.device)) * ctx.world_size
            r_sum, r_sq, right, zero, groups, n_gen, n_train, t_g, t_t = stats.tolist()
            loss_sum, kl_sum, clip_sum, ent_sum = (all_reduce_mean(ctx, sums) * ctx.world_size / mu).tolist()
            n, tok = n_seqs, n_tokens.item()
            record = {"step": step + 1, "max_steps": max_steps, "loss": loss_sum, "reward": r_sum / n,
                      "reward_std": max(0.0, r_sq / n - (r_sum / n) ** 2) ** 0.5, "acc": right / n,
                      "zero_std": zero / groups, "kl": kl_sum / tok, "clip_frac": clip_sum / tok,
                      "entropy": ent_sum / tok, "len": n_gen / n, "lr": lr_now, "grad_norm": grad_norm.item(),
                      "gen_tok_s": n_gen * ctx.world_size / t_g, "train_tok_s": mu * n_train * ctx.world_size / t_t}
            if ref is None:
                del record["kl"]
            run.logger.log(record)
    shutdown()


if __name__ == "__main__":
    main()
