"""prepare_data.py, data_formats.py, demo_world.py: memmap shards equal direct encoding, process count
and chunking change no byte, bad input leaves nothing behind, stage jsonl checks, the demo world."""
import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import data_formats
import demo_world
import prepare_data
from data_formats import DataError, check_vocab, load_meta, read_jsonl, read_rag_docs
from tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["Kami lives in Lotavi.\nKami is 34 years old.", "卡米住在洛塔维。卡米今年34岁。", "What is 12 + 7?  12 + 7 = 19.",
        "emoji 😀 and\ttabs\n  indented line", "把这句话翻译成英文：猫是黑色的。", "a ▁ lowline", "<|im_start|>not special"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer(DOCS * 30, 400, str(path), character_coverage=1.0)


def make_corpus(d):
    """txt with blank-line documents (CRLF, runs of blank lines), jsonl, nested folder. Returns the
    documents in the order prepare_data reads them (files sorted)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "sub").mkdir(exist_ok=True)
    txt = [f"{DOCS[i % len(DOCS)]} #{i}" for i in range(120)]
    seps = ["\n\n", "\n\n\n   \n", "\n \t\n", "\n\n  \n\n"]  # blank lines may hold spaces, come in runs
    (d / "a.txt").write_text("\n\n\n" + "".join(t + seps[i % 4] for i, t in enumerate(txt[:60])) + "\n\n"
                             + "\r\n\r\n".join(txt[60:]) + "\n", encoding="utf-8")
    js = [f"{DOCS[(i * 5) % len(DOCS)]} j{i}" for i in range(50)]
    (d / "sub" / "b.jsonl").write_text("".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n"
                                               for i, t in enumerate(js)), encoding="utf-8")
    return txt + js


def read_split_docs(out, tok):
    """The documents of train.bin and val.bin as token lists, split at BOS."""
    meta = json.loads((out / "meta.json").read_text())
    res = {}
    for split in ("train", "val"):
        arr = np.memmap(out / f"{split}.bin", dtype=meta["dtype"], mode="r")
        starts = list(np.flatnonzero(arr == tok.bos_id)) + [len(arr)]
        assert starts[0] == 0  # every document starts with BOS
        res[split] = [arr[a + 1:b].tolist() for a, b in zip(starts[:-1], starts[1:])]
    return meta, res


def assert_matches_direct_encoding(out, tok, docs):
    meta, res = read_split_docs(out, tok)
    want = [tok.encode(d) for d in docs]
    got = {s: iter(v) for s, v in res.items()}
    nxt = {s: next(it, None) for s, it in got.items()}
    for w in want:  # each document, in order, is the next one of train or of val
        split = "train" if nxt["train"] == w else "val"
        assert nxt[split] == w
        nxt[split] = next(got[split], None)
    assert nxt == {"train": None, "val": None}
    assert (meta["train_docs"], meta["val_docs"]) == (len(res["train"]), len(res["val"]))
    assert meta["train_tokens"] == sum(len(x) + 1 for x in res["train"]) and meta["val_docs"] > 0
    assert meta["text_bytes"] == meta["train_bytes"] + meta["val_bytes"] == sum(len(d.encode()) for d in docs)
    return meta


def test_memmap_equals_direct_encoding(tok, tmp_path):
    docs = make_corpus(tmp_path / "c")
    out = tmp_path / "out"
    meta = prepare_data.tokenize_corpus([str(tmp_path / "c")], tok, str(out), val_fraction=0.2, num_proc=1,
                                        chunk_mb=0.001)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size == 400
    assert meta["tokenizer"] == "tokenizer.model" and meta["tokenizer_sha256"] == tok.fingerprint
    assert_matches_direct_encoding(out, tok, docs)
    assert Tokenizer.load(str(out)).fingerprint == tok.fingerprint  # the data dir carries its tokenizer
    assert sorted(os.listdir(out)) == ["meta.json", "tokenizer.model", "train.bin", "val.bin"]
    assert load_meta(str(out)) == meta and data_formats.validate_pretrain_dir(str(out), lambda *a: None) == 0
    # a glob and a single file select the same documents
    out2 = tmp_path / "out2"
    prepare_data.tokenize_corpus([str(tmp_path / "c" / "*.txt"), str(tmp_path / "c" / "sub" / "b.jsonl")], tok,
                                 str(out2), val_fraction=0.2, num_proc=1)
    assert (out2 / "train.bin").read_bytes() == (out / "train.bin").read_bytes()


def test_multiprocess_and_chunking_change_no_byte(tok, tmp_path):
    make_corpus(tmp_path / "c")
    runs = [(1, 64.0), (2, 0.001), (2, 0.0003)]
    for k, (n, mb) in enumerate(runs):
        prepare_data.tokenize_corpus([str(tmp_path / "c")], tok, str(tmp_path / f"o{k}"), val_fraction=0.2,
                                     num_proc=n, chunk_mb=mb)
    chunks = list(prepare_data.plan_chunks(prepare_data.expand_inputs([str(tmp_path / "c")]), int(0.0003 * 2**20)))
    assert len(chunks) > 10  # the small chunk size really cut the files into many pieces
    for f in ("train.bin", "val.bin", "meta.json"):
        assert len({(tmp_path / f"o{k}" / f).read_bytes() for k in range(len(runs))}) == 1, f


def test_uint32_path(tmp_path):
    path = tmp_path / "cl100k_base.tiktoken"  # tiny BPE file with cl100k's special ids (> 65535)
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    big = Tokenizer.load(str(path))
    docs = make_corpus(tmp_path / "c")
    meta = prepare_data.tokenize_corpus([str(tmp_path / "c")], big, str(tmp_path / "o"), val_fraction=0.2, num_proc=2)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 100267 and meta["tokenizer"] == "tiktoken:cl100k_base"
    assert (tmp_path / "o" / "train.bin").stat().st_size == 4 * meta["train_tokens"]
    assert_matches_direct_encoding(tmp_path / "o", big, docs)
    assert (tmp_path / "o" / "cl100k_base.tiktoken").exists()
    with pytest.raises(DataError, match="uint16 cannot hold token ids up to 100266"):
        prepare_data.tokenize_corpus([str(tmp_path / "c")], big, str(tmp_path / "o2"), dtype="uint16")


def test_parquet(tok, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    docs = [f"{DOCS[i % len(DOCS)]} p{i}" for i in range(90)]
    (tmp_path / "c").mkdir()
    table = pa.table({"id": list(range(90)), "content": docs[:45] + [None] + docs[45:89]})
    pq.write_table(table, tmp_path / "c" / "a.parquet", row_group_size=20)  # 5 row groups = 5 chunks
    meta = prepare_data.tokenize_corpus([str(tmp_path / "c")], tok, str(tmp_path / "o"), val_fraction=0.2,
                                        num_proc=2, text_key="content")
    assert meta["skipped"]["empty"] == 1
    assert_matches_direct_encoding(tmp_path / "o", tok, docs[:89])


def run_main(args, capsys):
    rc = prepare_data.main(args)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "no_match", "empty", "bad_utf8", "unknown_type", "bad_tokenizer",
                                  "tiny_val", "no_pyarrow"])
def test_bad_input_rejected_and_nothing_left(case, tok, tmp_path, capsys, monkeypatch):
    c = tmp_path / "c"
    c.mkdir()
    inputs, extra = [str(c)], []
    if case == "missing":
        inputs, msg = [str(c / "nope.txt")], "nope.txt: no such file or folder"
    elif case == "no_match":
        inputs, msg = [str(c / "*.jsonl")], r"\*.jsonl: no files match"
    elif case == "empty":
        (c / "a.txt").write_text("\n\n  \n")
        (c / "b.jsonl").write_text('{"text": ""}\n\n')
        msg = "empty corpus: no documents in"
    elif case == "bad_utf8":
        (c / "a.txt").write_bytes("好的\n\nok".encode() + b"\xff\xfe bad\n\nmore")
        msg = r"a.txt: invalid UTF-8 at byte 10; nothing written; pass --bad_utf8=replace"
    elif case == "unknown_type":
        (c / "a.csv").write_text("x")
        inputs, msg = [str(c / "a.csv")], "a.csv: unknown file type"
    elif case == "bad_tokenizer":
        (c / "a.txt").write_text("hello")
        extra, msg = ["--tokenizer", str(tmp_path / "none.model")], "tokenizer not found"
    elif case == "no_pyarrow":
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
        (c / "a.parquet").write_bytes(b"PAR1")
        msg = r"a.parquet: reading .parquet needs pyarrow \(pip install pyarrow\)"
    elif case == "tiny_val":
        (c / "a.txt").write_text("just one document")
        msg = "1 documents with val_fraction=0.005 leave the (val|train) split empty"
    out = tmp_path / "out"
    rc, err = run_main(["pretrain", *inputs, "--out_dir", str(out), "--num_proc", "1",
                        *(extra or ["--tokenizer", tok.path])], capsys)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare_data pretrain: error: "), err
    assert re.search(msg, lines[0]), lines[0]
    assert not out.exists()


def test_failed_run_keeps_previous_output(tok, tmp_path, capsys):
    make_corpus(tmp_path / "c")
    out = tmp_path / "out"
    assert run_main(["pretrain", str(tmp_path / "c"), "--out_dir", str(out), "--tokenizer", tok.path,
                     "--val_fraction", "0.2", "--num_proc", "2"], capsys)[0] == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    (tmp_path / "c" / "z.txt").write_bytes(b"fine\n\nbroken \xc3(")  # read last: fails after real work
    rc, err = run_main(["pretrain", str(tmp_path / "c"), "--out_dir", str(out), "--tokenizer", tok.path,
                        "--num_proc", "2", "--chunk_mb", "0.001"], capsys)
    assert rc == 1 and "z.txt: invalid UTF-8 at byte 13" in err
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # no temp files, nothing changed


def test_bad_utf8_replace_and_skip(tok, tmp_path, capsys):
    (tmp_path / "c").mkdir()
    docs = b"\n\n".join(b"doc %d" % i for i in range(40))
    (tmp_path / "c" / "a.txt").write_bytes(b"good one\n\nbad \xff here\n\n" + docs)
    rc, err = run_main(["pretrain", str(tmp_path / "c"), "--out_dir", str(tmp_path / "r"), "--tokenizer", tok.path,
                        "--bad_utf8", "replace", "--val_fraction", "0.3"], capsys)
    assert rc == 0 and "a.txt: invalid UTF-8 at byte 14: replaced by U+FFFD" in err
    _, res = read_split_docs(tmp_path / "r", tok)
    assert tok.encode("bad \ufffd here") in res["train"] + res["val"]
    rc, err = run_main(["pretrain", str(tmp_path / "c"), "--out_dir", str(tmp_path / "s"), "--tokenizer", tok.path,
                        "--bad_utf8", "skip", "--val_fraction", "0.3"], capsys)
    meta, res = read_split_docs(tmp_path / "s", tok)
    assert rc == 0 and "document dropped" in err and meta["skipped"]["bad_utf8_docs"] == 1
    assert meta["train_docs"] + meta["val_docs"] == 41


def test_bad_jsonl_lines_counted(tok, tmp_path, capsys):
    (tmp_path / "c").mkdir()
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(30)]
    lines[3], lines[7] = '{"text": broken', '{"content": "no text field"}'
    (tmp_path / "c" / "a.jsonl").write_text("\n".join(lines) + "\n")
    rc, err = run_main(["pretrain", str(tmp_path / "c"), "--out_dir", str(tmp_path / "o"), "--tokenizer", tok.path,
                        "--val_fraction", "0.3"], capsys)
    meta = load_meta(str(tmp_path / "o"))
    assert rc == 0 and meta["skipped"]["bad_jsonl_lines"] == 2 and meta["train_docs"] + meta["val_docs"] == 28
    offset = sum(len(ln) + 1 for ln in lines[:7])
    assert f"a.jsonl: line at byte {offset} skipped: no 'text' field" in err


def test_check_vocab(tok, tmp_path):
    make_corpus(tmp_path / "c")
    meta = prepare_data.tokenize_corpus([str(tmp_path / "c")], tok, str(tmp_path / "o"), val_fraction=0.2, num_proc=1)
    check_vocab(meta, 400, tok)
    check_vocab(meta, 512)  # a model may pad its embedding past the tokenizer
    with pytest.raises(DataError, match="tokenized with a 400-token vocabulary .* but the model has vocab_size=256"):
        check_vocab(meta, 256)
    other = train_tokenizer(DOCS * 30 + ["something else"] * 5, 400, str(tmp_path / "other.model"),
                            character_coverage=1.0)
    with pytest.raises(DataError, match="tokenized with a different tokenizer"):
        check_vocab(meta, 400, other)
    (tmp_path / "o" / "val.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError, match="val.bin: expected .* bytes from meta.json, found 2"):
        load_meta(str(tmp_path / "o"))
    with pytest.raises(DataError, match="no meta.json"):
        load_meta(str(tmp_path))


def test_tokenizer_step(tmp_path, capsys):
    make_corpus(tmp_path / "c")
    out = tmp_path / "t" / "tokenizer.model"
    rc, err = run_main(["tokenizer", str(tmp_path / "c"), "--vocab_size", "420", "--out", str(out),
                        "--character_coverage", "1"], capsys)
    t = Tokenizer.load(str(out))
    assert rc == 0 and t.vocab_size == 420 and "tokenizer: 420 tokens" in err
    assert t.decode(t.encode(DOCS[3])) == DOCS[3]
    rc, err = run_main(["tokenizer", str(tmp_path / "c"), "--vocab_size", "100000", "--out", str(tmp_path / "x.model")],
                       capsys)
    assert rc == 1 and err.count("\n") == 1 and "error: tokenizer training failed: Vocabulary size too high" in err
    assert not list(tmp_path.glob("x.model*"))


def test_subprocess_exit_status(tok, tmp_path):
    r = subprocess.run([sys.executable, "prepare_data.py", "pretrain", str(tmp_path / "x.txt"), "--tokenizer",
                        tok.path, "--out_dir", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().endswith("x.txt: no such file or folder") and r.stdout == ""


def test_sigterm_leaves_nothing(tok, tmp_path):
    (tmp_path / "c").mkdir()
    block = ("\n\n".join(f"{DOCS[i % len(DOCS)]} {i}" for i in range(20000)) + "\n\n").encode()
    with open(tmp_path / "c" / "big.txt", "wb") as f:
        for _ in range(20):  # ~20 MB: seconds of work on any machine
            f.write(block)
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "prepare_data.py", "pretrain", str(tmp_path / "c"), "--tokenizer", tok.path,
                          "--out_dir", str(out), "--num_proc", "1"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    while not (out / ".train.bin.tmp").exists():
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.01)
    p.terminate()
    assert p.wait(timeout=60) == 128 + 15 and not out.exists()


# -- stage jsonl --------------------------------------------------------------------------------------------
def test_read_jsonl_reports_bad_lines(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = [good, {"messages": [{"role": "bot", "content": "x"}]}, "not json", good,
            {"messages": [{"role": "user", "content": "q"}]}, {"messages": [{"role": "user", "content": 3}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]}]
    p = tmp_path / "sft.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n\n")
    logged, stats = [], {}
    recs = read_jsonl(str(p), "sft", log=logged.append, stats=stats)
    assert recs == [good, good] and stats == {"used": 2, "skipped": 5}
    assert logged == [f"{p}:2: messages[1]: role 'bot' is not one of system, user, assistant",
                      f"{p}:3: invalid JSON (Expecting value at column 1)",
                      f"{p}:5: no assistant message, nothing to learn",
                      f"{p}:6: messages[1] (user): content must be a string, not int",
                      f"{p}:7: messages[2]: a system message can only come first",
                      f"{p}: 2 sft records used, 5 lines skipped"]
    with pytest.raises(DataError, match=r"sft.jsonl:2: messages\[1\]: role 'bot'"):
        read_jsonl(str(p), "sft", log=logged.append, strict=True)
    p.write_text("not json\n")
    with pytest.raises(DataError, match="no usable records"):
        read_jsonl(str(p), "sft", log=logged.append)
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(str(tmp_path / "none.jsonl"), "sft")


def test_read_jsonl_kinds(tmp_path):
    p = tmp_path / "x.jsonl"
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
             "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "a"}]
    p.write_text("\n".join(map(json.dumps, rows)))
    logged = []
    recs = read_jsonl(str(p), log=logged.append)  # kind guessed: pairs
    assert recs == [{"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"},
                    {"prompt": rows[1]["prompt"], "chosen": "a", "rejected": "b"}]
    assert [ln.split(": ", 1)[1] for ln in logged[:3]] == ["chosen and rejected are identical",
                                                           "prompt must end with a user message",
                                                           "'rejected' must be a non-empty string (missing)"]
    p.write_text("\n".join(map(json.dumps, [
        {"question": "Natalia sold 48 clips... how many?", "answer": "She sold 48/2 = 24.\n#### 1,072"},
        {"prompt": "1+1?", "answer": 2}, {"prompt": "1+1?"}, {"question": "q", "answer": "no marker"}])))
    recs = read_jsonl(str(p), "prompts", log=logged.append)
    assert recs == [{"prompt": [{"role": "user", "content": "Natalia sold 48 clips... how many?"}], "answer": "1072"},
                    {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}]
    p.write_text('{"question": "Where?", "answer": "Lotavi", "doc": "a.md"}\n{"question": "x"}\n')
    assert read_jsonl(str(p), "qa", log=logged.append) == [{"question": "Where?", "answer": "Lotavi", "doc": "a.md"}]
    assert logged[-2].endswith(":2: 'answer' must be a non-empty string (missing)")


def test_read_rag_docs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.md").write_text("# B\nbee")
    (tmp_path / "d" / "sub" / "a.txt").write_text("ay")
    (tmp_path / "d" / "skip.json").write_text("{}")
    assert read_rag_docs(str(tmp_path / "d"), log=lambda *a: None) == [
        {"id": "b.md", "text": "# B\nbee"}, {"id": os.path.join("sub", "a.txt"), "text": "ay"}]
    (tmp_path / "docs.jsonl").write_text('{"id": "x", "text": "t"}\n')
    assert read_rag_docs(str(tmp_path / "docs.jsonl"), log=lambda *a: None) == [{"id": "x", "text": "t"}]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt or .md documents"):
        read_rag_docs(str(tmp_path / "empty"), log=lambda *a: None)
    with pytest.raises(DataError, match="no such file or folder"):
        read_rag_docs(str(tmp_path / "nope"), log=lambda *a: None)


# -- the demo world ----------------------------------------------------------------------------------------
def world_files(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_demo_world_deterministic_and_sound(tmp_path):
    small = dict(n_people=24, n_towns=5, n_rag=6)
    w = demo_world.write_world(str(tmp_path / "a"), seed=7, n_strangers=20, **small)
    demo_world.write_world(str(tmp_path / "b"), seed=7, n_strangers=20, **small)
    demo_world.write_world(str(tmp_path / "c"), seed=8, n_strangers=20, **small)
    a = world_files(tmp_path / "a")
    assert a == world_files(tmp_path / "b") and a != world_files(tmp_path / "c")
    assert {"corpus/people.txt", "sft.jsonl", "sft_dev.jsonl", "pairs.jsonl", "pairs_dev.jsonl", "grpo.jsonl",
            "grpo_dev.jsonl", "rag/qa.jsonl", "rag/qa_dev.jsonl", "refuse_dev.jsonl", "pairs_grounded.jsonl"} <= set(a)
    quiet = lambda *x: None  # noqa: E731
    data = {k: read_jsonl(str(tmp_path / "a" / k), kind, log=quiet, strict=True) for k, kind in [
        ("sft.jsonl", "sft"), ("sft_dev.jsonl", "sft"), ("pairs.jsonl", "pairs"), ("pairs_dev.jsonl", "pairs"),
        ("grpo.jsonl", "prompts"), ("grpo_dev.jsonl", "prompts"), ("rag/qa.jsonl", "qa"), ("rag/qa_dev.jsonl", "qa"),
        ("refuse_dev.jsonl", "sft"), ("pairs_grounded.jsonl", "pairs")]}
    for name in ("sft", "pairs", "grpo", "rag/qa"):  # disjoint splits, both non-empty
        train, dev = ({json.dumps(r, sort_keys=True) for r in data[f"{name}{s}.jsonl"]} for s in ("", "_dev"))
        assert train and dev and not train & dev, name
    # dev facts never appear as an answer in SFT train
    train_answers = {m["content"] for r in data["sft.jsonl"] for m in r["messages"] if m["role"] == "assistant"}
    dev_last = {r["messages"][-1]["content"] for r in data["sft_dev.jsonl"]} - set(demo_world.DONT_KNOW)
    assert dev_last and not train_answers & dev_last
    # preference pairs (train and dev) are about facts SFT teaches, each with a wrong reply
    pairs = data["pairs.jsonl"] + data["pairs_dev.jsonl"]
    assert all(p["chosen"] in train_answers and p["rejected"] != p["chosen"] for p in pairs)
    # DPO's grounded pairs are SFT train retrieval chats, the cited answer chosen over "I don't know."
    train_chats = {(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in data["sft.jsonl"]}
    assert data["pairs_grounded.jsonl"] and all((p["prompt"][-1]["content"], p["chosen"]) in train_chats and
                                               p["rejected"] in demo_world.DONT_KNOW for p in data["pairs_grounded.jsonl"])
    grounded = [r for r in data["sft.jsonl"] if r["messages"][0]["content"].startswith("Answer the question using")]
    assert grounded and all(r["messages"][-1]["content"].endswith("]") or r["messages"][-1]["content"] in
                            demo_world.DONT_KNOW for r in grounded)
    assert all(r["answer"].isdigit() for r in data["grpo.jsonl"] + data["grpo_dev.jsonl"])
    # RAG people appear in exactly one fact sheet and nowhere in the pretraining or stage data
    seen_text = "".join(v.decode() for k, v in a.items() if not k.startswith("rag/"))
    sheets = {k: v.decode() for k, v in a.items() if k.startswith("rag/docs/")}
    for p in w.rag_people:
        for lang in ("en", "zh"):
            assert p[lang]["n"] not in seen_text
            assert sum(p[lang]["n"] in t for t in sheets.values()) == 1
    for q in data["rag/qa.jsonl"] + data["rag/qa_dev.jsonl"]:
        assert q["answer"] in sheets["rag/" + q["doc"]]
    # strangers are asked about only in preference pairs ("I don't know." chosen) and refuse_dev.jsonl;
    # a dev stranger is in no train file, a train one in no dev file
    train_text = "".join(v.decode() for k, v in a.items() if not k.startswith("rag/") and "_dev" not in k)
    refuse = json.dumps(data["refuse_dev.jsonl"], ensure_ascii=False)
    assert all(r["messages"][-1]["content"] in demo_world.DONT_KNOW for r in data["refuse_dev.jsonl"])
    for p in w.strangers:
        for lang in ("en", "zh"):
            assert (p[lang]["n"] in refuse) != (p[lang]["n"] in train_text), p[lang]["n"]
            assert p[lang]["n"] not in a["corpus/people.txt"].decode() + a["sft.jsonl"].decode()
    # the facts of the corpus agree with the chats
    person = w.people[0]
    assert demo_world.fact(person, "town", "zh") in a["corpus/people.txt"].decode()


def test_extra_wrong_values_are_train_only_and_move_nothing_else(monkeypatch):
    """EXTRA_WRONG adds train pairs and nothing else: with none, every other file of the world (SFT,
    GRPO, dev pairs) is the same, the train pairs are a subset; per fact every rejected value is a
    different one, and no dev pair's rejected reply appears among the train pairs of its question."""
    def world():
        return demo_world.chats(demo_world.World(7, n_people=24, n_towns=5, n_rag=6))
    more, extra = world(), demo_world.EXTRA_WRONG
    monkeypatch.setattr(demo_world, "EXTRA_WRONG", 0)
    base = world()
    key = lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False)  # noqa: E731
    assert more["sft"] == base["sft"] and more["grpo"] == base["grpo"] and more["pairs"][1] == base["pairs"][1]
    train, train0 = [key(r) for r in more["pairs"][0]], {key(r) for r in base["pairs"][0]}
    assert train0 < set(train) and len(train) == len(set(train)) and len(train) > 2 * len(train0)
    by_answer = {}
    for r in more["pairs"][0]:
        by_answer.setdefault(r["chosen"], []).append(r["rejected"])
    assert all(len(v) == len(set(v)) for v in by_answer.values())
    assert max(len(v) for v in by_answer.values()) == 4 + extra  # a fact none of whose four pairs went to dev
    assert not {(r["chosen"], r["rejected"]) for r in more["pairs"][1]} & {(r["chosen"], r["rejected"]) for r in more["pairs"][0]}


def test_demo_end_to_end(tmp_path, capsys):
    problems = prepare_data.demo(str(tmp_path / "demo"), vocab_size=700, num_proc=2, n_people=20)
    assert problems == 0
    d = tmp_path / "demo"
    meta = load_meta(str(d / "pretrain"))
    assert meta["vocab_size"] == 700 and meta["train_docs"] > 500 and meta["val_docs"] > 0
    assert (d / "pretrain" / "tokenizer.model").read_bytes() == (d / "tokenizer.model").read_bytes()
    assert prepare_data.main(["validate", str(d)]) == 0
    (d / "sft.jsonl").open("a").write('{"messages": []}\n')
    assert prepare_data.main(["validate", str(d / "sft.jsonl")]) == 1
    assert "sft.jsonl:" in capsys.readouterr().err
