"""Serve a checkpoint over HTTP: an OpenAI-compatible API (streaming too) and a web chat page (chat.html).

    python serve.py --out_dir=out/sft                       # http://127.0.0.1:8000, chat page at /
    python serve.py --out_dir=out/sft --host=0.0.0.0 --port=8080 --api_key=secret --max_batch=16
    python serve.py --out_dir=out/sft --rag_index=out/rag --rag_k=3   # chat answers grounded in an index

POST /v1/chat/completions and /v1/completions, GET /v1/models, /health and / (the page): docs/serving.md has their
fields, limits and errors. Standard library only; HTTP threads check requests, engine.py's worker decodes them.
"""
import hmac
import json
import os
import selectors
import socket
import sys
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch

from checkpoint import die, load_model
from configurator import configure
from data_formats import DataError
from engine import Engine, Request
from rag import Retriever, grounded_prompt, source_list

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
                  seed=v["seed"], n=v["n"], ignore_eos=v["ignore_eos"])
    req.sources = sources  # the chunks the answer is grounded in, sent back with it (None: no retrieval)
    return req, v["stream"], field(v["stream_options"], "include_usage", bool, False)


# -- HTTP ----------------------------------------------------------------------------------------------
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
        except (ConnectionError, TimeoutError):  # the client left, or stopped reading or sending (socket timeout)
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
        """Send bytes, or a dict as JSON; a status line and headers first when status is given."""
        if isinstance(data, dict):
            data = json.dumps(data, ensure_ascii=False).encode()
            headers = {"Content-Type": "application/json", "Content-Length": len(data), **dict(headers)}
        if status:
            self.send_response(status)
            for k, v in dict(headers).items():
                self.send_header(k, v)
            self.end_headers()
        self.wfile.write(data)

    def _content_length(self):
        """The body's length, or None when it has no usable Content-Length (chunked or malformed)."""
        n = self.headers.get("Content-Length", "0").strip()
        return None if self.headers.get("Transfer-Encoding") or not n.isdecimal() else int(n)

    def _discard_body(self):
        """Read and drop an unread body (up to 4x the limit): closing a socket with unread input makes the
        kernel send a reset, and the client may then lose the reply just sent."""
        left = 0 if self.body_read else min(self._content_length() or 0, 4 * self.server.app["max_body_bytes"])
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
        body = self.rfile.read(length)
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
        self._write({"status": "ok", "model": app["model"], "context": app["limits"]["context"],
                     "slots": engine.max_batch, **engine.load(), "api_key_required": bool(app["api_key"]),
                     **engine.stats}, 200)

    def _models(self):
        app = self.server.app
        model = {"id": app["model"], "object": "model", "created": app["created"], "owned_by": "astrai-nano"}
        self._write({"object": "list", "data": [model]}, 200)

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

        def choice(i, finish, message):  # completions send the message's text only
            part = {"delta" if stream else "message": message} if chat else {"text": message.get("content", "")}
            return {"index": i, **part, "logprobs": None, "finish_reason": finish}

        try:
            if stream:  # server-sent events in OpenAI's chunk format, then `data: [DONE]`
                self.streaming = self.close_connection = True
                roles = [sse({**head, "choices": [choice(i, None, {"role": "assistant", "content": ""})],
                              **(sources if i == 0 else {})}) for i in range(req.n)] if chat else []
                self._write(b"".join(roles), 200, {"Content-Type": "text/event-stream; charset=utf-8",
                                                   "Cache-Control": "no-cache",
                                                   "Connection": "close",      # the stream ends when we close
                                                   "X-Accel-Buffering": "no"})  # proxies (nginx): do not buffer
            for events in req.updates(poll=0.5):  # [] after half a second of silence: has the client left?
                if not events and self._client_gone():
                    raise ConnectionAbortedError("the client has left")
                for e in events:
                    if e[0] == "error":
                        raise ApiError(500, e[1], type="server_error")
                if stream and events:  # all that is ready in one write
                    chunks = [choice(e[1], None, {"content": e[2]}) if e[0] == "delta" else choice(e[1], e[2], {})
                              for e in events]
                    self._write(b"".join(sse({**head, "choices": [c]}) for c in chunks))
            n_prompt, n_out = len(req.prompt), sum(c.tokens for c in req.choices)
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
            if stream:
                tail = [sse({**head, "choices": [], "usage": usage})] if include_usage else []
                self._write(b"".join(tail) + b"data: [DONE]\n\n")
            else:
                choices = [choice(c.index, c.finish, {"role": "assistant", "content": c.text}) for c in req.choices]
                self._write({**head, "choices": choices, "usage": usage, **sources}, 200)
        finally:
            req.cancelled.set()  # frees the rows if we leave early (client gone); harmless when done

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
    """A ready server (call .serve_forever(); stop: .shutdown(), .server_close(), .engine.close()) with its model
    worker running; port 0 picks a free port. rag: a rag.Retriever to ground chat answers in (rag_k chunks each)."""
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
