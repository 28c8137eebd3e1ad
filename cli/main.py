"""fa-chat: stream one answer (--prompt) or chat in a REPL."""
from __future__ import annotations

import argparse
import sys
import time

from fachat.errors import FachatError

HELP = """Commands:
  /reset   start a new conversation
  /help    show this help
  /quit    exit (Ctrl-D works too)
Ctrl-C stops an answer."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fa-chat", description="Chat with a small Llama-style model.")
    p.add_argument("--model", help="local folder, .gguf file or Hugging Face hub id "
                                    "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", help="answer this one prompt and exit; '-' reads standard input")
    p.add_argument("--system", help="system prompt")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=positive_int, default=512, help="most new tokens per answer (default 512)")
    g.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    r.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    r.add_argument("--max-seq-len", type=positive_int, help="context length; presets the KV cache (default: the model's)")
    p.add_argument("--verbose", action="store_true", help="print stats after each answer and the attention backend")
    return p


def sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def stream_answer(engine, prompt, kwargs: dict, verbose: bool):
    """Streams one answer to stdout; returns the Generation (partial if interrupted by Ctrl-C)."""
    stream = engine.stream(prompt, **kwargs)
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.generation.finish_reason = "interrupted"
    gen = stream.generation
    sys.stdout.write("\n")
    if gen.finish_reason == "interrupted":
        print("[interrupted]", file=sys.stderr)
    elif gen.finish_reason == "length" and gen.stats.prompt_tokens + len(gen.tokens) >= engine.max_seq_len:
        print(f"[context full: {engine.max_seq_len} tokens. Use /reset, or a larger --max-seq-len]", file=sys.stderr)
    if verbose:
        s = gen.stats
        print(f"[{s.prompt_tokens} prompt tokens, {s.new_tokens} new; first token {s.time_to_first_token * 1e3:.0f} ms; "
              f"prefill {s.prefill_tokens_per_s:.1f} tok/s, decode {s.decode_tokens_per_s:.1f} tok/s]",
              file=sys.stderr)
    return gen


def make_prompt(engine, messages: list[dict], text: str):
    """Chat messages when the model has a template, else the raw text."""
    return messages if engine.tokenizer.chat_template else text


def repl(engine, args) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    print("Type a message, /help for commands, Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0]
            if command == "/quit":
                return
            if command == "/help":
                print(HELP)
            elif command == "/reset":
                messages = list(base)
                print("[new conversation]", file=sys.stderr)
            else:
                print(f"unknown command {command}; /help lists them", file=sys.stderr)
            continue
        turn = messages + [{"role": "user", "content": line}]
        try:
            gen = stream_answer(engine, make_prompt(engine, turn, line), sampling_kwargs(args), args.verbose)
        except (FachatError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        messages = turn + [{"role": "assistant", "content": gen.text}]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from fachat.engine import Engine, SamplingParams
        from fachat.models import default_model

        kwargs = sampling_kwargs(args)
        SamplingParams(**{k: v for k, v in kwargs.items() if k != "max_new_tokens"})  # fail before the slow load

        source = args.model or default_model()
        print(f"Loading {source} ...", file=sys.stderr)
        t0 = time.perf_counter()
        engine = Engine.load(source, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len)
        print(f"Loaded on {engine.device.type} ({str(engine.dtype).removeprefix('torch.')}) "
              f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if args.verbose:
            print(f"attention backend: {engine.attention_backend}", file=sys.stderr)
        if args.prompt is None:
            repl(engine, args)
            return 0
        text = sys.stdin.read() if args.prompt == "-" else args.prompt
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": text}]
        gen = stream_answer(engine, make_prompt(engine, messages, text), kwargs, args.verbose)
        return 130 if gen.finish_reason == "interrupted" else 0
    except (FachatError, ValueError) as e:
        print(f"fa-chat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
