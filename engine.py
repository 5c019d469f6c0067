"""The model worker behind serve.py: continuous batching (Yu et al. 2022, "Orca") over a KV cache of max_batch rows.

One thread owns the model. Before each decode step it moves waiting requests into free cache rows and prefills
their prompts in one forward; then one forward advances every active row by one token. Each row samples with its
request's own torch.Generator, so a seeded answer does not depend on what else is running.

    from checkpoint import load_model
    from engine import Engine, Request
    model, tok, _ = load_model("out/sft")
    engine = Engine(model, tok, max_batch=8)                  # starts the worker thread
    req = Request(tok.encode("Once upon a time", bos=True), max_tokens=50, temperature=0)
    engine.submit(req)                                        # False when max_queue requests already wait
    for events in req.updates():                              # ("delta", choice, text), then ("done", ...)
        print("".join(e[2] for e in events if e[0] == "delta"), end="", flush=True)
    print(req.choices[0].finish, req.choices[0].tokens)      # "stop" or "length"; .text holds the whole answer
    engine.close()
"""
import collections
import queue
import threading
import traceback

import torch

from model import sample_next
from tokenizer import StreamDecoder


class Request:
    """A prompt (token ids) and how to sample its n choices. The worker puts ("delta", choice, text),
    ("done", choice, finish_reason, n_tokens) or ("error", message) on `events`; set `cancelled` to drop it."""

    def __init__(self, prompt, max_tokens, temperature=1.0, top_p=1.0, top_k=0, stop=(), seed=None, n=1,
                 ignore_eos=False):
        self.prompt, self.max_tokens, self.n = prompt, max_tokens, n
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.stop, self.seed, self.ignore_eos = tuple(stop), seed, ignore_eos
        self.events = queue.Queue()
        self.cancelled = threading.Event()
        self.choices = []  # set by the worker; read them once updates() has ended (it no longer touches them)

    def updates(self, poll=None):
        """Yield lists of events, all that are ready at once (a server writes each list in one go), or [] after
        `poll` seconds without one; ends when every choice is done or has failed."""
        left = self.n
        while left > 0:
            try:
                events = [self.events.get(timeout=poll)]
            except queue.Empty:
                yield []
                continue
            while not self.events.empty():  # the only reader: what is there stays there
                events.append(self.events.get_nowait())
            left -= sum(e[0] != "delta" for e in events)  # the worker sends one error per row it held
            yield events


class Choice:
    """One completion of a request, generated in one cache row."""

    def __init__(self, req, index, tok, device):
        self.req, self.index = req, index
        self.decoder = StreamDecoder(tok)   # ids -> text, never half a character
        self.text, self.sent, self.tokens, self.finish = "", 0, 0, None
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
            self.finish = finish
            self.req.events.put(("done", self.index, finish, self.tokens))
        return finish is not None


class Engine:
    """Owns the model and its KV cache; requests come in through submit(), text goes out on their events."""

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
        """Rows decoding now and requests waiting for one (for /health)."""
        return {"active": sum(c is not None for c in self.rows), "queued": len(self.pending)}

    def _loop(self):
        with torch.inference_mode():
            while True:
                with self.cond:
                    while self.running and not self.pending and not any(self.rows):
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
            req.choices = [Choice(req, i, self.tok, self.device) for i in range(req.n)]
            for c in req.choices:
                r = free.pop(0)          # lowest free row first: keeps the active rows packed low
                self.rows[r] = c
                new_rows.append(r)
        self.stats["peak_active"] = max(self.stats["peak_active"], self.load()["active"])
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
