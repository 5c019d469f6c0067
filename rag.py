"""Retrieval-augmented answers, the plain method: chunk documents, embed the chunks as unit vectors, find the
nearest ones to a question with one numpy matrix product, and answer from them as numbered sources.

    python rag.py index --docs=data/demo/rag/docs --out_dir=out/rag          # chunk + embed (TF-IDF)
    python rag.py query --index=out/rag --query="How old is Dava?" --k=5     # top-k chunks, with scores
    python rag.py ask   --index=out/rag --model=out/sft --query="达瓦今年多大？"  # grounded answer + sources
    python rag.py eval  --index=out/rag --model=out/sft --qa=data/demo/rag/qa.jsonl

Index files: docs/data.md. serve.py --rag_index grounds chat answers in an index; `bench.py rag` times top_k at 1M.
"""
import argparse
import json
import os
import re
import shutil
import sys
import time
from itertools import accumulate

import numpy as np
import torch

from checkpoint import generate_replies, load_model, write_json
from data_formats import DataError, rag_prompt, read_jsonl, read_rag_docs
from tokenizer import Tokenizer


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# -- documents and chunks -----------------------------------------------------------------------------------
def read_docs(path, max_doc_mb=64.0):
    """([(id, text)], number skipped): data_formats.read_rag_docs, which logs each skipped document and why."""
    stats = {}
    docs = read_rag_docs(path, log, max_doc_mb, stats)
    return [(d["id"], d["text"]) for d in docs], stats["skipped"]


# How good a place for a cut: 3 a paragraph break, 2 a sentence end (Chinese 。！？… need no space after them; English
# . ! ? do: 3.14 is not cut) or line end, 1 a space or Chinese comma, 0 else. Group 1 stays before the cut, which may
# fall anywhere in the whitespace after it (tokenizers glue a space to the next word, a newline to the full stop).
BREAKS = [
    (3, re.compile(r"()\n[^\S\n]*\n\s*")),
    (2, re.compile(r"([。！？…]+[”’」』）)\]\"']*)\s*")),
    (2, re.compile(r"([.!?]+[”’)\]\"']*)(?=\s|$)\s*")),
    (2, re.compile(r"()\n\s*")),
    (1, re.compile(r"()\s+")),
    (1, re.compile(r"([，、：；])\s*")),
]


def break_kinds(text):
    """kind[p] for every character position p in 0..len(text) (see BREAKS)."""
    kind = np.zeros(len(text) + 1, np.int8)
    for k, pattern in BREAKS:
        for m in pattern.finditer(text):
            np.maximum(kind[m.end(1):m.end() + 1], k, out=kind[m.end(1):m.end() + 1])
    return kind


def chunk_document(text, tok, chunk_tokens=64, overlap=16):
    """Chunks [{"start", "end", "span", "ids", "cut"}] (text[start:end] == tok.decode(ids), span: token range, cut: its
    BREAKS kind) ending at the best break in the second half of chunk_tokens, the next up to `overlap` tokens earlier
    at a sentence (else word) start. Cuts fall between UTF-8 characters; whitespace-only chunks are dropped."""
    if chunk_tokens < 8 or not 0 <= overlap <= chunk_tokens // 2:
        raise ValueError(f"need chunk_tokens >= 8 and 0 <= overlap <= chunk_tokens / 2, not {chunk_tokens}, {overlap}")
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    n = len(ids)
    if n == 0:
        return []
    raw = np.frombuffer(text.encode("utf-8"), np.uint8)
    at = np.cumsum([0] + [len(tok.token_bytes(int(i))) for i in ids])   # byte offset of token boundary j
    if at[-1] != len(raw):
        raise ValueError(f"the tokenizer does not reproduce this text ({at[-1]} bytes from {len(raw)})")
    lead = np.append((raw & 0xC0) != 0x80, True)          # byte b starts a character (or is the end)
    pos = np.concatenate([[0], np.cumsum(lead[:-1])])[at]  # character offset of token boundary j
    kind = np.where(lead[at], break_kinds(text)[pos], -1)  # -1: inside a character, never cut there

    def last_best(lo, hi):  # the latest token boundary of the best kind in [lo, hi], or None
        w = kind[lo:hi + 1]
        return lo + len(w) - 1 - int(np.argmax(w[::-1] == w.max())) if len(w) and w.max() >= 0 else None

    chunks, s, e = [], 0, 0
    while True:
        if s + chunk_tokens >= n:
            e = n
        else:  # end after the previous chunk's end, in the second half of the budget if possible
            e_min = e + 1
            e = last_best(max(s + chunk_tokens // 2, e_min), s + chunk_tokens)
            if e is None:  # a character is at most 4 tokens, so this window always has a boundary
                e = last_best(e_min, s + chunk_tokens)
        a, b = int(pos[s]), int(pos[e])
        if text[a:b].strip():
            chunks.append({"start": a, "end": b, "span": (s, e), "ids": ids[s:e], "cut": int(kind[e]) if e < n else 3})
        if e == n:
            return chunks
        lo = max(s + 1, e - overlap)                         # the next chunk starts in [lo, e]
        w = np.minimum(kind[lo:e], 2)                        # a paragraph start is as good as a sentence start
        s = lo + int(np.argmax(w == w.max())) if len(w) and w.max() >= 0 else e  # earliest: the most overlap


# -- embedders --------------------------------------------------------------------------------------------------
# An embedder, as build_index and Retriever use it: `name`, `settings` (index.json keeps both, to rebuild it), `dim`,
# `fit(chunk_ids, index_dir)` (learn from the chunks' token ids, save there) and `__call__(batch_ids)` -> unit rows.
class TfidfEmbedder:
    """Sublinear TF-IDF, w(t, c) = (1 + ln tf(t, c)) * idf(t), over token ids: a dimension per vocabulary id
    (dim=0), or unigrams and, with ngrams=2, bigrams ("Diti" vs "Tidi") hashed into dim dimensions."""
    name = "tfidf"

    def __init__(self, vocab_size, dim=0, ngrams=1, idf=None):
        if ngrams not in (1, 2) or (ngrams == 2 and not dim):
            raise ValueError("ngrams must be 1, or 2 with a hashed --tfidf_dim > 0")
        self.vocab_size, self.hashed, self.ngrams, self.idf = vocab_size, dim > 0, ngrams, idf
        self.dim = dim or vocab_size
        self.settings = {"vocab_size": vocab_size, "dim": dim, "ngrams": ngrams}  # kept in index.json

    def terms(self, ids):
        """The feature index of every unigram (and bigram) of ids, repeats kept."""
        ids = np.asarray(ids, dtype=np.int64)
        if not self.hashed:
            return ids
        keys = [ids] if self.ngrams == 1 else [ids, self.vocab_size * (1 + ids[:-1]) + ids[1:]]
        # Fibonacci hashing: multiply by 2^64 / golden ratio (wrapping), keep high bits, fold into dim
        k = np.concatenate(keys).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return (k >> np.uint64(29)).astype(np.int64) % self.dim

    def fit(self, chunk_ids, index_dir):
        """idf(t) = ln((1 + N) / (1 + df(t))) + 1 over the N chunks (smoothed, as scikit-learn does)."""
        df = np.zeros(self.dim, np.int64)
        for ids in chunk_ids:
            df[np.unique(self.terms(ids))] += 1
        self.idf = (np.log((1 + len(chunk_ids)) / (1 + df)) + 1).astype(np.float32)
        np.save(os.path.join(index_dir, "idf.npy"), self.idf)

    def __call__(self, batch_ids):
        out = np.zeros((len(batch_ids), self.dim), np.float32)
        for r, ids in enumerate(batch_ids):
            t, tf = np.unique(self.terms(ids), return_counts=True)
            out[r, t] = (1 + np.log(tf)) * self.idf[t]      # sublinear tf: the 10th "the" adds little
        return normalize(out)


def normalize(v):
    """Rows scaled to unit length (all-zero rows stay zero), float32."""
    v = np.asarray(v, np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


# -- the index: build, open, search ---------------------------------------------------------------------------
def build_index(docs, out_dir, embedder, tok, chunk_tokens, overlap, dtype="float32", batch_size=256, meta=None):
    """Chunk docs [(id, text)], embed the chunks (embedder "tfidf": TfidfEmbedder(tok.vocab_size)) and write the
    index to out_dir via out_dir.tmp, so a failed build leaves the old index whole; returns index.json's dict."""
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "index.json")):
        raise DataError(f"{out_dir} exists and is not a rag index; choose another --out_dir")
    records, chunk_ids = [], []
    for doc_id, text in docs:
        chunks = chunk_document(text, tok, chunk_tokens, overlap)
        mid = sum(c["cut"] < 2 for c in chunks[:-1])
        if mid:
            log(f"{doc_id}: {mid} of {len(chunks)} chunks cut mid-sentence (no sentence end within {chunk_tokens} "
                f"tokens)" + (f"; it is one line of {len(text):,} characters" if "\n" not in text.strip() else ""))
        records += [{"id": f"{doc_id}#{n}", "source": doc_id, "offsets": [c["start"], c["end"]],
                     "tokens": len(c["ids"]), "text": text[c["start"]:c["end"]]} for n, c in enumerate(chunks)]
        chunk_ids += [c["ids"] for c in chunks]
    if not records:
        raise DataError("the documents hold no text to index")
    embedder = TfidfEmbedder(tok.vocab_size) if embedder == "tfidf" else embedder
    tmp, old = out_dir.rstrip("/\\") + ".tmp", out_dir.rstrip("/\\") + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    embedder.fit(chunk_ids, tmp)
    vectors = np.lib.format.open_memmap(os.path.join(tmp, "vectors.npy"), "w+", dtype, (len(records), embedder.dim))
    for b in range(0, len(records), batch_size):  # batch by batch: the vectors need not fit in memory
        vectors[b:b + batch_size] = embedder(chunk_ids[b:b + batch_size])
    vectors.flush()
    del vectors
    with open(os.path.join(tmp, "chunks.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    tok.save(tmp)
    settings = {"embedder": embedder.name, embedder.name: embedder.settings, "dim": embedder.dim, "dtype": dtype,
                "chunks": len(records), "documents": len(docs), "chunk_tokens": chunk_tokens, "overlap": overlap,
                "tokenizer": tok.name, "tokenizer_sha256": tok.fingerprint, **(meta or {})}
    write_json(os.path.join(tmp, "index.json"), settings)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return settings


def top_k(vectors, queries, k, block_bytes=32 << 20):
    """(scores, rows), each (B, k): the k rows of vectors (N, D) nearest each query (B, D) by cosine, best first. A
    matmul per block of rows keeps memory flat (float16 scored in float32); argpartition keeps k without sorting."""
    k = min(k, len(vectors))
    q = np.ascontiguousarray(np.asarray(queries, np.float32).T)        # (D, B)
    rows = max(1024, block_bytes // (4 * vectors.shape[1]))
    cand_s, cand_i = [], []
    for lo in range(0, len(vectors), rows):
        s = np.asarray(vectors[lo:lo + rows], dtype=np.float32) @ q    # (rows, B): cosine of every pair
        best = np.argpartition(-s, min(k, len(s)) - 1, axis=0)[:k]     # (k, B), unordered
        cand_s.append(np.take_along_axis(s, best, axis=0))
        cand_i.append(best + lo)
    s, i = np.concatenate(cand_s), np.concatenate(cand_i)
    order = np.lexsort((i, -s), axis=0)[:k]                           # by score, then by row
    return np.take_along_axis(s, order, 0).T.copy(), np.take_along_axis(i, order, 0).T.copy()


class Retriever:
    """Retriever("out/rag").search(["How old is Dava?"], k=5) -> per query, best first, [{"rank", "score", "id",
    "source", "offsets", "text"}]. Vectors are memory-mapped, texts stay on disk (device: for a model embedder)."""

    def __init__(self, index_dir, device="auto"):
        if not os.path.isfile(os.path.join(index_dir, "index.json")):
            raise DataError(f"{index_dir}: not a rag index (no index.json); build one with "
                            f"`python rag.py index --docs=... --out_dir={index_dir}`")
        with open(os.path.join(index_dir, "index.json")) as f:
            self.settings = s = json.load(f)
        self.path = os.path.join(index_dir, "chunks.jsonl")
        self.vectors = np.load(os.path.join(index_dir, "vectors.npy"), mmap_mode="r")
        self.tok = Tokenizer.load(index_dir)
        if s["embedder"] != "tfidf":  # an embedder of your own opens here (docs/exercises.md, exercise 10)
            raise DataError(f"{index_dir}: rag.py has no {s['embedder']!r} embedder; rebuild it with `rag.py index`")
        self.embedder = TfidfEmbedder(**s["tfidf"], idf=np.load(os.path.join(index_dir, "idf.npy")))
        with open(self.path, "rb") as f:
            self.line_at = [0, *accumulate(len(line) for line in f)]      # byte offset of each chunk's line
        if not (len(self.line_at) - 1 == len(self.vectors) == s["chunks"]) or self.vectors.shape[1] != s["dim"]:
            raise DataError(f"{index_dir}: vectors.npy {self.vectors.shape}, chunks.jsonl {len(self.line_at) - 1} "
                            f"lines and index.json ({s['chunks']} chunks of {s['dim']}) disagree; rebuild it")

    def __len__(self):
        return len(self.vectors)

    def embed(self, queries):
        return self.embedder([self.tok.encode(q) for q in queries])

    def chunks(self, rows):
        out = []
        with open(self.path, "rb") as f:
            for r in rows:
                f.seek(self.line_at[r])
                out.append(json.loads(f.readline()))
        return out

    def search(self, queries, k=5):
        scores, rows = top_k(self.vectors, self.embed(queries), k)
        return [[{"rank": n + 1, "score": float(s), **c} for n, (s, c) in enumerate(zip(sc, self.chunks(rw)))]
                for sc, rw in zip(scores, rows)]


# -- grounded answers -----------------------------------------------------------------------------------------
def ground_messages(messages, hits):
    """A copy of messages whose last (user) message holds the hits as numbered sources (data_formats.rag_prompt)."""
    messages = [dict(m) for m in messages]
    if hits and messages and messages[-1]["role"] == "user":
        messages[-1]["content"] = rag_prompt(messages[-1]["content"], [h["text"] for h in hits])
    return messages


def grounded_prompt(tok, messages, hits, max_tokens):
    """(prompt ids, hits used): the best hits that fit in max_tokens (none if the messages alone do not fit)."""
    hits = list(hits) if messages and messages[-1]["role"] == "user" else []
    while True:
        ids = tok.render_chat(ground_messages(messages, hits), add_generation_prompt=True)[0]
        if len(ids) <= max_tokens or not hits:
            return ids, hits
        hits.pop()


def source_list(hits):
    """Hits as the API returns them, numbered as the prompt cites them."""
    return [{"n": n, "id": h["id"], "source": h["source"], "offsets": h["offsets"], "score": round(h["score"], 4),
             "text": h["text"]} for n, h in enumerate(hits, 1)]


def cited(answer):
    """The source numbers an answer cites as [n]."""
    return sorted({int(n) for n in re.findall(r"\[(\d+)\]", answer)})


def holds_answer(chunk, qa):
    """The chunk has the answer (case-folded) and is from qa's "doc" if given (either id may end the other's path)."""
    a, b = chunk["source"].replace("\\", "/"), qa.get("doc", "").replace("\\", "/")
    in_doc = "doc" not in qa or a == b or a.endswith("/" + b) or b.endswith("/" + a)
    return in_doc and qa["answer"].casefold() in chunk["text"].casefold()


# -- commands -------------------------------------------------------------------------------------------------
def cmd_index(a):
    """Chunk and embed documents into an index dir."""
    t0 = time.time()
    docs, skipped = read_docs(a.docs, a.max_doc_mb)
    tok = Tokenizer.load(a.tokenizer)
    embedder = TfidfEmbedder(tok.vocab_size, a.tfidf_dim, a.ngrams)
    s = build_index(docs, a.out_dir, embedder, tok, a.chunk_tokens, a.overlap, a.dtype,
                    meta={"docs": a.docs, "skipped_documents": skipped})
    size = os.path.getsize(os.path.join(a.out_dir, "vectors.npy"))
    log(f"{a.out_dir}: {s['chunks']} chunks from {s['documents']} documents ({skipped} skipped), "
        f"{s['embedder']} vectors of {s['dim']} dims ({a.dtype}, {size / 2**20:.1f} MB) in {time.time() - t0:.1f}s")


def search(a, questions, k):
    """(the retriever of --index, each question's k best hits, milliseconds the search took)."""
    r = Retriever(a.index, a.device)
    t0 = time.perf_counter()
    results = r.search(questions, k)
    return r, results, 1000 * (time.perf_counter() - t0)


def grounded_chats(a, questions, results):
    """(--model, its tokenizer, per question: (the chat with its top --k hits as sources, the hits that fit))."""
    device = a.device if a.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, _ = load_model(a.model, device)
    room, chats = model.cfg.max_seq_len - a.max_new_tokens, []
    for q, hits in zip(questions, results):
        used = grounded_prompt(tok, [{"role": "user", "content": q}], hits[:a.k], room)[1]
        chats.append((ground_messages([{"role": "user", "content": q}], used), used))
    return model, tok, chats


def cmd_query(a):
    """Print the top-k chunks for questions."""
    r, results, ms = search(a, a.query, a.k)
    log(f"{len(a.query)} queries against {len(r)} chunks in {ms:.1f} ms")
    for q, hits in zip(a.query, results):
        print(f"query: {q}")
        for h in hits:
            print(f"  {h['rank']}. {h['score']:.3f}  {h['id']} [{h['offsets'][0]}:{h['offsets'][1]}]  "
                  f"{' '.join(h['text'].split())[:120]}")


def cmd_ask(a):
    """Answer questions from the retrieved chunks, citing them."""
    results = search(a, a.query, a.k)[1]
    model, tok, chats = grounded_chats(a, a.query, results)
    answers = generate_replies(model, tok, [m for m, _ in chats], a.max_new_tokens)  # greedy
    for q, hits, (_, used), answer in zip(a.query, results, chats, answers):
        print(f"question: {q}\nanswer: {answer.strip()}\nsources:" + ("" if len(used) == len(hits) else
              f" ({len(hits) - len(used)} more retrieved, left out to fit the context)"))
        for n, h in enumerate(used, 1):
            print(f"  {'*' if n in cited(answer) else ' '}[{n}] {h['id']} chars {h['offsets'][0]}-{h['offsets'][1]}"
                  f" (score {h['score']:.3f}): {' '.join(h['text'].split())[:100]}")


def cmd_eval(a):
    """Recall@1/@5, and answer accuracy without and with the sources in the prompt."""
    qa = read_jsonl(a.qa, "qa", log=log)[:a.limit or None]
    questions = [x["question"] for x in qa]
    r, results, ms = search(a, questions, max(5, a.k))
    rank = [next((h["rank"] for h in hits if holds_answer(h, x)), np.inf) for x, hits in zip(qa, results)]
    report = {"qa": a.qa, "questions": len(qa), "index": a.index, "chunks": len(r), "embedder": r.settings["embedder"],
              "recall@1": sum(n == 1 for n in rank) / len(qa), "recall@5": sum(n <= 5 for n in rank) / len(qa),
              "search_ms": ms}
    print(f"retrieval ({report['embedder']}, {len(r)} chunks, {len(qa)} questions): recall@1 {report['recall@1']:.3f}, "
          f"recall@5 {report['recall@5']:.3f} ({ms:.0f} ms for all questions)")
    if a.model:
        model, tok, grounded = grounded_chats(a, questions, results)
        report["sources_in_prompt"] = sum(len(used) for _, used in grounded) / len(qa)
        for key, chats in (("without retrieval", [[{"role": "user", "content": q}] for q in questions]),
                           ("with retrieval", [m for m, _ in grounded])):
            answers = generate_replies(model, tok, chats, a.max_new_tokens, a.batch_size)
            right = [x["answer"].casefold() in ans.casefold() for x, ans in zip(qa, answers)]
            report["accuracy_" + key.replace(" ", "_")] = sum(right) / len(qa)
            for x, ans in [(x, ans) for x, ans, ok in zip(qa, answers, right) if not ok][:a.show]:
                log(f"  wrong ({key}): {x['question']} -> {ans.strip()!r} (want {x['answer']!r})")
        # answers: the replies with retrieval, which may cite a source holding the answer and get the value wrong
        report["cites_right_source"] = sum(
            any(1 <= n <= len(used) and holds_answer(used[n - 1], x) for n in cited(ans))
            for x, ans, (_, used) in zip(qa, answers, grounded)) / len(qa)
        lo, hi = report["accuracy_without_retrieval"], report["accuracy_with_retrieval"]
        report.update(model=a.model, k=a.k, ratio=hi / lo if lo else None)
        print(f"answers ({a.model}, greedy, up to {a.k} chunks in the prompt, {report['sources_in_prompt']:.1f} on "
              f"average): accuracy without retrieval {lo:.3f}, with retrieval {hi:.3f} "
              f"({f'{hi / lo:.1f}x' if lo else 'none right without'}); "
              f"{report['cites_right_source']:.3f} cite a source holding the answer")
    if a.results:
        write_json(a.results, report)


COMMANDS = {"index": cmd_index, "query": cmd_query, "ask": cmd_ask, "eval": cmd_eval}
FLAGS = [  # (flag, the commands that take it, argparse keywords); query --k: see main
    ("--docs", "index", dict(default="data/demo/rag/docs", help="a folder of .txt/.md files or a jsonl of {id, text}")),
    ("--out_dir", "index", dict(default="out/rag")),
    ("--tokenizer", "index", dict(default="data/demo/tokenizer.model", help="whose token ids are the terms")),
    ("--tfidf_dim", "index", dict(type=int, default=0, help="0 = a dimension per vocabulary id; N = hashed")),
    ("--ngrams", "index", dict(type=int, choices=(1, 2), default=1, help="2 adds bigrams (needs --tfidf_dim)")),
    ("--chunk_tokens", "index", dict(type=int, default=64, help="most tokens in a chunk")),
    ("--overlap", "index", dict(type=int, default=16, help="most tokens a chunk repeats from the previous one")),
    ("--dtype", "index", dict(choices=("float32", "float16"), default="float32", help="of the stored vectors")),
    ("--max_doc_mb", "index", dict(type=float, default=64, help="larger documents are skipped")),
    ("--index", "query ask eval", dict(default="out/rag", help="the index dir written by `rag.py index`")),
    ("--device", "query ask eval", dict(default="auto", help="where models run: auto | cpu | cuda | cuda:N | mps")),
    ("--query", "query ask", dict(action="append", required=True, help="a question (repeat for several)")),
    ("--k", "query ask eval", dict(type=int, default=3, help="chunks retrieved (ask, eval: put in the prompt)")),
    ("--model", "ask eval", dict(default="out/sft", help="chat checkpoint that answers (eval --model=: none)")),
    ("--max_new_tokens", "ask eval", dict(type=int, default=32)),
    ("--qa", "eval", dict(default="data/demo/rag/qa.jsonl", help='jsonl of {"question", "answer", "doc"?}')),
    ("--limit", "eval", dict(type=int, default=0, help="first N questions only (0: all)")),
    ("--batch_size", "eval", dict(type=int, default=16, help="questions answered together")),
    ("--show", "eval", dict(type=int, default=3, help="wrong answers printed per setting")),
    ("--results", "eval", dict(default="", help="also write the numbers to this json file")),
]


def main(argv=None):
    if hasattr(sys.stdout, "reconfigure"):  # a query with lone surrogates prints, escaped (as in sample.py)
        sys.stdout.reconfigure(errors="backslashreplace")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    parsers = {name: sub.add_parser(name, help=fn.__doc__) for name, fn in COMMANDS.items()}
    for flag, names, kw in FLAGS:
        for name in names.split():
            parsers[name].add_argument(flag, **kw)
    parsers["query"].set_defaults(k=5)
    a = ap.parse_args(argv)
    try:
        with torch.inference_mode():
            COMMANDS[a.cmd](a)
    except (DataError, ValueError, OSError) as e:
        log(f"rag.py {a.cmd}: error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
