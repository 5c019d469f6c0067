"""Readers and validators for the data formats every stage shares (see ../shared/DESIGN.md).

    from data_formats import read_jsonl, read_rag_docs, load_meta, check_vocab, DataError
    chats = read_jsonl("data/demo/sft.jsonl", "sft")          # [{"messages": [...]}, ...]
    pairs = read_jsonl("data/demo/pairs.jsonl", "pairs")      # [{"prompt": [...], "chosen": str, "rejected": str}]
    probs = read_jsonl("data/demo/grpo.jsonl", "prompts")     # [{"prompt": [...], "answer": "42"}]; GSM8K too
    qa    = read_jsonl("data/demo/rag/qa.jsonl", "qa")        # [{"question": str, "answer": str, ...}]
    docs  = read_rag_docs("data/demo/rag")                    # [{"id": "docs/x.md", "text": str}]
    meta  = load_meta("data/demo/pretrain"); check_vocab(meta, model_vocab_size, tokenizer)

Check files by hand with `python prepare_data.py validate data/demo` (this module does the work).

A bad line is reported as `file:line: what is wrong` and skipped; the summary line says how many
lines were used and how many skipped, so nothing disappears silently. A file with no usable line,
or a missing file, raises DataError (one line; stages print it and exit). Prompts are normalized
to a list of messages, so stages render every prompt with Tokenizer.render_chat.

Only the standard library and numpy: the stages, common.py and prepare_data.py all import it.
"""
import json
import os

import numpy as np

ROLES = ("system", "user", "assistant")
KINDS = ("sft", "pairs", "prompts", "qa", "docs")


class DataError(ValueError):
    """Bad input data; str(e) is the one line to show the user."""


# -- one record per kind -------------------------------------------------------------------------
def check_messages(messages, what="messages"):
    """Raise DataError unless messages is a non-empty list of {role, content: non-empty str}
    with roles from ROLES and a system message only in first place. Returns a clean copy."""
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


def gsm8k_answer(answer):
    """GSM8K's answer field ends with '#### 1,234': return '1234'."""
    if "####" not in answer:
        raise DataError("GSM8K answer has no '#### <number>' line")
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise DataError("GSM8K answer has nothing after '####'")
    return final


def parse_record(obj, kind):
    """Validate one decoded jsonl object of the given kind and return its normalized form."""
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
    if kind == "prompts":
        if "question" in obj and "prompt" not in obj:  # a GSM8K line
            return {"prompt": [{"role": "user", "content": _text(obj, "question")}],
                    "answer": gsm8k_answer(_text(obj, "answer"))}
        if isinstance(obj.get("answer"), (int, float)) and not isinstance(obj["answer"], bool):
            obj = {**obj, "answer": str(obj["answer"])}  # a bare number is fine too
        return {"prompt": _prompt(obj), "answer": _text(obj, "answer").strip()}
    if kind == "qa":
        return {**obj, "question": _text(obj, "question"), "answer": _text(obj, "answer")}
    if kind == "docs":
        return {"id": _text(obj, "id"), "text": _text(obj, "text")}
    raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")


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
    if "question" in obj:
        return "qa"
    if "text" in obj:
        return "docs"
    return None


# -- files ---------------------------------------------------------------------------------------
def read_jsonl(path, kind=None, log=print, max_shown=20, strict=False, stats=None):
    """All valid records of a jsonl file, normalized (see parse_record). kind=None guesses it
    from the first object. Bad lines are reported as `path:line: what` (the first max_shown) and
    skipped, or raise DataError at the first one with strict=True. Returns a list; a dict given
    as stats gets {"used": n, "skipped": m}."""
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


def read_rag_docs(path, log=print):
    """RAG documents: a folder of .txt/.md files (searched recursively; id = path inside the
    folder) or a jsonl file of {"id", "text"}. Returns [{"id", "text"}] sorted by id."""
    if os.path.isfile(path):
        docs = read_jsonl(path, "docs", log=log)
    elif os.path.isdir(path):
        docs = []
        for root, _, files in os.walk(path):
            for name in files:
                if name.endswith((".txt", ".md")):
                    full = os.path.join(root, name)
                    with open(full, encoding="utf-8", errors="replace") as f:
                        text = f.read()
                    if text.strip():
                        docs.append({"id": os.path.relpath(full, path), "text": text})
                    else:
                        log(f"{full}: empty, skipped")
        if not docs:
            raise DataError(f"{path}: no .txt or .md documents in this folder")
        log(f"{path}: {len(docs)} documents")
    else:
        raise DataError(f"{path}: no such file or folder")
    return sorted(docs, key=lambda d: d["id"])


# -- pretraining data dirs (written by `prepare_data.py pretrain`) --------------------------------
def load_meta(data_dir):
    """meta.json of a pretraining data dir, after checking train.bin/val.bin match it."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{data_dir}: no meta.json; make it with `python prepare_data.py pretrain "
                        f"--out_dir={data_dir} ...` (or `python prepare_data.py demo`)")
    with open(path) as f:
        meta = json.load(f)
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        fn = os.path.join(data_dir, f"{split}.bin")
        want = meta[f"{split}_tokens"] * itemsize
        if not os.path.isfile(fn) or os.path.getsize(fn) != want:
            got = os.path.getsize(fn) if os.path.isfile(fn) else "missing"
            raise DataError(f"{fn}: expected {want} bytes from meta.json, found {got}; re-run prepare_data.py pretrain")
    return meta


def open_tokens(data_dir, split, meta=None):
    """The token memmap of one split ("train" or "val"), read-only."""
    meta = meta or load_meta(data_dir)
    return np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=meta["dtype"], mode="r")


def check_vocab(meta, vocab_size, tokenizer=None):
    """Raise DataError unless data tokenized as in meta fits a model with vocab_size embeddings
    (and, given a Tokenizer, was tokenized by that same tokenizer)."""
    if meta["vocab_size"] > vocab_size:
        raise DataError(f"the data was tokenized with a {meta['vocab_size']}-token vocabulary ({meta['tokenizer']}) "
                        f"but the model has vocab_size={vocab_size}: set vocab_size={meta['vocab_size']} "
                        f"or re-run prepare_data.py pretrain with the model's tokenizer")
    if tokenizer is not None and meta.get("tokenizer_sha256") not in (None, tokenizer.fingerprint):
        raise DataError(f"the data was tokenized with a different tokenizer than {tokenizer.name} "
                        f"(sha256 {meta['tokenizer_sha256'][:12]} vs {tokenizer.fingerprint[:12]}): "
                        f"re-run prepare_data.py pretrain with this tokenizer, or use the data dir's tokenizer.model")
