"""Data preparation: train the tokenizer, tokenize pretraining text into memmap shards, check the
stage jsonl files, and build the built-in demo world.

    python prepare_data.py demo                      # demo world -> data/demo (seconds), then:
    python pretrain.py config/tiny.py

    python prepare_data.py tokenizer --vocab_size=32768 --out=data/tok/tokenizer.model CORPUS...
    python prepare_data.py pretrain --tokenizer=data/tok/tokenizer.model --out_dir=data/pretrain CORPUS...
    python prepare_data.py validate data/demo        # stage jsonl, RAG folders, pretraining dirs

CORPUS is any mix of files, folders (searched recursively) and quoted globs: .txt/.md (documents separated
by blank lines; --txt_split=line or file), .jsonl (a `text` field; --text_key) and .parquet (a `text`
column; needs pyarrow). `pretrain` writes train.bin and val.bin (each document BOS + its tokens, uint16
when the vocabulary fits, else uint32), meta.json and a copy of the tokenizer (formats: docs/data.md).
A document goes to val by a keyed hash of its text: independent of file order, chunking and process count,
and exact duplicates never straddle the split.

How it scales: files are cut into ~--chunk_mb chunks at document boundaries, --num_proc processes tokenize
them, and the main process appends each chunk's tokens in order (Pool.imap): memory stays at a few chunks
per process, and the bytes are identical for any --num_proc. Bad input stops with one line and exit status
1 and leaves nothing behind (temporary names, renamed at the end, meta.json last).
"""
import argparse
import glob
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import time
from collections import Counter

import numpy as np

import demo_world
from data_formats import DataError, read_jsonl, validate
from tokenizer import SURROGATE, Tokenizer, train_tokenizer, without_surrogates

TEXT_EXT, JSONL_EXT, PARQUET_EXT = (".txt", ".md"), (".jsonl",), (".parquet",)
BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")  # ASCII-whitespace-only lines separate documents
BAD_UTF8_HELP = "pass --bad_utf8=replace (U+FFFD) or --bad_utf8=skip (drop those documents), or fix the file"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# -- finding and reading the corpus ---------------------------------------------------------------
def expand_inputs(patterns):
    """Files (sorted within each folder/glob) for a list of files, folders and globs."""
    files = []
    for pat in patterns:
        if os.path.isdir(pat):
            found = sorted(os.path.join(root, f) for root, _, fs in os.walk(pat) for f in fs
                           if f.endswith(TEXT_EXT + JSONL_EXT + PARQUET_EXT))
            if not found:
                raise DataError(f"{pat}: no .txt, .md, .jsonl or .parquet files in this folder")
        elif os.path.isfile(pat):
            found = [pat]
        elif glob.has_magic(pat):
            found = sorted(f for f in glob.glob(pat, recursive=True) if os.path.isfile(f))
            if not found:
                raise DataError(f"{pat}: no files match")
        else:
            raise DataError(f"{pat}: no such file or folder")
        for f in found:
            if f.endswith(PARQUET_EXT):
                try:
                    import pyarrow.parquet  # noqa: F401
                except ImportError:
                    raise DataError(f"{f}: reading .parquet needs pyarrow (pip install pyarrow)") from None
            elif not f.endswith(TEXT_EXT + JSONL_EXT):
                raise DataError(f"{f}: unknown file type; use .txt/.md, .jsonl or .parquet")
        files += found
    if not files:
        raise DataError("no input files given")
    return files


def plan_chunks(files, chunk_bytes, txt_split="blank"):
    """Cut files into (path, start, end, input bytes) of about chunk_bytes that end at a document boundary:
    after a blank line (txt), after a newline (jsonl, txt lines), at a row group (parquet: start/end are row
    group indices then), or at the end of the file."""
    for path in files:
        if path.endswith(PARQUET_EXT):
            import pyarrow.parquet as pq
            n = pq.ParquetFile(path).num_row_groups
            for rg in range(n):
                yield path, rg, rg + 1, os.path.getsize(path) / n
            continue
        size = os.path.getsize(path)
        if txt_split == "file" and path.endswith(TEXT_EXT):
            yield path, 0, size, size
            continue
        by_blank = path.endswith(TEXT_EXT) and txt_split == "blank"
        with open(path, "rb") as f:
            start = 0
            while start < size:
                end = start + chunk_bytes
                if end < size:
                    f.seek(end - 1)
                    if f.read(1) != b"\n":
                        f.readline()  # finish the line we landed in
                    while by_blank and (line := f.readline()) and line.strip():
                        pass  # txt: go on to just after a blank line
                    end = min(f.tell(), size)
                yield path, start, end, end - start
                start = end


def chunk_docs(chunk, opt, stats, notes):
    """The documents of one chunk, in order; what is skipped or repaired is counted in stats and the first
    places described in notes. Invalid UTF-8 is an error unless opt.bad_utf8 is "replace" (U+FFFD, one per
    bad byte) or "skip" (drop the document)."""
    path, start, end, _ = chunk
    if path.endswith(PARQUET_EXT):
        import pyarrow.parquet as pq
        texts = pq.ParquetFile(path).read_row_group(start, columns=[opt.text_key]).column(0).to_pylist()
        docs = ((t, f"row group {start}") for t in texts)
    else:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        if path.endswith(JSONL_EXT) or opt.txt_split == "line":
            docs = _line_docs(data, path, start, path.endswith(JSONL_EXT), opt, stats, notes)
        else:
            text = _decode(data, path, start, opt, notes)
            # the "\n" makes a blank line at the very start of a chunk separate like any other,
            # so the documents do not depend on where the chunks were cut
            parts = BLANK_LINES.split("\n" + text) if opt.txt_split == "blank" else [text]
            docs = ((d, f"byte {start}") for d in parts if d.strip())
    for doc, where in docs:
        if not isinstance(doc, str) or not doc.strip():
            stats["empty"] += 1
            continue
        doc = doc.strip("\r\n")
        if SURROGATE.search(doc):  # invalid UTF-8 (or a lone \udXXX escape in JSON)
            if opt.bad_utf8 == "error":
                raise DataError(f"{path}: {where}: text is not valid Unicode (a lone surrogate); {BAD_UTF8_HELP}")
            stats["bad_utf8_docs"] += 1
            if opt.bad_utf8 == "skip":
                continue
            doc = without_surrogates(doc)
        yield doc


def _decode(data, path, offset, opt, notes):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}: invalid UTF-8 at byte {offset + e.start}"
        if opt.bad_utf8 == "error":
            raise DataError(f"{where}; nothing written; {BAD_UTF8_HELP}") from None
        if len(notes) < 10:
            notes.append(f"{where}: {'replaced by U+FFFD' if opt.bad_utf8 == 'replace' else 'document dropped'}")
        # keep the bad bytes as lone surrogates, so chunk_docs can tell which documents hold them
        return data.decode("utf-8", "surrogateescape")


def _line_docs(data, path, offset, is_json, opt, stats, notes):
    for line in data.split(b"\n"):
        line_start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        text = _decode(line, path, line_start, opt, notes)
        if not is_json:
            yield text, f"byte {line_start}"
            continue
        try:
            doc = json.loads(text)[opt.text_key]
            if not isinstance(doc, str):
                raise TypeError(f"'{opt.text_key}' is {type(doc).__name__}, not a string")
        except (ValueError, KeyError, TypeError) as e:
            stats["bad_jsonl_lines"] += 1
            if len(notes) < 10:
                why = f"no '{opt.text_key}' field" if isinstance(e, KeyError) else str(e)[:100]
                notes.append(f"{path}: line at byte {line_start} skipped: {why}")
            continue
        yield doc, f"line at byte {line_start}"


# -- tokenizing: a pool of processes, results appended in order ------------------------------------
_worker = {}


def _init_worker(tok, opt):
    _worker.update(tok=tok, opt=opt, key=opt.seed.to_bytes(8, "little"))


def _tokenize_chunk(chunk):
    """One chunk -> (token bytes per split, counts, notes, input bytes). Each document is BOS + its
    tokens; it goes to val when a keyed hash of its text falls under val_fraction."""
    tok, opt, key = _worker["tok"], _worker["opt"], _worker["key"]
    stats, notes, out = Counter(), [], {"train": [], "val": []}
    docs = list(chunk_docs(chunk, opt, stats, notes))
    for k in range(0, len(docs), 256):  # a batch at a time: one C++ call, short Python lists
        batch = docs[k:k + 256]
        for doc, ids in zip(batch, tok.encode_batch(batch, num_threads=1)):
            raw = doc.encode()
            h = int.from_bytes(hashlib.blake2b(raw, digest_size=8, key=key).digest(), "little")
            split = "val" if h < opt.val_fraction * 2**64 else "train"
            out[split].append(tok.bos_id)
            out[split].extend(ids)
            stats[split + "_docs"] += 1
            stats[split + "_bytes"] += len(raw)
    return {s: np.array(v, dtype=opt.dtype).tobytes() for s, v in out.items()}, stats, notes, chunk[3]


def tokenize_corpus(inputs, tok, out_dir, val_fraction=0.005, seed=1337, num_proc=None, chunk_mb=4.0,
                    txt_split="blank", text_key="text", bad_utf8="error", dtype="auto", progress_s=10.0):
    """Tokenize the corpus into out_dir/{train.bin, val.bin, meta.json, tokenizer}; returns meta."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    dtype = ("uint16" if tok.vocab_size <= 65536 else "uint32") if dtype == "auto" else dtype
    if np.iinfo(dtype).max < tok.vocab_size - 1:
        raise DataError(f"dtype {dtype} cannot hold token ids up to {tok.vocab_size - 1}")
    opt = argparse.Namespace(val_fraction=val_fraction, seed=seed, txt_split=txt_split, text_key=text_key,
                             bad_utf8=bad_utf8, dtype=dtype)
    files = expand_inputs(inputs)
    num_proc = num_proc or os.cpu_count()
    total = max(sum(os.path.getsize(f) for f in files), 1)
    made_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp = {s: os.path.join(out_dir, f".{s}.bin.tmp") for s in ("train", "val")}
    stats, notes, pool, t0 = Counter(), [], None, time.time()
    try:
        chunks = plan_chunks(files, int(chunk_mb * 2**20), txt_split)
        if num_proc > 1:  # spawn, not fork: the same on every OS, and safe next to threads
            pool = mp.get_context("spawn").Pool(num_proc, _init_worker, (tok, opt))
            results = pool.imap(_tokenize_chunk, chunks)  # imap keeps the order: output is deterministic
        else:
            _init_worker(tok, opt)
            results = map(_tokenize_chunk, chunks)
        done, last = 0, t0
        with open(tmp["train"], "wb") as ftrain, open(tmp["val"], "wb") as fval:
            for arrays, st, nt, size in results:
                ftrain.write(arrays["train"])
                fval.write(arrays["val"])
                stats.update(st)
                notes += nt[:10 - len(notes)]
                done += size
                if progress_s and time.time() - last > progress_s:
                    last = time.time()
                    log(f"pretrain: {done / total:6.1%} of {total / 1e6:,.1f} MB, "
                        f"{(stats['train_bytes'] + stats['val_bytes']) / 1e6 / (last - t0):.2f} MB/s, "
                        f"{stats['train_docs'] + stats['val_docs']:,} "
                        f"docs, ETA {(last - t0) * (total - done) / max(done, 1) / 60:.1f} min")
        if pool:
            pool.close()
            pool.join()
        meta = dict(vocab_size=tok.vocab_size, dtype=dtype, tokenizer=tok.name, tokenizer_sha256=tok.fingerprint,
                    bos_id=tok.bos_id, eos_id=tok.eos_id,
                    train_tokens=os.path.getsize(tmp["train"]) // np.dtype(dtype).itemsize,
                    val_tokens=os.path.getsize(tmp["val"]) // np.dtype(dtype).itemsize,
                    train_docs=stats["train_docs"], val_docs=stats["val_docs"],
                    train_bytes=stats["train_bytes"], val_bytes=stats["val_bytes"],  # UTF-8 bytes of the documents
                    text_bytes=stats["train_bytes"] + stats["val_bytes"],
                    val_fraction=val_fraction, seed=seed, sources=[str(i) for i in inputs],
                    skipped={k: stats[k] for k in ("empty", "bad_jsonl_lines", "bad_utf8_docs")}, bad_utf8=bad_utf8)
        n_docs = meta["train_docs"] + meta["val_docs"]
        if n_docs == 0:
            raise DataError(f"empty corpus: no documents in {' '.join(map(str, inputs))}")
        for s in ("val", "train"):
            if meta[s + "_docs"] == 0:
                raise DataError(f"{n_docs} documents with val_fraction={val_fraction} leave the {s} split empty; "
                                "change --val_fraction or add text")
        # meta.json goes first and comes back last, so a dir that has a meta.json is complete
        meta_path = os.path.join(out_dir, "meta.json")
        if os.path.exists(meta_path):
            os.remove(meta_path)
        for s, p in tmp.items():
            os.replace(p, os.path.join(out_dir, f"{s}.bin"))
        tok.save(out_dir)
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(meta_path + ".tmp", meta_path)
    except BaseException:
        if pool:
            pool.terminate()
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
        if made_dir and not os.listdir(out_dir):
            os.rmdir(out_dir)
        raise
    dt = time.time() - t0
    for n in notes:
        log("warning: " + n)
    sk = meta["skipped"]
    if any(sk.values()):
        log(f"warning: skipped {sk['empty']} empty documents and {sk['bad_jsonl_lines']} bad jsonl lines; "
            f"{sk['bad_utf8_docs']} documents with invalid UTF-8 were "
            f"{'repaired (U+FFFD)' if bad_utf8 == 'replace' else 'dropped'}")
    log(f"pretrain: {meta['text_bytes'] / 1e6:,.1f} MB of text -> {meta['train_tokens']:,} train + "
        f"{meta['val_tokens']:,} val tokens ({meta['train_docs']:,} + {meta['val_docs']:,} docs, {dtype}) "
        f"in {dt:.1f}s = {meta['text_bytes'] / 1e6 / dt:.2f} MB/s with {num_proc} "
        f"process{'es' * (num_proc > 1)} -> {out_dir}")
    return meta


# -- the tokenizer step ---------------------------------------------------------------------------
def build_tokenizer(inputs, out, vocab_size=32768, max_sentences=500_000, character_coverage=0.9995, seed=1337,
                    txt_split="blank", text_key="text", extra_texts=()):
    """Train the SentencePiece BPE of tokenizer.py on a corpus (see train_tokenizer for sampling)."""
    files = expand_inputs(inputs)
    opt = argparse.Namespace(txt_split=txt_split, text_key=text_key, bad_utf8="replace")
    t0, stats, notes = time.time(), Counter(), []
    docs = (d for c in plan_chunks(files, 16 * 2**20, txt_split) for d in chunk_docs(c, opt, stats, notes))
    try:
        tok = train_tokenizer(itertools.chain(docs, extra_texts), vocab_size, out, max_sentences=max_sentences,
                              character_coverage=character_coverage, seed=seed)
    except RuntimeError as e:  # SentencePiece's own complaint, e.g. "Vocabulary size too high (4096)"
        raise DataError(f"tokenizer training failed: {str(e).splitlines()[-1].split('] ')[-1]}") from None
    for n in notes:
        log("warning: " + n)
    if stats["bad_jsonl_lines"] or stats["bad_utf8_docs"]:
        log(f"warning: {stats['bad_jsonl_lines']} bad jsonl lines skipped, {stats['bad_utf8_docs']} documents with "
            "invalid UTF-8 used with U+FFFD")
    log(f"tokenizer: {tok.vocab_size} tokens trained in {time.time() - t0:.1f}s -> {out}")
    return tok


# -- demo -----------------------------------------------------------------------------------------
def demo(out_dir="data/demo", seed=1337, vocab_size=1024, num_proc=None, n_people=demo_world.N_PEOPLE):
    """The demo world (demo_world.py), its tokenizer and its tokenized corpus. The vocabulary is small on
    purpose: at 1024 no token fuses a name with its fact, so facts stay compositional (docs/data.md)."""
    t0 = time.time()
    demo_world.write_world(out_dir, seed=seed, n_people=n_people)
    corpus = os.path.join(out_dir, "corpus")
    log(f"demo: world written to {out_dir} in {time.time() - t0:.1f}s")
    chats = read_jsonl(os.path.join(out_dir, "sft.jsonl"), "sft", log=lambda *a: None)
    tok = build_tokenizer([corpus], os.path.join(out_dir, "tokenizer.model"), vocab_size=vocab_size, seed=seed,
                          character_coverage=1.0, extra_texts=(m["content"] for c in chats for m in c["messages"]))
    tokenize_corpus([corpus], tok, os.path.join(out_dir, "pretrain"), val_fraction=0.02, seed=seed, num_proc=num_proc)
    problems = validate([out_dir, os.path.join(out_dir, "rag", "docs") + ":docs"], log)
    log(f"demo: done in {time.time() - t0:.1f}s; next: python pretrain.py config/tiny.py")
    return problems


# -- command line ---------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def corpus_args(p):
        p.add_argument("inputs", nargs="+", help="files, folders and globs (.txt/.md, .jsonl, .parquet)")
        p.add_argument("--txt_split", choices=("blank", "line", "file"), default="blank",
                       help="a .txt document ends at a blank line (default), a newline, or the file end")
        p.add_argument("--text_key", default="text", help="the text field of .jsonl / column of .parquet")
        p.add_argument("--seed", type=int, default=1337, help="keys the val split hash (and the tokenizer's sampling)")

    p = sub.add_parser("tokenizer", help="train the SentencePiece BPE tokenizer on a corpus")
    corpus_args(p)
    p.add_argument("--out", default="data/tokenizer.model")
    p.add_argument("--vocab_size", type=int, default=32768)
    p.add_argument("--max_sentences", type=int, default=500_000, help="pieces of <=1000 chars sampled for training")
    p.add_argument("--character_coverage", type=float, default=0.9995)

    p = sub.add_parser("pretrain", help="tokenize a corpus into train.bin/val.bin/meta.json")
    corpus_args(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer.model, a dir holding one, or tiktoken:gpt2")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--val_fraction", type=float, default=0.005, help="share of documents that go to val.bin")
    p.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokenizing processes (default: all cores)")
    p.add_argument("--chunk_mb", type=float, default=4.0, help="work unit per process; memory is a few of these each")
    p.add_argument("--bad_utf8", choices=("error", "replace", "skip"), default="error",
                   help="invalid UTF-8: stop (default), replace by U+FFFD, or drop the document")
    p.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                   help="auto: uint16 when the vocabulary has <= 65536 entries")

    p = sub.add_parser("validate", help="check stage jsonl files, RAG folders and pretraining dirs")
    p.add_argument("paths", nargs="+", help="jsonl files (as path:kind to name the kind: sft pairs prompts qa docs), "
                   "RAG folders as folder:docs, pretraining dirs, or folders holding those")

    p = sub.add_parser("demo", help="generate the built-in demo world, its tokenizer and pretraining data")
    p.add_argument("--out_dir", default="data/demo")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--vocab_size", type=int, default=1024)
    p.add_argument("--num_proc", type=int, default=os.cpu_count())
    p.add_argument("--n_people", type=int, default=demo_world.N_PEOPLE,
                   help="world size (towns, pets and problems scale with it)")

    a = ap.parse_args(argv)
    try:
        if a.cmd == "tokenizer":
            build_tokenizer(a.inputs, a.out, a.vocab_size, a.max_sentences, a.character_coverage, a.seed,
                            a.txt_split, a.text_key)
        elif a.cmd == "pretrain":
            try:
                tok = Tokenizer.load(a.tokenizer)
            except (OSError, ValueError) as e:
                raise DataError(str(e)) from None
            tokenize_corpus(a.inputs, tok, a.out_dir, a.val_fraction, a.seed, a.num_proc, a.chunk_mb,
                            a.txt_split, a.text_key, a.bad_utf8, a.dtype)
        elif a.cmd == "validate":
            n = validate(a.paths, log)
            log(f"validate: {n} problem{'s' * (n != 1)} found")
            return 1 if n else 0
        elif a.cmd == "demo":
            return 1 if demo(a.out_dir, a.seed, a.vocab_size, a.num_proc, a.n_people) else 0
    except DataError as e:
        log(f"prepare_data {a.cmd}: error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    # a killed job (SIGTERM) unwinds like Ctrl-C, so the temporary files are removed on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
