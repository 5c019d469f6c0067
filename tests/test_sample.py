"""sample.py: the real command on tiny run dirs; every printed answer must be exactly what the
model generates for that prompt (greedy, or seeded), in the right template."""
import contextlib
import io
import runpy
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

import sample
from checkpoint import load_model
from test_serve import make_run_dir
from tokenizer import StreamDecoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return {stage: make_run_dir(base / stage, stage=stage) for stage in ("pretrain", "sft")}


def run(*args, stdin=""):
    """Run `python sample.py ARGS` in this process (runpy: a fresh module, so no state carries over
    between runs, and no second torch import); return what it printed to stdout."""
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", ["sample.py", *args]), mock.patch.object(sys, "stdin", io.StringIO(stdin)), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(ROOT / "sample.py"), run_name="__main__")
        except SystemExit as e:
            raise AssertionError(f"sample.py exited {e.code}: {err.getvalue()}")
    return out.getvalue()


def greedy_text(run_dir, ids, n, dtype=torch.float32):
    model, tok, _ = load_model(str(run_dir))
    model.to(dtype)
    out = [int(t) for t, _ in model.generate([ids], n, temperature=0, stop_ids=tok.stop_ids)]
    return tok.decode([t for t in out if t not in tok.stop_ids])


def chat_ids(run_dir, messages):
    return load_model(str(run_dir))[1].render_chat(messages, add_generation_prompt=True)[0]


def test_pretrain_checkpoint_continues_raw_text(runs):
    """The command in a process of its own, exactly as a user runs it."""
    tok = load_model(str(runs["pretrain"]))[1]
    p = subprocess.run([sys.executable, "sample.py", f"--out_dir={runs['pretrain']}", "--prompt=The cat",
                        "--temperature=0", "--max_new_tokens=20"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "The cat" + greedy_text(runs["pretrain"], tok.encode("The cat", bos=True), 20) + "\n"
    assert "raw completion" in p.stderr


def test_chat_checkpoint_answers_in_chatml(runs):
    user = [{"role": "user", "content": "你好，卡米！"}]
    out = run(f"--out_dir={runs['sft']}", "--prompt=你好，卡米！", "--temperature=0", "--max_new_tokens=20")
    assert out == greedy_text(runs["sft"], chat_ids(runs["sft"], user), 20) + "\n"
    # the same prompt as a raw completion gives another text: the template really is applied
    forced = run(f"--out_dir={runs['sft']}", "--prompt=你好，卡米！", "--mode=completion", "--temperature=0",
                 "--max_new_tokens=20")
    assert forced != "你好，卡米！" + out and forced.startswith("你好，卡米！")
    with_system = run(f"--out_dir={runs['sft']}", "--prompt=你好，卡米！", "--system=Be brief.",
                      "--temperature=0", "--max_new_tokens=20")
    want = greedy_text(runs["sft"], chat_ids(runs["sft"], [{"role": "system", "content": "Be brief."}] + user), 20)
    assert with_system == want + "\n"


def test_prompt_with_bytes_that_are_not_utf8(runs):
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape): the prompt
    is tokenized with U+FFFD for them and echoed escaped, not a crash."""
    p = subprocess.run([sys.executable, "sample.py", f"--out_dir={runs['pretrain']}", b"--prompt=caf\xff",
                        "--temperature=0", "--max_new_tokens=3"], cwd=ROOT, capture_output=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith(b"caf\\udcff"), p.stderr[-2000:]


def test_chat_repl_keeps_history_and_resets(runs):
    d = runs["sft"]
    out = run(f"--out_dir={d}", "--chat", "--temperature=0", "--max_new_tokens=12",
              stdin="hello\nagain\n/reset\nagain\n/quit\nnever read\n")
    a1 = greedy_text(d, chat_ids(d, [{"role": "user", "content": "hello"}]), 12)
    a2 = greedy_text(d, chat_ids(d, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": a1},
                                     {"role": "user", "content": "again"}]), 12)
    a3 = greedy_text(d, chat_ids(d, [{"role": "user", "content": "again"}]), 12)
    assert a2 != a3  # the history changes the answer, so the check below can tell them apart
    answers = [part.split("\n")[0] for part in out.split("\n> ")[1:] if not part.startswith("(new")]
    assert answers[:3] == [a1, a2, a3], out
    assert "(new conversation)" in out


def test_file_of_prompts_in_batches_equals_one_by_one(runs, tmp_path):
    d = runs["sft"]
    prompts = ["hello", "卡米住在哪里？", "", "The cat sat", "12 + 7 ="]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = run(f"--out_dir={d}", f"--file={f}", "--batch_size=3", "--temperature=0", "--max_new_tokens=10")
    blocks = out.split("### ")[1:]
    assert len(blocks) == 4
    for block, (n, p) in zip(blocks, [(1, "hello"), (2, "卡米住在哪里？"), (4, "The cat sat"), (5, "12 + 7 =")]):
        head, text = block.split("\n", 1)
        assert head == f"{f}:{n}: {p}"
        assert text == greedy_text(d, chat_ids(d, [{"role": "user", "content": p}]), 10) + "\n\n"


def test_num_samples_are_seeded_and_different(runs):
    args = (f"--out_dir={runs['pretrain']}", "--prompt=Kami", "--num_samples=3", "--temperature=1.0",
            "--max_new_tokens=15")
    a, b, c = run(*args, "--seed=3"), run(*args, "--seed=3"), run(*args, "--seed=4")
    samples = a.split("--- sample ")[1:]
    assert len(samples) == 3 and len(set(s.split("\n", 1)[1] for s in samples)) == 3
    assert a == b and a != c


def test_bfloat16(runs):
    tok = load_model(str(runs["pretrain"]))[1]
    out = run(f"--out_dir={runs['pretrain']}", "--prompt=The dog", "--dtype=bfloat16", "--temperature=0",
              "--max_new_tokens=10")
    assert out == "The dog" + greedy_text(runs["pretrain"], tok.encode("The dog", bos=True), 10, torch.bfloat16) + "\n"


def test_streaming_prints_whole_characters(runs, monkeypatch):
    """stream_text prints each piece as it is sampled, and a character split into byte tokens only
    when it is complete."""
    tok = load_model(str(runs["sft"]))[1]
    text = "卡米住在龘海边。"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # some characters are several byte tokens

    class Stub:  # stands in for the model: "generates" the ids of text, then <|im_end|>
        def generate(self, prompts, *args, **kwargs):
            for t in ids + [tok.im_end_id, 7]:
                yield torch.tensor([t]), torch.tensor([True])

    pieces = []
    monkeypatch.setattr(sample, "print", lambda *a, **k: pieces.append(a[0] if a else ""), raising=False)
    assert sample.stream_text(Stub(), tok, [tok.bos_id], None) == text
    printed = [p for p in pieces if p]
    assert "".join(printed) == text and "龘" in printed and all("\ufffd" not in p for p in printed)
    decoder = StreamDecoder(tok)
    assert len(printed) == len([p for p in map(decoder.push, ids) if p]) == len(text)


def test_checkpoint_kind_detection():
    assert sample.is_chat_checkpoint({"stage": "sft"})
    assert not sample.is_chat_checkpoint({"config": {"stage": "pretrain", "data": "x.jsonl"}})
    assert sample.is_chat_checkpoint({"config": {"data": "data/demo/sft.jsonl"}})
    assert not sample.is_chat_checkpoint({"config": {"data_dir": "data/demo/pretrain"}})


def test_bad_arguments_fail_with_one_line(runs):
    for args, message in [((), "give exactly one of"), (("--prompt=" + "x" * 2000,), "shorten it"),
                          (("--prompt=hi", "--mode=poem"), "mode must be")]:
        with pytest.raises(AssertionError, match=message):
            run(f"--out_dir={runs['sft']}", *args)
