"""Sample from a trained model: one prompt, a chat in the terminal, or a file of prompts.

    python sample.py --out_dir=out/pretrain --prompt="Once upon a time"     # raw completion, streamed
    python sample.py --out_dir=out/sft --prompt="什么是光合作用？"              # chat checkpoint: ChatML
    python sample.py --out_dir=out/sft --chat                                 # multi-turn REPL: /reset, /quit
    python sample.py --out_dir=out/sft --file=prompts.txt --num_samples=4     # one prompt a line, in batches
"""
import os
import sys

import torch

from checkpoint import die, load_model
from configurator import configure
from tokenizer import StreamDecoder

out_dir = "out/sft"       # a run dir: ckpt.pt + tokenizer + config.json
prompt = ""               # the text to continue (completion) or to answer (chat)
chat = False              # multi-turn chat in the terminal (/reset starts over, /quit leaves)
file = ""                 # a text file with one prompt per line (blank lines skipped)
mode = "auto"             # auto (from the checkpoint) | chat | completion
system = ""               # chat: an optional system message
num_samples = 1           # answers per prompt
max_new_tokens = 256
temperature = 0.8         # 0: greedy
top_k = 0                 # keep the k most likely tokens (0: off)
top_p = 0.95              # nucleus sampling (1.0: off)
seed = 1337
batch_size = 8            # --file: prompts per batch
device = "auto"           # auto | cpu | cuda | cuda:N | mps
dtype = "float32"         # float32 | bfloat16 (weights and KV cache)
compile = False           # torch.compile the decode step: 2.3-3.3x tokens/s on a CPU after ~10-55 s of compiling


def is_chat_checkpoint(ckpt):
    """Chat stages (sft, dpo, grpo) say so in the checkpoint, or else their run config read a .jsonl file."""
    run = ckpt.get("config") or {}
    stage = ckpt.get("stage") or run.get("stage")
    return stage != "pretrain" if stage else any(isinstance(v, str) and v.endswith(".jsonl") for v in run.values())


def generate_texts(model, tok, prompts, generator):
    """num_samples answers for each prompt in one batch; answer r is for prompt r // num_samples."""
    rows = [[] for _ in range(len(prompts) * num_samples)]
    for tokens, active in model.generate(prompts, max_new_tokens, temperature, top_k or None, top_p,
                                         stop_ids=tok.stop_ids, num_samples=num_samples, generator=generator):
        for r, (t, a) in enumerate(zip(tokens.tolist(), active.tolist())):
            if a and t not in tok.stop_ids:
                rows[r].append(t)
    return [tok.decode(r) for r in rows]


def stream_text(model, tok, prompt_ids, generator):
    """Print one answer as it is sampled, whole characters only, and return it. Ctrl-C stops only this answer."""
    decoder, pieces = StreamDecoder(tok), []
    try:
        for tokens, _ in model.generate([prompt_ids], max_new_tokens, temperature, top_k or None, top_p,
                                        stop_ids=tok.stop_ids, generator=generator):
            t = int(tokens[0])
            if t in tok.stop_ids:
                break
            pieces.append(decoder.push(t))
            print(pieces[-1], end="", flush=True)
    except KeyboardInterrupt:
        print(" [interrupted]", end="")
    pieces.append(decoder.flush())
    print(pieces[-1], flush=True)
    return "".join(pieces)


def repl(model, tok, generator, start):
    """Multi-turn chat: each turn's prompt is the conversation, less its oldest exchanges when it does not fit."""
    print("chat: type a message; /reset starts a new conversation, /quit (or Ctrl-D) leaves", flush=True)
    messages, ctx = list(start), model.cfg.max_seq_len
    try:
        while (line := input("\n> ").strip()) not in ("/quit", "/exit"):
            if line == "/reset":
                messages = list(start)
                print("(new conversation)")
            elif line:
                messages.append({"role": "user", "content": line})
                ids = tok.render_chat(messages, add_generation_prompt=True)[0]
                while len(ids) > ctx - min(max_new_tokens, ctx // 2) and len(messages) > len(start) + 1:
                    del messages[len(start):len(start) + 2]  # the oldest user message and its answer
                    print("(dropped the oldest exchange to fit the context)")
                    ids = tok.render_chat(messages, add_generation_prompt=True)[0]
                if len(ids) < ctx:
                    messages.append({"role": "assistant", "content": stream_text(model, tok, ids, generator)})
                else:
                    print(f"(that message is {len(ids)} tokens; the context is {ctx}: say less)")
                    messages.pop()
    except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C
        print()


def main():
    configure(globals(), verbose=False)  # stdout carries only the generated text
    if hasattr(sys.stdout, "reconfigure"):  # argv bytes that are not UTF-8 (lone surrogates) print escaped
        sys.stdout.reconfigure(errors="backslashreplace")
    if sum(map(bool, (prompt, chat, file))) != 1:
        die("give exactly one of --prompt=TEXT, --chat, --file=PROMPTS.txt")
    if mode not in ("auto", "chat", "completion"):
        die(f"mode must be auto, chat or completion, not {mode!r}")
    if dtype not in ("float32", "bfloat16"):
        die(f"dtype must be float32 or bfloat16, not {dtype!r}")
    if file and not os.path.isfile(file):  # before the model loads
        die(f"--file={file}: no such file")
    dev = device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, ckpt = load_model(out_dir, device=dev)
    model.to(getattr(torch, dtype))
    if compile:
        model.compile_for_decode()
    as_chat = chat or (is_chat_checkpoint(ckpt) if mode == "auto" else mode == "chat")
    print(f"{out_dir}: {model.num_params() / 1e6:.1f}M params, step {ckpt.get('step')}, "
          f"{'chat (ChatML)' if as_chat else 'raw completion'}", file=sys.stderr, flush=True)
    generator = torch.Generator(device=dev).manual_seed(seed)
    start = [{"role": "system", "content": system}] if system else []

    def encode(text, where):
        user = start + [{"role": "user", "content": text}]
        ids = tok.render_chat(user, add_generation_prompt=True)[0] if as_chat else tok.encode(text, bos=True)
        if len(ids) >= model.cfg.max_seq_len:
            die(f"{where} is {len(ids)} tokens; the model's context is {model.cfg.max_seq_len}: shorten it")
        return ids

    if chat:
        repl(model, tok, generator, start)
    elif prompt and num_samples == 1:
        ids = encode(prompt, "the prompt")
        print("" if as_chat else prompt, end="", flush=True)  # a completion continues the prompt's line
        stream_text(model, tok, ids, generator)
    elif prompt:
        for i, text in enumerate(generate_texts(model, tok, [encode(prompt, "the prompt")], generator)):
            print(f"--- sample {i + 1}/{num_samples}\n{'' if as_chat else prompt}{text}", flush=True)
    else:
        with open(file, encoding="utf-8") as f:
            todo = [(n, ln.rstrip("\n")) for n, ln in enumerate(f, 1) if ln.strip()]
        print(f"{file}: {len(todo)} prompts (blank lines skipped)", file=sys.stderr)
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            texts = generate_texts(model, tok, [encode(p, f"{file}:{n}") for n, p in batch], generator)
            for r, text in enumerate(texts):
                n, p = batch[r // num_samples]
                tag = f" sample {r % num_samples + 1}/{num_samples}" if num_samples > 1 else ""
                print(f"### {file}:{n}{tag}: {p}\n{text}\n", flush=True)

if __name__ == "__main__":
    with torch.inference_mode():
        main()
