"""Retrieval-augmented answers, the plain method: chunk documents, embed the chunks as unit vectors, find the
nearest ones to a question with one numpy matrix product, and answer from them as numbered sources.

    python rag.py index --docs=data/demo/rag/docs --out_dir=out/rag          # chunk + embed (TF-IDF)
    python rag.py query --index=out/rag --query="How old is Diti?" --k=5     # top-k chunks, with scores
    python rag.py ask   --index=out/rag --model=out/sft --query="迪蒂今年多大？"  # grounded answer + sources
    python rag.py eval  --index=out/rag --model=out/sft --qa=data/demo/rag/qa.jsonl
    python rag.py index --embedder=lm --embed_model=out/pretrain --out_dir=out/rag_lm   # LM embeddings
    python rag.py bench --n=1000000 --dim=384                                # search speed and memory at scale

The index dir (docs/data.md) holds vectors.npy, chunks.jsonl, index.json, the tokenizer and, for TF-IDF,
idf.npy. serve.py --rag_index grounds chat answers through Retriever and grounded_prompt.
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

from common import generate_replies, load_model
from data_formats import DataError, read_jsonl, read_rag_docs
from tokenizer import Tokenizer


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# -- documents and chunks -----------------------------------------------------------------------------------
def read_docs(path, max_doc_mb=64.0):
    """([(id, text)], number skipped): data_formats.read_rag_docs, which logs each skipped document and why."""
    stats = {}
    docs = read_rag_docs(path, log, max_doc_mb, stats)
    return [(d["id"], d["text"]) for d in docs], stats["skipped"]


# How good a character position is for a cut: 3 a paragraph break, 2 a sentence end (Chinese 。！？… need no
# space after them; English . ! ? do, so 3.14 is not cut) or line end, 1 a space or Chinese comma, 0 any other.
# Group 1 stays before the cut; the cut may fall anywhere in the whitespace after it, because tokenizers glue
# a space to the next word (" Baga") or a newline to the full stop (".\n").
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
    """Chunks [{"start", "end", "span", "ids", "cut"}] covering text: text[start:end] == tok.decode(ids), span the
    token range, cut the BREAKS kind it ends at. A chunk ends at the best break in the second half of its
    chunk_tokens; the next starts up to `overlap` tokens earlier, at the earliest sentence (else word) start.
    Cuts fall only on UTF-8 character boundaries; whitespace-only chunks are dropped."""
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
        nxt = e
        if overlap:
            lo = max(s + 1, e - overlap)
            w = np.minimum(kind[lo:e], 2)                    # a paragraph start is as good as a sentence start
            if len(w) and w.max() >= 0:
                nxt = lo + int(np.argmax(w == w.max()))      # earliest: as much overlap as fits
        s = nxt


# -- embedders: lists of token ids -> unit vectors; fit() learns from the chunks and saves into the index dir --
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


class LMEmbedder:
    """Mean of a checkpoint's final hidden states over a text's tokens (BOS first, as in pretraining, but left
    out of the mean: its state is the same for every text)."""
    name = "lm"

    def __init__(self, run_dir, device="cpu", batch_size=32):
        self.model, self.tok, ckpt = load_model(run_dir, device)
        self.dim, self.device, self.batch_size = self.model.cfg.dim, device, batch_size
        self.settings = {"embed_model": os.path.abspath(run_dir), "step": ckpt.get("step")}

    def fit(self, chunk_ids, index_dir):
        pass  # the checkpoint is all it needs

    @torch.no_grad()
    def __call__(self, batch_ids):
        out, cap = [], self.model.cfg.max_seq_len - 1
        for b in range(0, len(batch_ids), self.batch_size):
            rows = [[self.tok.bos_id] + list(map(int, ids[:cap])) for ids in batch_ids[b:b + self.batch_size]]
            x = torch.full((len(rows), max(map(len, rows))), self.tok.pad_id, dtype=torch.long)
            mask = torch.zeros(x.shape)
            for r, row in enumerate(rows):
                x[r, :len(row)] = torch.tensor(row)
                mask[r, 1:len(row)] = 1                      # padding comes after: causal attention ignores it
            h = self.model.hidden_states(x.to(self.device)).float().cpu()
            out.append(((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)).numpy())
        return normalize(np.concatenate(out))


def normalize(v):
    """Rows scaled to unit length (all-zero rows stay zero), float32."""
    v = np.asarray(v, np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def pick_device(device):
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


# -- the index: build, open, search ---------------------------------------------------------------------------
def build_index(docs, out_dir, embedder, tok, chunk_tokens, overlap, dtype="float32", batch_size=256, meta=None):
    """Chunk docs [(id, text)], embed the chunks ("tfidf": a TfidfEmbedder of tok) and write the index to out_dir,
    by way of out_dir.tmp, so a failed build leaves the old index whole. Returns index.json's dict."""
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
    with open(os.path.join(tmp, "index.json"), "w") as f:
        json.dump(settings, f, indent=2, ensure_ascii=False)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return settings


def top_k(vectors, queries, k, block_bytes=32 << 20):
    """(scores, rows), each (B, k), of the k rows of vectors (N, D) with the largest dot product (the cosine:
    unit vectors) with each query (B, D), best first. One matrix product per block of rows keeps memory flat for
    a memory-mapped index and scores float16 in float32; np.argpartition keeps a block's k best without sorting."""
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
    """An index opened for search: Retriever("out/rag").search(["How old is Diti?"], k=5) -> per query, best
    first, [{"rank", "score", "id", "source", "offsets", "text"}]. The vectors are memory-mapped, and the chunk
    texts stay on disk: one byte offset per chunk is kept."""

    def __init__(self, index_dir, device="auto"):
        if not os.path.isfile(os.path.join(index_dir, "index.json")):
            raise DataError(f"{index_dir}: not a rag index (no index.json); build one with "
                            f"`python rag.py index --docs=... --out_dir={index_dir}`")
        with open(os.path.join(index_dir, "index.json")) as f:
            self.settings = s = json.load(f)
        self.path = os.path.join(index_dir, "chunks.jsonl")
        self.vectors = np.load(os.path.join(index_dir, "vectors.npy"), mmap_mode="r")
        self.tok = Tokenizer.load(index_dir)
        if s["embedder"] == "tfidf":
            self.embedder = TfidfEmbedder(**s["tfidf"], idf=np.load(os.path.join(index_dir, "idf.npy")))
        else:
            self.embedder = LMEmbedder(s["lm"]["embed_model"], pick_device(device))
            if self.embedder.tok.fingerprint != s["tokenizer_sha256"]:
                raise DataError(f"{s['lm']['embed_model']} has another tokenizer than when {index_dir} was built: "
                                "rebuild the index")
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
# demo_world.py writes its retrieval chats (SFT data) in exactly this form, so the model has learned to answer
# from such sources: change them together.
RAG_PROMPT = {
    "en": "Answer the question using only the sources below, and cite the source you used as [n].\n"
          "{sources}\nQuestion: {question}",
    "zh": "请只根据下面的资料回答问题，并用[n]注明所用的资料。\n{sources}\n问题：{question}",
}
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def ground_messages(messages, hits):
    """A copy of messages whose last (user) message carries the hits as numbered sources "[1] text" (a line
    each), the instruction (Chinese for a Chinese question) and the question. No hits: unchanged."""
    messages = [dict(m) for m in messages]
    if hits and messages and messages[-1]["role"] == "user":
        question = messages[-1]["content"]
        sources = "\n".join(f"[{n}] {' '.join(h['text'].split())}" for n, h in enumerate(hits, 1))
        prompt = RAG_PROMPT["zh" if CJK.search(question) else "en"]
        messages[-1]["content"] = prompt.format(sources=sources, question=question)
    return messages


def grounded_prompt(tok, messages, hits, max_tokens):
    """(prompt ids, hits used): the chat rendered with as many hits (best first) as fit in max_tokens, the
    lowest-ranked dropped first. The prompt may still be longer when the messages alone are."""
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
    """The chunk contains the answer (case-folded) and, when qa names a document, is from it: one id is the other
    or a path ending in it (qa.jsonl says "docs/diti.md", an index of the docs folder "diti.md")."""
    a, b = chunk["source"].replace("\\", "/"), qa.get("doc", "").replace("\\", "/")
    in_doc = "doc" not in qa or a == b or a.endswith("/" + b) or b.endswith("/" + a)
    return in_doc and qa["answer"].casefold() in chunk["text"].casefold()


# -- commands -------------------------------------------------------------------------------------------------
def cmd_index(a):
    """Chunk and embed documents into an index dir."""
    t0 = time.time()
    docs, skipped = read_docs(a.docs, a.max_doc_mb)
    if a.embedder == "lm":
        embedder = LMEmbedder(a.embed_model, pick_device(a.device), a.batch_size)
        tok, max_len = embedder.tok, embedder.model.cfg.max_seq_len
        if a.chunk_tokens >= max_len:
            raise DataError(f"--chunk_tokens={a.chunk_tokens} must be below the model's max_seq_len {max_len}")
    else:
        tok = Tokenizer.load(a.tokenizer)
        embedder = TfidfEmbedder(tok.vocab_size, a.tfidf_dim, a.ngrams)
    s = build_index(docs, a.out_dir, embedder, tok, a.chunk_tokens, a.overlap, a.dtype,
                    meta={"docs": a.docs, "skipped_documents": skipped})
    size = os.path.getsize(os.path.join(a.out_dir, "vectors.npy"))
    log(f"{a.out_dir}: {s['chunks']} chunks from {s['documents']} documents ({skipped} skipped), "
        f"{a.embedder} vectors of {s['dim']} dims ({a.dtype}, {size / 2**20:.1f} MB) in {time.time() - t0:.1f}s")


def search(a, questions, k):
    """(the retriever of --index, each question's k best hits, milliseconds the search took)."""
    r = Retriever(a.index, a.device)
    t0 = time.perf_counter()
    results = r.search(questions, k)
    return r, results, 1000 * (time.perf_counter() - t0)


def grounded_chats(tok, questions, results, k, max_prompt_tokens):
    """For each question: (messages with its top-k hits as sources, the hits used: as many as fit)."""
    out = []
    for q, hits in zip(questions, results):
        used = grounded_prompt(tok, [{"role": "user", "content": q}], hits[:k], max_prompt_tokens)[1]
        out.append((ground_messages([{"role": "user", "content": q}], used), used))
    return out


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
    model, tok, _ = load_model(a.model, pick_device(a.device))
    chats = grounded_chats(tok, a.query, results, a.k, model.cfg.max_seq_len - a.max_new_tokens)
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
        model, tok, _ = load_model(a.model, pick_device(a.device))
        grounded = grounded_chats(tok, questions, results, a.k, model.cfg.max_seq_len - a.max_new_tokens)
        report["sources_in_prompt"] = sum(len(used) for _, used in grounded) / len(qa)
        for key, chats in (("without retrieval", [[{"role": "user", "content": q}] for q in questions]),
                           ("with retrieval", [m for m, _ in grounded])):
            answers = generate_replies(model, tok, chats, a.max_new_tokens, a.batch_size)
            right = [x["answer"].casefold() in ans.casefold() for x, ans in zip(qa, answers)]
            report["accuracy_" + key.replace(" ", "_")] = sum(right) / len(qa)
            for x, ans in [(x, ans) for x, ans, ok in zip(qa, answers, right) if not ok][:a.show]:
                log(f"  wrong ({key}): {x['question']} -> {ans.strip()!r} (want {x['answer']!r})")
        # answers now holds the replies with retrieval. Their citation is scored apart from the value: a reply
        # can cite a source holding the answer and still get the value wrong.
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
        with open(a.results + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(a.results + ".tmp", a.results)


def memory_mb(reset_peak=False):
    """Resident MB from /proc (Linux): RssAnon (heap), RssFile (mapped index pages), VmHWM (the peak)."""
    try:
        if reset_peak:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                  # resets VmHWM (Linux >= 4.0)
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) / 1024 for k, _, v in (ln.partition(":") for ln in f)
                    if k in ("RssAnon", "RssFile", "VmHWM")}
    except OSError:
        return {}


def cmd_bench(a):
    """Query latency (k=5, batches of 1 and 64) and memory on an index of n random unit vectors."""
    rng = np.random.default_rng(0)
    os.makedirs(a.dir, exist_ok=True)
    try:
        for dtype in ("float32", "float16"):
            path = os.path.join(a.dir, f"vectors_{dtype}.npy")
            v = np.lib.format.open_memmap(path, "w+", dtype, (a.n, a.dim))
            for lo in range(0, a.n, 65536):
                v[lo:lo + 65536] = normalize(rng.standard_normal((min(65536, a.n - lo), a.dim), dtype=np.float32))
            v.flush()
            del v
            vectors = np.load(path, mmap_mode="r")
            before = memory_mb()
            top_k(vectors, normalize(rng.standard_normal((1, a.dim))), 5)     # first touch pages the file in
            memory_mb(reset_peak=True)
            line = [f"{dtype}: {os.path.getsize(path) / 2**30:.2f} GiB on disk"]
            for batch, reps in ((1, 10), (64, 3)):
                times = []  # (wall, CPU): on a shared machine the wall clock includes waiting
                for _ in range(reps):
                    q = normalize(rng.standard_normal((batch, a.dim)))
                    t0, c0 = time.perf_counter(), time.process_time()
                    top_k(vectors, q, 5)
                    times.append((time.perf_counter() - t0, time.process_time() - c0))
                wall, cpu = 1000 * np.median(times, axis=0)
                line.append(f"batch {batch}: {wall:.0f} ms ({cpu:.0f} ms CPU)")
            m = memory_mb()
            line.append(f"RSS peak {m.get('VmHWM', 0):.0f} MB = mapped index {m.get('RssFile', 0):.0f} MB "
                        f"+ heap {m.get('RssAnon', 0):.0f} MB (heap before search {before.get('RssAnon', 0):.0f} MB)")
            print(f"{a.n:,} x {a.dim}, " + ", ".join(line), flush=True)
            del vectors
            os.remove(path)
    finally:
        shutil.rmtree(a.dir, ignore_errors=True)


COMMANDS = {"index": cmd_index, "query": cmd_query, "ask": cmd_ask, "eval": cmd_eval, "bench": cmd_bench}
FLAGS = [  # (flag, the commands that take it, argparse keywords); query --k and eval --batch_size: see main
    ("--docs", "index", dict(default="data/demo/rag/docs", help="a folder of .txt/.md files or a jsonl of {id, text}")),
    ("--out_dir", "index", dict(default="out/rag")),
    ("--embedder", "index", dict(choices=("tfidf", "lm"), default="tfidf")),
    ("--tokenizer", "index", dict(default="data/demo/tokenizer.model", help="tfidf: whose token ids are the terms")),
    ("--tfidf_dim", "index", dict(type=int, default=0, help="tfidf: 0 = a dimension per vocabulary id; N = hashed")),
    ("--ngrams", "index", dict(type=int, choices=(1, 2), default=1, help="tfidf: 2 adds bigrams (needs --tfidf_dim)")),
    ("--embed_model", "index", dict(default="out/pretrain", help="lm: the checkpoint whose hidden states embed")),
    ("--chunk_tokens", "index", dict(type=int, default=64, help="most tokens in a chunk")),
    ("--overlap", "index", dict(type=int, default=16, help="most tokens a chunk repeats from the previous one")),
    ("--dtype", "index", dict(choices=("float32", "float16"), default="float32", help="of the stored vectors")),
    ("--max_doc_mb", "index", dict(type=float, default=64, help="larger documents are skipped")),
    ("--index", "query ask eval", dict(default="out/rag", help="the index dir written by `rag.py index`")),
    ("--device", "index query ask eval", dict(default="auto", help="auto | cpu | cuda | cuda:N | mps (lm, model)")),
    ("--query", "query ask", dict(action="append", required=True, help="a question (repeat for several)")),
    ("--k", "query ask eval", dict(type=int, default=3, help="chunks retrieved (ask, eval: put in the prompt)")),
    ("--model", "ask eval", dict(default="out/sft", help="chat checkpoint that answers (eval --model=: none)")),
    ("--max_new_tokens", "ask eval", dict(type=int, default=32)),
    ("--qa", "eval", dict(default="data/demo/rag/qa.jsonl", help='jsonl of {"question", "answer", "doc"?}')),
    ("--limit", "eval", dict(type=int, default=0, help="first N questions only (0: all)")),
    ("--batch_size", "index eval", dict(type=int, default=64, help="chunks embedded / questions answered together")),
    ("--show", "eval", dict(type=int, default=3, help="wrong answers printed per setting")),
    ("--results", "eval", dict(default="", help="also write the numbers to this json file")),
    ("--n", "bench", dict(type=int, default=1_000_000)),
    ("--dim", "bench", dict(type=int, default=384)),
    ("--dir", "bench", dict(default="/tmp/rag_bench", help="where the synthetic vectors go (deleted after)")),
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
    parsers["eval"].set_defaults(batch_size=16)
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
