"""Serve a checkpoint over HTTP: an OpenAI-compatible API, server-sent events, and a web chat page.

    python serve.py --out_dir=out/sft                       # http://127.0.0.1:8000, chat page at /
    python serve.py --out_dir=out/sft --host=0.0.0.0 --port=8080 --api_key=secret --max_batch=16
    python serve.py --out_dir=out/sft --rag_index=out/rag --rag_k=3   # chat answers grounded in an index

Standard library only (http.server), no web framework. Endpoints:

    POST /v1/chat/completions   messages, temperature, top_p, top_k, max_tokens, stop, seed, n, stream
    POST /v1/completions        prompt (a string) and the same sampling fields: raw text completion
    GET  /v1/models             the one model served here
    GET  /health                {"status": "ok", ...} with slot and queue counts (no API key needed)
    GET  /                      chat.html: a self-contained chat page that streams from the API

Any OpenAI client works: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")`.

Retrieval (--rag_index, an index built by `rag.py index`): a chat request's last user message is the
query; its rag_k best chunks go into that message as numbered sources, exactly as `rag.py ask` does
(rag.grounded_prompt: the lowest-ranked are dropped until the prompt leaves room for max_tokens), and
the reply carries them as an extra top-level field, "sources": [{"n", "id", "source", "offsets",
"score", "text"}, ...] (in the first chunk of a stream); OpenAI clients ignore fields they do not
know. A request sends "rag": false to skip retrieval. The search runs in the request's HTTP thread
before the request joins the queue, so the model worker never waits for it.

How concurrent requests share the model (continuous batching): one worker thread owns the model
and a KV cache with `max_batch` rows ("slots"). HTTP threads validate a request, tokenize it and
put it in a bounded queue (full -> 429). Before every decode step the worker moves waiting requests
into free rows and prefills their prompts in one forward (model.forward_cached with rows=...); then
one forward advances every active row by one token. Each row samples with its request's own
temperature / top-p / seed (a per-request torch.Generator, so a seeded request gives the same text
whatever runs next to it). A row that finishes, or whose client went away, is free at the next step.
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
threads = 0                  # CPU threads for the model (0: torch's default, one per core); fewer leaves
                             # cores to the HTTP threads, and 1 is much faster on a CPU shared with other jobs
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
SAMPLING = {"model", "temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "n", "stream",
            "stream_options", "user", "ignore_eos"}  # top_k and ignore_eos: vLLM's extensions
CHAT_FIELDS = SAMPLING | {"messages", "max_completion_tokens", "rag"}  # rag: false skips retrieval
COMPLETION_FIELDS = SAMPLING | {"prompt"}


# -- prompts -----------------------------------------------------------------------------------------
def chat_prompt(tok, messages):
    """Messages -> prompt ids (ChatML, ending in the assistant generation prompt). Message text is
    encoded as plain text, so a user who types <|im_start|> gets ordinary tokens, never the control id.
    With --rag_index, parse_request renders through rag.grounded_prompt instead (sources added)."""
    return tok.render_chat(messages, add_generation_prompt=True)[0]


def completion_prompt(tok, text):
    """Raw completion: BOS + the text, the way every pretraining document starts."""
    return tok.encode(text, bos=True)


# -- the model worker --------------------------------------------------------------------------------
class QueueFull(Exception):
    pass


class Request:
    """One API request as the worker sees it. The worker writes events to `events`:
    ("delta", choice, text), ("done", choice, finish_reason, n_tokens), ("error", message).
    The HTTP thread sets `cancelled` when its client has gone; the worker then frees the rows.
    `sources`: the retrieved chunks in the prompt (rag.source_list), None when nothing was retrieved."""

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
        # requests accepted, tokens generated, choices cancelled (client left), most rows active at once
        self.stats = collections.Counter(requests=0, tokens=0, cancelled=0, peak_active=0)
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self.thread.start()

    def submit(self, req):
        with self.cond:
            if len(self.pending) >= self.max_queue:
                raise QueueFull
            self.pending.append(req)
            self.stats["requests"] += 1
            self.cond.notify()

    def close(self):
        with self.cond:
            self.running = False
            self.cond.notify()
        self.thread.join()

    def load(self):
        """(active rows, queued requests), for /health."""
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
        idx = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, :len(p)] = torch.tensor(p)
        rows = torch.tensor(new_rows, device=self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        self.cache.reset(rows)
        self.logits[rows] = self.model.forward_cached(idx.to(self.device), self.cache, rows=rows, lengths=lengths)

    def _step(self):
        """Sample one token for every active row, then one forward for all rows that go on."""
        for r, c in enumerate(self.rows):
            if c is not None and c.req.cancelled.is_set():
                self.rows[r] = None
                self.stats["cancelled"] += 1
        active = [r for r, c in enumerate(self.rows) if c is not None]
        if not active:
            return
        greedy = self.logits.argmax(dim=-1).tolist()
        next_tokens = [0] * self.max_batch
        for r in active:
            c = self.rows[r]
            req = c.req
            if req.temperature == 0:
                t = greedy[r]
            else:  # one row at a time, with this request's own generator
                t = int(sample_next(self.logits[r:r + 1], req.temperature, req.top_k or None, req.top_p,
                                    c.generator))
            next_tokens[r] = t
            self.stats["tokens"] += 1
            if c.add(t, () if req.ignore_eos else self.stop_ids):
                self.rows[r] = None
        live = [r for r in active if self.rows[r] is not None]
        if not live:
            return
        # Decode rows 0..hi-1 only (new requests take the lowest free row, so the active rows stay
        # packed low). Free rows inside that range compute a throwaway token from position 0, which
        # is cheaper than gathering the active rows out of the cache; their length is reset so the
        # garbage never grows.
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
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = dict(headers)


def _number(body, key, default, lo, hi, integer=False, lo_open=False):
    v = body.get(key)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise ApiError(400, f"'{key}' must be {kind}, got {json.dumps(v)[:40]}", key, "invalid_type")
    if not (lo < v if lo_open else lo <= v) or not v <= hi:
        raise ApiError(400, f"'{key}' must be {kind} in {'(' if lo_open else '['}{lo}, {hi}], got {v}", key,
                       "invalid_value")
    return v


def _flag(body, key):
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise ApiError(400, f"'{key}' must be true or false", key, "invalid_type")
    return bool(v)


def _messages(body):
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", where)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}",
                           f"{where}.role")
        if isinstance(content, list):  # OpenAI's content parts: only text parts here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"'{where}.content' parts must be {{\"type\": \"text\", \"text\": string}}",
                               f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"'{where}.content' must be a string", f"{where}.content")
        out.append({"role": ROLES[role], "content": content})
    return out


def parse_request(body, chat, tok, limits, rag=None):
    """Check an API request body; return (Request, stream, include_usage) or raise ApiError(400).
    rag: (Retriever, k) when chat answers are grounded in an index (see the module docstring)."""
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]} (supported: "
                            f"{', '.join(sorted(allowed))})", unknown[0], "unknown_parameter")
    for key in ("model", "user"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise ApiError(400, f"'{key}' must be a string", key, "invalid_type")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or an array of up to 4 of them", "stop")
    n = _number(body, "n", 1, 1, limits["max_n"], integer=True)
    ctx = limits["context"]
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, None, 1, limits["max_tokens_limit"], integer=True)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    sampling = dict(temperature=_number(body, "temperature", 1.0, 0, 2),
                    top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
                    top_k=_number(body, "top_k", 0, 0, 1_000_000, integer=True),
                    stop=stop, seed=_number(body, "seed", None, -2**63, 2**63 - 1, integer=True), n=n,
                    ignore_eos=_flag(body, "ignore_eos"))
    sources = None
    if chat:
        field, messages = "messages", _messages(body)
        if _flag(body, "rag") and rag is None:
            raise ApiError(400, "'rag' is true but this server has no index (start it with --rag_index=DIR)",
                           "rag", "invalid_value")
        if rag is not None and body.get("rag") is not False:
            # The sources get what max_tokens leaves of the context (no max_tokens: the default, at most
            # half the context); the lowest-ranked are dropped first, as in `rag.py ask`.
            retriever, k = rag
            reserve = max_tokens or min(limits["default_max_tokens"], ctx // 2)
            room = min(limits["max_prompt_tokens"], ctx - reserve)
            question = messages[-1]["content"] if messages[-1]["role"] == "user" else ""
            hits = retriever.search([question], k)[0] if question.strip() else []
            prompt, used = grounded_prompt(tok, messages, hits, room)
            sources = source_list(used)
        else:
            prompt = chat_prompt(tok, messages)
    else:
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1:  # the OpenAI SDK may send ["text"]
            text = text[0]
        if not isinstance(text, str):
            raise ApiError(400, "'prompt' must be a string", "prompt", "invalid_type")
        field, prompt = "prompt", completion_prompt(tok, text)
    if len(prompt) > limits["max_prompt_tokens"]:
        raise ApiError(400, f"'{field}' is {len(prompt)} tokens long; this server accepts at most "
                            f"{limits['max_prompt_tokens']} prompt tokens", field, "context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(limits["default_max_tokens"], ctx - len(prompt))
    elif len(prompt) + max_tokens > ctx:
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the {field}, {max_tokens} in "
                            f"the completion). Please reduce the length of the {field} or '{key}'.", key,
                       "context_length_exceeded")
    req = Request(prompt, max_tokens, sources=sources, **sampling)
    return req, _flag(body, "stream"), _flag(stream_options or {}, "include_usage")


# -- HTTP ----------------------------------------------------------------------------------------------
class ClientGone(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive for JSON replies; a stream ends by closing the connection
    server_version = "AstrAI-nano"

    def setup(self):
        self.timeout = self.server.app["timeout"]   # socket timeout: reads and writes of stuck clients fail
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # tokens leave at once

    ROUTES = {("GET", "/"): "_page", ("GET", "/health"): "_health", ("GET", "/v1/models"): "_models",
              ("POST", "/v1/chat/completions"): "_chat", ("POST", "/v1/completions"): "_completions"}

    def do_GET(self):
        path = urlsplit(self.path).path
        self._body_read = False
        try:
            name = self.ROUTES.get((self.command, path))
            if name is None:
                allowed = [m for m, p in self.ROUTES if p == path]
                if allowed:
                    raise ApiError(405, f"Method {self.command} is not allowed on {path}; use {allowed[0]}",
                                   headers={"Allow": allowed[0]})
                raise ApiError(404, f"Invalid URL ({self.command} {path})", code="unknown_url")
            if path.startswith("/v1/"):
                self._check_key()
            getattr(self, name)()
            self._discard_body()  # a GET that came with a body must not garble the next request
        except ApiError as e:
            self._send_error(e)
        except ClientGone:
            self.close_connection = True
        except Exception as e:  # a bug must not take the server down; tell the client what happened
            traceback.print_exc()
            self._send_error(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET  # one dispatcher; ROUTES says what exists

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
        """The standard library's own errors (a malformed request line or header, 414, 431) as OpenAI error
        objects, not its HTML page, on a connection that then closes."""
        if self.request_version == "HTTP/0.9":  # the default until a request line parses: write a status
            self.request_version = "HTTP/1.0"   # line and headers anyway, for the client to read
        self._body_read = True
        self._send_error(ApiError(code, message or "bad request"))

    def _check_key(self):
        key = self.server.app["api_key"]
        if not key:
            return
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 7235); compare_digest: no timing hints about the key
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "Incorrect API key provided. Send 'Authorization: Bearer <api_key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # replies
    def _send_json(self, status, obj, headers=()):
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in dict(headers).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e):
        # The body of a failed request may not have been read, so this connection ends here.
        self.close_connection = True
        try:
            self._send_json(e.status, {"error": {"message": e.message, "type": e.type, "param": e.param,
                                                 "code": e.code}}, {**e.headers, "Connection": "close"})
            self._discard_body()
        except OSError:
            pass

    def _discard_body(self):
        """Read and drop an unread request body (up to 4x the body limit). Closing a socket with unread
        input makes the kernel send a reset, and the client may then lose the error reply just sent."""
        if self._body_read or self.headers.get("Transfer-Encoding"):
            return
        try:
            left = min(int(self.headers.get("Content-Length", "0")), 4 * self.server.app["max_body_bytes"])
        except ValueError:
            return
        while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
            left -= len(chunk)

    def _page(self):
        with open(PAGE, "rb") as f:
            data = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
                         "style-src 'unsafe-inline'; connect-src 'self'")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(data)

    def _health(self):
        app, engine = self.server.app, self.server.engine
        active, queued = engine.load()
        self._send_json(200, {"status": "ok", "model": app["model"], "context": app["limits"]["context"],
                              "slots": engine.max_batch, "active": active, "queued": queued,
                              "api_key_required": bool(app["api_key"]), **engine.stats})

    def _models(self):
        app = self.server.app
        self._send_json(200, {"object": "list", "data": [
            {"id": app["model"], "object": "model", "created": app["created"], "owned_by": "astrai-nano"}]})

    def _read_json(self):
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "send the body with a Content-Length header (chunked bodies are not supported)")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ApiError(400, "bad Content-Length header")
        limit = self.server.app["max_body_bytes"]
        if length > limit:
            raise ApiError(413, f"request body is {length} bytes; the limit is {limit}", code="request_too_large")
        try:
            body = self.rfile.read(length) if length > 0 else b""
        except OSError:  # the client stopped sending (timeout) or went away
            raise ClientGone
        self._body_read = True
        try:
            obj = json.loads(body)
            json.dumps(obj, ensure_ascii=False).encode()  # a lone surrogate ("\ud800") fails here
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body must be a JSON object: {e}")
        except UnicodeEncodeError:
            raise ApiError(400, "the body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair), "
                                "which is not text; send valid Unicode")
        except RecursionError:
            raise ApiError(400, "the body's JSON is nested too deeply")
        if not isinstance(obj, dict):
            raise ApiError(400, "the body must be a JSON object")
        return obj

    def _chat(self):
        self._generate(chat=True)

    def _completions(self):
        self._generate(chat=False)

    def _generate(self, chat):
        app, engine = self.server.app, self.server.engine
        body = self._read_json()
        model = body.get("model")
        if isinstance(model, str) and model and model != app["model"]:  # empty or absent: the one served
            raise ApiError(404, f"The model '{model[:100]}' does not exist; this server serves '{app['model']}'",
                           "model", "model_not_found")
        req, stream, include_usage = parse_request(body, chat, engine.tok, app["limits"], app["rag"])
        try:
            engine.submit(req)
        except QueueFull:
            raise ApiError(429, f"the server is busy ({engine.max_queue} requests waiting); retry shortly",
                           code="rate_limit_exceeded", type="rate_limit_error", headers={"Retry-After": "1"})
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": app["model"]}
        try:
            if stream:
                self._stream(req, head, chat, include_usage)
            else:
                self._reply(req, head, chat)
        finally:
            req.cancelled.set()  # frees the rows if we leave early (client gone); harmless when done

    def _events(self, req):
        """The request's events as they come; raises ClientGone when the client disconnects."""
        while True:
            try:
                event = req.events.get(timeout=0.5)
            except queue.Empty:
                if self._client_gone():
                    raise ClientGone
                continue
            if event[0] == "error":
                raise ApiError(500, event[1], type="server_error")
            yield event

    def _client_gone(self):
        """True if the client closed its side (readable with nothing to read = end of file)."""
        try:
            with selectors.DefaultSelector() as sel:  # epoll/kqueue: no limit on descriptor numbers
                sel.register(self.connection, selectors.EVENT_READ)
                return bool(sel.select(0)) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _usage(self, req, tokens):
        return {"prompt_tokens": len(req.prompt), "completion_tokens": tokens, "total_tokens": len(req.prompt) + tokens}

    def _reply(self, req, head, chat):
        texts, finish, tokens = [""] * req.n, [None] * req.n, 0
        for event in self._events(req):
            if event[0] == "delta":
                texts[event[1]] += event[2]
            else:
                finish[event[1]], tokens = event[2], tokens + event[3]
                if all(finish):
                    break
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                        "finish_reason": finish[i]} for i in range(req.n)]
        else:
            choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": finish[i]}
                       for i in range(req.n)]
        sources = {} if req.sources is None else {"sources": req.sources}
        self._send_json(200, {**head, "choices": choices, "usage": self._usage(req, tokens), **sources})

    def _stream(self, req, head, chat, include_usage):
        """Server-sent events in OpenAI's chunk format, then `data: [DONE]`."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(choices, **extra):
            return b"data: " + json.dumps({**head, "choices": choices, **extra}, ensure_ascii=False).encode() + b"\n\n"

        def choice(i, text=None, finish=None, role=False):
            if not chat:
                return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")     # no Content-Length: the stream ends when we close
        self.send_header("X-Accel-Buffering", "no")  # proxies (nginx) must not buffer the stream
        self.end_headers()
        self.close_connection = True
        try:
            sources = {} if req.sources is None else {"sources": req.sources}  # in the first chunk only
            if chat:
                self._write(b"".join(chunk([choice(i, role=True)], **(sources if i == 0 else {}))
                                     for i in range(req.n)))
            done, tokens = 0, 0
            for event in self._events(req):
                out = []
                while True:  # send everything that is ready in one write
                    if event[0] == "delta":
                        out.append(chunk([choice(event[1], text=event[2])]))
                    else:
                        out.append(chunk([choice(event[1], finish=event[2])]))
                        done, tokens = done + 1, tokens + event[3]
                    try:
                        event = req.events.get_nowait()
                    except queue.Empty:
                        break
                    if event[0] == "error":
                        raise ApiError(500, event[1], type="server_error")
                if done == req.n and include_usage:
                    out.append(chunk([], usage=self._usage(req, tokens)))
                if done == req.n:
                    out.append(b"data: [DONE]\n\n")
                self._write(b"".join(out))
                if done == req.n:
                    return
        except ApiError as e:  # the headers are sent already: report the error as an event
            self._write(b"data: " + json.dumps({"error": {"message": e.message, "type": e.type, "param": None,
                                                         "code": e.code}}).encode() + b"\n\n")

    def _write(self, data):
        try:
            self.wfile.write(data)
        except OSError:  # broken pipe, reset, timeout: the client is gone
            raise ClientGone

    def log_message(self, fmt, *args):
        if self.server.app["log"]:
            super().log_message(fmt, *args)


class Server(ThreadingHTTPServer):
    daemon_threads = True
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
    if max_batch < 1 or max_queue < 0 or max_tokens_limit < 1 or default_max_tokens < 1 or max_body_bytes < 1:
        die("max_batch, max_tokens_limit, default_max_tokens and max_body_bytes must be >= 1, max_queue >= 0")
    if rag_k < 1:
        die(f"rag_k must be >= 1, not {rag_k}")
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
          f"torch threads {torch.get_num_threads()}{grounded}) on http://{h}:{p}"
          f"  (chat page: /, API: /v1)", flush=True)
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
