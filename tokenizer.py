"""Tokenizers: a SentencePiece BPE trained here, or OpenAI's tiktoken BPEs, behind one interface.

    tok = Tokenizer.load("data/demo/pretrain")       # a dir holding tokenizer.model (or <name>.tiktoken)
    tok = Tokenizer.load("tiktoken:gpt2")            # GPT-2 BPE from the local tiktoken cache
    ids, mask = tok.render_chat([{"role": "user", "content": "1+1?"}], add_generation_prompt=True)

Train one with `python prepare_data.py tokenizer --vocab_size=32768 --out=tok/tokenizer.model CORPUS...`:
a Chinese-English BPE with byte fallback (no unknown token: any string survives encode -> decode), identity
normalization and no whitespace cleanup (tabs, runs of spaces, newlines come back as they went in), and
split digits (arithmetic sees every digit). BOS/EOS/PAD and ChatML's <|im_start|>/<|im_end|> are *control*
symbols: they have ids but text never produces them, so a user typing "<|im_start|>" gets ordinary tokens.
Decoding maps every id to its bytes (special ids to none), so decode() and StreamDecoder are exact UTF-8
decodes and a stream never emits half a character. Imports nothing from the project.
"""
import codecs
import hashlib
import io
import itertools
import os
import re
import shutil

SPECIALS = ("<|im_start|>", "<|im_end|>")  # ChatML control symbols; BOS/EOS/PAD/UNK are SentencePiece's own
ROLES = ("system", "user", "assistant")
LOWLINE = "\u2581"  # SentencePiece's visible space; a literal one in text needs care (see _encode)
# A lone UTF-16 surrogate (JSON's "\ud800", undecodable command-line bytes) has no UTF-8 form: encoding
# replaces each with U+FFFD, as decoding does with invalid UTF-8. (serve.py answers them with a 400 instead.)
SURROGATE = re.compile("[\ud800-\udfff]")


def without_surrogates(text):
    return SURROGATE.sub("\ufffd", text)


class Tokenizer:
    """Both backends. A subclass sets vocab_size, bos_id, eos_id, pad_id, im_start_id, im_end_id, path, name
    (what meta.json stores: "tokenizer.model" or "tiktoken:gpt2"), fingerprint (the file's sha256: equal ones
    share token ids) and _bytes (id -> bytes, b"" for special ids), and implements _encode and encode_batch."""

    @classmethod
    def load(cls, path_or_name: str) -> "Tokenizer":
        """A tokenizer.model file, a *.tiktoken file, a dir holding one, or "tiktoken:gpt2" / "tiktoken:cl100k_base"."""
        p = str(path_or_name)
        if p.startswith("tiktoken:"):
            return TiktokenTokenizer.from_name(p[len("tiktoken:"):])
        if os.path.isdir(p):
            tiktokens = [e + ".tiktoken" for e in TIKTOKEN_ENCODINGS]
            found = [f for f in ["tokenizer.model", *tiktokens] if os.path.isfile(os.path.join(p, f))]
            if not found:
                raise FileNotFoundError(f"no tokenizer in {p}: expected tokenizer.model or one of "
                                        + ", ".join(tiktokens))
            p = os.path.join(p, found[0])
        elif not os.path.isfile(p):
            raise FileNotFoundError(f"tokenizer not found: {p} (give a tokenizer.model, a dir holding one, "
                                    "or tiktoken:gpt2 / tiktoken:cl100k_base)")
        return TiktokenTokenizer(p) if p.endswith(".tiktoken") else SentencePieceTokenizer(p)

    def encode(self, text: str, bos=False, eos=False) -> list[int]:
        """Plain text to ids; never a special id, whatever the text says; a lone surrogate reads as U+FFFD."""
        if not isinstance(text, str):
            raise TypeError(f"encode() wants a str, got {type(text).__name__}")
        return [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos

    def token_bytes(self, i: int) -> bytes:
        """The bytes of token i; b"" for special ids and ids past the vocabulary (a padded embedding samples those)."""
        return self._bytes[i] if 0 <= i < len(self._bytes) else b""

    def decode(self, ids) -> str:
        """Ids to text, special ids dropped. Invalid UTF-8 (a cut-off character) becomes U+FFFD."""
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def render_chat(self, messages, add_generation_prompt=False) -> tuple[list[int], list[int]]:
        """ChatML: BOS, then <|im_start|>{role}\\n{content}<|im_end|>\\n per message. Returns (ids, mask): mask is 1
        exactly on assistant contents and their closing <|im_end|> (the model must learn to stop). Content is
        encoded apart from its header, exactly as the model generates it after the generation prompt."""
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
        ids, mask = [self.bos_id], [0]
        newline = self._encode("\n")
        for n, m in enumerate(messages, 1):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {n}: must be a dict with 'role' and 'content', got {m!r:.80}")
            role, content = m["role"], m["content"]
            if role not in ROLES:
                raise ValueError(f"message {n}: role {role!r} is not one of {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise ValueError(f"message {n} ({role}): content must be a string, got {type(content).__name__}")
            head, body = [self.im_start_id] + self._encode(role + "\n"), self._encode(content)
            ids += head + body + [self.im_end_id] + newline
            mask += [0] * len(head) + [int(role == "assistant")] * (len(body) + 1) + [0] * len(newline)
        if add_generation_prompt:
            head = [self.im_start_id] + self._encode("assistant\n")
            ids, mask = ids + head, mask + [0] * len(head)
        return ids, mask

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generated reply."""
        return (self.im_end_id, self.eos_id)

    def save(self, out_dir):
        """Copy the model file into out_dir (atomically), so the dir is self-contained and offline."""
        os.makedirs(out_dir, exist_ok=True)
        dst = os.path.join(out_dir, self._file_name)
        if os.path.abspath(dst) != os.path.abspath(self.path):
            shutil.copyfile(self.path, dst + ".tmp")
            os.replace(dst + ".tmp", dst)

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} vocab_size={self.vocab_size}>"

    def __reduce__(self):  # pickle as "load this file again" (multiprocessing workers)
        return type(self), (self.path,)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path):
        import sentencepiece as spm
        with open(path, "rb") as f:
            proto = f.read()
        self.path, self._file_name, self.name = path, "tokenizer.model", "tokenizer.model"
        self.fingerprint = hashlib.sha256(proto).hexdigest()
        self.sp = sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = sp.bos_id(), sp.eos_id(), sp.pad_id()
        self.im_start_id, self.im_end_id = (sp.piece_to_id(s) for s in SPECIALS)
        for what, i in zip(("BOS", "EOS", "PAD", *SPECIALS), (self.bos_id, self.eos_id, self.pad_id,
                                                              self.im_start_id, self.im_end_id)):
            if i < 0 or not sp.is_control(i):
                raise ValueError(f"{path}: {what} is not a control symbol; train it with train_tokenizer()")
        self._bytes = []
        for i, piece in enumerate(map(sp.id_to_piece, range(self.vocab_size))):
            self._bytes.append(bytes([int(piece[3:5], 16)]) if sp.is_byte(i) else  # "<0xE4>" -> b"\xe4"
                               b"" if sp.is_control(i) or sp.is_unknown(i) else piece.replace(LOWLINE, " ").encode())
        byte_ids = {self._bytes[i][0]: i for i in range(self.vocab_size) if sp.is_byte(i)}
        if len(byte_ids) != 256:
            raise ValueError(f"{path}: not trained with byte_fallback; train it with train_tokenizer()")
        self._lowline = [byte_ids[b] for b in LOWLINE.encode("utf-8")]

    def _encode(self, text):
        # SentencePiece writes spaces as U+2581: a literal one goes in as its three UTF-8 byte tokens (rare)
        text = without_surrogates(text)
        if LOWLINE not in text:
            return self.sp.encode(text)
        ids = []
        for k, part in enumerate(text.split(LOWLINE)):
            ids += (self._lowline if k else []) + (self.sp.encode(part) if part else [])
        return ids

    def encode_batch(self, texts, num_threads=None):
        # one C++ call for the whole batch (num_threads=1 inside multiprocessing workers)
        texts = [without_surrogates(t) for t in texts]
        out = self.sp.encode(texts, num_threads=num_threads or -1)
        return [self._encode(t) if LOWLINE in t else ids for t, ids in zip(texts, out)]


# tiktoken: (BPE file, split regex, special ids) per encoding; OpenAI's own ids where it has them, BOS = EOS =
# <|endoftext|> as in GPT-2. Never downloaded: the file must be in tiktoken's cache or given as a path.
_R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
               r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
_BLOB = "https://openaipublic.blob.core.windows.net/encodings/"
TIKTOKEN_ENCODINGS = {
    "gpt2": (_BLOB + "r50k_base.tiktoken", _R50K_PAT,
             {"<|endoftext|>": 50256, "<|im_start|>": 50257, "<|im_end|>": 50258, "<|pad|>": 50259}),
    "cl100k_base": (_BLOB + "cl100k_base.tiktoken", _CL100K_PAT,
                    {"<|endoftext|>": 100257, "<|im_start|>": 100264, "<|im_end|>": 100265, "<|pad|>": 100266}),
}


def tiktoken_cache_path(url):
    """Where tiktoken caches the file at url (same rule as tiktoken.load.read_file_cached)."""
    import tempfile
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") \
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())


class TiktokenTokenizer(Tokenizer):
    @classmethod
    def from_name(cls, enc):
        if enc not in TIKTOKEN_ENCODINGS:
            raise ValueError(f"unknown tiktoken encoding {enc!r}; known: {', '.join(TIKTOKEN_ENCODINGS)}")
        url = TIKTOKEN_ENCODINGS[enc][0]
        cached = tiktoken_cache_path(url)
        if not os.path.isfile(cached):
            raise FileNotFoundError(f"tiktoken:{enc} needs its BPE file and we are offline: download {url} and pass "
                                    f"its path (named {enc}.tiktoken), or put it at {cached} (tiktoken's cache; "
                                    "set TIKTOKEN_CACHE_DIR to move it)")
        return cls(cached, enc)

    def __init__(self, path, enc=None):
        import base64
        import tiktoken
        enc = enc or os.path.basename(path)[:-len(".tiktoken")]
        if enc not in TIKTOKEN_ENCODINGS:
            raise ValueError(f"{path}: name the file after its encoding ({', '.join(TIKTOKEN_ENCODINGS)}).tiktoken")
        with open(path, "rb") as f:
            data = f.read()
        # the .tiktoken format: one "<base64 token bytes> <rank>" per line; the rank is the id
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (ln.split() for ln in data.splitlines() if ln)}
        _, pattern, specials = TIKTOKEN_ENCODINGS[enc]
        if max(ranks.values()) >= min(specials.values()):
            raise ValueError(f"{path}: has ids up to {max(ranks.values())}, too many for a {enc} file")
        self.path, self._file_name, self.name = path, enc + ".tiktoken", "tiktoken:" + enc
        self.fingerprint = hashlib.sha256(data).hexdigest()
        self.enc = tiktoken.Encoding(enc, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        self.vocab_size = max(specials.values()) + 1
        self.bos_id = self.eos_id = specials["<|endoftext|>"]
        self.pad_id, self.im_start_id, self.im_end_id = (specials[s] for s in ("<|pad|>", *SPECIALS))
        self._bytes = [b""] * self.vocab_size  # ids not in ranks (gaps, specials) decode to nothing
        for tok, rank in ranks.items():
            self._bytes[rank] = tok

    def __reduce__(self):
        return type(self), (self.path, self.name[len("tiktoken:"):])

    def _encode(self, text):
        return self.enc.encode_ordinary(without_surrogates(text))  # "ordinary": special-token text is plain

    def encode_batch(self, texts, num_threads=None):
        texts = [without_surrogates(t) for t in texts]
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads or 8)


class StreamDecoder:
    """Incremental decode for streaming: push(id) returns only complete characters (a character that
    fell back to three byte tokens comes out on the third). "".join(pushes) + flush() == tok.decode(ids)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id) -> str:
        return self._utf8.decode(self.tok.token_bytes(int(token_id)))

    def flush(self) -> str:
        """End of stream: whatever is left (an incomplete character becomes U+FFFD). Resets."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


# -- training ------------------------------------------------------------------------------------
def _sentences(texts, max_chars=1000):
    """SentencePiece 'sentences': texts cut into pieces of at most max_chars, not single lines, since
    SentencePiece strips a sentence's trailing newline and "\n" would never get a token of its own."""
    for text in texts:
        text = text.replace(LOWLINE, " ")
        for k in range(0, len(text), max_chars):
            yield text[k:k + max_chars]


def _read_files(files, block=1 << 20):
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            while block_text := f.read(block):
                yield block_text


def train_tokenizer(texts_or_files, vocab_size, out_path, max_sentences=500_000, character_coverage=0.9995,
                    seed=0) -> Tokenizer:
    """Train the BPE described at the top of this file on a path, a list of paths of UTF-8 text files, or
    any iterable of strings, and write out_path. SentencePiece keeps a uniform sample (reservoir) of
    max_sentences 1000-character pieces, so memory stays bounded (~max_sentences KB) on a big corpus."""
    import sentencepiece as spm
    it = iter([texts_or_files] if isinstance(texts_or_files, (str, os.PathLike)) else texts_or_files)
    first = next(it, None)
    if first is None:
        raise ValueError("train_tokenizer: no text given")
    items = itertools.chain([first], it)
    if isinstance(first, os.PathLike) or (isinstance(first, str) and "\n" not in first and os.path.isfile(first)):
        items = _read_files(items)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(items), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, character_coverage=character_coverage,
        byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_by_whitespace=True, split_by_unicode_script=True, allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16, max_sentence_length=8192,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, control_symbols=list(SPECIALS),
        num_threads=os.cpu_count(), minloglevel=2)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path + ".tmp", "wb") as f:
        f.write(model.getvalue())
    os.replace(out_path + ".tmp", out_path)
    return SentencePieceTokenizer(out_path)
