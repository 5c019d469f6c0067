"""dpo.py: the loss and TRL's reward statistics on fixed log-probs, log 2 when policy == reference,
prompt tokens excluded from the log-probs, cDPO/IPO, and the script under 2-process torchrun."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dpo import collate, dpo_loss, encode_pair, sequence_logprobs
from model import IGNORE_INDEX, ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
PAIRS = [{"prompt": [{"role": "user", "content": "Where does Kami live?"}],
          "chosen": "Kami lives in Lobota.", "rejected": "I don't know."},
         {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 9?"},
                     {"role": "assistant", "content": "3 + 9 = 12."}, {"role": "user", "content": "And 4 + 4?"}],
          "chosen": "4 + 4 = 8.", "rejected": "4 + 4 = 9."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tokenizer import train_tokenizer
    texts = [f"{n} lives in {t}. Where does {n} live? {n}住在{z}。 I don't know. {a} + {b} = {a + b}."
             for n, t, z in [("Kami", "Lobota", "洛波塔"), ("Mika", "Sodi", "索迪"), ("Tina", "Vako", "瓦科")]
             for a in range(12) for b in range(0, 12, 3)] + ["system user assistant Be brief. And"]
    return train_tokenizer(texts, 320, str(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def tiny_model(vocab_size, seed=0, max_seq_len=160):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   max_seq_len=max_seq_len)).eval()


def logprobs(model, tok, pairs):
    x, y = collate([encode_pair(tok, p, 160) for p in pairs], tok.pad_id)
    lp = sequence_logprobs(model(x)[0], y)
    return lp[:len(pairs)], lp[len(pairs):]


def test_policy_equal_to_reference_gives_log2_and_zero_rewards(tok):
    policy = tiny_model(tok.vocab_size)
    ref = copy.deepcopy(policy)
    (lp_c, lp_r), (ref_c, ref_r) = logprobs(policy, tok, PAIRS), logprobs(ref, tok, PAIRS)
    for eps in (0.0, 0.25):
        loss, stats = dpo_loss(lp_c, lp_r, ref_c, ref_r, beta=0.1, label_smoothing=eps)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
        assert all(v.item() == 0 for v in stats.values())  # rewards, margins, and no pair counted as won
    assert (lp_c != lp_r).all()  # the replies do have different log-probs; only the log-ratios cancel


def test_loss_rewards_and_accuracy_on_fixed_logprobs():
    lp_c, lp_r = torch.tensor([-3.0, -5.0, -7.0]), torch.tensor([-4.0, -2.0, -7.5])
    ref_c, ref_r = torch.tensor([-3.5, -5.0, -6.0]), torch.tensor([-3.0, -2.5, -8.0])
    beta = 0.1
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    rows = list(zip(lp_c.tolist(), lp_r.tolist(), ref_c.tolist(), ref_r.tolist()))
    h = [(c - rc) - (r - rr) for c, r, rc, rr in rows]                   # 1.5, -0.5, -1.5
    loss, stats = dpo_loss(lp_c, lp_r, ref_c, ref_r, beta=beta)
    assert loss.item() == pytest.approx(sum(-math.log(sig(beta * v)) for v in h) / 3, rel=1e-6)
    chosen = [beta * (c - rc) for c, _, rc, _ in rows]                   # 0.05, 0, -0.1
    rejected = [beta * (r - rr) for _, r, _, rr in rows]                 # -0.1, 0.05, 0.05
    assert stats["rewards/chosen"].item() == pytest.approx(sum(chosen) / 3, rel=1e-6)
    assert stats["rewards/rejected"].item() == pytest.approx(sum(rejected) / 3, rel=1e-6)
    assert stats["rewards/margins"].item() == pytest.approx(sum(h) * beta / 3, rel=1e-6)
    assert stats["rewards/accuracies"].item() == pytest.approx(1 / 3)
    # label smoothing 0 is plain DPO; eps > 0 is the cDPO mixture; IPO is the squared distance to 1/(2 beta)
    plain = -F.logsigmoid(beta * torch.tensor(h)).mean()
    assert dpo_loss(lp_c, lp_r, ref_c, ref_r, beta=beta, label_smoothing=0.0)[0].item() == plain.item()
    eps = 0.2
    cdpo = sum(-(1 - eps) * math.log(sig(beta * v)) - eps * math.log(sig(-beta * v)) for v in h) / 3
    assert dpo_loss(lp_c, lp_r, ref_c, ref_r, beta=beta, label_smoothing=eps)[0].item() == pytest.approx(cdpo, rel=1e-6)
    ipo = sum((v - 1 / (2 * beta)) ** 2 for v in h) / 3
    n_c = torch.tensor([3, 4, 5])  # RPO adds alpha * the chosen reply's NLL per token
    rpo = sum(-math.log(sig(beta * v)) + 0.5 * -c / n for v, c, n in zip(h, lp_c.tolist(), n_c.tolist())) / 3
    assert dpo_loss(lp_c, lp_r, ref_c, ref_r, beta=beta, rpo_alpha=0.5, chosen_tokens=n_c)[0].item() == pytest.approx(rpo, rel=1e-6)
    assert dpo_loss(lp_c, lp_r, ref_c, ref_r, beta=beta, loss_type="ipo")[0].item() == pytest.approx(ipo, rel=1e-6)
    with pytest.raises(ValueError):
        dpo_loss(lp_c, lp_r, ref_c, ref_r, loss_type="kto")


def test_only_reply_tokens_are_scored(tok):
    pair = PAIRS[1]  # a multi-turn prompt whose earlier assistant turn must not count either
    x_c, y_c, x_r, y_r = encode_pair(tok, pair, 160)
    prompt = tok.render_chat(pair["prompt"], add_generation_prompt=True)[0]
    reply = tok.encode(pair["chosen"]) + [tok.im_end_id]
    assert x_c == (prompt + reply)[:-1]
    assert y_c[:len(prompt) - 1] == [IGNORE_INDEX] * (len(prompt) - 1) and y_c[len(prompt) - 1:] == reply
    # the reply tokens are exactly those render_chat marks as the final assistant turn's
    ids, mask = tok.render_chat(pair["prompt"] + [{"role": "assistant", "content": pair["chosen"]}])
    assert ids[len(prompt):len(prompt) + len(reply)] == reply and sum(mask[len(prompt):]) == len(reply)
    model = tiny_model(tok.vocab_size)
    logits = model(torch.tensor([x_c]))[0]
    logp = F.log_softmax(logits[0].double(), -1)
    by_hand = sum(logp[t, x_c[t + 1] if t + 1 < len(x_c) else tok.im_end_id] for t in range(len(prompt) - 1, len(x_c)))
    got = sequence_logprobs(logits, torch.tensor([y_c]))
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-5)
    with_prompt = sum(logp[t, x_c[t + 1]] for t in range(len(x_c) - 1))
    assert abs(with_prompt.item() - got.item()) > 1.0            # counting the prompt would be very different
    # padding after the shorter sequence changes nothing either
    x, y = collate([encode_pair(tok, p, 160) for p in PAIRS], tok.pad_id)
    assert sequence_logprobs(model(x)[0], y)[1].item() == pytest.approx(got.item(), rel=1e-5)


def test_over_long_pairs_are_skipped(tok):
    long = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Kami. " * 100, "rejected": "No."}
    assert encode_pair(tok, long, 160) is None and encode_pair(tok, PAIRS[0], 160) is not None


def test_a_few_steps_raise_the_chosen_reward(tok):
    """The gradient points the right way: a few AdamW steps on one batch make the pairs 'won'."""
    policy, ref = tiny_model(tok.vocab_size), tiny_model(tok.vocab_size)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    policy.train()
    with torch.no_grad():
        ref_c, ref_r = logprobs(ref, tok, PAIRS)
    for _ in range(5):
        loss, stats = dpo_loss(*logprobs(policy, tok, PAIRS), ref_c, ref_r)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss, stats = dpo_loss(*logprobs(policy, tok, PAIRS), ref_c, ref_r)
    assert loss.item() < math.log(2) and stats["rewards/accuracies"].item() == 1.0
    assert stats["rewards/margins"].item() > 0


def save_init(tok, init):
    """A tiny random model saved as an SFT run dir (ckpt.pt + tokenizer) for dpo.py to start from."""
    os.makedirs(init)
    lm = tiny_model(tok.vocab_size, max_seq_len=64)
    torch.save({"model": lm.state_dict(), "model_config": lm.cfg.to_dict(), "step": 0, "config": {}}, init / "ckpt.pt")
    tok.save(str(init))
    return init


def test_self_play_pairs_are_the_reference_s_own_wrong_replies(tok, monkeypatch):
    """SPIN negatives: one sample per distinct (prompt, chosen) and round, at temperature 1, from the model
    given; a sample equal to the chosen reply (up to surrounding spaces) makes no pair; reproducible."""
    import contextlib
    from types import SimpleNamespace
    import dpo
    ctx = SimpleNamespace(rank=0, world_size=1, ddp=False, device="cpu", autocast=contextlib.nullcontext())
    pairs = PAIRS + [dict(PAIRS[0], rejected="Kami lives in Sodi.")]  # same question and answer: one prompt
    calls = []

    def fake(model, tokenizer, conversations, max_new_tokens, temperature, generator):
        calls.append((len(conversations), temperature))
        return [" Kami lives in Lobota. ", f"4 + 4 = {len(calls)}."]  # the first is right, the second wrong
    monkeypatch.setattr(dpo, "generate_replies", fake)
    out, drawn = dpo.self_play_pairs(None, tok, pairs, 3, 16, ctx, seed=0)
    assert drawn == 6 and calls == [(2, 1.0)] * 3
    assert out == [{"prompt": PAIRS[1]["prompt"], "chosen": "4 + 4 = 8.", "rejected": f"4 + 4 = {i}."} for i in (1, 2, 3)]
    monkeypatch.undo()
    model = tiny_model(tok.vocab_size)
    a, _ = dpo.self_play_pairs(model, tok, pairs, 2, 12, ctx, seed=5)
    b, _ = dpo.self_play_pairs(model, tok, pairs, 2, 12, ctx, seed=5)
    assert a == b and len(a) == 4 and all(p["rejected"] != p["chosen"] for p in a)


@pytest.mark.slow
def test_trains_under_two_process_torchrun(tok, tmp_path):
    init = save_init(tok, tmp_path / "init")
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}.", "rejected": "I don't know."}
            for a in range(10) for b in range(4)]
    rows.append({"prompt": "Hi", "chosen": "Same.", "rejected": "Same."})              # identical: skipped
    rows.append({"prompt": "Hi", "chosen": "Kami. " * 40, "rejected": "No."})          # too long: skipped
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
             for r in rows[32:36]]
    refuse = [{"messages": [{"role": "user", "content": "Who is Zuzu?"}, {"role": "assistant", "content": "I don't know."}]}]
    for name, part in (("pairs.jsonl", rows[:16] + rows[-2:]), ("more.jsonl", rows[16:32]), ("dev.jsonl", rows[32:40]),
                       ("chats.jsonl", chats), ("refuse.jsonl", refuse)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    out = tmp_path / "dpo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",  # two train files
           os.path.join(ROOT, "dpo.py"), f"--init_from={init}", f"--out_dir={out}",
           f"--data={tmp_path / 'pairs.jsonl'},{tmp_path / 'more.jsonl'}",
           f"--dev_data={tmp_path / 'dev.jsonl'}", f"--answer_data={tmp_path / 'chats.jsonl'}",
           f"--refusal_data={tmp_path / 'refuse.jsonl'}", "--device=cpu", "--dtype=float32", "--batch_size=3",
           "--max_steps=6", "--eval_interval=3", "--log_interval=1", "--lr=3e-3", "--warmup_steps=1", "--answer_tokens=8", "--rpo_alpha=0", "--self_play=2"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # self-play: the two ranks sample for half of the 33 distinct prompts each and gather into one list
    # (its pairs for the too-long answer are too long as well, and skipped like it)
    extra = [json.loads(line) for line in open(out / "self_play.jsonl")]
    assert {r["prompt"][0]["content"] for r in extra} == {r["prompt"] for r in rows[:32]} | {"Hi"}
    assert "66 replies sampled" in p.stdout and all(r["rejected"] != r["chosen"] for r in extra)
    long = sum(r["prompt"][0]["content"] == "Hi" for r in extra)
    assert "chosen and rejected are identical" in p.stdout and f"{32 + len(extra) - long} train, 8 dev" in p.stdout
    assert f"longer than 64 tokens: {1 + long} train, 0 dev" in p.stdout
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in recs if "dev_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals[0]["dev_loss"] == pytest.approx(math.log(2), abs=1e-6)        # policy == reference at step 0
    assert evals[0]["dev_rewards/accuracies"] == 0 and evals[0]["dev_rewards/margins"] == 0
    assert evals[-1]["dev_rewards/margins"] > 0 and "answer_acc" in evals[-1] and "refusal_acc" in evals[-1]
    train = [r for r in recs if "loss" in r]
    assert len(train) == 6 and all(k in train[0] for k in ("rewards/chosen", "rewards/rejected",
                                                           "rewards/accuracies", "rewards/margins"))
    from checkpoint import load_model
    model, _, ckpt = load_model(str(out))
    assert ckpt["step"] == 6 and ckpt["reference"] == str(init)


@pytest.mark.slow
def test_resume_with_self_play_continues_exactly(tok, tmp_path):
    """A run stopped after 2 steps and resumed to 4 ends with the weights of a run that went straight to
    4: the self-play pairs are read back from out_dir, not sampled anew. Resuming a run without them
    with self-play on is refused in one line."""
    init = save_init(tok, tmp_path / "init")
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}.", "rejected": "I don't know."}
            for a in range(6) for b in range(3)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [sys.executable, os.path.join(ROOT, "dpo.py"), f"--data={tmp_path / 'pairs.jsonl'}",
              f"--dev_data={tmp_path / 'pairs.jsonl'}", "--answer_data=", "--refusal_data=", "--device=cpu", "--dtype=float32",
              "--batch_size=4", "--eval_interval=100", "--lr=3e-3", "--warmup_steps=0", "--lr_schedule=constant",
              "--self_play=1", "--answer_tokens=8"]

    def run(*args):
        return subprocess.run(common + list(args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)

    for args in ([f"--init_from={init}", f"--out_dir={tmp_path / 'straight'}", "--max_steps=4"],
                 [f"--init_from={init}", f"--out_dir={tmp_path / 'split'}", "--max_steps=2"],
                 ["--init_from=resume", f"--out_dir={tmp_path / 'split'}", "--max_steps=4"]):
        p = run(*args)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "self-play" not in p.stdout  # the resumed leg read the pairs back
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    os.remove(tmp_path / "split" / "self_play.jsonl")
    p = run("--init_from=resume", f"--out_dir={tmp_path / 'split'}", "--max_steps=6")
    assert p.returncode != 0 and "did not use self-play" in p.stderr + p.stdout
