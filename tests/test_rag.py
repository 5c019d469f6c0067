"""rag.py: chunks cover documents with the stated overlap and never cut a UTF-8 character, Chinese and
English sentence splitting, top-k equals brute-force sorting, the index round-trips, bad documents
get a clear message, grounded prompts, and the index/query/ask/eval commands on a tiny model."""
import json
import math
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
from common import load_model, save_checkpoint, write_json
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


def test_lm_embedder_index_round_trips(tok, tmp_path):
    run = make_chat_run(tmp_path / "run", tok)
    write_docs(tmp_path / "docs")
    docs = rag.read_docs(str(tmp_path / "docs"))[0]
    emb = rag.LMEmbedder(str(run))
    s = rag.build_index(docs, str(tmp_path / "index"), emb, emb.tok, 24, 6)
    assert s["embedder"] == "lm" and s["dim"] == 32
    r = rag.Retriever(str(tmp_path / "index"), device="cpu")
    chunks = r.chunks(range(len(r)))
    np.testing.assert_allclose(r.embed([c["text"] for c in chunks]), np.asarray(r.vectors), atol=1e-5)
    # mean pooling ignores padding: a chunk embedded alone or in a batch padded to a longer one is the same
    ids = sorted((emb.tok.encode(c["text"]) for c in chunks), key=len)
    assert len(ids[0]) < len(ids[-1])
    np.testing.assert_allclose(emb([ids[0]])[0], emb([ids[0], ids[-1]])[0], atol=1e-5)


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
                                 "as [n].\n[1] Kami lives in Lotavi. Kami is 34.\n[2] Bodo is a baker.\n"
                                 "Question: How old is Kami?")
    zh = rag.ground_messages([{"role": "user", "content": "卡米今年多大？"}], hits[2:])[0]["content"]
    assert zh == "请只根据下面的资料回答问题，并用[n]注明所用的资料。\n[1] 卡米今年34岁。\n问题：卡米今年多大？"
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

    # ask: the printed answer is what the model generates greedily for the grounded prompt, with the
    # sources' kNN vote (default) or without it (--knn=0)
    hits = rag.Retriever(str(index)).search(["How old is Bodo?"], 2)[0]
    model, mtok, _ = load_model(str(run))
    ids, used = rag.grounded_prompt(mtok, [{"role": "user", "content": "How old is Bodo?"}], hits, 256 - 8)
    vote = rag.SourceKNN(model, mtok, [[h["text"] for h in used]])
    answers = set()
    for flag, hook in (("--knn=10000", vote), ("--knn=0", None)):
        code, out, err = cli("ask", f"--index={index}", f"--model={run}", "--query=How old is Bodo?", "--k=2",
                             "--max_new_tokens=8", flag)
        assert code == 0, err
        want = [int(t) for t, a in model.generate([ids], 8, temperature=0, hook=hook) if a and int(t) not in mtok.stop_ids]
        lines = out.splitlines()
        assert lines[:3] == ["question: How old is Bodo?", "answer: " + mtok.decode(want).strip(), "sources:"]
        assert lines[3].lstrip(" *").startswith(f"[1] {hits[0]['id']} chars ") and len(lines) == 5
        answers.add(lines[1])
    assert len(answers) == 2  # the vote changed this random model's answer

    # eval: recall@k from the chunks; accuracy with a stand-in model that repeats its prompt, so a
    # question counts as answered exactly when the answer is in the prompt it was given
    qa = [{"question": "How old is Bodo?", "answer": "51", "doc": "docs/sub/bodo.txt"},
          {"question": "卡米今年多大？", "answer": "34", "doc": "docs/kami.md"},
          {"question": "What is Kami's cat called?", "answer": "Zizo", "doc": "kami.md"},
          {"question": "Where does Bodo live?", "answer": "Lotavi", "doc": "docs/sub/bodo.txt"}]  # not in that doc
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in qa))
    calls = []  # (chats, the hook's knn or None) of each call

    def echo(model, tok, chats, *a, hook=None, **kw):
        calls.append(([c[-1]["content"] for c in chats], hook and (hook.knn, hook.temperature, hook.sentinel)))
        return [c[-1]["content"] for c in chats]
    monkeypatch.setattr(rag, "generate_replies", echo)
    code, out, err = cli("eval", f"--index={index}", f"--model={run}", f"--qa={tmp_path / 'qa.jsonl'}", "--k=2",
                         f"--results={tmp_path / 'eval.json'}", "--knn=77", "--knn_temperature=0.3", "--knn_sentinel=2")
    assert code == 0, err
    res = json.loads((tmp_path / "eval.json").read_text())
    results = rag.Retriever(str(index)).search([x["question"] for x in qa], 5)
    first = [next((h["rank"] for h in hits if h["source"] in x["doc"] and x["answer"] in h["text"]), 9)
             for x, hits in zip(qa, results)]
    assert first[3] == 9 and res["recall@5"] == sum(r <= 5 for r in first) / 4 >= 0.5
    assert res["recall@1"] == sum(r == 1 for r in first) / 4
    in_prompt = [any(x["answer"] in h["text"] for h in hits[:2]) for x, hits in zip(qa, results)]
    assert res["accuracy_without_retrieval"] == 0 and res["accuracy_with_retrieval"] == sum(in_prompt) / 4 > 0
    assert res["accuracy_sources_in_prompt_only"] == res["accuracy_with_retrieval"]  # the echo ignores the vote
    # without retrieval: the bare questions, no vote; then the grounded prompts without and with the vote
    assert calls[0] == ([x["question"] for x in qa], None)
    assert calls[1][0] == calls[2][0] != calls[0][0] and calls[1][1] is None and calls[2][1] == (77, 0.3, 2)
    assert res["knn"] == 77 and res["knn_sentinel"] == 2
    assert f"recall@5 {res['recall@5']:.3f}" in out and "accuracy without retrieval 0.000" in out
    assert f"reading check: the model predicts {res['copy_probe']:.0%}" in out   # the untrained model: ~0%

    code, out, err = cli("ask", "--index=/nonexistent", "--query=x")
    assert code == 1 and "not a rag index" in err
    for bad in ("--knn_temperature=0", "--knn=inf", "--knn_sentinel=-1"):
        code, out, err = cli("ask", f"--index={index}", f"--model={run}", "--query=x", bad)
        assert code == 1 and "--knn_temperature finite and > 0" in err and len(err.strip().splitlines()) == 1


def test_source_knn_vote_equals_its_formula(tok, tmp_path):
    """SourceKNN against a direct computation: every source run through the model alone (no padding),
    p_kNN(w) = sum over the keys whose next token is w of exp(-d_j / T) / (sum_j exp(-d_j / T) +
    exp(-sentinel / T)), d_j = ||h - k_j||^2 / dim, and the answer's log-probabilities
    log p_LM + log(1 + knn p_kNN). A row without sources is left as the model has it."""
    model, mtok, _ = load_model(str(make_chat_run(tmp_path / "m", tok)))
    sources = [["Kami lives in Lotavi. Kami is 34 years old.", "卡米住在洛塔维。"], [], ["Bodo is   a baker.\n\nBodo!"]]
    vote = rag.SourceKNN(model, mtok, sources, knn=50.0, temperature=0.3, sentinel=0.8, batch_size=2)  # padding
    g = torch.Generator().manual_seed(0)
    h, logits = torch.randn(3, model.cfg.dim, generator=g), torch.randn(3, model.cfg.vocab_size, generator=g)
    out = vote(logits, h)
    for r, texts in enumerate(sources):
        p = torch.zeros(model.cfg.vocab_size)
        if texts:
            keys, values = [], []
            for t in texts:
                ids = [mtok.bos_id] + mtok.encode(" ".join(t.split()))
                keys.append(model.hidden_states(torch.tensor([ids]))[0, :-1])
                values += ids[1:]
            d = ((torch.cat(keys) - h[r]) ** 2).sum(-1) / model.cfg.dim
            e = torch.exp(-d.double() / 0.3)
            w = e / (e.sum() + math.exp(-0.8 / 0.3))
            for wj, v in zip(w, values):
                p[v] += wj
            assert 0.01 < p.sum().item() < 0.99   # the sentinel holds a share of a random h's vote
        want = logits[r].log_softmax(-1) + torch.log1p(50.0 * p)
        torch.testing.assert_close(out[r], want, atol=1e-4, rtol=1e-4)
    assert torch.equal(out[1], logits[1].log_softmax(-1))
    # at a key itself, with a sharp softmax and a strong vote, the next token is that key's value; far
    # from every key (past the sentinel) the vote fades to nothing
    sharp = rag.SourceKNN(model, mtok, sources[:1], knn=1e6, temperature=1e-4)
    for j in (0, 5, 11):
        assert int(sharp(logits[:1], sharp.keys[0, j][None]).argmax()) == int(sharp.values[0, j])
    far = sharp.keys[0, 0][None] + 1e3
    torch.testing.assert_close(sharp(logits[:1], far), logits[:1].log_softmax(-1))
    assert torch.equal(rag.SourceKNN(model, mtok, sources, knn=0.0)(logits, h), logits.log_softmax(-1))
    for bad in (dict(knn=math.inf), dict(knn=-1.0), dict(temperature=0.0), dict(sentinel=math.nan)):
        with pytest.raises(ValueError, match="sources' vote needs"):
            rag.SourceKNN(model, mtok, sources, **bad)


def test_stacked_votes_equal_each_alone(tok, tmp_path):
    """SourceKNN.stack (serve.py's batch): rows of votes with different numbers of keys, stacked, score
    each row as its own vote does; votes with other settings are refused."""
    model, mtok, _ = load_model(str(make_chat_run(tmp_path / "m", tok)))
    votes = [rag.SourceKNN(model, mtok, [ts]) for ts in (["Kami lives in Lotavi."], [], EN[:3], ZH[:1])]
    g = torch.Generator().manual_seed(1)
    h, logits = torch.randn(4, model.cfg.dim, generator=g), torch.randn(4, model.cfg.vocab_size, generator=g)
    stacked = rag.SourceKNN.stack(votes)(logits, h)
    for i, v in enumerate(votes):
        torch.testing.assert_close(stacked[i:i + 1], v(logits[i:i + 1], h[i:i + 1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="different settings"):
        rag.SourceKNN.stack([votes[0], rag.SourceKNN(model, mtok, [EN[:1]], knn=5.0)])


def test_answer_grounded_gives_each_chat_its_own_sources(tok, tmp_path):
    """Batched answers (3 chats in one batch, then a batch of 1) equal each chat answered alone with a
    vote over its own sources only."""
    model, mtok, _ = load_model(str(make_chat_run(tmp_path / "m", tok)))
    texts = [["Kami lives in Lotavi. Kami is 34 years old."], ["卡米住在洛塔维。卡米今年34岁。"], [],
             ["The quick brown fox jumps over the lazy dog!", "Pi is about 3.14, and e is about 2.72."]]
    chats = [[{"role": "user", "content": q}] for q in ("How old is Kami?", "卡米今年多大？", "Hi", "What is pi?")]
    used = [[{"text": t} for t in ts] for ts in texts]
    got = rag.answer_grounded(model, mtok, chats, used, 10, knn=1e4, batch_size=3)
    for chat, ts, answer in zip(chats, texts, got):
        ids = mtok.render_chat(chat, add_generation_prompt=True)[0]
        hook = rag.SourceKNN(model, mtok, [ts], knn=1e4)
        want = [int(t) for t, a in model.generate([ids], 10, temperature=0, stop_ids=mtok.stop_ids, hook=hook)
                if a and int(t) not in mtok.stop_ids]
        assert answer == mtok.decode(want)
    assert len(set(got)) > 2


def test_demo_world_retrieval_chats_use_the_rag_prompt():
    """SFT retrieval chats (demo_world.py) must be written exactly as ground_messages writes prompts."""
    if not hasattr(demo_world, "rag_chats"):
        pytest.skip("demo_world.py has no retrieval chats yet (see README: RAG)")
    w = demo_world.World(seed=1, n_people=20, n_towns=4, n_rag=3)
    train, dev = demo_world.rag_chats(w, n_people=6)
    assert train and dev
    for chat in train + dev:
        user, reply = chat["messages"][-2:]
        lang = "zh" if rag.CJK.search(user["content"].rsplit("\n", 1)[-1]) else "en"
        head, _, rest = user["content"].partition("\n")
        sources, question = rest.rsplit("\n", 1)
        question = question.split("：", 1)[1] if lang == "zh" else question.split(": ", 1)[1]
        hits = [{"text": s.split("] ", 1)[1]} for s in sources.split("\n")]
        assert rag.ground_messages([{"role": "user", "content": question}], hits)[0]["content"] == user["content"]
        assert rag.cited(reply["content"]) or reply["content"] in demo_world.DONT_KNOW


class FakeLM(torch.nn.Module):
    """Stands in for a Transformer in copy_probe: with induction=True its logits at each position point at
    the token that followed the latest earlier occurrence of the current token (an ideal induction head),
    else always at one token (a model blind to its context)."""

    def __init__(self, vocab, induction):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=vocab, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, max_seq_len=64)
        self.tok_embeddings = torch.nn.Embedding(vocab, 8)
        self.induction = induction

    def forward(self, x):
        assert x.shape[1] <= self.cfg.max_seq_len
        logits = torch.zeros(*x.shape, self.cfg.vocab_size)
        logits[..., 5] = 1.0
        if self.induction:
            for b, row in enumerate(x.tolist()):
                for p, t in enumerate(row):
                    q = next((q for q in range(p - 1, -1, -1) if row[q] == t), None)
                    if q is not None:
                        logits[b, p, row[q + 1]] = 2.0
        return logits, None


def test_copy_probe_tells_a_copying_model_from_a_blind_one(tok):
    """copy_probe scores an ideal induction head 1 (every token of the second copy after its first, with the
    length capped by max_seq_len 64) and a context-blind model ~0; an off-by-one in the positions would
    score the copier ~0 too. Random tokens can repeat within a sequence, so the copier is not exact there
    - the probe scores 16 x 30 tokens drawn from the ordinary ids of a 400-token vocabulary."""
    copier, blind = FakeLM(tok.vocab_size, True), FakeLM(tok.vocab_size, False)
    assert rag.copy_probe(copier, tok) > 0.9
    assert rag.copy_probe(blind, tok) < 0.05
