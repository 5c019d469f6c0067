"""grpo.py: the verifier, group advantages, the clipped surrogate and its gradient, the k3 KL, and the
script end to end (2 processes under torchrun, exact resume). Models have dim 32 and 2 layers."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from data_formats import extract_answer, is_correct
from grpo import build_batch, group_advantages, grpo_loss, logprobs_and_entropy, parse_reward
from model import IGNORE_INDEX, ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def tiny_model(seed=0, vocab=64, max_seq_len=32):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=max_seq_len)
    return Transformer(cfg)


def rollout_batch(seed=0, vocab=64, B=4, T=12):
    """idx/targets like grpo.py builds them: a prompt (no loss), a completion of varying length, padding."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.full((B, T), IGNORE_INDEX)
    for b in range(B):
        start, end = 3 + b % 2, T - b  # completions of different lengths, then padding
        targets[b, start:end] = torch.randint(0, vocab, (end - start,), generator=g)
    return idx, targets


# -- verifier ---------------------------------------------------------------------------------------

def test_extract_answer_english_chinese_and_gsm8k():
    assert extract_answer("53 + 1 = 54.") == "54"
    assert extract_answer("Sala has 21 pens left.") == "21"
    assert extract_answer("37加66等于103。") == "103"
    assert extract_answer("现在帕基有57枚硬币。") == "57"
    assert extract_answer("答案是１２３。") == "123"                     # full-width digits
    assert extract_answer("It costs 1,234.5 dollars") == "1234.5"
    assert extract_answer("x = -5") == "-5"
    assert extract_answer("She sells 16 - 3 - 4 = 9 eggs.\n#### 18") == "18"   # GSM8K: the #### line wins
    assert extract_answer("#### 1,080 and then 7") == "1080"


def test_extract_answer_rejects_malformed():
    assert extract_answer("I don't know.") is None
    assert extract_answer("我不知道。") is None
    assert extract_answer("The total is 42.\n####") is None           # a #### line without a number
    assert extract_answer("#### forty-two (42)") is None              # not a number right after ####
    assert extract_answer("") is None


def test_is_correct_numeric_tolerance_and_exact_match():
    assert is_correct("53 + 1 = 54.", "54") and not is_correct("53 + 1 = 55.", "54")
    assert is_correct("95减65等于30。", "30") and not is_correct("95减65等于31。", "30")
    assert is_correct("the answer is 3.0000000001", "3") and not is_correct("3.01", "3")
    assert is_correct("so 2.5", "2.50")
    assert is_correct("#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72")  # raw GSM8K answer field
    assert not is_correct("no number here", "54") and not is_correct("54 #### ", "54")
    assert is_correct("Kadi lives in Notali.", "kadi lives in notali")  # non-numeric: exact, normalized
    assert not is_correct("Kadi lives in Notali, I think.", "Kadi lives in Notali.")


def test_parse_reward():
    assert parse_reward("rule") == [("rule", None, 1.0)]
    assert parse_reward("rm:out/rm") == [("rm", "out/rm", 1.0)]
    assert parse_reward("rule:1.0,rm:out/rm:0.5") == [("rule", None, 1.0), ("rm", "out/rm", 0.5)]
    assert parse_reward("rule, format:0.1") == [("rule", None, 1.0), ("format", None, 0.1)]
    for bad in ("rm", "rm:0.5", "rules", "rule:x", ""):
        with pytest.raises(ValueError):
            parse_reward(bad)


def rollouts(model, prompts, n, G, stop_ids, generator):
    """Completions as grpo.py takes them from generate: each row up to and including its first stop token."""
    steps = list(model.generate(prompts, n, temperature=1.0, stop_ids=stop_ids, num_samples=G, generator=generator))
    tokens, active = (torch.stack(s, dim=1) for s in zip(*steps))
    return tokens, active, [row[m].tolist() for row, m in zip(tokens, active)]


def test_completions_stop_after_the_first_stop_token():
    """generate's active flags, grpo.py's completion mask: True up to and including the row's first stop token,
    False after it (what generate samples for a row that already stopped is padding, not a completion)."""
    stop = (5, 7)
    tokens, active, completions = rollouts(tiny_model(vocab=16).eval(), [[1, 2], [3]], 8, 4, stop,
                                           torch.Generator().manual_seed(0))
    for row, m, c in zip(tokens.tolist(), active.tolist(), completions):
        first = next((i for i, t in enumerate(row) if t in stop), len(row) - 1)
        assert m == [i <= first for i in range(len(row))] and c == row[:first + 1]
    assert not active.all()  # some row stopped before the end


def test_build_batch_targets_only_completion_tokens():
    prompts, completions = [[1, 10, 11], [1, 12]], [[20, 21, 7], [22]]
    idx, targets = build_batch(prompts, completions)
    I = IGNORE_INDEX
    assert idx.tolist() == [[1, 10, 11, 20, 21], [1, 12, 0, 0, 0]]
    assert targets.tolist() == [[I, I, 20, 21, 7], [I, 22, I, I, I]]


# -- advantages -----------------------------------------------------------------------------------

def test_group_advantages_equal_the_formula_both_variants():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.2, 0.9, 0.1, 1.0, 1.0, 1.0, 1.0, 0.3, 0.3, 0.3, 0.3])
    adv, zero_std = group_advantages(rewards, 4, scale=True, eps=1e-4)
    for g in range(4):
        r = rewards[4 * g:4 * g + 4]
        mean, std = r.mean(), r.std()  # unbiased std, as TRL
        want = torch.zeros(4) if g >= 2 else (r - mean) / (std + 1e-4)
        torch.testing.assert_close(adv[4 * g:4 * g + 4], want)
    assert zero_std.tolist() == [False, False, True, True]
    assert torch.equal(adv[8:], torch.zeros(8))  # exactly zero, not merely small (0.3 has no exact mean)
    adv_dr, zero_dr = group_advantages(rewards, 4, scale=False)
    want = torch.cat([rewards[:4] - rewards[:4].mean(), rewards[4:8] - rewards[4:8].mean()])
    torch.testing.assert_close(adv_dr[:8], want)
    assert torch.equal(adv_dr[8:], torch.zeros(8)) and torch.equal(zero_dr, zero_std)
    # std scaling: the same ranking, a different size; Dr. GRPO keeps the reward's scale
    assert torch.allclose(adv[:4] * (rewards[:4].std() + 1e-4), adv_dr[:4])


# -- loss -----------------------------------------------------------------------------------------

def test_logprobs_match_token_logprobs():
    model = tiny_model().eval()
    idx, targets = rollout_batch()
    logits, _ = model(idx)
    logp, entropy = logprobs_and_entropy(logits, targets, temperature=0.7)
    torch.testing.assert_close(logp, model.token_logprobs(idx, targets, temperature=0.7))
    assert (entropy > 0).all() and (entropy <= torch.log(torch.tensor(64.0)) + 1e-5).all()


@pytest.mark.parametrize("loss_norm", ["sequence", "token", "constant"])
def test_first_iteration_gradient_is_the_policy_gradient(loss_norm):
    """Ratio 1 (old = current, detached): grad of the GRPO loss == grad of -A * logp over completion
    tokens, normalized the same way."""
    model, idx, targets = tiny_model(), *rollout_batch()
    mask = targets != IGNORE_INDEX
    adv = torch.tensor([1.5, -0.5, 0.7, -1.2])

    def grads(loss_fn):
        model.zero_grad()
        logits, _ = model(idx)
        logp, _ = logprobs_and_entropy(logits, targets, temperature=0.9)
        loss_fn(logp).backward()
        return [p.grad.clone() for p in model.parameters()]

    g_grpo = grads(lambda lp: grpo_loss(lp, lp.detach(), None, adv, mask, 0.2, 0.28, 0.0, loss_norm, max_len=12)[0])
    norm = {"sequence": mask.sum(1, keepdim=True) * 4, "token": mask.sum(), "constant": 4 * 12}[loss_norm]
    g_pg = grads(lambda lp: (-adv[:, None] * lp * mask / norm).sum())
    assert any(g.abs().sum() > 0 for g in g_grpo)
    for a, b in zip(g_grpo, g_pg):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_clipping_zeroes_the_gradient_on_the_clipped_side_only():
    """rho outside [1 - eps_low, 1 + eps_high]: no gradient where clipping caps the gain (A > 0 and rho too
    high, A < 0 and rho too low); the other side still gets -A * rho / n, pushing rho back towards 1."""
    rho = torch.tensor([0.5, 0.75, 0.9, 1.1, 1.25, 1.5])
    old = torch.zeros(1, 6)
    mask = torch.ones(1, 6)
    for A, zero in ((1.0, [False, False, False, False, True, True]),    # capped above 1 + eps_high = 1.2
                    (-1.0, [True, False, False, False, False, False])):  # capped below 1 - eps_low = 0.6
        logp = torch.log(rho)[None].clone().requires_grad_(True)
        loss, st = grpo_loss(logp, old, None, torch.tensor([A]), mask, eps_low=0.4, eps_high=0.2, loss_norm="token")
        loss.backward()
        g = logp.grad[0]
        assert [bool(x == 0) for x in g] == zero
        assert torch.allclose(g[~torch.tensor(zero)], (-A * rho / 6)[~torch.tensor(zero)])
        # descent moves log-probs up when A > 0 and down when A < 0
        assert ((-g[g != 0]) * A > 0).all()
        assert st["clipped"].item() == sum(zero)
    # clip-higher: with eps_high = 0.28, rho = 1.25 is inside the trust region again
    logp = torch.log(rho)[None].clone().requires_grad_(True)
    grpo_loss(logp, old, None, torch.tensor([1.0]), mask, eps_low=0.2, eps_high=0.28, loss_norm="token")[0].backward()
    assert logp.grad[0, 4] != 0 and logp.grad[0, 5] == 0


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    policy, idx, targets = tiny_model(), *rollout_batch()
    mask = targets != IGNORE_INDEX
    ref = copy.deepcopy(policy).requires_grad_(False)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0])
    lp = policy.token_logprobs(idx, targets)
    _, st = grpo_loss(lp, lp.detach(), ref.token_logprobs(idx, targets), adv, mask, beta=0.1)
    assert st["kl"].item() == 0.0
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lp = policy.token_logprobs(idx, targets)
    ref_lp = ref.token_logprobs(idx, targets)
    loss_kl, st = grpo_loss(lp, lp.detach(), ref_lp, adv, mask, beta=0.1)
    loss_0, _ = grpo_loss(lp, lp.detach(), ref_lp, adv, mask, beta=0.0)
    log_r = (ref_lp - lp)[mask]
    k3 = torch.exp(log_r) - log_r - 1
    assert (k3 >= 0).all() and st["kl"].item() > 0
    torch.testing.assert_close(st["kl"], k3.sum())
    assert loss_kl.item() > loss_0.item()  # the penalty adds to the loss


def test_the_pieces_together_raise_a_toy_reward():
    """Sample G completions, reward each by how many of its tokens are 5, advantages, loss, AdamW: the
    mean reward must rise well above its start (the random model gives 5 about 1/16 of the time)."""
    model = tiny_model(vocab=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    prompts, curve = [[1, 2], [3], [4, 6, 7]], []
    for step in range(25):
        model.eval()
        _, _, completions = rollouts(model, prompts, 6, 8, (15,), g)
        rewards = torch.tensor([sum(t == 5 for t in c) / 6 for c in completions])
        adv, _ = group_advantages(rewards, 8)
        idx, targets = build_batch([p for p in prompts for _ in range(8)], completions)
        logits, _ = model(idx)
        logp, _ = logprobs_and_entropy(logits, targets)
        loss, _ = grpo_loss(logp, logp.detach(), None, adv, targets != IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(rewards.mean().item())
    assert sum(curve[:5]) / 5 < 0.15 and sum(curve[-5:]) / 5 > 0.5, curve


# -- the script ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A chat 'checkpoint' as the sft stage writes one (random weights, dim 32), its tokenizer, and prompts."""
    from tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("grpo")
    texts = [f"What is {a} + {b}? {a} + {b} = {a + b}. {a}加{b}等于{a + b}。" for a in range(30) for b in range(30)]
    os.makedirs(d / "sft")
    tok = train_tokenizer(texts, 290, str(d / "sft" / "tokenizer.model"))
    model = tiny_model(vocab=tok.vocab_size, max_seq_len=64)
    torch.save({"model": model.state_dict(), "model_config": model.cfg.to_dict(), "config": {}, "step": 0,
                "stage": "sft", "tokenizer": tok.name}, d / "sft" / "ckpt.pt")
    for name, rng in (("train.jsonl", range(0, 40)), ("dev.jsonl", range(40, 46))):
        with open(d / name, "w") as f:
            for i in rng:
                a, b = i % 7, i // 7
                q = f"What is {a} + {b}?" if i % 2 else f"{a}加{b}等于多少？"
                f.write(json.dumps({"prompt": q, "answer": str(a + b)}, ensure_ascii=False) + "\n")
    return d


def grpo(d, out, *args, nproc=1):
    cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), f"--init_from={d}/sft", f"--out_dir={out}",
           f"--data={d}/train.jsonl", f"--eval_data={d}/dev.jsonl", "--device=cpu", "--dtype=float32",
           "--prompts_per_step=2", "--group_size=4", "--max_new_tokens=6", "--micro_batch=4", "--lr=1e-3",
           "--eval_interval=2", *args]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_process_smoke_run_writes_a_loadable_grpo_checkpoint(sft_dir, tmp_path):
    out = str(tmp_path / "two")
    recs = grpo(sft_dir, out, "--max_steps=3", "--mu=2", "--beta=0.1", "--reward=rule,format:0.5",
                "--loss_norm=token", "--eps_high=0.28", "--dtype=bfloat16", nproc=2)
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in recs if "eval_pass@1" in r] == [0, 2, 3]
    for key in ("reward", "reward_std", "acc", "zero_std", "kl", "clip_frac", "entropy", "len", "gen_tok_s",
                "train_tok_s"):
        assert all(key in r for r in train), key
    assert train[0]["kl"] == 0.0 or train[0]["kl"] < 1e-6  # the first pass starts at the reference
    assert train[-1]["kl"] > 0  # three steps at lr 1e-3 later, the policy has moved
    assert all(0 < r["len"] <= 6 and 0 <= r["zero_std"] <= 1 for r in train)
    from checkpoint import load_model
    model, _, ckpt = load_model(out)
    assert ckpt["step"] == 3 and ckpt["stage"] == "grpo" and model.cfg.dim == 32


@pytest.mark.slow
def test_exact_resume(sft_dir, tmp_path):
    """4 steps straight == 2 steps, stop, resume 2: the same logs and weights (prompts and sampling
    generators are functions of the step)."""
    straight, parts = str(tmp_path / "straight"), str(tmp_path / "parts")
    a = grpo(sft_dir, straight, "--max_steps=4")
    grpo(sft_dir, parts, "--max_steps=4", "--stop_at_step=2")
    b = grpo(sft_dir, parts, "--max_steps=4", "--init_from=resume")

    def timeless(recs):
        return [{k: v for k, v in r.items() if k not in ("gen_tok_s", "train_tok_s")} for r in recs]
    assert timeless(a) == timeless(b) and len(a) == 7  # evals at steps 0, 2, 4 and 4 training steps
    wa = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)["model"]
    wb = torch.load(os.path.join(parts, "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
