"""fa-chat: stream one answer (--prompt) or chat in a REPL whose session can be saved and resumed."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fachat.errors import FachatError

HELP = """Commands:
  /save PATH     save the session: conversation, KV cache and sampling state
  /load PATH     continue a saved session (the current one is kept if loading fails)
  /reset         start a new conversation, keeping the system prompt
  /undo          take back the last turn
  /system TEXT   set the system prompt; /system alone removes it
  /stats         context size, cache memory and the last answer's speed
  /help          show this help
  /quit          exit (Ctrl-D works too)
Ctrl-C stops an answer; the conversation keeps what was said."""

# Flag -> generate() argument; flags left out keep the session's own settings (a resumed one's included).
SAMPLING_FLAGS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                  "min_p": "min_p", "repetition_penalty": "repetition_penalty", "seed": "seed"}
NEW_SESSION_DEFAULTS = {"max_new_tokens": 512}


def int_at_least(low: int):
    """An argparse type: an int >= low."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse's message for a non-number: "invalid int value: 'abc'"
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fa-chat", description="Chat with a small Llama-style model.")
    p.add_argument("--model", help="local folder, .gguf file or Hugging Face hub id "
                                    "(default: the saved session's model with --resume, else the embedded "
                                    "SmolLM2-135M-Instruct)")
    p.add_argument("--resume", metavar="PATH", help="continue a session saved with /save")
    p.add_argument("--convert-dtype", action="store_true",
                   help="let --resume and /load take a session saved in another dtype, converting its KV cache")
    p.add_argument("--prompt", help="answer this one prompt and exit; '-' reads standard input")
    p.add_argument("--system", help="system prompt")
    g = p.add_argument_group("sampling (with --resume, the saved session's settings unless given)")
    g.add_argument("--max-tokens", type=int_at_least(1), help="most new tokens per answer (default 512)")
    g.add_argument("--temperature", type=float, help="0 is greedy (default 0.7)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1.0: off)")
    g.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (default 0: off)")
    g.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability (default 0: off)")
    g.add_argument("--repetition-penalty", type=float, help="penalty for tokens already in context (default 1.0)")
    g.add_argument("--seed", type=int, help="seed of the sampler, for repeatable answers")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    r.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    r.add_argument("--max-seq-len", type=int_at_least(2),
                   help="context length; presets the KV cache (default: the model's)")
    p.add_argument("--verbose", action="store_true", help="print stats after each answer, the attention backend and whether CUDA graphs run")
    return p


def sampling_flags(args) -> dict:
    """The sampling settings given on the command line, as generate() arguments."""
    return {arg: getattr(args, flag) for flag, arg in SAMPLING_FLAGS.items() if getattr(args, flag) is not None}


def read_prompt(arg: str | None) -> str | None:
    """The --prompt text ('-': standard input), or None for the REPL; refuses a blank one, which has
    nothing to answer."""
    if arg is None:
        return None
    text = sys.stdin.read() if arg == "-" else arg
    if not text.strip():
        raise ValueError("the prompt is empty" + (" (nothing on standard input)" if arg == "-" else ""))
    return text


def stats_line(gen) -> str:
    s = gen.stats
    return (f"{s.prompt_tokens} context tokens ({s.cached_tokens} cached), {s.new_tokens} new; first token {s.time_to_first_token * 1e3:.0f} ms; "
            f"prefill {s.prefill_tokens_per_s:.1f} tok/s, decode {s.decode_tokens_per_s:.1f} tok/s")


def print_stats(session) -> None:
    cache, engine = session.cache, session.engine
    mib = 1 << 20
    print(f"context: {len(session.tokens)} tokens of {engine.max_seq_len}, {len(session.messages)} messages")
    print(f"KV cache: {cache.length} positions cached, capacity {cache.capacity}, "
          f"{cache.nbytes / mib:.1f} MiB allocated, {cache.live_nbytes / mib:.1f} MiB live")
    gen = session.last_generation
    print("last answer: none yet" if gen is None else "last answer: " + stats_line(gen))


def stream_answer(session, message: str, verbose: bool):
    """Streams one answer to stdout (models without a chat template continue the text). Returns the
    Generation, partial if Ctrl-C stopped it, or None if Ctrl-C stopped the text's prefill (what was
    prefilled stays in the context, as a chat message does)."""
    if session.engine.tokenizer.chat_template:
        stream = session.stream_chat(message)
    else:
        try:
            session.append(message)  # prefills here, not in the stream
        except KeyboardInterrupt:
            print("[interrupted]", file=sys.stderr)
            return None
        stream = session.stream()
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()  # the partial answer joins the conversation now
    gen = stream.generation
    sys.stdout.write("\n")
    sys.stdout.flush()
    if gen.finish_reason == "interrupted":
        print("[interrupted]", file=sys.stderr)
    elif gen.finish_reason == "length" and len(session.tokens) >= session.engine.max_seq_len:
        print(f"[context full: {session.engine.max_seq_len} tokens. Use /reset or /undo, "
              "or restart with a larger --max-seq-len]", file=sys.stderr)
    if verbose:
        print(f"[{stats_line(gen)}]", file=sys.stderr)
    return gen


def history_file() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "fa-chat" / "history"


def enable_history():
    """readline line editing, with history kept across runs; returns a function that saves it."""
    try:
        import readline
    except ImportError:
        return lambda: None
    path = history_file()
    try:
        readline.read_history_file(path)
    except (OSError, ValueError):
        pass  # no history yet, or unreadable: start afresh
    readline.set_history_length(1000)

    def save():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            readline.write_history_file(tmp)
            os.replace(tmp, path)
        except OSError:
            pass  # history is a convenience; never fail the exit over it

    return save


def run_command(text: str, session, convert_dtype: bool):
    """Runs a /command; returns the (possibly new) session, or None to quit."""
    command, _, rest = text.partition(" ")
    rest = rest.strip()
    if command == "/quit":
        return None
    if command == "/help":
        print(HELP)
    elif command == "/reset":
        session.reset()
        print("[new conversation]", file=sys.stderr)
    elif command == "/undo":
        session.undo()
        print(f"[took back the last turn; {len(session.tokens)} tokens in context]", file=sys.stderr)
    elif command == "/system":
        if not session.engine.tokenizer.chat_template:
            raise ValueError("this model has no chat template, so it has no system prompt")
        session.system = rest or None
        print("[system prompt set]" if rest else "[system prompt removed]", file=sys.stderr)
    elif command == "/stats":
        print_stats(session)
    elif command in ("/save", "/load"):
        if not rest:
            raise ValueError(f"{command} needs a file path, e.g. {command} chat.safetensors")
        path = os.path.expanduser(rest)
        if command == "/save":
            session.save(path)
            print(f"[saved {len(session.tokens)} tokens to {path} ({os.path.getsize(path) / (1 << 20):.1f} MiB)]",
                  file=sys.stderr)
        else:
            session = session.engine.load_session(path, convert_dtype)  # raises before anything changes
            print(f"[loaded {path}: {len(session.tokens)} tokens, {len(session.messages)} messages]",
                  file=sys.stderr)
    else:
        raise ValueError(f"unknown command {command}; /help lists them")
    return session


def repl(session, args) -> None:
    save_history = enable_history()
    print("Type a message, /help for commands, Ctrl-D to quit.", file=sys.stderr)
    try:
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
            try:
                if text.startswith("/"):
                    session = run_command(text, session, args.convert_dtype)
                    if session is None:
                        return
                else:
                    stream_answer(session, line, args.verbose)
            except BrokenPipeError:
                raise  # stdout's reader has gone: main exits
            except (FachatError, ValueError, OSError) as e:
                print(f"error: {e}", file=sys.stderr)
    finally:
        save_history()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from fachat.engine.persistence import read_checkpoint_info
        from fachat.engine.engine import Engine
        from fachat.engine.sampling import SamplingParams
        from fachat.models.loaders import default_model

        flags = sampling_flags(args)
        SamplingParams(**flags)  # bad flags, an empty prompt and a bad --resume file fail before the slow load
        prompt = read_prompt(args.prompt)
        saved = read_checkpoint_info(args.resume) if args.resume else None
        source = args.model or (saved.model_source if saved else None) or default_model()
        print(f"Loading {source} ...", file=sys.stderr)
        t0 = time.perf_counter()
        engine = Engine.load(source, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len)
        print(f"Loaded on {engine.device.type} ({str(engine.dtype).removeprefix('torch.')}) "
              f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if args.verbose:
            print(f"attention backend: {engine.attention_backend} ({engine.attention_backend_reason})", file=sys.stderr)
            print(f"CUDA graphs: {'on' if engine.cuda_graphs else 'off'} ({engine.cuda_graphs_reason})", file=sys.stderr)
        if args.resume:
            session = engine.load_session(args.resume, args.convert_dtype)
            session.configure(**flags)
            if args.system is not None:
                session.system = args.system
            print(f"[resumed {args.resume}: {len(session.tokens)} tokens, {len(session.messages)} messages]",
                  file=sys.stderr)
        else:
            session = engine.session(system=args.system, **(NEW_SESSION_DEFAULTS | flags))
        if prompt is None:
            repl(session, args)
            return 0
        gen = stream_answer(session, prompt, args.verbose)
        return 130 if gen is None or gen.finish_reason == "interrupted" else 0
    except BrokenPipeError:
        # stdout's reader has gone (`fa-chat ... | head`): exit quietly with 128 + SIGPIPE, the status of a
        # Unix tool that SIGPIPE killed. stdout goes to devnull so that Python's flush at exit does not fail
        # again (Python's docs, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (FachatError, ValueError, OSError) as e:
        print(f"fa-chat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
