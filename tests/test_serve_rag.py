"""serve.py --rag_index: chat answers grounded in a tiny TF-IDF index. The server must retrieve with
the last user message, put the chunks into the prompt exactly as `rag.py ask` does (the model's answer
and prompt_tokens are checked against rag.grounded_prompt), return them as "sources" (JSON reply and
first stream chunk), keep retrieval out of the model worker's way, and refuse a bad index at startup."""
import http.client
import json
import os
import subprocess
import sys
import threading

import pytest

import rag
import serve
from data_formats import numbered
from test_serve import ROOT, Live, greedy, make_run_dir
from tokenizer import Tokenizer

DOCS = {"river.txt": "The dog ran to the river and back again. The cat sat on the mat.\n",
        "kami.md": "Kami lives by the sea and likes noodles; her pet is a small green turtle.\n",
        "zh/kami.txt": "卡米住在海边，喜欢吃面条。她的宠物是一只绿色的小乌龟。\n"}
K = 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run"), max_seq_len=512)


@pytest.fixture(scope="module")
def index(run_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    for name, text in DOCS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    docs, skipped = rag.read_docs(str(folder))
    assert len(docs) == 3 and skipped == 0
    out = tmp_path_factory.mktemp("index") / "rag"
    tok = Tokenizer.load(str(run_dir))
    rag.build_index(docs, str(out), "tfidf", tok, chunk_tokens=32, overlap=8)
    return out


@pytest.fixture(scope="module")
def live(run_dir, index):
    server = Live(run_dir, max_batch=4, default_max_tokens=400, rag=rag.Retriever(str(index)), rag_k=K)
    server.prompts = []  # the text of every prompt the worker prefilled, as the model saw it
    inner = server.model.forward_cached

    def forward_cached(idx, cache, rows=None, lengths=None):
        if lengths is not None:
            server.prompts += [server.tok.decode(idx[i, :n].tolist()) for i, n in enumerate(lengths.tolist())]
        return inner(idx, cache, rows=rows, lengths=lengths)
    server.model.forward_cached = forward_cached
    yield server
    server.close()


def ask(question, **kw):
    return {"messages": [{"role": "user", "content": question}], "temperature": 0, **kw}


def expected(live, question, max_tokens):
    """(grounded prompt ids, the hits in it, the greedy answer) as rag.py ask builds them."""
    hits = live.httpd.app["rag"][0].search([question], K)[0]
    ids, used = rag.grounded_prompt(live.tok, [{"role": "user", "content": question}], hits,
                                    live.model.cfg.max_seq_len - max_tokens)
    return ids, used, live.tok.decode(greedy(live.model, ids, max_tokens))


@pytest.mark.parametrize("question,top", [("What is Kami's pet?", "kami.md"),
                                          ("Where did the dog run?", "river.txt"),
                                          ("卡米的宠物是什么？", "zh/kami.txt")])
def test_chat_answer_is_grounded_and_returns_sources(live, question, top):
    ids, used, want = expected(live, question, 16)
    assert len(used) == K
    live.prompts.clear()
    status, _, r = live.request("POST", "/v1/chat/completions", ask(question, max_tokens=16))
    assert status == 200, r
    src = r["sources"]
    assert [s["n"] for s in src] == [1, 2] and src[0]["source"] == top and src[0]["id"].startswith(top + "#")
    assert src[0]["text"] in DOCS[top]
    assert src[0]["score"] >= src[1]["score"] and src[0]["score"] > 0
    assert src == rag.source_list(used)
    # the model saw the numbered chunks: its prompt holds "[1] <top chunk>", and the answer and the
    # token count are those of the grounded prompt, longer than the bare question's
    assert live.prompts == [live.tok.decode(ids)] and f"{numbered(1, src[0]['text'])}\n[2] " in live.prompts[0]
    assert r["choices"][0]["message"]["content"] == want
    plain = serve.chat_prompt(live.tok, [{"role": "user", "content": question}])
    assert r["usage"]["prompt_tokens"] == len(ids) > len(plain) + 10


def test_stream_sends_sources_in_the_first_chunk(live):
    question = "What is Kami's pet?"
    _, used, want = expected(live, question, 12)
    _, payloads = live.stream("/v1/chat/completions", ask(question, max_tokens=12))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["sources"] == rag.source_list(used) and chunks[0]["sources"][0]["source"] == "kami.md"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert not any("sources" in c for c in chunks[1:])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == want


def test_openai_client_keeps_the_sources_as_an_extra_field(live):
    openai = pytest.importorskip("openai", reason="pip install openai (requirements-dev.txt)")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
    question = "Where did the dog run?"
    _, used, want = expected(live, question, 8)
    r = client.chat.completions.create(model="test", messages=[{"role": "user", "content": question}], temperature=0,
                                       max_tokens=8)
    assert r.choices[0].message.content == want and r.model_extra["sources"] == rag.source_list(used)
    chunks = list(client.chat.completions.create(model="test", messages=[{"role": "user", "content": question}],
                                                 temperature=0, max_tokens=8, stream=True))
    assert chunks[0].model_extra["sources"] == rag.source_list(used)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


def test_sources_that_do_not_fit_are_dropped_lowest_first(live):
    question = "What is Kami's pet?"
    msgs = [{"role": "user", "content": question}]
    hits = live.httpd.app["rag"][0].search([question], K)[0]
    one = rag.grounded_prompt(live.tok, msgs, hits[:1], 10_000)[0]
    ctx = live.model.cfg.max_seq_len
    # room for the best chunk only
    status, _, r = live.request("POST", "/v1/chat/completions", ask(question, max_tokens=ctx - len(one)))
    assert status == 200, r
    assert r["sources"] == rag.source_list(hits[:1]) and r["usage"]["prompt_tokens"] == len(one)
    # room for none: the bare question, and an empty source list
    plain = serve.chat_prompt(live.tok, msgs)
    status, _, r = live.request("POST", "/v1/chat/completions", ask(question, max_tokens=ctx - len(plain)))
    assert status == 200, r
    assert r["sources"] == [] and r["usage"]["prompt_tokens"] == len(plain)
    # no max_tokens: the sources leave room for the default answer length, at most half the context
    # (default_max_tokens=400 here, so 256), and the answer gets the rest
    status, _, r = live.request("POST", "/v1/chat/completions", ask(question))
    assert status == 200, r
    want, used = rag.grounded_prompt(live.tok, msgs, hits, ctx // 2)
    assert used and r["sources"] == rag.source_list(used) and r["usage"]["prompt_tokens"] == len(want)
    assert r["usage"]["completion_tokens"] == min(400, ctx - len(want))


def test_opting_out_and_other_requests_get_no_sources(live):
    question = "What is Kami's pet?"
    msgs = [{"role": "user", "content": question}]
    plain = serve.chat_prompt(live.tok, msgs)
    live.prompts.clear()
    status, _, r = live.request("POST", "/v1/chat/completions", ask(question, max_tokens=8, rag=False))
    assert status == 200, r
    assert "sources" not in r and r["usage"]["prompt_tokens"] == len(plain) and "[1] " not in live.prompts[0]
    assert r["choices"][0]["message"]["content"] == live.tok.decode(greedy(live.model, plain, 8))
    # an assistant turn last (a prefilled answer): nothing to ask the index, nothing added
    status, _, r = live.request("POST", "/v1/chat/completions",
                                {"messages": msgs + [{"role": "assistant", "content": "Kami"}], "max_tokens": 4})
    assert status == 200 and r["sources"] == []
    status, _, r = live.request("POST", "/v1/completions", {"prompt": "Kami", "max_tokens": 4})
    assert status == 200 and "sources" not in r
    status, _, r = live.request("POST", "/v1/chat/completions", ask(question, rag="yes"))
    assert status == 400 and r["error"]["param"] == "rag"
    # a server without an index says so when a request asks for retrieval
    limits = live.httpd.app["limits"]
    with pytest.raises(serve.ApiError, match="no index") as e:
        serve.parse_request(ask(question, rag=True), True, live.tok, limits, None)
    assert e.value.status == 400 and e.value.param == "rag"
    assert serve.parse_request(ask(question, rag=False), True, live.tok, limits, None)[0].sources is None


def test_retrieval_runs_outside_the_model_worker(live):
    """A request held inside retrieval does not hold up another request's generation."""
    retriever = live.httpd.app["rag"][0]
    entered, release = threading.Event(), threading.Event()
    search = retriever.search

    def held_search(queries, k=5):
        entered.set()
        assert release.wait(60)
        return search(queries, k)
    retriever.search = held_search
    result = {}
    t = threading.Thread(target=lambda: result.update(r=live.request(
        "POST", "/v1/chat/completions", ask("What is Kami's pet?", max_tokens=4))))
    try:
        t.start()
        assert entered.wait(60)
        status, _, r = live.request("POST", "/v1/chat/completions", ask("Where did the dog run?", max_tokens=4,
                                                                        rag=False))
        assert status == 200 and r["choices"][0]["finish_reason"] == "length"
        assert t.is_alive() and "r" not in result       # the first one is still retrieving
    finally:
        release.set()
        t.join(60)
        del retriever.search
    assert result["r"][0] == 200 and result["r"][2]["sources"][0]["source"] == "kami.md"


def start(run_dir, *args):
    return subprocess.Popen([sys.executable, "serve.py", f"--out_dir={run_dir}", "--port=0", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_serve_command_with_rag_index(run_dir, index):
    proc = start(run_dir, f"--rag_index={index}", "--rag_k=1")
    watchdog = threading.Timer(120, proc.kill)  # a server that never prints its URL must not hang the suite
    watchdog.start()
    try:
        line = next((ln for ln in proc.stdout if ln.startswith("serving ")), "")
        assert "answers grounded in" in line and "k=1" in line, proc.stderr.read() if not line else line
        host, port = line[line.index("http://") + 7:].split()[0].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(ask("Where did the dog run?", max_tokens=4)),
                     {"Content-Type": "application/json"})
        r = json.loads(conn.getresponse().read())
        conn.close()
        assert len(r["sources"]) == 1 and r["sources"][0]["source"] == "river.txt"
    finally:
        watchdog.cancel()
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("bad,says", [("missing", "not a rag index"), ("run_dir", "not a rag index"),
                                      ("no_vectors", "vectors.npy")])
def test_bad_rag_index_stops_at_startup_with_one_clear_line(run_dir, index, tmp_path, bad, says):
    path = {"missing": tmp_path / "nope", "run_dir": run_dir, "no_vectors": tmp_path / "broken"}[bad]
    if bad == "no_vectors":  # index.json, but the rest of the index is gone
        path.mkdir()
        (path / "index.json").write_bytes((index / "index.json").read_bytes())
    p = subprocess.run([sys.executable, "serve.py", f"--out_dir={run_dir}", "--port=0", f"--rag_index={path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "serving" not in p.stdout
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("--rag_index: ") and str(path) in err[0] and says in err[0], \
        p.stderr
