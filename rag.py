"""Retrieval-augmented answers: chunk documents, embed the chunks, find the nearest ones with numpy,
and answer from them with numbered sources.

    python rag.py index --docs=data/demo/rag/docs --out_dir=out/rag          # chunk + embed (TF-IDF)
    python rag.py query --index=out/rag --query="How old is Diti?" --k=5     # top-k chunks, with scores
    python rag.py ask   --index=out/rag --model=out/sft --query="迪蒂今年多大？"  # grounded answer + sources
    python rag.py eval  --index=out/rag --model=out/sft --qa=data/demo/rag/qa.jsonl
    python rag.py index --embedder=lm --embed_model=out/pretrain --out_dir=out/rag_lm   # LM embeddings
    python rag.py bench --n=1000000 --dim=384                                # search speed and memory at scale

index: read a folder of .txt/.md files (recursively) or a jsonl of {"id", "text"}; cut each document
into chunks of at most --chunk_tokens tokens, ending at a paragraph or sentence break (Chinese 。！？
and English . ! ?) where one is in reach, each starting up to --overlap tokens before the previous one
ends; embed every chunk as a unit vector; write out_dir/vectors.npy (float32, or float16 with
--dtype=float16), chunks.jsonl ({"id", "source", "offsets": [start, end] character offsets into the
document, "tokens", "text"}), index.json (how it was built), the tokenizer and, for TF-IDF, idf.npy.
Empty, binary, non-UTF-8 and oversized files are skipped with a line saying why.

Two embedders. tfidf (the default; it retrieves better on the demo world, see README): a vector of
our tokenizer's ids weighted by sublinear term frequency and inverse document frequency,
    w(t, c) = (1 + ln tf(t, c)) * (ln((1 + N) / (1 + df(t))) + 1),    v(c) = w(., c) / ||w(., c)||
with one dimension per vocabulary id, or unigrams and bigrams hashed into --tfidf_dim dimensions.
lm: the mean of a checkpoint's final hidden states (model.hidden_states) over the chunk's tokens.

query: the index is opened with np.load(mmap_mode='r'), so a big index is paged in, not read whole.
All queries are scored by one matrix product per block of rows, scores = V @ Q^T (cosine, since
every vector has unit length), and np.argpartition takes the k best without sorting all N scores.

ask / eval: the k best chunks go into the user message as numbered sources with the instruction to
answer only from them and cite [n] (ground_messages), and a chat checkpoint answers: the plain method,
nothing but the prompt. eval reports recall@1/@5 of the chunk holding each answer, answer accuracy
without retrieval and with the sources in the prompt, and the share of answers that cite a source
holding the answer.

serve.py grounds its chat answers through Retriever and grounded_prompt (serve.py --rag_index=out/rag).
"""
import argparse
import json
import os
import re
import shutil
import sys
import time

import numpy as np
import torch

from common import generate_replies, load_model
from data_formats import DataError, read_jsonl
from tokenizer import Tokenizer

DOC_EXTENSIONS = (".txt", ".md")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------------------------
# documents

def check_text(raw):
    """(text, None) for usable UTF-8 text, else (None, the reason it is skipped)."""
    if b"\x00" in raw:
        return None, "binary (it contains NUL bytes), skipped"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, (f"not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset {e.start}), skipped; "
                      "convert it to UTF-8")
    if not text.strip():
        return None, "empty, skipped"
    return text, None


def read_docs(path, max_doc_mb=64.0):
    """([(id, text)], number skipped) from a folder of .txt/.md files, searched recursively (id: the
    path inside the folder), one such file (id: its name), or a jsonl of {"id", "text"}. Every
    skipped document is logged with the reason."""
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if f.endswith(DOC_EXTENSIONS))
        items, skipped = [(os.path.relpath(f, path).replace(os.sep, "/"), f) for f in files], 0
    elif os.path.isfile(path) and path.endswith(DOC_EXTENSIONS):
        items, skipped = [(os.path.basename(path), path)], 0
    elif os.path.isfile(path):
        stats = {}
        records = read_jsonl(path, "docs", log=log, stats=stats)  # bad lines are reported there
        items, skipped = [(r["id"], r["text"].encode("utf-8")) for r in records], stats["skipped"]
    else:
        raise DataError(f"{path}: no such file or folder (give a folder of .txt/.md files or a jsonl of "
                        "{id, text})")
    docs, seen = [], set()
    for doc_id, src in items:
        size = os.path.getsize(src) if isinstance(src, str) else len(src)
        if size > max_doc_mb * 2**20:
            text, problem = None, f"{size / 2**20:.1f} MB, more than --max_doc_mb={max_doc_mb:g}; split it or raise it"
        elif isinstance(src, str):
            with open(src, "rb") as f:
                text, problem = check_text(f.read())
        else:
            text, problem = check_text(src)
        if problem:
            log(f"{doc_id}: {problem}")
            skipped += 1
        elif doc_id in seen:
            raise DataError(f"{path}: document id {doc_id!r} appears twice; ids must be unique")
        else:
            seen.add(doc_id)
            docs.append((doc_id, text))
    if not docs:
        raise DataError(f"{path}: no usable documents ({skipped} skipped; want .txt/.md files or jsonl {{id, text}})")
    return docs, skipped


# -----------------------------------------------------------------------------------------------
# chunking

# How good a place each character position is for a cut, best first: 3 a paragraph break, 2 the end
# of a sentence (Chinese 。！？… need no space after them; English . ! ? do, so 3.14 is not cut) or
# of a line, 1 a space or a Chinese comma, 0 any other character boundary. Group 1 is what must stay
# before the cut; the cut may fall anywhere in the whitespace after it, because tokenizers glue a
# space to the next word (" Baga") or a newline to the full stop (".\n").
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
            a, b = m.end(1), m.end() + 1
            np.maximum(kind[a:b], k, out=kind[a:b])
    return kind


def chunk_document(text, tok, chunk_tokens=64, overlap=16):
    """Cut text into chunks that cover it: [{"start", "end", "span", "ids", "cut"}], where
    text[start:end] is the chunk, ids = doc_ids[span[0]:span[1]] its tokens (tok.decode(ids) gives
    the chunk text back exactly) and cut the BREAKS kind it ends at.

    Every chunk has at most chunk_tokens tokens. It ends at the best break in the second half of its
    budget (the latest paragraph break, else sentence end, else space, else character boundary), so
    chunks are never shorter than half the budget unless the document is. The next chunk starts at
    most `overlap` tokens earlier: at the earliest sentence start in those tokens (whole sentences
    are repeated), else the earliest word start, else character. Cuts are only made between tokens
    that lie on a UTF-8 character boundary: a character split into byte tokens is never cut.
    Chunks of whitespace only are dropped: every other character is in some chunk."""
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
    char_of = np.concatenate([[0], np.cumsum(lead[:-1])])  # characters before byte b
    pos = char_of[at]                                      # character offset of token boundary j
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


# -----------------------------------------------------------------------------------------------
# embedders: token ids -> unit vectors

class TfidfEmbedder:
    """Sublinear TF-IDF over token ids (formula in the module docstring). dim=0: one dimension per
    vocabulary id (unigrams). dim>0: unigrams and, with ngrams=2, bigrams of ids hashed into dim
    dimensions: bigrams tell "Diti" from "Tidi", and the vectors stay small for big vocabularies."""

    def __init__(self, vocab_size, dim=0, ngrams=1, idf=None):
        if ngrams not in (1, 2) or (ngrams == 2 and not dim):
            raise ValueError("ngrams must be 1, or 2 with a hashed --tfidf_dim > 0")
        self.vocab_size, self.hashed, self.ngrams = vocab_size, dim > 0, ngrams
        self.dim = dim or vocab_size
        self.idf = idf

    def settings(self):
        return {"vocab_size": self.vocab_size, "dim": self.dim if self.hashed else 0, "ngrams": self.ngrams}

    def terms(self, ids):
        """The feature index of every unigram (and bigram) of ids, repeats kept."""
        ids = np.asarray(ids, dtype=np.int64)
        if not self.hashed:
            return ids
        keys = [ids] if self.ngrams == 1 else [ids, self.vocab_size * (1 + ids[:-1]) + ids[1:]]
        k = np.concatenate(keys).astype(np.uint64)
        # Fibonacci hashing: multiply by 2^64 / golden ratio (wrapping), keep high bits, fold into dim
        return ((k * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(29)).astype(np.int64) % self.dim

    def fit(self, chunk_ids):
        """idf(t) = ln((1 + N) / (1 + df(t))) + 1 over the N chunks (smoothed, as scikit-learn does)."""
        df = np.zeros(self.dim, np.int64)
        for ids in chunk_ids:
            df[np.unique(self.terms(ids))] += 1
        self.idf = (np.log((1 + len(chunk_ids)) / (1 + df)) + 1).astype(np.float32)

    def __call__(self, batch_ids):
        out = np.zeros((len(batch_ids), self.dim), np.float32)
        for r, ids in enumerate(batch_ids):
            t, tf = np.unique(self.terms(ids), return_counts=True)
            out[r, t] = (1 + np.log(tf)) * self.idf[t]      # sublinear tf: the 10th "the" adds little
        return normalize(out)


class LMEmbedder:
    """Mean of a checkpoint's final hidden states over a text's tokens (BOS first, as in pretraining,
    but left out of the mean: its state is the same for every text)."""

    def __init__(self, run_dir, device="cpu", batch_size=32):
        self.model, self.tok, ckpt = load_model(run_dir, device)
        self.run_dir, self.step, self.batch_size = os.path.abspath(run_dir), ckpt.get("step"), batch_size
        self.dim, self.device = self.model.cfg.dim, device

    def settings(self):
        return {"embed_model": self.run_dir, "step": self.step}

    @torch.no_grad()
    def __call__(self, batch_ids):
        out, cap = [], self.model.cfg.max_seq_len - 1
        for b in range(0, len(batch_ids), self.batch_size):
            rows = [[self.tok.bos_id] + list(map(int, ids[:cap])) for ids in batch_ids[b:b + self.batch_size]]
            T = max(map(len, rows))
            x = torch.full((len(rows), T), self.tok.pad_id, dtype=torch.long)
            mask = torch.zeros(len(rows), T)
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


# -----------------------------------------------------------------------------------------------
# the index: build, open, search

def chunk_docs(docs, tok, chunk_tokens, overlap):
    """Chunk records ({"id", "source", "offsets", "tokens", "text"}) and their token ids, for all docs."""
    records, chunk_ids = [], []
    for doc_id, text in docs:
        chunks = chunk_document(text, tok, chunk_tokens, overlap)
        mid = sum(c["cut"] < 2 for c in chunks[:-1])
        if mid:
            log(f"{doc_id}: {mid} of {len(chunks)} chunks cut mid-sentence (no sentence end within {chunk_tokens} "
                f"tokens)" + (f"; it is one line of {len(text):,} characters" if "\n" not in text.strip() else ""))
        for n, c in enumerate(chunks):
            records.append({"id": f"{doc_id}#{n}", "source": doc_id, "offsets": [c["start"], c["end"]],
                            "tokens": len(c["ids"]), "text": text[c["start"]:c["end"]]})
            chunk_ids.append(c["ids"])
    return records, chunk_ids


def build_index(docs, out_dir, embedder, tok, chunk_tokens, overlap, dtype="float32", batch_size=256, meta=None):
    """Chunk docs [(id, text)], embed the chunks and write the index to out_dir. embedder: "tfidf" or
    a TfidfEmbedder (fitted here on the chunks), or an LMEmbedder. The index is written to out_dir.tmp
    and renamed into place, so a failed build leaves the old index whole. Returns index.json's dict."""
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "index.json")):
        raise DataError(f"{out_dir} exists and is not a rag index; choose another --out_dir")
    records, chunk_ids = chunk_docs(docs, tok, chunk_tokens, overlap)
    if not records:
        raise DataError("the documents hold no text to index")
    if embedder == "tfidf":
        embedder = TfidfEmbedder(tok.vocab_size)
    name = "tfidf" if isinstance(embedder, TfidfEmbedder) else "lm"
    if name == "tfidf":
        embedder.fit(chunk_ids)

    tmp = out_dir.rstrip("/\\") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    vectors = np.lib.format.open_memmap(os.path.join(tmp, "vectors.npy"), mode="w+", dtype=dtype,
                                        shape=(len(records), embedder.dim))
    for b in range(0, len(records), batch_size):  # written batch by batch: the vectors need not fit in RAM
        vectors[b:b + batch_size] = embedder(chunk_ids[b:b + batch_size])
    vectors.flush()
    del vectors
    with open(os.path.join(tmp, "chunks.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if name == "tfidf":
        np.save(os.path.join(tmp, "idf.npy"), embedder.idf)
    tok.save(tmp)
    settings = {"embedder": name, name: embedder.settings(), "dim": embedder.dim, "dtype": dtype,
                "chunks": len(records), "documents": len(docs), "chunk_tokens": chunk_tokens, "overlap": overlap,
                "tokenizer": tok.name, "tokenizer_sha256": tok.fingerprint, **(meta or {})}
    with open(os.path.join(tmp, "index.json"), "w") as f:
        json.dump(settings, f, indent=2, ensure_ascii=False)
    old = out_dir.rstrip("/\\") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return settings


def top_k(vectors, queries, k, block_bytes=32 << 20):
    """The k rows of vectors (N, D) with the largest dot product with each query (B, D), best first:
    (scores (B, k) float32, rows (B, k) int64). For unit vectors the dot product is the cosine.

    One matrix product scores a block of rows against all queries at once; np.argpartition keeps the
    block's k best (O(rows), no full sort); the blocks' survivors are merged and sorted at the end.
    Blocks keep memory flat for a memory-mapped index and let a float16 index be scored in float32
    (numpy has no fast float16 matmul). Which of several equal scores make the cut is arbitrary."""
    n = len(vectors)
    k = min(k, n)
    q = np.ascontiguousarray(np.asarray(queries, np.float32).T)        # (D, B)
    rows = max(1024, block_bytes // (4 * vectors.shape[1]))
    cand_s, cand_i = [], []
    for lo in range(0, n, rows):
        s = np.asarray(vectors[lo:lo + rows], dtype=np.float32) @ q    # (rows, B): cosine of every pair
        kk = min(k, len(s))
        best = np.argpartition(-s, kk - 1, axis=0)[:kk]                # (kk, B), unordered
        cand_s.append(np.take_along_axis(s, best, axis=0))
        cand_i.append(best + lo)
    s, i = np.concatenate(cand_s), np.concatenate(cand_i)
    order = np.lexsort((i, -s), axis=0)[:k]                           # by score, then by row
    return np.take_along_axis(s, order, 0).T.copy(), np.take_along_axis(i, order, 0).T.copy()


class Retriever:
    """An index opened for search: Retriever("out/rag").search(["How old is Diti?"], k=5) ->
    [[{"rank", "score", "id", "source", "offsets", "text"}, ...]] per query, best first.
    The vectors are memory-mapped; chunk texts are read from chunks.jsonl on demand."""

    def __init__(self, index_dir, device="auto"):
        path = os.path.join(index_dir, "index.json")
        if not os.path.isfile(path):
            raise DataError(f"{index_dir}: not a rag index (no index.json); build one with "
                            f"`python rag.py index --docs=... --out_dir={index_dir}`")
        with open(path) as f:
            self.settings = s = json.load(f)
        self.dir = index_dir
        self.vectors = np.load(os.path.join(index_dir, "vectors.npy"), mmap_mode="r")
        self.tok = Tokenizer.load(index_dir)
        if s["embedder"] == "tfidf":
            t = s["tfidf"]
            self.embedder = TfidfEmbedder(t["vocab_size"], t["dim"], t["ngrams"],
                                          idf=np.load(os.path.join(index_dir, "idf.npy")))
        else:
            self.embedder = LMEmbedder(s["lm"]["embed_model"], pick_device(device))
            if self.embedder.tok.fingerprint != s["tokenizer_sha256"]:
                raise DataError(f"{s['lm']['embed_model']} has another tokenizer than when {index_dir} was built: "
                                "rebuild the index")
        self.line_at = [0]                                             # byte offset of each chunk's line
        with open(os.path.join(index_dir, "chunks.jsonl"), "rb") as f:
            for line in f:
                self.line_at.append(self.line_at[-1] + len(line))
        if not (len(self.line_at) - 1 == len(self.vectors) == s["chunks"]) or self.vectors.shape[1] != s["dim"]:
            raise DataError(f"{index_dir}: vectors.npy {self.vectors.shape}, chunks.jsonl {len(self.line_at) - 1} "
                            f"lines and index.json ({s['chunks']} chunks of {s['dim']}) disagree; rebuild it")

    def __len__(self):
        return len(self.vectors)

    def embed(self, queries):
        return self.embedder([self.tok.encode(q) for q in queries])

    def chunks(self, rows):
        out = []
        with open(os.path.join(self.dir, "chunks.jsonl"), "rb") as f:
            for r in rows:
                f.seek(self.line_at[r])
                out.append(json.loads(f.readline()))
        return out

    def search(self, queries, k=5):
        scores, rows = top_k(self.vectors, self.embed(queries), k)
        return [[{"rank": n + 1, "score": float(s), **c} for n, (s, c) in enumerate(zip(sc, self.chunks(rw)))]
                for sc, rw in zip(scores, rows)]


# -----------------------------------------------------------------------------------------------
# grounded answers

# The user message of a grounded chat. demo_world.py writes its retrieval chats (SFT data) in exactly
# this form, so the model has learned to answer from such sources; change them together.
RAG_PROMPT = {
    "en": "Answer the question using only the sources below, and cite the source you used as [n].\n"
          "{sources}\nQuestion: {question}",
    "zh": "请只根据下面的资料回答问题，并用[n]注明所用的资料。\n{sources}\n问题：{question}",
}
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def ground_messages(messages, hits):
    """A copy of messages whose last (user) message carries the hits as numbered sources
    "[1] text" (one line each), the instruction to answer from them and cite [n], then the question.
    The instruction is Chinese when the question has Chinese characters. No hits: unchanged."""
    messages = [dict(m) for m in messages]
    if not hits or not messages or messages[-1]["role"] != "user":
        return messages
    question = messages[-1]["content"]
    sources = "\n".join(f"[{n}] {' '.join(h['text'].split())}" for n, h in enumerate(hits, 1))
    lang = "zh" if CJK.search(question) else "en"
    messages[-1]["content"] = RAG_PROMPT[lang].format(sources=sources, question=question)
    return messages


def grounded_prompt(tok, messages, hits, max_tokens):
    """(prompt ids, hits used): the chat rendered with as many of the hits (best first) as fit in
    max_tokens; the lowest-ranked are dropped first. The prompt may still be longer than max_tokens
    when the messages alone are."""
    hits = list(hits) if messages and messages[-1]["role"] == "user" else []
    while True:
        ids = tok.render_chat(ground_messages(messages, hits), add_generation_prompt=True)[0]
        if len(ids) <= max_tokens or not hits:
            return ids, hits
        hits.pop()


def source_list(hits):
    """Hits as an API returns them, numbered as the prompt cites them:
    [{"n", "id", "source", "offsets", "score", "text"}, ...]."""
    return [{"n": n, "id": h["id"], "source": h["source"], "offsets": h["offsets"], "score": round(h["score"], 4),
             "text": h["text"]} for n, h in enumerate(hits, 1)]


def cited(answer):
    """The source numbers an answer cites as [n]."""
    return sorted({int(n) for n in re.findall(r"\[(\d+)\]", answer)})


def same_doc(a, b):
    """Document ids name the same file when equal or when one is a path ending in the other
    (qa.jsonl says "docs/diti.md", an index of the docs folder says "diti.md")."""
    a, b = a.replace("\\", "/"), b.replace("\\", "/")
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


def holds_answer(chunk, qa):
    """The chunk holds the answer: its text contains it (case-folded) and, when the question names
    its document, the chunk comes from that document."""
    in_doc = "doc" not in qa or same_doc(chunk["source"], qa["doc"])
    return in_doc and qa["answer"].casefold() in chunk["text"].casefold()


# -----------------------------------------------------------------------------------------------
# commands

def cmd_index(a):
    t0 = time.time()
    docs, skipped = read_docs(a.docs, a.max_doc_mb)
    if a.embedder == "lm":
        embedder = LMEmbedder(a.embed_model, pick_device(a.device), a.batch_size)
        tok = embedder.tok
        if a.chunk_tokens >= embedder.model.cfg.max_seq_len:
            raise DataError(f"--chunk_tokens={a.chunk_tokens} must be below the model's max_seq_len "
                            f"{embedder.model.cfg.max_seq_len}")
    else:
        tok = Tokenizer.load(a.tokenizer)
        embedder = TfidfEmbedder(tok.vocab_size, a.tfidf_dim, a.ngrams)
    s = build_index(docs, a.out_dir, embedder, tok, a.chunk_tokens, a.overlap, a.dtype,
                    meta={"docs": a.docs, "skipped_documents": skipped})
    size = os.path.getsize(os.path.join(a.out_dir, "vectors.npy"))
    log(f"{a.out_dir}: {s['chunks']} chunks from {s['documents']} documents ({skipped} skipped), "
        f"{a.embedder} vectors of {s['dim']} dims ({a.dtype}, {size / 2**20:.1f} MB) in {time.time() - t0:.1f}s")


def read_queries(a):
    qs = list(a.query or [])
    if getattr(a, "queries", ""):
        with open(a.queries, encoding="utf-8") as f:
            qs += [ln.strip() for ln in f if ln.strip()]
    if not qs:
        raise DataError("give --query=TEXT (repeatable) or --queries=FILE (one question per line)")
    return qs


def cmd_query(a):
    r = Retriever(a.index, a.device)
    qs = read_queries(a)
    t0 = time.perf_counter()
    results = r.search(qs, a.k)
    log(f"{len(qs)} queries against {len(r)} chunks in {1000 * (time.perf_counter() - t0):.1f} ms")
    for q, hits in zip(qs, results):
        print(f"query: {q}")
        for h in hits:
            print(f"  {h['rank']}. {h['score']:.3f}  {h['id']} [{h['offsets'][0]}:{h['offsets'][1]}]  "
                  f"{' '.join(h['text'].split())[:120]}")


def grounded_chats(tok, questions, results, k, max_prompt_tokens):
    """For each question and its hits: (messages with the top-k hits as sources, the hits used), as
    many hits as fit in max_prompt_tokens."""
    out = []
    for q, hits in zip(questions, results):
        messages = [{"role": "user", "content": q}]
        used = grounded_prompt(tok, messages, hits[:k], max_prompt_tokens)[1]
        out.append((ground_messages(messages, used), used))
    return out


def cmd_ask(a):
    r = Retriever(a.index, a.device)
    model, tok, _ = load_model(a.model, pick_device(a.device))
    gen = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(a.seed)
    questions = read_queries(a)
    results = r.search(questions, a.k)
    chats = grounded_chats(tok, questions, results, a.k, model.cfg.max_seq_len - a.max_new_tokens)
    answers = generate_replies(model, tok, [m for m, _ in chats], a.max_new_tokens, temperature=a.temperature,
                               generator=gen)
    for q, hits, (_, used), answer in zip(questions, results, chats, answers):
        refs = cited(answer)
        print(f"question: {q}\nanswer: {answer.strip()}\nsources:" + ("" if len(used) == len(hits) else
              f" ({len(hits) - len(used)} more retrieved, left out to fit the context)"))
        for n, h in enumerate(used, 1):
            print(f"  {'*' if n in refs else ' '}[{n}] {h['id']} chars {h['offsets'][0]}-{h['offsets'][1]} "
                  f"(score {h['score']:.3f}): {' '.join(h['text'].split())[:100]}")


def cmd_eval(a):
    r = Retriever(a.index, a.device)
    qa = read_jsonl(a.qa, "qa", log=log)[:a.limit or None]
    questions = [x["question"] for x in qa]
    t0 = time.perf_counter()
    results = r.search(questions, max(5, a.k))
    search_ms = 1000 * (time.perf_counter() - t0)
    # the rank of the first chunk that holds the answer (None: not in the top 5)
    rank = [next((h["rank"] for h in hits if holds_answer(h, x)), None) for x, hits in zip(qa, results)]
    report = {"qa": a.qa, "questions": len(qa), "index": a.index, "chunks": len(r), "embedder": r.settings["embedder"],
              "recall@1": sum(n == 1 for n in rank) / len(qa),
              "recall@5": sum(n is not None and n <= 5 for n in rank) / len(qa), "search_ms": search_ms}
    print(f"retrieval ({report['embedder']}, {len(r)} chunks, {len(qa)} questions): recall@1 {report['recall@1']:.3f}, "
          f"recall@5 {report['recall@5']:.3f} ({search_ms:.0f} ms for all questions)")
    if a.model:
        model, tok, _ = load_model(a.model, pick_device(a.device))
        plain = [[{"role": "user", "content": q}] for q in questions]
        grounded = grounded_chats(tok, questions, results, a.k, model.cfg.max_seq_len - a.max_new_tokens)
        report["sources_in_prompt"] = sum(len(used) for _, used in grounded) / len(qa)
        answers = {}
        for key, label, chats in (("accuracy_without_retrieval", "without retrieval", plain),
                                  ("accuracy_with_retrieval", "with retrieval", [m for m, _ in grounded])):
            answers[key] = generate_replies(model, tok, chats, a.max_new_tokens, a.batch_size)
            right = [x["answer"].casefold() in ans.casefold() for x, ans in zip(qa, answers[key])]
            report[key] = sum(right) / len(qa)
            for x, ans in [(x, ans) for x, ans, ok in zip(qa, answers[key], right) if not ok][:a.show]:
                log(f"  wrong ({label}): {x['question']} -> {ans.strip()!r} (want {x['answer']!r})")
        # the citation is scored apart from the value: does the reply point at a source that holds the
        # answer (any cited [n])? A reply can cite the right source and still get the value wrong.
        report["cites_right_source"] = sum(
            any(1 <= n <= len(used) and holds_answer(used[n - 1], x) for n in cited(ans))
            for x, ans, (_, used) in zip(qa, answers["accuracy_with_retrieval"], grounded)) / len(qa)
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
    return report


def memory_mb():
    """Resident memory of this process from /proc (Linux): anonymous (heap), file-backed (mapped
    pages of the index, shared with the page cache) and the peak since the last reset_peak()."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def cmd_bench(a):
    """Synthetic index of n random unit vectors: query latency (k=5) for batches of 1 and 64, and memory."""
    rng = np.random.default_rng(0)
    os.makedirs(a.dir, exist_ok=True)
    try:
        for dtype in ("float32", "float16"):
            path = os.path.join(a.dir, f"vectors_{dtype}.npy")
            v = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(a.n, a.dim))
            for lo in range(0, a.n, 65536):
                v[lo:lo + 65536] = normalize(rng.standard_normal((min(65536, a.n - lo), a.dim), dtype=np.float32))
            v.flush()
            del v
            vectors = np.load(path, mmap_mode="r")
            before = memory_mb()
            top_k(vectors, normalize(rng.standard_normal((1, a.dim))), 5)     # first touch pages the file in
            reset_peak()
            line = [f"{dtype}: {os.path.getsize(path) / 2**30:.2f} GiB on disk"]
            for batch, reps in ((1, 10), (64, 3)):
                wall, cpu = [], []   # CPU time too: on a shared machine the wall clock includes waiting
                for _ in range(reps):
                    q = normalize(rng.standard_normal((batch, a.dim)))
                    t0, c0 = time.perf_counter(), time.process_time()
                    top_k(vectors, q, 5)
                    wall.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                line.append(f"batch {batch}: {1000 * np.median(wall):.0f} ms ({1000 * np.median(cpu):.0f} ms CPU)")
            m = memory_mb()
            line.append(f"RSS peak {m.get('VmHWM', 0):.0f} MB = mapped index {m.get('RssFile', 0):.0f} MB "
                        f"+ heap {m.get('RssAnon', 0):.0f} MB (heap before search {before.get('RssAnon', 0):.0f} MB)")
            print(f"{a.n:,} x {a.dim}, " + ", ".join(line), flush=True)
            del vectors
            os.remove(path)
    finally:
        if not a.keep:
            shutil.rmtree(a.dir, ignore_errors=True)


def main(argv=None):
    if hasattr(sys.stdout, "reconfigure"):  # a query with lone surrogates prints, escaped (as in sample.py)
        sys.stdout.reconfigure(errors="backslashreplace")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common_args(p, index=True):
        if index:
            p.add_argument("--index", default="out/rag", help="the index dir written by `rag.py index`")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (lm embedder, chat model)")

    def answer_args(p, k):
        p.add_argument("--model", default="out/sft", help="chat checkpoint that answers (an sft, dpo or grpo run dir)"
                       + ("; --model= measures retrieval only" if p.prog.endswith("eval") else ""))
        p.add_argument("--k", type=int, default=k, help="chunks put into the prompt (fewer if they do not fit)")
        p.add_argument("--max_new_tokens", type=int, default=32)

    p = sub.add_parser("index", help="chunk and embed documents into an index dir")
    p.add_argument("--docs", default="data/demo/rag/docs", help="a folder of .txt/.md files or a jsonl of {id, text}")
    p.add_argument("--out_dir", default="out/rag")
    p.add_argument("--embedder", choices=("tfidf", "lm"), default="tfidf")
    p.add_argument("--tokenizer", default="data/demo/tokenizer.model", help="tfidf: whose token ids are the terms")
    p.add_argument("--tfidf_dim", type=int, default=0, help="tfidf: 0 = a dimension per vocabulary id; N = hashed")
    p.add_argument("--ngrams", type=int, choices=(1, 2), default=1, help="tfidf: 2 adds bigrams (needs --tfidf_dim)")
    p.add_argument("--embed_model", default="out/pretrain", help="lm: the checkpoint whose hidden states embed")
    p.add_argument("--chunk_tokens", type=int, default=64, help="most tokens in a chunk")
    p.add_argument("--overlap", type=int, default=16, help="most tokens a chunk repeats from the previous one")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="of the stored vectors")
    p.add_argument("--max_doc_mb", type=float, default=64, help="larger documents are skipped")
    p.add_argument("--batch_size", type=int, default=64, help="chunks embedded together")
    common_args(p, index=False)

    p = sub.add_parser("query", help="print the top-k chunks for questions")
    common_args(p)
    p.add_argument("--query", action="append", help="a question (repeat for several)")
    p.add_argument("--queries", default="", help="a file with one question per line, searched as one batch")
    p.add_argument("--k", type=int, default=5)

    p = sub.add_parser("ask", help="answer questions from the retrieved chunks, citing them")
    common_args(p)
    answer_args(p, k=3)
    p.add_argument("--query", action="append", help="a question (repeat for several)")
    p.add_argument("--queries", default="", help="a file with one question per line")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=1337)

    p = sub.add_parser("eval", help="recall@1/@5 and answer accuracy with and without retrieval")
    common_args(p)
    answer_args(p, k=3)
    p.add_argument("--qa", default="data/demo/rag/qa.jsonl", help='jsonl of {"question", "answer", "doc"?}')
    p.add_argument("--limit", type=int, default=0, help="first N questions only (0: all)")
    p.add_argument("--batch_size", type=int, default=16, help="questions answered together")
    p.add_argument("--show", type=int, default=3, help="wrong answers printed per setting")
    p.add_argument("--results", default="", help="also write the numbers to this json file")

    p = sub.add_parser("bench", help="query latency and memory on a synthetic index")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--dir", default="/tmp/rag_bench", help="where the synthetic vectors are written (deleted after)")
    p.add_argument("--keep", action="store_true")

    a = ap.parse_args(argv)
    if getattr(a, "model", None) == "":
        a.model = None
    try:
        with torch.inference_mode():
            {"index": cmd_index, "query": cmd_query, "ask": cmd_ask, "eval": cmd_eval, "bench": cmd_bench}[a.cmd](a)
    except (DataError, ValueError, OSError) as e:
        log(f"rag.py {a.cmd}: error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
