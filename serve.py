"""Serve a checkpoint over HTTP: an OpenAI-compatible API (streaming too) and a web chat page (chat.html).

    python serve.py --out_dir=out/sft                       # http://127.0.0.1:8000, chat page at /
    python serve.py --out_dir=out/sft --host=0.0.0.0 --port=8080 --api_key=secret --max_batch=16
    python serve.py --out_dir=out/sft --rag_index=out/rag --rag_k=3   # chat answers grounded in an index

POST /v1/chat/completions and /v1/completions, GET /v1/models, /health and / (the page); fields, limits and
errors: docs/serving.md. Standard library only. Continuous batching: one worker thread owns the model and a
KV cache of max_batch rows; before each decode step it prefills waiting requests into free rows, and every
row samples with its request's own torch.Generator, so a seeded answer does not depend on its neighbours.
"""
import collections
import hmac
import json
import os
import queue
import selectors
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch

from common import die, load_model
from configurator import configure
from data_formats import DataError
from model import sample_next
from rag import Retriever, grounded_prompt, source_list
from tokenizer import StreamDecoder

# -- config (python serve.py --key=value) ------------------------------------------------------------
out_dir = "out/sft"          # the run to serve: ckpt.pt + tokenizer + config.json
host = "127.0.0.1"           # loopback only; --host=0.0.0.0 exposes the server to the network
port = 8000                  # 0 picks a free port (printed at startup)
api_key = ""                 # when set, /v1/* needs "Authorization: Bearer <api_key>"
model_name = ""              # the model id the API reports; default: the out_dir's folder name
device = "auto"              # auto (cuda if available), cpu, cuda, cuda:1, mps
dtype = "float32"            # float32 or bfloat16 weights and KV cache
threads = 0                  # model CPU threads (0: one per core); 1 is much faster on a CPU shared with other jobs
max_batch = 8                # KV-cache rows decoded together; a request with n choices takes n rows
max_queue = 32               # requests waiting for a row; one more gets 429 + Retry-After
max_body_bytes = 1_000_000   # larger request bodies get 413
max_prompt_tokens = 0        # longer prompts get 400; 0 means the model's context (max_seq_len) - 1
max_tokens_limit = 1024      # the largest max_tokens a request may ask for
default_max_tokens = 256     # max_tokens when a request gives none (capped by what is left of the context)
timeout = 60                 # seconds a socket may sit idle (slow or stuck clients) before we hang up
rag_index = ""               # a rag.py index dir: ground chat answers in its chunks and return them as sources
rag_k = 3                    # chunks retrieved per chat request (fewer go into the prompt if they do not fit)

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
KINDS = {bool: (bool, "true or false"), str: (str, "a string"), dict: (dict, "an object"),
         int: (int, "an integer"), float: ((int, float), "a number")}


def chat_prompt(tok, messages):
    """Messages -> ChatML prompt ids. Text is encoded as plain text: typing <|im_start|> never gives the control id."""
    return tok.render_chat(messages, add_generation_prompt=True)[0]


# -- the model worker --------------------------------------------------------------------------------
class Request:
    """One API request. The worker puts ("delta", choice, text), ("done", choice, finish_reason, n_tokens) or
    ("error", message) on `events`; the HTTP thread sets `cancelled` when its client has gone."""

    def __init__(self, prompt, max_tokens, temperature=1.0, top_p=1.0, top_k=0, stop=(), seed=None, n=1,
                 ignore_eos=False, sources=None):
        self.prompt, self.max_tokens, self.n, self.sources = prompt, max_tokens, n, sources
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.stop, self.seed, self.ignore_eos = tuple(stop), seed, ignore_eos
        self.events = queue.Queue()
        self.cancelled = threading.Event()


class Choice:
    """One completion of a request, generated in one cache row."""

    def __init__(self, req, index, tok, device):
        self.req, self.index = req, index
        self.decoder = StreamDecoder(tok)   # ids -> text, never half a character
        self.text, self.sent, self.tokens = "", 0, 0
        self.generator = None
        if req.temperature > 0:
            self.generator = torch.Generator(device=device)
            if req.seed is None:
                self.generator.seed()      # a fresh random seed
            else:                          # choice i of a seeded request: seed + i
                self.generator.manual_seed((req.seed + index) % 2**64)

    def add(self, token, stop_ids):
        """Take one sampled token, send the text that can no longer change; True when this choice is done."""
        self.tokens += 1
        finish = "stop" if token in stop_ids else None
        if not finish:
            self.text += self.decoder.push(token)
        if finish or self.tokens >= self.req.max_tokens:
            self.text += self.decoder.flush()
            finish = finish or "length"
        hold = 0
        for s in self.req.stop:            # cut at a stop string (it is not part of the answer)
            i = self.text.find(s, self.sent)
            if i >= 0:
                self.text, finish = self.text[:i], "stop"
        if not finish:                     # hold back a tail that may still grow into a stop string
            hold = max([k for s in self.req.stop for k in range(1, len(s)) if self.text.endswith(s[:k])],
                       default=0)
        end = len(self.text) - hold
        if end > self.sent:
            self.req.events.put(("delta", self.index, self.text[self.sent:end]))
            self.sent = end
        if finish:
            self.req.events.put(("done", self.index, finish, self.tokens))
        return finish is not None


class Engine:
    """The model worker: continuous batching over a fixed number of KV-cache rows."""

    def __init__(self, model, tok, max_batch=8, max_queue=32):
        self.model, self.tok = model.eval(), tok
        self.device = model.tok_embeddings.weight.device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.cache = model.new_cache(max_batch)
        self.logits = torch.zeros(max_batch, model.cfg.vocab_size, device=self.device)
        self.rows = [None] * max_batch           # row -> the Choice decoding there, or None (free)
        self.pending = collections.deque()       # requests waiting for rows, first come first served
        self.cond = threading.Condition()
        self.stop_ids = set(tok.stop_ids)        # <|im_end|> and EOS end an answer
        self.stats = collections.Counter(requests=0, tokens=0, cancelled=0, peak_active=0)  # for /health
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self.thread.start()

    def submit(self, req):
        """Queue a request; False when the queue is full."""
        with self.cond:
            if len(self.pending) >= self.max_queue:
                return False
            self.pending.append(req)
            self.stats["requests"] += 1
            self.cond.notify()
            return True

    def close(self):
        with self.cond:
            self.running = False
            self.cond.notify()
        self.thread.join()

    def load(self):
        """(active rows, queued requests)."""
        return sum(c is not None for c in self.rows), len(self.pending)

    def _loop(self):
        with torch.inference_mode():
            while True:
                with self.cond:
                    while self.running and not self.pending and self.load()[0] == 0:
                        self.cond.wait()
                    if not self.running:
                        return
                    new_rows = self._admit()
                try:
                    if new_rows:
                        self._prefill(new_rows)
                    self._step()
                except Exception as e:  # keep serving: fail the requests in flight, not the server
                    traceback.print_exc()
                    for r, c in enumerate(self.rows):
                        if c is not None:
                            c.req.events.put(("error", f"model worker error: {type(e).__name__}: {e}"))
                            self.rows[r] = None
                    self.cache.reset(torch.arange(self.max_batch, device=self.device))

    def _admit(self):
        """Move waiting requests into free rows (in arrival order; a request needs a row per choice)."""
        free = [r for r, c in enumerate(self.rows) if c is None]
        new_rows = []
        while self.pending and self.pending[0].n <= len(free):
            req = self.pending.popleft()
            if req.cancelled.is_set():   # its client left while it waited
                continue
            for i in range(req.n):
                r = free.pop(0)          # lowest free row first: keeps the active rows packed low
                self.rows[r] = Choice(req, i, self.tok, self.device)
                new_rows.append(r)
        self.stats["peak_active"] = max(self.stats["peak_active"], self.load()[0])
        return new_rows

    def _prefill(self, new_rows):
        """Run the new prompts (right-padded, one per row) into their rows in one forward."""
        prompts = [self.rows[r].req.prompt for r in new_rows]
        idx = torch.nn.utils.rnn.pad_sequence([torch.tensor(p) for p in prompts], batch_first=True)
        rows = torch.tensor(new_rows, device=self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        self.cache.reset(rows)
        self.logits[rows] = self.model.forward_cached(idx.to(self.device), self.cache, rows=rows, lengths=lengths)

    def _step(self):
        """Sample one token for every active row, then one forward for all rows that go on."""
        greedy = self.logits.argmax(dim=-1).tolist()
        next_tokens = [0] * self.max_batch
        for r, c in enumerate(self.rows):
            if c is None:
                continue
            req = c.req
            if req.cancelled.is_set():  # its client left
                self.rows[r] = None
                self.stats["cancelled"] += 1
                continue
            if req.temperature == 0:
                t = greedy[r]
            else:  # one row at a time, with this request's own generator
                t = int(sample_next(self.logits[r:r + 1], req.temperature, req.top_k or None, req.top_p, c.generator))
            next_tokens[r] = t
            self.stats["tokens"] += 1
            if c.add(t, () if req.ignore_eos else self.stop_ids):
                self.rows[r] = None
        live = [r for r, c in enumerate(self.rows) if c is not None]
        if not live:
            return
        # Decode rows 0..hi-1 only (the active rows are packed low). A free row in that range decodes a
        # throwaway token from position 0: cheaper than gathering the active rows out of the cache.
        hi = live[-1] + 1
        idle = [r for r in range(hi) if self.rows[r] is None]
        if idle:
            self.cache.reset(torch.tensor(idle, device=self.device))
        tokens = torch.tensor(next_tokens[:hi], device=self.device)[:, None]
        rows = None if hi == self.max_batch else torch.arange(hi, device=self.device)
        self.logits[:hi] = self.model.forward_cached(tokens, self.cache, rows=rows)


# -- request validation ------------------------------------------------------------------------------
class ApiError(Exception):
    """An error reply in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error", headers=()):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, dict(headers)
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


def field(body, key, kind, default=None, lo=None, hi=None):
    """body[key] of the given kind, or default when absent or null; a number must lie in [lo, hi]
    ((lo, hi] for top_p: top_p = 0 would keep no token)."""
    v = body.get(key)
    if v is None:
        return default
    types, name = KINDS[kind]
    if not isinstance(v, types) or isinstance(v, bool) != (kind is bool):  # JSON true is not the number 1
        raise ApiError(400, f"'{key}' must be {name}, got {json.dumps(v)[:40]}", key, "invalid_type")
    if lo is not None and not (lo < v <= hi if key == "top_p" else lo <= v <= hi):
        raise ApiError(400, f"'{key}' must be {name} in {'(' if key == 'top_p' else '['}{lo}, {hi}], got {v}",
                       key, "invalid_value")
    return v


def chat_messages(msgs):
    """The request's messages as [{role, content}] with string contents (OpenAI's text parts joined)."""
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", where)
        if not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {', '.join(ROLES)}", f"{where}.role")
        text = m.get("content")
        if isinstance(text, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                          and isinstance(p.get("text"), str) for p in text):
            text = "".join(p["text"] for p in text)
        if not isinstance(text, str):
            raise ApiError(400, f"'{where}.content' must be a string or an array of "
                                f"{{\"type\": \"text\", \"text\": string}} parts", f"{where}.content")
        out.append({"role": ROLES[m["role"]], "content": text})
    return out


def parse_request(body, chat, tok, limits, rag=None):
    """Check an API request body; return (Request, stream, include_usage) or raise ApiError(400).
    rag: (Retriever, k) when chat answers are grounded in an index."""
    # typed fields: (kind, default, lo, hi); top_k and ignore_eos are vLLM's, "rag": false skips retrieval
    spec = {"model": (str,), "user": (str,), "stream": (bool, False), "stream_options": (dict, {}),
            "ignore_eos": (bool, False), "rag": (bool,), "temperature": (float, 1.0, 0, 2),
            "top_p": (float, 1.0, 0, 1), "top_k": (int, 0, 0, 1_000_000), "seed": (int, None, -2**63, 2**63 - 1),
            "n": (int, 1, 1, limits["max_n"]), "max_tokens": (int, None, 1, limits["max_tokens_limit"]),
            "max_completion_tokens": (int, None, 1, limits["max_tokens_limit"])}
    allowed = set(spec) | {"stop", "messages", "prompt"}
    allowed -= {"prompt"} if chat else {"messages", "max_completion_tokens", "rag"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]} (supported: "
                            f"{', '.join(sorted(allowed))})", unknown[0], "unknown_parameter")
    v = {k: field(body, k, *s) for k, s in spec.items()}
    key = "max_completion_tokens" if v["max_completion_tokens"] is not None else "max_tokens"
    ctx, max_prompt, max_tokens, sources = limits["context"], limits["max_prompt_tokens"], v[key], None
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or an array of up to 4 of them", "stop")
    if not chat:
        name, text = "prompt", body.get("prompt")
        if isinstance(text, list) and len(text) == 1:  # the OpenAI SDK may send ["text"]
            text = text[0]
        if not isinstance(text, str):
            raise ApiError(400, "'prompt' must be a string", "prompt", "invalid_type")
        prompt = tok.encode(text, bos=True)  # BOS + the text, the way every pretraining document starts
    else:
        name, messages = "messages", chat_messages(body.get("messages"))
        if v["rag"] and rag is None:
            raise ApiError(400, "'rag' is true but this server has no index (start it with --rag_index=DIR)",
                           "rag", "invalid_value")
        if rag is not None and v["rag"] is not False:
            # The last user message is the query. As in `rag.py ask`, its sources get what max_tokens leaves of
            # the context (no max_tokens: the default, at most half the context), the lowest-ranked dropped first.
            retriever, k = rag
            reserve = max_tokens or min(limits["default_max_tokens"], ctx // 2)
            question = messages[-1]["content"] if messages[-1]["role"] == "user" else ""
            hits = retriever.search([question], k)[0] if question.strip() else []
            prompt, used = grounded_prompt(tok, messages, hits, min(max_prompt, ctx - reserve))
            sources = source_list(used)
        else:
            prompt = chat_prompt(tok, messages)
    if len(prompt) > max_prompt:
        raise ApiError(400, f"'{name}' is {len(prompt)} tokens long; this server accepts at most {max_prompt} "
                            f"prompt tokens", name, "context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(limits["default_max_tokens"], ctx - len(prompt))
    elif len(prompt) + max_tokens > ctx:
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the {name}, {max_tokens} in "
                            f"the completion). Please reduce the length of the {name} or '{key}'.", key,
                       "context_length_exceeded")
    req = Request(prompt, max_tokens, temperature=v["temperature"], top_p=v["top_p"], top_k=v["top_k"], stop=stop,
                  seed=v["seed"], n=v["n"], ignore_eos=v["ignore_eos"], sources=sources)
    return req, v["stream"], field(v["stream_options"], "include_usage", bool, False)


# -- HTTP ----------------------------------------------------------------------------------------------
class ClientGone(OSError):
    """The client closed the connection, or stopped reading or sending (socket timeout)."""


def sse(obj):
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive for JSON replies; a stream ends by closing the connection
    server_version = "AstrAI-nano"
    ROUTES = {("GET", "/"): "_page", ("GET", "/health"): "_health", ("GET", "/v1/models"): "_models",
              ("POST", "/v1/chat/completions"): "_generate", ("POST", "/v1/completions"): "_generate"}

    def setup(self):
        self.timeout = self.server.app["timeout"]   # socket timeout: reads and writes of stuck clients fail
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # tokens leave at once

    def do_GET(self):
        """The one dispatcher (for every method), and the one place where an error becomes a reply."""
        self.route, self.body_read, self.streaming = urlsplit(self.path).path, False, False
        try:
            name = self.ROUTES.get((self.command, self.route))
            allowed = [m for m, p in self.ROUTES if p == self.route]
            if name is None and allowed:
                raise ApiError(405, f"Method {self.command} is not allowed on {self.route}; use {allowed[0]}",
                               headers={"Allow": allowed[0]})
            if name is None:
                raise ApiError(404, f"Invalid URL ({self.command} {self.route})", code="unknown_url")
            if self.route.startswith("/v1/"):
                self._check_key()
            getattr(self, name)()
            self._discard_body()  # a GET that came with a body must not garble the next request
        except ClientGone:
            self.close_connection = True
        except ApiError as e:
            self._fail(e)
        except Exception as e:  # a bug must not take the server down: tell the client what happened
            traceback.print_exc()
            self._fail(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def parse_request(self):
        # An HTTP/0.9 request line ("GET /") has no headers after it, but the standard library waits
        # for them until the idle timeout: answer at once instead.
        if len(self.raw_requestline.split()) == 2:
            self.requestline = self.raw_requestline.decode("latin-1").rstrip("\r\n")
            self.request_version = "HTTP/0.9"
            self.send_error(400, "HTTP/0.9 requests are not supported; send HTTP/1.1")
            return False
        return super().parse_request()

    def send_error(self, code, message=None, explain=None):
        """The standard library's own errors (bad request line or header, 414, 431) as OpenAI error objects."""
        if self.request_version == "HTTP/0.9":  # the default until a request line parses: it would send no
            self.request_version = "HTTP/1.0"   # status line and headers
        self.body_read, self.streaming = True, False
        self._fail(ApiError(code, message or "bad request"))

    def _fail(self, e):
        """An error as a JSON reply, or as one event once a stream has begun. The body of a failed request
        may be unread, so the connection ends here."""
        self.close_connection = True
        try:
            if self.streaming:
                self._write(sse(e.body))
            else:
                self._write(e.body, e.status, {**e.headers, "Connection": "close"})
                self._discard_body()
        except OSError:
            pass

    def _write(self, data, status=None, headers=()):
        """Send bytes, or a dict as JSON; a status line and headers first when status is given.
        Raises ClientGone when the client is not there to read it."""
        if isinstance(data, dict):
            data = json.dumps(data, ensure_ascii=False).encode()
            headers = {"Content-Type": "application/json", "Content-Length": len(data), **dict(headers)}
        try:
            if status:
                self.send_response(status)
                for k, v in dict(headers).items():
                    self.send_header(k, v)
                self.end_headers()
            self.wfile.write(data)
        except OSError:  # broken pipe, reset, timeout
            raise ClientGone

    def _content_length(self):
        """The body's length, or None when it has no usable Content-Length (chunked or malformed)."""
        n = self.headers.get("Content-Length", "0").strip()
        return None if self.headers.get("Transfer-Encoding") or not n.isdecimal() else int(n)

    def _discard_body(self):
        """Read and drop an unread body (up to 4x the limit): closing a socket with unread input makes the
        kernel send a reset, and the client may then lose the reply just sent."""
        left = 0 if self.body_read else self._content_length() or 0
        left = min(left, 4 * self.server.app["max_body_bytes"])
        while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
            left -= len(chunk)

    def _read_json(self):
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "send the body with a Content-Length header (chunked bodies are not supported)")
        length, limit = self._content_length(), self.server.app["max_body_bytes"]
        if length is None:
            raise ApiError(400, "bad Content-Length header")
        if length > limit:
            raise ApiError(413, f"request body is {length} bytes; the limit is {limit}", code="request_too_large")
        try:
            body = self.rfile.read(length)
        except OSError:  # the client stopped sending (timeout) or went away
            raise ClientGone
        self.body_read = True
        try:
            obj = json.loads(body)
            json.dumps(obj, ensure_ascii=False).encode()  # a lone surrogate ("\ud800") is not text: fails here
        except (ValueError, RecursionError) as e:  # (Unicode errors are ValueErrors)
            raise ApiError(400, f"the body must be a JSON object of valid Unicode, not too deeply nested: {e}")
        if not isinstance(obj, dict):
            raise ApiError(400, "the body must be a JSON object")
        return obj

    def _check_key(self):
        key = self.server.app["api_key"]
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 7235); compare_digest: no timing hints about the key
        if key and (scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode())):
            raise ApiError(401, "Incorrect API key provided. Send 'Authorization: Bearer <api_key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _page(self):
        with open(PAGE, "rb") as f:
            data = f.read()
        self._write(data, 200, {"Content-Type": "text/html; charset=utf-8", "Content-Length": len(data),
                                "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                                           "style-src 'unsafe-inline'; connect-src 'self'",
                                "X-Content-Type-Options": "nosniff"})

    def _health(self):
        app, engine = self.server.app, self.server.engine
        active, queued = engine.load()
        self._write({"status": "ok", "model": app["model"], "context": app["limits"]["context"],
                     "slots": engine.max_batch, "active": active, "queued": queued,
                     "api_key_required": bool(app["api_key"]), **engine.stats}, 200)

    def _models(self):
        app = self.server.app
        self._write({"object": "list", "data": [{"id": app["model"], "object": "model", "created": app["created"],
                                                 "owned_by": "astrai-nano"}]}, 200)

    def _generate(self):
        app, engine, chat = self.server.app, self.server.engine, self.route == "/v1/chat/completions"
        body = self._read_json()
        model = body.get("model")
        if isinstance(model, str) and model and model != app["model"]:  # empty or absent: the one served
            raise ApiError(404, f"The model '{model[:100]}' does not exist; this server serves '{app['model']}'",
                           "model", "model_not_found")
        req, stream, include_usage = parse_request(body, chat, engine.tok, app["limits"], app["rag"])
        if not engine.submit(req):
            raise ApiError(429, f"the server is busy ({engine.max_queue} requests waiting); retry shortly",
                           code="rate_limit_exceeded", type="rate_limit_error", headers={"Retry-After": "1"})
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                "object": kind + ".chunk" if chat and stream else kind, "created": int(time.time()),
                "model": app["model"]}
        sources = {} if req.sources is None else {"sources": req.sources}  # in a stream's first chunk only

        def choice(i, text, finish, message):
            if not chat:
                return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            return {"index": i, "delta" if stream else "message": message, "logprobs": None, "finish_reason": finish}

        try:
            if stream:  # server-sent events in OpenAI's chunk format, then `data: [DONE]`
                self.streaming = self.close_connection = True
                roles = [sse({**head, "choices": [choice(i, "", None, {"role": "assistant", "content": ""})],
                              **(sources if i == 0 else {})}) for i in range(req.n)] if chat else []
                self._write(b"".join(roles), 200, {"Content-Type": "text/event-stream; charset=utf-8",
                                                   "Cache-Control": "no-cache",
                                                   "Connection": "close",      # the stream ends when we close
                                                   "X-Accel-Buffering": "no"})  # proxies (nginx): do not buffer
            texts, finish, tokens = [""] * req.n, [None] * req.n, 0
            while not all(finish):
                chunks = []
                for event in self._ready_events(req):
                    i = event[1]
                    if event[0] == "delta":
                        texts[i] += event[2]
                        chunks.append(choice(i, event[2], None, {"content": event[2]}))
                    else:
                        finish[i], tokens = event[2], tokens + event[3]
                        chunks.append(choice(i, "", event[2], {}))
                usage = {"prompt_tokens": len(req.prompt), "completion_tokens": tokens,
                         "total_tokens": len(req.prompt) + tokens}
                if stream:  # everything that is ready in one write
                    out = [sse({**head, "choices": [c]}) for c in chunks]
                    if all(finish) and include_usage:
                        out.append(sse({**head, "choices": [], "usage": usage}))
                    self._write(b"".join(out) + (b"data: [DONE]\n\n" if all(finish) else b""))
            if not stream:
                choices = [choice(i, t, finish[i], {"role": "assistant", "content": t}) for i, t in enumerate(texts)]
                self._write({**head, "choices": choices, "usage": usage, **sources}, 200)
        finally:
            req.cancelled.set()  # frees the rows if we leave early (client gone); harmless when done

    def _ready_events(self, req):
        """The request's next events (all that are ready, at least one); polls for a client that has left."""
        while True:
            try:
                events = [req.events.get(timeout=0.5)]
                break
            except queue.Empty:
                if self._client_gone():
                    raise ClientGone
        while not req.events.empty():  # this thread is the only reader
            events.append(req.events.get_nowait())
        for event in events:
            if event[0] == "error":
                raise ApiError(500, event[1], type="server_error")
        return events

    def _client_gone(self):
        """True if the client closed its side (readable with nothing to read = end of file)."""
        try:
            with selectors.DefaultSelector() as sel:  # epoll/kqueue: no limit on descriptor numbers
                sel.register(self.connection, selectors.EVENT_READ)
                return bool(sel.select(0)) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def log_message(self, fmt, *args):
        if self.server.app["log"]:
            super().log_message(fmt, *args)


class Server(ThreadingHTTPServer):  # daemon threads: a stuck client does not hold up the exit
    request_queue_size = 128  # listen backlog: a burst of clients must not wait for SYN retries


def make_server(model, tok, host="127.0.0.1", port=0, api_key="", model_name="astrai-nano", max_batch=8,
                max_queue=32, max_body_bytes=1_000_000, max_prompt_tokens=0, max_tokens_limit=1024,
                default_max_tokens=256, timeout=60, log=True, rag=None, rag_k=3):
    """A ready server (call .serve_forever()) with its model worker running; port 0 picks a free port.
    rag: a rag.Retriever to ground chat answers in (rag_k chunks each), or None.
    Stop it with .shutdown(), then .server_close() and .engine.close()."""
    ctx = model.cfg.max_seq_len
    httpd = Server((host, port), Handler)
    httpd.engine = Engine(model, tok, max_batch, max_queue)
    httpd.app = {"model": model_name, "api_key": api_key, "max_body_bytes": max_body_bytes, "timeout": timeout,
                 "created": int(time.time()), "log": log, "rag": None if rag is None else (rag, rag_k),
                 "limits": {"context": ctx, "max_n": max_batch,
                            "max_prompt_tokens": min(max_prompt_tokens or ctx - 1, ctx - 1),
                            "max_tokens_limit": max_tokens_limit, "default_max_tokens": default_max_tokens}}
    return httpd


def main():
    configure(globals())
    if dtype not in ("float32", "bfloat16"):
        die(f"dtype must be float32 or bfloat16, not {dtype!r}")
    if min(max_batch, max_tokens_limit, default_max_tokens, max_body_bytes, rag_k) < 1 or max_queue < 0:
        die("max_batch, max_tokens_limit, default_max_tokens, max_body_bytes and rag_k must be >= 1, max_queue >= 0")
    if threads:
        torch.set_num_threads(threads)
    dev = device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    retriever = None
    if rag_index:  # before the model loads: a wrong path fails at once
        try:
            retriever = Retriever(rag_index, dev)
        except (DataError, ValueError, OSError) as e:
            die(f"--rag_index: {str(e).splitlines()[0]}")
    model, tok, _ = load_model(out_dir, device=dev)
    model.to(getattr(torch, dtype))
    name = model_name or os.path.basename(os.path.normpath(out_dir))
    httpd = make_server(model, tok, host, port, api_key, name, max_batch, max_queue, max_body_bytes,
                        max_prompt_tokens, max_tokens_limit, default_max_tokens, timeout, rag=retriever, rag_k=rag_k)
    h, p = httpd.server_address[:2]
    grounded = "" if retriever is None else f", answers grounded in {rag_index} ({len(retriever)} chunks, k={rag_k})"
    print(f"serving {name} ({model.num_params() / 1e6:.1f}M params, {dtype} on {dev}, {max_batch} slots, "
          f"torch threads {torch.get_num_threads()}{grounded}) on http://{h}:{p}  (chat page: /, API: /v1)", flush=True)
    if host not in ("127.0.0.1", "localhost") and not api_key:
        print("warning: listening beyond this machine without --api_key", file=sys.stderr)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        httpd.engine.close()


if __name__ == "__main__":
    main()
