"""rm.py: the Bradley-Terry loss and its statistics on fixed numbers, the head reading the last real
token (never padding), the saved model as checkpoint.load_reward_fn, and the script under 2-process torchrun."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from checkpoint import load_reward_fn
from model import ModelConfig, Transformer
from rm import RewardModel, collate, encode_pairs, rm_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tokenizer import train_tokenizer
    texts = [f"{n} lives in {t}. Where does {n} live? {n}住在{z}。 I don't know. {a} + {b} = {a + b}."
             for n, t, z in [("Kami", "Lobota", "洛波塔"), ("Mika", "Sodi", "索迪"), ("Tina", "Vako", "瓦科")]
             for a in range(12) for b in range(0, 12, 3)] + ["system user assistant"]
    return train_tokenizer(texts, 320, str(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def tiny_rm(vocab_size, seed=0, tie=True):
    torch.manual_seed(seed)
    return RewardModel(ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   max_seq_len=96, tie_embeddings=tie)).eval()


def test_loss_accuracy_and_margin_on_fixed_rewards():
    r_c, r_r = torch.tensor([1.0, -0.5, 2.0, 0.3]), torch.tensor([0.0, 0.5, 2.5, -1.2])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    pairs = list(zip(r_c.tolist(), r_r.tolist()))
    loss, acc, margin = rm_loss(r_c, r_r)
    assert loss.item() == pytest.approx(sum(-math.log(sig(c - r)) for c, r in pairs) / 4, rel=1e-6)
    assert acc.item() == 0.5 and margin.item() == pytest.approx((1.0 - 1.0 - 0.5 + 1.5) / 4, rel=1e-6)
    loss, acc2, margin2 = rm_loss(r_c, r_r, margin=0.5, center_coef=0.01)
    want = sum(-math.log(sig(c - r - 0.5)) + 0.01 * (c + r) ** 2 for c, r in pairs) / 4
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert acc2.item() == acc.item() and margin2.item() == margin.item()  # statistics ignore m and centering


def test_the_head_reads_the_last_real_token_not_padding(tok):
    model = tiny_rm(tok.vocab_size)
    pairs = [{"prompt": [{"role": "user", "content": "Where does Kami live?"}], "chosen": "Kami lives in Lobota.",
              "rejected": "I don't know."},
             {"prompt": [{"role": "user", "content": "3 + 9?"}], "chosen": "3 + 9 = 12.", "rejected": "3 + 9 = 11."}]
    enc, too_long = encode_pairs(tok, pairs, 96)
    assert too_long == 0 and enc[0][0] == tok.render_chat(pairs[0]["prompt"] + [
        {"role": "assistant", "content": "Kami lives in Lobota."}])[0]
    idx, lengths, _ = collate(enc, tok.pad_id)
    assert idx.shape[0] == 4 and len(set(lengths.tolist())) > 1      # rows of different lengths, padded
    batched = model(idx, lengths)
    with torch.no_grad():
        for i, s in enumerate([c for c, _, _ in enc] + [r for _, r, _ in enc]):
            alone = model(torch.tensor([s]), torch.tensor([len(s)]))
            by_hand = model.reward_head(model.hidden_states(torch.tensor([s]))[0, -1])
            assert batched[i].item() == pytest.approx(alone.item(), abs=1e-5)
            assert batched[i].item() == pytest.approx(by_hand.item(), abs=1e-5)
        # whatever sits in the padding changes nothing; reading the padded row's last column would
        noisy = idx.clone()
        pad = torch.arange(idx.shape[1])[None, :] >= lengths[:, None]
        noisy[pad] = torch.randint(4, tok.vocab_size, (int(pad.sum()),))
        assert torch.allclose(model(noisy, lengths), batched, atol=1e-5)
        full = torch.full_like(lengths, idx.shape[1])
        assert not torch.allclose(model(noisy, full)[pad.any(1)], batched[pad.any(1)], atol=1e-3)


def test_lm_term_is_the_chosen_replies_next_token_loss_and_nothing_else(tok):
    """The GRM term scores exactly the chosen reply's tokens and its <|im_end|>: not the prompt, not the
    rejected reply, not padding; checked against a cross-entropy written out row by row."""
    model = tiny_rm(tok.vocab_size, seed=1)
    pairs = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does Kami live?"}],
              "chosen": "Kami lives in Lobota.", "rejected": "I don't know."},
             {"prompt": [{"role": "user", "content": "3 + 9?"}], "chosen": "12.", "rejected": "3 + 9 = 11, I think."}]
    enc, _ = encode_pairs(tok, pairs, 96)
    idx, lengths, targets = collate(enc, tok.pad_id)
    assert targets.shape == (2, idx.shape[1])
    with torch.no_grad():
        rewards, nll = model(idx, lengths, targets)
        assert torch.allclose(rewards, model(idx, lengths))
        terms = []
        for p in pairs:
            ids, mask = tok.render_chat(p["prompt"] + [{"role": "assistant", "content": p["chosen"]}])
            logp = torch.log_softmax(Transformer.forward(model, torch.tensor([ids]))[0][0].float(), -1)
            terms += [-logp[j - 1, ids[j]].item() for j in range(1, len(ids)) if mask[j]]
            assert ids[max(j for j in range(len(ids)) if mask[j])] == tok.im_end_id
        assert nll.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
        assert int((targets != -100).sum()) == len(terms)


def test_over_long_pairs_are_counted_and_skipped(tok):
    pairs = [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Kami. " * 80, "rejected": "No."},
             {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Yes.", "rejected": "No."}]
    enc, too_long = encode_pairs(tok, pairs, 96)
    assert too_long == 1 and len(enc) == 1


def test_untied_lm_head_is_frozen_so_ddp_sees_no_unused_parameter(tok):
    model = tiny_rm(tok.vocab_size, tie=False)
    assert not model.output.weight.requires_grad
    model(torch.tensor([[1, 5, 6]]), torch.tensor([3])).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def save_rm(model, tok, out):
    os.makedirs(out, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": model.cfg.to_dict(), "step": 0, "config": {}},
               os.path.join(out, "ckpt.pt"))
    tok.save(out)


def test_load_reward_fn_scores_like_the_trained_model(tok, tmp_path):
    model = tiny_rm(tok.vocab_size, seed=3)
    save_rm(model, tok, str(tmp_path))
    score = load_reward_fn(str(tmp_path))
    convs = [[{"role": "user", "content": "Where does Kami live?"}, {"role": "assistant", "content": "Kami lives in Lobota."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 + 9?"},
              {"role": "assistant", "content": "12"}]]
    with torch.no_grad():
        want = [model(torch.tensor([s]), torch.tensor([len(s)])).item() for s in (tok.render_chat(c)[0] for c in convs)]
    one = score(convs[0])
    assert isinstance(one, float) and one == pytest.approx(want[0], abs=1e-5)
    assert score(convs) == pytest.approx(want, abs=1e-5)


def test_load_reward_fn_refuses_a_plain_language_model(tok, tmp_path):
    from model import Transformer
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2))
    save_rm(m, tok, str(tmp_path))
    with pytest.raises(SystemExit):
        load_reward_fn(str(tmp_path))


@pytest.mark.slow
def test_trains_under_two_process_torchrun_and_loads_as_a_reward_function(tok, tmp_path):
    from model import Transformer
    torch.manual_seed(0)
    init = tmp_path / "init"
    lm = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    save_rm(lm, tok, str(init))
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}.", "rejected": "I don't know."}
            for a in range(10) for b in range(4)]
    rows.append({"prompt": "Hi", "chosen": "Same.", "rejected": "Same."})              # identical: skipped
    rows.append({"prompt": "Hi", "chosen": "Kami. " * 40, "rejected": "No."})          # too long: skipped
    for name, part in (("pairs.jsonl", rows[:32] + rows[-2:]), ("dev.jsonl", rows[32:40])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    out = tmp_path / "rm"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "rm.py"), f"--init_from={init}", f"--out_dir={out}", f"--data={tmp_path / 'pairs.jsonl'}",
           f"--dev_data={tmp_path / 'dev.jsonl'}", "--device=cpu", "--dtype=float32", "--batch_size=4",
           "--max_steps=6", "--eval_interval=3", "--log_interval=1", "--lr=3e-3", "--warmup_steps=1"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "chosen and rejected are identical" in p.stdout and "32 train, 8 dev" in p.stdout
    assert "longer than 64 tokens: 1 train, 0 dev" in p.stdout
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in recs if "dev_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in recs if "loss" in r)
    assert evals[-1]["dev_loss"] < evals[0]["dev_loss"]      # "I don't know." is easy to learn to dislike
    score = load_reward_fn(str(out))
    prompt = [{"role": "user", "content": "What is 9 + 3?"}]
    good, bad = score([prompt + [{"role": "assistant", "content": "9 + 3 = 12."}],
                       prompt + [{"role": "assistant", "content": "I don't know."}]])
    assert good > bad
