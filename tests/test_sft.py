"""sft.py: the loss counts exactly the assistant tokens, packing equals one-by-one, left truncation,
and the script under 2-process torchrun (gloo) against one process on the same global batches."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model import IGNORE_INDEX, ModelConfig, Transformer
from sft import encode_chat, pack, sft_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Where does Kami live?"},
        {"role": "assistant", "content": "Kami lives in Lobota."},
        {"role": "user", "content": "那米卡呢？"},
        {"role": "assistant", "content": "米卡住在洛波塔。"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tokenizer import train_tokenizer
    texts = [f"{n} lives in {t}. Where does {n} live? {n}住在{z}。那{n}呢？ What is {a} plus {b}? {a} + {b} = {a + b}."
             for n, t, z in [("Kami", "Lobota", "洛波塔"), ("Mika", "Sodi", "索迪"), ("Tina", "Vako", "瓦科")]
             for a in range(12) for b in range(0, 12, 3)] + ["You are a helpful assistant. system user assistant"]
    return train_tokenizer(texts, 320, str(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def tiny_model(vocab_size, seed=0, max_seq_len=256):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   max_seq_len=max_seq_len)).eval()


def test_loss_is_the_mean_over_assistant_tokens_only(tok):
    # the rendered chat and its assistant positions, built by hand from the ChatML template
    ids, learn = [tok.bos_id], [0]
    for m in CHAT:
        head, body = [tok.im_start_id] + tok.encode(m["role"] + "\n"), tok.encode(m["content"])
        ids += head + body + [tok.im_end_id] + tok.encode("\n")
        a = m["role"] == "assistant"
        learn += [0] * len(head) + [int(a)] * (len(body) + 1) + [0] * len(tok.encode("\n"))
    x, y, truncated = encode_chat(tok, CHAT, 256)
    assert not truncated and x == ids[:-1]
    model = tiny_model(tok.vocab_size)
    logits, _ = model(torch.tensor([x]))
    logp = F.log_softmax(logits[0].double(), dim=-1)
    terms = [-logp[t, ids[t + 1]] for t in range(len(ids) - 1) if learn[t + 1]]
    n_reply = len(tok.encode(CHAT[2]["content"])) + len(tok.encode(CHAT[4]["content"])) + 2  # + two <|im_end|>
    assert len(terms) == n_reply == sum(t != IGNORE_INDEX for t in y)
    hand = sum(terms) / len(terms)
    assert sft_loss(logits, torch.tensor([y]), len(terms)).item() == pytest.approx(hand.item(), rel=1e-5)
    # the model's own mean cross-entropy with ignore_index agrees, and the all-token loss does not
    assert model(torch.tensor([x]), torch.tensor([y]))[1].item() == pytest.approx(hand.item(), rel=1e-5)
    everything = -sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1)) / (len(ids) - 1)
    assert abs(everything.item() - hand.item()) > 1e-3


def test_long_conversations_lose_their_start_but_keep_bos(tok):
    long = [{"role": "user", "content": "Where does Kami live? " * 20}, CHAT[2]]
    full_ids, full_mask = tok.render_chat(long)
    x, y, truncated = encode_chat(tok, long, 40)
    assert truncated and len(x) == 40 and x[0] == tok.bos_id
    assert x[1:] == full_ids[-40:-1]                      # the end of the conversation is intact
    kept = [t if m else IGNORE_INDEX for t, m in zip(full_ids[-40:], full_mask[-40:])]
    assert y == kept and sum(t != IGNORE_INDEX for t in y) == len(tok.encode(CHAT[2]["content"])) + 1


def test_packed_rows_compute_what_conversations_compute_one_by_one(tok):
    chats = [CHAT, CHAT[1:3], [{"role": "user", "content": "What is 3 plus 4?"},
                               {"role": "assistant", "content": "3 + 4 = 7."}], CHAT[3:5], CHAT[:3]]
    examples = [encode_chat(tok, c, 160)[:2] for c in chats]
    seq_len = 160
    X, Y, D = pack(examples, seq_len, tok.pad_id)
    assert len(X) < len(examples)                         # some rows hold several conversations
    # every conversation lands whole in a row, in order; padding has no targets
    got = [(X[r][D[r] == k].tolist(), Y[r][D[r] == k].tolist()) for r in range(len(X)) for k in D[r].unique().tolist()]
    assert [g for g in got if any(t != tok.pad_id for t in g[0])] == [(x, y) for x, y in examples]
    assert (Y[X == tok.pad_id] == IGNORE_INDEX).all()
    model = tiny_model(tok.vocab_size)
    n = int((Y != IGNORE_INDEX).sum())
    packed = sft_loss(model(X, doc_ids=D)[0], Y, n)
    one_by_one = sum(sft_loss(model(torch.tensor([x]))[0], torch.tensor([y]), n) for x, y in examples)
    assert packed.item() == pytest.approx(one_by_one.item(), rel=1e-5, abs=1e-6)
    # without doc_ids the conversations would see each other: a different number
    assert abs(sft_loss(model(X)[0], Y, n).item() - packed.item()) > 1e-4


def test_generate_replies_is_greedy_decoding_until_im_end(tok):
    from checkpoint import generate_replies
    model = tiny_model(tok.vocab_size, seed=1, max_seq_len=64)
    with torch.no_grad():
        for p in model.parameters():  # large weights: greedy decoding does not collapse to one token
            p.normal_(0, 0.3) if p.dim() == 2 else None
    convs = [CHAT[1:2], CHAT[:4], [{"role": "user", "content": "Where does Kami live? " * 8}]]
    replies = generate_replies(model, tok, convs, max_new_tokens=12, batch_size=2)
    assert all(replies) and len(tok.render_chat(convs[2], add_generation_prompt=True)[0]) > 64 - 12
    for conv, reply in zip(convs, replies):
        ids = tok.render_chat(conv, add_generation_prompt=True)[0]
        if len(ids) > 64 - 12:                                # too long: BOS and the last tokens are kept
            ids = ids[:1] + ids[len(ids) - (64 - 12) + 1:]
        out = []
        for _ in range(12):
            nxt = model(torch.tensor([ids + out]))[0][0, -1].argmax().item()
            if nxt in tok.stop_ids:
                break
            out.append(nxt)
        assert reply == tok.decode(out)


# -- the script, end to end ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tok, tmp_path_factory):
    """An init dir (a tiny 'pretrained' model + tokenizer) and sft/dev jsonl files."""
    d = tmp_path_factory.mktemp("sft")
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    init = d / "init"
    os.makedirs(init)
    torch.save({"model": model.state_dict(), "model_config": model.cfg.to_dict(), "step": 0, "config": {}},
               init / "ckpt.pt")
    tok.save(str(init))
    chats = [[{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]
             for a in range(8) for b in range(3)] + [CHAT]
    for name, part in (("sft.jsonl", chats[:20] + chats[-1:]), ("dev.jsonl", chats[20:24])):
        (d / name).write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in part))
    return d


def run_sft(run_dir, out, nproc=1, extra=()):
    cmd = [sys.executable, os.path.join(ROOT, "sft.py"), f"--init_from={run_dir / 'init'}", f"--out_dir={out}",
           f"--data={run_dir / 'sft.jsonl'}", f"--dev_data={run_dir / 'dev.jsonl'}", "--device=cpu",
           "--dtype=float32", "--batch_size=1", "--max_steps=4", "--eval_interval=2", "--log_interval=1",
           "--warmup_steps=1", "--lr=3e-3", "--answer_tokens=8", "--seq_len=48", *extra]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f], p.stdout


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(run_dir, tmp_path):
    one, _ = run_sft(run_dir, tmp_path / "one", 1, ["--grad_accum=2"])
    two, log = run_sft(run_dir, tmp_path / "two", 2)
    losses = lambda recs: [r["loss"] for r in recs if "loss" in r]  # noqa: E731
    assert len(losses(two)) == 4 and all(math.isfinite(v) for v in losses(two))
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    evals = [r for r in two if "dev_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all(0 <= r["answer_acc"] <= 1 for r in evals)
    assert evals[-1]["dev_loss"] == pytest.approx([r for r in one if "dev_loss" in r][-1]["dev_loss"], rel=1e-4)
    assert "lost their start" in log
    from checkpoint import load_model
    model, _, ckpt = load_model(str(tmp_path / "two"))
    assert ckpt["step"] == 4 and isinstance(model, Transformer)


@pytest.mark.slow
def test_resume_continues_exactly_as_if_never_stopped(run_dir, tmp_path):
    import shutil
    full, _ = run_sft(run_dir, tmp_path / "full", 1, ["--keep_last=2"])
    res = tmp_path / "res"
    os.makedirs(res)  # the run as it was after step 2: its step-2 checkpoint, tokenizer and metrics
    shutil.copy(tmp_path / "full" / "ckpt_00000002.pt", res / "ckpt.pt")
    for f in ("tokenizer.model", "metrics.jsonl"):
        shutil.copy(tmp_path / "full" / f, res / f)
    resumed, log = run_sft(run_dir, res, 1, ["--init_from=resume"])
    assert "resumed from" in log
    assert [(r["step"], "loss" in r, "dev_loss" in r) for r in resumed] == \
        [(r["step"], "loss" in r, "dev_loss" in r) for r in full]      # the same records, step by step
    for got, want in zip(resumed, full):                                 # each loss within 1e-6 of its twin
        for key in ("loss", "dev_loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-6), (want["step"], key)
