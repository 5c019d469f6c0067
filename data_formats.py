"""Readers and validators of the data formats every stage shares (../shared/DESIGN.md); stdlib and numpy only.

    chats = read_jsonl("data/demo/sft.jsonl", "sft")          # [{"messages": [...]}, ...]
    pairs = read_jsonl("data/demo/pairs.jsonl", "pairs")      # [{"prompt": [...], "chosen": str, "rejected": str}]
    probs = read_jsonl("data/demo/grpo.jsonl", "prompts")     # [{"prompt": [...], "answer": "42"}]; GSM8K too
    qa    = read_jsonl("data/demo/rag/qa.jsonl", "qa")        # [{"question": str, "answer": str, ...}]
    docs  = read_rag_docs("data/demo/rag/docs")               # [{"id": "x.md", "text": str}]
    meta  = load_meta("data/demo/pretrain"); check_vocab(meta, model_vocab_size, tokenizer)
    is_correct("53 + 1 = 54.", "54")                          # grpo.py's rule verifier: True
    validate(["data/demo"])                                   # python prepare_data.py validate data/demo

A bad line or document is logged (`file:line: what is wrong`) and skipped, and a summary line counts them:
nothing disappears silently. A missing file, or one with nothing usable, raises DataError, whose text is the
one line to show. Prompts become lists of messages, so every stage renders them with Tokenizer.render_chat.
"""
import json
import os
import re
import unicodedata

import numpy as np

ROLES = ("system", "user", "assistant")
DOC_EXTENSIONS = (".txt", ".md")


class DataError(ValueError):
    """Bad input data; str(e) is the one line to show the user."""


# -- one record per kind --------------------------------------------------------------------------------------
def check_messages(messages, what="messages"):
    """A clean copy of a non-empty list of {role, content: non-empty str}, a system message only first."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{what} must be a non-empty list of {{role, content}} objects")
    out = []
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{what}[{n}] must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{what}[{n}]: role {role!r} is not one of {', '.join(ROLES)}")
        if role == "system" and n != 1:
            raise DataError(f"{what}[{n}]: a system message can only come first")
        if not isinstance(content, str):
            raise DataError(f"{what}[{n}] ({role}): content must be a string, not {type(content).__name__}")
        if not content.strip():
            raise DataError(f"{what}[{n}] ({role}): content is empty")
        out.append({"role": role, "content": content})
    return out


def _text(obj, key):
    v = obj.get(key)
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"'{key}' must be a non-empty string" + ("" if key in obj else " (missing)"))
    return v


def _prompt(obj):
    """A prompt given as a string or as messages, returned as messages ending with a user turn."""
    p = obj.get("prompt")
    msgs = check_messages(p, "prompt") if isinstance(p, list) else [{"role": "user", "content": _text(obj, "prompt")}]
    if msgs[-1]["role"] != "user":
        raise DataError("prompt must end with a user message")
    return msgs


def parse_record(obj, kind):
    """One decoded jsonl object of the given kind, validated and normalized."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    if kind == "sft":
        msgs = check_messages(obj.get("messages"))
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError("no assistant message, nothing to learn")
        return {"messages": msgs}
    if kind == "pairs":
        rec = {"prompt": _prompt(obj), "chosen": _text(obj, "chosen"), "rejected": _text(obj, "rejected")}
        if rec["chosen"] == rec["rejected"]:
            raise DataError("chosen and rejected are identical")
        return rec
    if kind == "prompts" and "question" in obj and "prompt" not in obj:  # GSM8K: the answer ends '#### 1,234'
        _, mark, final = _text(obj, "answer").rpartition("####")
        if not mark or not final.strip():
            raise DataError("GSM8K answer has no '#### <number>' line")
        return {"prompt": [{"role": "user", "content": _text(obj, "question")}],
                "answer": final.strip().replace(",", "")}
    if kind == "prompts":
        if isinstance(obj.get("answer"), (int, float)) and not isinstance(obj["answer"], bool):
            obj = {**obj, "answer": str(obj["answer"])}  # a bare number is fine too
        return {"prompt": _prompt(obj), "answer": _text(obj, "answer").strip()}
    if kind == "qa":
        return {**obj, "question": _text(obj, "question"), "answer": _text(obj, "answer")}
    if kind == "docs":
        return {"id": _text(obj, "id"), "text": _text(obj, "text")}
    raise ValueError(f"unknown kind {kind!r}; one of sft, pairs, prompts, qa, docs")


def detect_kind(obj):
    """Guess a record's kind from its keys (for `prepare_data.py validate`), or None."""
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "sft"
    if "chosen" in obj or "rejected" in obj:
        return "pairs"
    if "prompt" in obj or ("question" in obj and "####" in str(obj.get("answer", ""))):
        return "prompts"
    return "qa" if "question" in obj else "docs" if "text" in obj else None


# -- answers: the rule verifier of grpo.py -------------------------------------------------------------------
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def extract_answer(text):
    """The final answer of a reply as a string of digits, or None: the number right after the last '####' (GSM8K),
    else the last number ("53 + 1 = 54." and "53加1等于54。" give "54"); full-width digits normalized (NFKC)."""
    text = unicodedata.normalize("NFKC", text)
    if "####" in text:
        m = NUMBER.match(text.rsplit("####", 1)[1].strip())
        return m.group().replace(",", "") if m else None  # a '####' line without a number is malformed
    nums = NUMBER.findall(text)
    return nums[-1].replace(",", "") if nums else None


def is_correct(reply, answer, tol=1e-6):
    """Rule verifier: numeric equality within tol * max(1, |answer|) when the answer is a number (a GSM8K answer
    may still hold its '#### n' line), else exact match ignoring case, spaces and a final period."""
    gold = extract_answer(answer) if "####" in answer else answer.strip().replace(",", "")
    try:
        g = float(gold)
    except (TypeError, ValueError):
        return " ".join(reply.lower().split()).rstrip(".。") == " ".join(answer.lower().split()).rstrip(".。")
    pred = extract_answer(reply)
    return pred is not None and abs(float(pred) - g) <= tol * max(1.0, abs(g))


# -- files ----------------------------------------------------------------------------------------------------
def read_jsonl(path, kind=None, log=print, max_shown=20, strict=False, stats=None):
    """All valid records of a jsonl file, normalized (parse_record; kind=None guesses it from the first object).
    Bad lines are logged as `path:line: what` (the first max_shown) and skipped, or with strict=True raise
    DataError at the first one. A dict given as stats gets {"used": n, "skipped": m}."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    records, bad = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise DataError(f"invalid UTF-8 at byte {e.start} of the line") from None
                except json.JSONDecodeError as e:
                    raise DataError(f"invalid JSON ({e.msg} at column {e.colno})") from None
                kind = kind or detect_kind(obj)
                if kind is None:
                    raise DataError(f"cannot tell what kind of record this is (keys: {', '.join(obj)})")
                records.append(parse_record(obj, kind))
            except DataError as e:
                if strict:
                    raise DataError(f"{path}:{lineno}: {e}") from None
                bad.append(f"{path}:{lineno}: {e}")
    for line in bad[:max_shown]:
        log(line)
    if len(bad) > max_shown:
        log(f"{path}: ... and {len(bad) - max_shown} more bad lines")
    if stats is not None:
        stats.update(used=len(records), skipped=len(bad))
    if not records:
        raise DataError(f"{path}: no usable records ({len(bad)} bad lines)")
    log(f"{path}: {len(records)} {kind} records used, {len(bad)} lines skipped")
    return records


def doc_text(src, max_doc_mb):
    """(text, None) for a usable RAG document (a file's path, or a jsonl text's bytes), else (None, why not)."""
    size = os.path.getsize(src) if isinstance(src, str) else len(src)
    if size > max_doc_mb * 2**20:
        return None, f"{size / 2**20:.1f} MB, more than --max_doc_mb={max_doc_mb:g}; split it or raise it"
    if isinstance(src, str):
        with open(src, "rb") as f:
            src = f.read()
    if b"\x00" in src:
        return None, "binary (it contains NUL bytes), skipped"
    try:
        text = src.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, (f"not UTF-8 text (invalid byte 0x{src[e.start]:02x} at offset {e.start}), skipped; "
                      "convert it to UTF-8")
    return (text, None) if text.strip() else (None, "empty, skipped")


def read_rag_docs(path, log=print, max_doc_mb=64.0, stats=None):
    """RAG documents [{"id", "text"}] from a folder of .txt/.md files (searched recursively; id: the path inside
    it), one such file, or a jsonl of {"id", "text"}. Empty, binary, non-UTF-8 and oversized documents are
    logged and skipped; a dict given as stats gets {"used": n, "skipped": m}."""
    counts = {"skipped": 0}
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if f.endswith(DOC_EXTENSIONS))
        if not files:
            raise DataError(f"{path}: no .txt or .md documents in this folder")
        items = [(os.path.relpath(f, path).replace(os.sep, "/"), f) for f in files]
    elif os.path.isfile(path) and path.endswith(DOC_EXTENSIONS):
        items = [(os.path.basename(path), path)]
    elif os.path.isfile(path):  # read_jsonl reports the bad lines
        items = [(r["id"], r["text"].encode("utf-8")) for r in read_jsonl(path, "docs", log=log, stats=counts)]
    else:
        raise DataError(f"{path}: no such file or folder (give a folder of .txt/.md files or a jsonl of {{id, text}})")
    docs, skipped = {}, counts["skipped"]
    for doc_id, src in items:
        text, problem = doc_text(src, max_doc_mb)
        if problem:
            log(f"{doc_id}: {problem}")
            skipped += 1
        elif doc_id in docs:
            raise DataError(f"{path}: document id {doc_id!r} appears twice; ids must be unique")
        else:
            docs[doc_id] = text
    if not docs:
        raise DataError(f"{path}: no usable documents ({skipped} skipped; want .txt/.md files or jsonl {{id, text}})")
    log(f"{path}: {len(docs)} documents used, {skipped} skipped")
    if stats is not None:
        stats.update(used=len(docs), skipped=skipped)
    return [{"id": k, "text": v} for k, v in docs.items()]


# -- the grounded prompt: rag.py asks with it, demo_world.py writes its retrieval chats with it ---------------
RAG_PROMPT = {
    "en": "Answer the question using only the sources below, and cite the source you used as [n].\n"
          "{sources}\nQuestion: {question}",
    "zh": "请只根据下面的资料回答问题，并用[n]注明所用的资料。\n{sources}\n问题：{question}",
}
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def numbered(n, text):
    """Source n as a prompt lists it: "[n]" before it and after each of its sentences. An answer copies a source's
    sentence, so it copies the citation with it: a small model copies well, but does not learn to find a number
    that stands up to ~50 tokens before the sentence (docs/benchmarks.md, "Reading from sources")."""
    text = re.sub(r"(?<=[。！？])", f"[{n}]", re.sub(r"(?<=[.!?])(?= |$)", f" [{n}]", " ".join(text.split())))
    return f"[{n}] {text}" + ("" if text.endswith(f"[{n}]") else f" [{n}]")


def rag_prompt(question, sources):
    """The user message that asks question from the texts sources, in the question's language."""
    listed = "\n".join(numbered(n, text) for n, text in enumerate(sources, 1))
    return RAG_PROMPT["zh" if CJK.search(question) else "en"].format(sources=listed, question=question)


# -- pretraining data dirs (written by `prepare_data.py pretrain`) ---------------------------------------------
def load_meta(data_dir):
    """meta.json of a pretraining data dir, after checking train.bin/val.bin match it."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{data_dir}: no meta.json; make it with `python prepare_data.py pretrain "
                        f"--out_dir={data_dir} ...` (or `python prepare_data.py demo`)")
    with open(path) as f:
        meta = json.load(f)
    for split in ("train", "val"):
        fn = os.path.join(data_dir, f"{split}.bin")
        want = meta[f"{split}_tokens"] * np.dtype(meta["dtype"]).itemsize
        got = os.path.getsize(fn) if os.path.isfile(fn) else "missing"
        if got != want:
            raise DataError(f"{fn}: expected {want} bytes from meta.json, found {got}; re-run prepare_data.py pretrain")
    return meta


def open_tokens(data_dir, split, meta=None):
    """The token memmap of one split ("train" or "val"), read-only."""
    meta = meta or load_meta(data_dir)
    return np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"], mode="r")


def check_vocab(meta, vocab_size, tokenizer=None):
    """Raise DataError unless data tokenized as in meta fits a model with vocab_size embeddings (and, given a
    Tokenizer, was tokenized by that same tokenizer)."""
    if meta["vocab_size"] > vocab_size:
        raise DataError(f"the data was tokenized with a {meta['vocab_size']}-token vocabulary ({meta['tokenizer']}) "
                        f"but the model has vocab_size={vocab_size}: set vocab_size={meta['vocab_size']} "
                        f"or re-run prepare_data.py pretrain with the model's tokenizer")
    if tokenizer is not None and meta.get("tokenizer_sha256") not in (None, tokenizer.fingerprint):
        raise DataError(f"the data was tokenized with a different tokenizer than {tokenizer.name} "
                        f"(sha256 {meta['tokenizer_sha256'][:12]} vs {tokenizer.fingerprint[:12]}): "
                        f"re-run prepare_data.py pretrain with this tokenizer, or use the data dir's tokenizer.model")


# -- validation (`prepare_data.py validate`) ------------------------------------------------------------------
def validate(paths, log=print):
    """Check stage jsonl files (kind guessed, or given as path:kind), RAG document folders (given as
    folder:docs) and pretraining dirs (holding meta.json); other folders are searched for those.
    Returns the number of problems found."""
    problems = 0
    for arg in paths:
        path, _, kind = arg.rpartition(":") if ":" in arg and not os.path.exists(arg) else (arg, "", "")
        try:
            if kind == "docs":
                read_rag_docs(path, log=log)
            elif os.path.isfile(os.path.join(path, "meta.json")):
                problems += validate_pretrain_dir(path, log)
            elif os.path.isdir(path):
                entries = [os.path.join(path, e) for e in sorted(os.listdir(path))]
                problems += validate([e for e in entries if e.endswith(".jsonl") or os.path.isdir(e)], log)
            else:
                stats = {}
                read_jsonl(path, kind or None, log=log, stats=stats)
                problems += stats["skipped"]
        except DataError as e:
            log(f"error: {e}")
            problems += 1
    return problems


def validate_pretrain_dir(data_dir, log=print):
    """Sizes match meta.json, every id is inside the vocabulary, one BOS per document, BOS first."""
    meta = load_meta(data_dir)
    problems, bos = 0, meta["bos_id"]
    for split in ("train", "val"):
        toks = open_tokens(data_dir, split, meta)
        n_bos = top = 0
        for k in range(0, len(toks), 1 << 24):  # in blocks: a 10B-token file does not fit in memory
            block = toks[k:k + (1 << 24)]
            n_bos, top = n_bos + int(np.count_nonzero(block == bos)), max(top, int(block.max()))
        docs, first_is_bos = meta[f"{split}_docs"], len(toks) > 0 and toks[0] == bos
        ok = first_is_bos and n_bos == docs and top < meta["vocab_size"]
        log(f"{data_dir}/{split}.bin: {len(toks):,} tokens, {docs:,} documents, max id {top}" + ("" if ok else
            f": PROBLEM: starts with BOS {first_is_bos}, {n_bos} BOS for {docs} documents, "
            f"vocab_size {meta['vocab_size']}"))
        problems += not ok
    return problems
