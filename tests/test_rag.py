"""rag.py: chunks cover documents with the stated overlap and never cut a UTF-8 character, Chinese and
English sentence splitting, top-k equals brute-force sorting, the index round-trips, bad documents
get a clear message, grounded prompts, and the index/query/ask/eval commands on a tiny model."""
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import demo_world
import rag
from checkpoint import load_model, save_checkpoint, write_json
from model import ModelConfig, Transformer
from tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]

EN = ["Kami lives in Lotavi. Kami is 34 years old.", "The quick brown fox jumps over the lazy dog!",
      "What is 12 + 7? It is 19.", "Pi is about 3.14, and e is about 2.72."]
ZH = ["卡米住在洛塔维。卡米今年34岁。", "今天天气很好，我们去公园散步吧！", "十二加七等于多少？等于十九。", "他说：“你好。”然后走了。"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    # coverage < 1: rare characters (龘, emoji) fall back to 3-4 byte tokens, the case a cut could split
    lines = [f"{e} {z}" for e in EN for z in ZH] * 5
    return train_tokenizer(lines, 400, str(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def sentences(rng, n):
    return [rng.choice(EN + ZH + ["龘龘是一个很少见的字。", "Emoji 😀👍🏽 are four bytes each."]) for _ in range(n)]


def documents():
    rng = random.Random(0)
    return {
        "paragraphs": "\n\n".join(" ".join(sentences(rng, rng.randint(1, 6))) for _ in range(12)),
        "chinese": "".join(rng.choice(ZH) for _ in range(40)),
        "one_line_no_spaces": "龘卡米住在洛塔维😀" * 150,             # no break at all: character cuts only
        "one_line_words": " ".join(rng.choice("abc de fgh ijkl 龘 😀".split()) for _ in range(600)),
        "lines": "\n".join(rng.choice(EN) for _ in range(50)) + "\n\n\n   \n",
    }


def check_chunks(text, tok, chunks, chunk_tokens, overlap):
    ids = tok.encode(text)
    assert chunks and not text[:chunks[0]["start"]].strip() and not text[chunks[-1]["end"]:].strip()
    for c in chunks:
        s, e = c["span"]
        assert 0 < e - s <= chunk_tokens
        assert c["ids"].tolist() == ids[s:e]
        # the chunk's own tokens decode to exactly its text: no character was cut in two (a cut one would
        # decode to U+FFFD), and the character offsets point at that text
        assert tok.decode(c["ids"]) == text[c["start"]:c["end"]] and "\ufffd" not in text[c["start"]:c["end"]]
    for prev, nxt in zip(chunks, chunks[1:]):
        assert prev["span"][0] < nxt["span"][0] and prev["span"][1] < nxt["span"][1]
        shared = prev["span"][1] - nxt["span"][0]           # tokens the next chunk repeats
        if shared >= 0:
            assert shared <= overlap
        else:                                                # only a dropped whitespace-only chunk lies between
            assert not text[prev["end"]:nxt["start"]].strip()
    covered = np.zeros(len(text), bool)
    for c in chunks:
        covered[c["start"]:c["end"]] = True
    assert all(covered[i] or ch.isspace() for i, ch in enumerate(text))


@pytest.mark.parametrize("chunk_tokens,overlap", [(8, 0), (16, 4), (40, 12), (64, 32)])
def test_chunks_cover_document_with_overlap_and_whole_characters(tok, chunk_tokens, overlap):
    for name, text in documents().items():
        check_chunks(text, tok, rag.chunk_document(text, tok, chunk_tokens, overlap), chunk_tokens, overlap)


def test_overlap_is_whole_sentences_else_exact_tokens(tok):
    text = " ".join(["Kami lives in Lotavi."] * 40)       # sentences of ~6 tokens, overlap of 16
    chunks = rag.chunk_document(text, tok, 48, 16)
    for prev, nxt in zip(chunks, chunks[1:]):
        repeated = text[nxt["start"]:prev["end"]]
        assert repeated.strip().startswith("Kami") and repeated.strip().endswith("Lotavi.")   # whole sentences
        # as many whole sentences as fit: one more would exceed 16 tokens
        assert len(tok.encode(" Kami lives in Lotavi.")) + prev["span"][1] - nxt["span"][0] > 16
    # no break anywhere: the overlap is the stated number of tokens, give or take one character
    text = "龘卡米住在洛塔维" * 100
    chunks = rag.chunk_document(text, tok, 32, 10)
    assert len(chunks) > 5
    for prev, nxt in zip(chunks, chunks[1:]):
        assert 10 - 3 <= prev["span"][1] - nxt["span"][0] <= 10


def test_chinese_and_english_sentence_ends(tok):
    text = "卡米住在洛塔维。今年34岁！对吗？Pi is 3.14. Yes"
    kind = rag.break_kinds(text)
    assert [text[p - 1] for p in range(1, len(text)) if kind[p] == 2] == ["。", "！", "？", ".", " "]
    assert kind[text.index("3.14") + 2] == 0                 # "3.14" is not a sentence end, "3.14. " is
    # Chinese text is cut after 。！？ when a sentence end is in reach, never inside a sentence
    text = "".join(ZH[:3]) * 6
    chunks = rag.chunk_document(text, tok, 24, 0)
    assert len(chunks) > 3
    assert all(text[c["start"]:c["end"]].endswith(("。", "！", "？")) for c in chunks)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_top_k_equals_brute_force(tmp_path, dtype):
    rng = np.random.default_rng(0)
    v = rag.normalize(rng.standard_normal((5000, 24))).astype(dtype)
    v[4000:4003] = v[17]                                     # tied rows
    np.save(tmp_path / "v.npy", v)
    mm = np.load(tmp_path / "v.npy", mmap_mode="r")
    q = rag.normalize(rng.standard_normal((7, 24)))
    q[3] = v[17]
    exact = q.astype(np.float64) @ v.astype(np.float64).T    # brute force: every score, in float64
    for k in (1, 5, 37, 5000, 6000):
        scores, rows = rag.top_k(mm, q, k, block_bytes=24 * 4 * 1000)   # blocks of 1024 rows, merged
        kk = min(k, 5000)
        assert rows.shape == scores.shape == (7, kk)
        for i in range(7):
            order = np.argsort(-exact[i], kind="stable")
            assert len(set(rows[i])) == kk
            np.testing.assert_allclose(scores[i], exact[i, rows[i]], atol=1e-6)
            # the same scores as sorting all of them, best first (rows may differ only among equal scores)
            np.testing.assert_allclose(exact[i, rows[i]], exact[i, order[:kk]], atol=1e-6)
            if kk < 5000:
                assert exact[i, rows[i]].min() >= exact[i, order[kk:]].max() - 1e-6
    assert sorted(rag.top_k(mm, q, 4)[1][3]) == [17, 4000, 4001, 4002]


def make_chat_run(path, tok, dim=32, seed=0):
    """A run dir like sft.py writes, with a random tiny model and the test tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    config = {"stage": "sft", "out_dir": str(path), **cfg.to_dict()}
    save_checkpoint(str(path), {"model": model.state_dict(), "model_config": cfg.to_dict(), "config": config,
                                "step": 0, "tokenizer": tok.name})
    write_json(str(path / "config.json"), config)
    return path


def write_docs(folder):
    docs = {"kami.md": "# Kami (卡米)\n\nKami lives in Lotavi. Kami is 34 years old. Kami has a cat called Zizo.\n\n"
                       "卡米住在洛塔维。卡米今年34岁。卡米有一只叫兹佐的猫。\n",
            "sub/bodo.txt": "Bodo / 波多\n\nBodo lives in Fanimo. Bodo is 51 years old. Bodo is a baker.\n\n"
                            "波多住在法妮莫。波多今年51岁。波多是一名面包师。\n",
            "notes.txt": "\n\n".join(" ".join(EN[i % 4] for i in range(j, j + 5)) for j in range(10))}
    for name, text in docs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return docs


def test_index_round_trips(tok, tmp_path):
    docs = write_docs(tmp_path / "docs")
    read, skipped = rag.read_docs(str(tmp_path / "docs"))
    assert dict(read) == docs and skipped == 0
    for dtype in ("float32", "float16"):
        out = tmp_path / f"index_{dtype}"
        s = rag.build_index(read, str(out), rag.TfidfEmbedder(tok.vocab_size), tok, 24, 6, dtype)
        r = rag.Retriever(str(out))
        assert r.vectors.dtype == np.dtype(dtype) and len(r) == s["chunks"] == r.settings["chunks"]
        chunks = r.chunks(range(len(r)))
        assert [c["id"] for c in chunks if c["source"] == "kami.md"][:2] == ["kami.md#0", "kami.md#1"]
        for row, c in enumerate(chunks):
            start, end = c["offsets"]
            assert docs[c["source"]][start:end] == c["text"] and c["tokens"] <= 24
            # the stored vector is what the embedder gives the chunk's text now
            atol = 2e-3 if dtype == "float16" else 1e-6
            np.testing.assert_allclose(r.vectors[row], r.embed([c["text"]])[0], atol=atol)
        hits = r.search(["How old is Bodo?", "卡米今年多大？"], k=3)
        assert hits[0][0]["source"] == "sub/bodo.txt" and "51" in hits[0][0]["text"]
        assert hits[1][0]["source"] == "kami.md" and "34岁" in hits[1][0]["text"]
        assert [h["rank"] for h in hits[0]] == [1, 2, 3] and hits[0][0]["score"] >= hits[0][1]["score"]
    # rebuilding replaces the index whole; a dir that is not an index is never overwritten
    rag.build_index(read[:1], str(tmp_path / "index_float32"), "tfidf", tok, 24, 6)
    assert {c["source"] for c in rag.Retriever(str(tmp_path / "index_float32")).chunks(range(2))} == {read[0][0]}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"precious")
    with pytest.raises(rag.DataError, match="not a rag index"):
        rag.build_index(read, str(tmp_path / "run"), "tfidf", tok, 24, 6)
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == b"precious"
    # jsonl documents; hashed TF-IDF with bigrams
    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"id": k, "text": v}, ensure_ascii=False) + "\n" for k, v in docs.items()))
    read2, _ = rag.read_docs(str(jl))
    assert dict(read2) == docs
    rag.build_index(read2, str(tmp_path / "hashed"), rag.TfidfEmbedder(tok.vocab_size, 256, 2), tok, 24, 6)
    r = rag.Retriever(str(tmp_path / "hashed"))
    assert r.vectors.shape[1] == 256 and r.search(["Bodo baker"], 1)[0][0]["source"] == "sub/bodo.txt"
    # an index built with an embedder rag.py does not have (the LM one of docs/exercises.md): a clear message
    meta = json.loads((tmp_path / "hashed" / "index.json").read_text())
    (tmp_path / "hashed" / "index.json").write_text(json.dumps({**meta, "embedder": "lm"}))
    with pytest.raises(rag.DataError, match="rag.py has no 'lm' embedder; rebuild it"):
        rag.Retriever(str(tmp_path / "hashed"))


@pytest.fixture
def cli(capsys):
    """Run `python rag.py ARGS` in this process (no torch import per call): (exit status, stdout, stderr)."""
    def run(*args):
        code = rag.main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def test_bad_documents_get_a_clear_message(tok, tmp_path, cli):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "good.md").write_text("# Good\n\nKami lives in Lotavi. 卡米住在洛塔维。\n", encoding="utf-8")
    (d / "empty.txt").write_text("")
    (d / "blank.md").write_text("  \n\n \t\n")
    (d / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (d / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (d / "huge.txt").write_text("龘卡米住在洛塔维😀" * 20000, encoding="utf-8")      # 180k characters, one line
    (d / "ignored.pdf").write_bytes(b"%PDF")
    code, out, err = cli("index", f"--docs={d}", f"--out_dir={tmp_path / 'index'}", f"--tokenizer={tok.path}",
                "--chunk_tokens=64", "--overlap=8")
    assert code == 0, err
    assert "empty.txt: empty, skipped" in err and "blank.md: empty, skipped" in err
    assert "image.txt: binary (it contains NUL bytes), skipped" in err
    assert "latin1.txt: not UTF-8 text (invalid byte 0xe9 at offset 3)" in err
    m = re.search(r"huge.txt: (\d+) of (\d+) chunks cut mid-sentence \(no sentence end within 64 tokens\); it is one "
                  r"line of 180,000 characters", err)
    assert m and int(m[1]) == int(m[2]) - 1 > 1000
    assert "from 2 documents (4 skipped)" in err
    sources = {json.loads(ln)["source"] for ln in (tmp_path / "index" / "chunks.jsonl").open()}
    assert sources == {"good.md", "huge.txt"}
    # a size limit, and a folder with nothing usable: one line, exit status 1, no index written
    code, out, err = cli("index", f"--docs={d}", f"--out_dir={tmp_path / 'index2'}", f"--tokenizer={tok.path}",
                "--max_doc_mb=0.1")
    assert code == 0 and "huge.txt: 0.5 MB, more than --max_doc_mb=0.1; split it" in err
    for f in ("good.md", "huge.txt"):
        (d / f).unlink()
    code, out, err = cli("index", f"--docs={d}", f"--out_dir={tmp_path / 'index3'}", f"--tokenizer={tok.path}")
    assert code == 1 and err.strip().endswith("no usable documents (4 skipped; want .txt/.md files "
                                                            "or jsonl {id, text})")
    assert not (tmp_path / "index3").exists()


def test_grounded_prompt(tok):
    hits = [{"text": "Kami lives in Lotavi.\n\nKami is 34."}, {"text": "Bodo is a baker."}, {"text": "卡米今年34岁。"}]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How old is Kami?"}]
    out = rag.ground_messages(msgs, hits[:2])
    assert out[0] == msgs[0] and msgs[1]["content"] == "How old is Kami?"      # the input is not changed
    assert out[1]["content"] == ("Answer the question using only the sources below, and cite the source you used "
                                 "as [n].\n[1] Kami lives in Lotavi. [1] Kami is 34. [1]\n[2] Bodo is a baker. [2]\n"
                                 "Question: How old is Kami?")
    zh = rag.ground_messages([{"role": "user", "content": "卡米今年多大？"}], hits[2:])[0]["content"]
    assert zh == "请只根据下面的资料回答问题，并用[n]注明所用的资料。\n[1] 卡米今年34岁。[1]\n问题：卡米今年多大？"
    # a chunk cut mid-sentence still ends with its marker; a decimal point ends no sentence
    assert rag.ground_messages(msgs, [{"text": "Kami is 3.5 m tall. Kami lives"}])[1]["content"].split("\n")[1] == \
        "[1] Kami is 3.5 m tall. [1] Kami lives [1]"
    assert rag.ground_messages(msgs, []) == msgs
    full, used = rag.grounded_prompt(tok, msgs, hits, 10_000)
    assert used == hits and full == tok.render_chat(rag.ground_messages(msgs, hits), add_generation_prompt=True)[0]
    fewer, used = rag.grounded_prompt(tok, msgs, hits, len(full) - 1)            # the lowest-ranked goes first
    assert used == hits[:2] and len(fewer) < len(full)
    prefilled = msgs + [{"role": "assistant", "content": "Kami is"}]          # no user turn last: no sources
    assert rag.grounded_prompt(tok, prefilled, hits, 10_000)[1] == []
    assert rag.cited("Kami is 34 years old. [1][3] not [x]") == [1, 3]


def test_commands_on_a_tiny_model(tok, tmp_path, cli, monkeypatch):
    run = make_chat_run(tmp_path / "sft", tok)
    write_docs(tmp_path / "docs")
    index = tmp_path / "index"
    code, out, err = cli("index", f"--docs={tmp_path / 'docs'}", f"--out_dir={index}", f"--tokenizer={tok.path}",
                         "--chunk_tokens=32", "--overlap=8", "--dtype=float16")
    assert code == 0, err
    # the real script, once: query prints the ranked chunks of each question
    p = subprocess.run([sys.executable, "rag.py", "query", f"--index={index}", "--query=How old is Bodo?",
                        "--query=卡米有宠物吗？", "--k=2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "query: How old is Bodo?" and lines[1].lstrip().startswith("1.") and "sub/bodo.txt#" in lines[1]
    assert lines[3] == "query: 卡米有宠物吗？" and "kami.md#" in lines[4] and len(lines) == 6
    # command-line bytes that are not UTF-8 (lone surrogates in Python) are searched as U+FFFD, printed escaped
    p = subprocess.run([sys.executable, "rag.py", "query", f"--index={index}", b"--query=Bodo\xff?", "--k=1"],
                       cwd=ROOT, capture_output=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith(b"query: Bodo\\udcff?\n"), p.stderr[-2000:]

    # ask: the printed answer is what the model generates greedily for the grounded prompt
    code, out, err = cli("ask", f"--index={index}", f"--model={run}", "--query=How old is Bodo?", "--k=2",
                         "--max_new_tokens=8")
    assert code == 0, err
    hits = rag.Retriever(str(index)).search(["How old is Bodo?"], 2)[0]
    model, mtok, _ = load_model(str(run))
    ids, _ = rag.grounded_prompt(mtok, [{"role": "user", "content": "How old is Bodo?"}], hits, 256 - 8)
    want = [int(t) for t, a in model.generate([ids], 8, temperature=0) if a and int(t) not in mtok.stop_ids]
    lines = out.splitlines()
    assert lines[:3] == ["question: How old is Bodo?", "answer: " + mtok.decode(want).strip(), "sources:"]
    assert lines[3].lstrip(" *").startswith(f"[1] {hits[0]['id']} chars ") and len(lines) == 5

    # eval: recall@k from the chunks; accuracy with a stand-in model that repeats its prompt, so a
    # question counts as answered exactly when the answer is in the prompt it was given
    qa = [{"question": "How old is Bodo?", "answer": "51", "doc": "docs/sub/bodo.txt"},
          {"question": "卡米今年多大？", "answer": "34", "doc": "docs/kami.md"},
          {"question": "What is Kami's cat called?", "answer": "Zizo", "doc": "kami.md"},
          {"question": "Where does Bodo live?", "answer": "Lotavi", "doc": "docs/sub/bodo.txt"}]  # not in that doc
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in qa))
    calls = []  # the last user message of each chat, per call

    def echo(model, tok, chats, *a, **kw):
        calls.append([c[-1]["content"] for c in chats])
        return [c[-1]["content"] for c in chats]
    monkeypatch.setattr(rag, "generate_replies", echo)
    code, out, err = cli("eval", f"--index={index}", f"--model={run}", f"--qa={tmp_path / 'qa.jsonl'}", "--k=2",
                         f"--results={tmp_path / 'eval.json'}")
    assert code == 0, err
    res = json.loads((tmp_path / "eval.json").read_text())
    results = rag.Retriever(str(index)).search([x["question"] for x in qa], 5)
    first = [next((h["rank"] for h in hits if h["source"] in x["doc"] and x["answer"] in h["text"]), 9)
             for x, hits in zip(qa, results)]
    assert first[3] == 9 and res["recall@5"] == sum(r <= 5 for r in first) / 4 >= 0.5
    assert res["recall@1"] == sum(r == 1 for r in first) / 4
    in_prompt = [any(x["answer"] in h["text"] for h in hits[:2]) for x, hits in zip(qa, results)]
    assert res["accuracy_without_retrieval"] == 0 and res["accuracy_with_retrieval"] == sum(in_prompt) / 4 > 0
    # the echo cites every source it was given ("[1] ...", "[2] ..."): right when one of them holds the
    # answer in its own document (the last question's answer is only in another document)
    right_doc = [any(rag.holds_answer(h, x) for h in hits[:2]) for x, hits in zip(qa, results)]
    assert res["cites_right_source"] == sum(right_doc) / 4 > 0 and not right_doc[3]
    # without retrieval: the bare questions; then the grounded prompts
    assert calls[0] == [x["question"] for x in qa] and len(calls) == 2
    assert all(c.endswith(x["question"]) and c != x["question"] for c, x in zip(calls[1], qa))
    assert f"recall@5 {res['recall@5']:.3f}" in out and "accuracy without retrieval 0.000" in out
    assert "knn" not in json.dumps(res) and "copy_probe" not in res

    code, out, err = cli("ask", "--index=/nonexistent", "--query=x")
    assert code == 1 and "not a rag index" in err


def test_demo_world_retrieval_replies_copy_a_source_sentence():
    """Each answerable SFT retrieval chat (demo_world.py) replies with a sentence of one of its sources followed by
    that source's marker, exactly as the prompt lists it: answering and citing are one copy."""
    w = demo_world.World(seed=1, n_people=20, n_towns=4, n_rag=3)
    train, dev, pairs = demo_world.rag_chats(w, n_people=6, n_dev=2)
    assert train and dev
    # DPO's grounded pairs: every answerable train chat, its reply chosen over "I don't know.", no dev prompt
    answerable = [c["messages"] for c in train if c["messages"][-1]["content"] not in demo_world.DONT_KNOW]
    assert [(p["prompt"], p["chosen"]) for p in pairs] == [(m[0]["content"], m[1]["content"]) for m in answerable]
    assert all(p["rejected"] == demo_world.DONT_KNOW[not p["chosen"].isascii()] for p in pairs)
    answered = 0
    for chat in train + dev:
        user, reply = (m["content"] for m in chat["messages"][-2:])
        if reply in demo_world.DONT_KNOW:
            continue
        n = rag.cited(reply)
        source = next(line for line in user.split("\n") if line.startswith(f"[{n[0]}] "))
        assert len(n) == 1 and reply in source, (reply, source)
        answered += 1
    assert answered > 0.8 * len(train + dev)
