"""fa-chat: stream one answer (--prompt) or chat in a REPL whose session can be saved and resumed."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fachat.cli.terminal import PASTE_OFF, Console, read_message, use_bracketed_paste
from fachat.errors import FachatError

HELP = """Commands:
  /set NAME VALUE   change a setting for the rest of the session (saved with it): max-tokens, temperature,
                    top-p, top-k, min-p, repetition-penalty, seed; /set system TEXT is /system TEXT
  /show             the current settings
  /save PATH        save the session: conversation, KV cache, settings and sampling state
  /load PATH        continue a saved session (the current one is kept if loading fails)
  /reset            start a new conversation, keeping the system prompt
  /undo             take back the last turn
  /system TEXT      set the system prompt; /system alone removes it
  /stats            context size, cache memory and the last answer's speed
  /help             show this help
  /quit             exit (Ctrl-D works too)
A pasted block is one message, and so are the lines typed between two \"\"\" lines.
Ctrl-C stops an answer, or drops what is being typed; the conversation keeps what was said."""
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


# Sampling option (--top-p, /set top-p) -> (generate() argument, parser of its text, help). Flags left out
# keep the session's own settings (a resumed one's included).
SAMPLING = {
    "max-tokens": ("max_new_tokens", int_at_least(1), "most new tokens per answer (default 512)"),
    "temperature": ("temperature", float, "0 is greedy (default 0.7)"),
    "top-p": ("top_p", float, "nucleus sampling mass (default 1.0: off)"),
    "top-k": ("top_k", int, "sample among the k likeliest tokens (default 0: off)"),
    "min-p": ("min_p", float, "drop tokens below min_p x the top probability (default 0: off)"),
    "repetition-penalty": ("repetition_penalty", float, "penalty for tokens already in context (default 1.0)"),
    "seed": ("seed", int, "seed of the sampler, for repeatable answers"),
}


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
    g = p.add_argument_group("sampling (with --resume, the saved session's settings unless given; /set changes "
                             "them in the chat)")
    for name, (_, kind, text) in SAMPLING.items():
        g.add_argument("--" + name, type=kind, help=text)
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    r.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    r.add_argument("--quantize", choices=("auto", "none", "int4", "int8"),
                   help="weights: auto keeps a GGUF file's quantized blocks quantized (int4 where exact, int8 "
                        "otherwise) and loads other models unquantized; int4 or int8 quantize every linear layer on "
                        "load; none dequantizes (default: auto, or with --resume what the session was saved with)")
    r.add_argument("--max-seq-len", type=int_at_least(2),
                   help="context length; presets the KV cache (default: the model's)")
    r.add_argument("--context-full", choices=("shift", "stop"), default="shift",
                   help="when a chat fills the context: drop its oldest turns (never the system prompt) and go on "
                        "(shift, the default), or stop the answer there (stop)")
    o = p.add_argument_group("output")
    o.add_argument("--quiet", action="store_true", help="no stats line after each answer on a terminal")
    o.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour fa-chat's own lines: auto (on a terminal, unless NO_COLOR is set), always, never")
    o.add_argument("--verbose", action="store_true",
                   help="print full stats after each answer, the attention backend (and why it runs) and whether CUDA "
                        "graphs run")
    return p


def sampling_flags(args) -> dict:
    """The sampling settings given on the command line, as generate() arguments."""
    flags = {arg: getattr(args, name.replace("-", "_")) for name, (arg, _, _) in SAMPLING.items()}
    return {arg: value for arg, value in flags.items() if value is not None}


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


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


def weights_line(engine) -> str:
    from fachat.models.loaders import quantize_described  # imported where used, as main() imports the engine

    return f"{engine.weight_bytes / (1 << 20):.1f} MiB resident, {quantize_described(engine.quantize)}"


def print_stats(session) -> None:
    cache, engine = session.cache, session.engine
    mib = 1 << 20
    print(f"weights: {weights_line(engine)}")
    print(f"context: {len(session.tokens)} tokens of {engine.max_seq_len}, "
          f"{plural(len(session.messages), 'message')}")
    print(f"KV cache: {cache.length} positions cached, capacity {cache.capacity}, "
          f"{cache.nbytes / mib:.1f} MiB allocated, {cache.live_nbytes / mib:.1f} MiB live")
    gen = session.last_generation
    print("last answer: none yet" if gen is None else "last answer: " + stats_line(gen))


def print_settings(session) -> None:
    params = session.params
    for name, (arg, _, _) in SAMPLING.items():
        value = getattr(params, arg)
        print(f"{name:<19} {'none' if value is None else value}")
    print(f"{'system':<19} {'none' if session.system is None else session.system}")
    print(f"{'context':<19} {session.engine.max_seq_len} tokens; when full: {session.context_full}")


def set_option(session, text: str) -> None:
    """/set NAME VALUE: a sampling setting, parsed and checked as its flag is."""
    name, _, value = text.partition(" ")
    name, value = name.replace("_", "-"), value.strip()
    if name not in SAMPLING:
        raise ValueError(f"/set takes system or one of {', '.join(SAMPLING)}, e.g. /set temperature 0.2"
                         + (f"; got {name}" if name else ""))
    if not value:
        raise ValueError(f"/set {name} needs a value")
    arg, kind, _ = SAMPLING[name]
    try:
        parsed = kind(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        # argparse's words for the flag's own type errors
        reason = e if isinstance(e, argparse.ArgumentTypeError) else f"invalid {kind.__name__} value: {value!r}"
        raise ValueError(f"{name}: {reason}") from None
    session.configure(**{arg: parsed})  # checks the value as the flag's is checked


def stream_answer(session, message: str, console: Console):
    """Streams one answer to stdout (models without a chat template continue the text). Returns the
    Generation, partial if Ctrl-C stopped it, or None if Ctrl-C stopped the text's prefill (what was
    prefilled stays in the context, as a chat message does)."""
    if session.engine.tokenizer.chat_template:
        stream = session.stream_chat(message)
        n = session.dropped_turns
        if n:
            console.notice(f"[context full: dropped {'the oldest turn' if n == 1 else f'the {n} oldest turns'}; "
                           "the system prompt stays]")
    else:
        try:
            session.append(message)  # prefills here, not in the stream
        except KeyboardInterrupt:
            console.notice("[interrupted]")
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
    limit = session.engine.max_seq_len
    if gen.finish_reason == "interrupted":
        console.notice("[interrupted]")
    elif gen.finish_reason == "length" and len(session.tokens) >= limit:
        console.notice(f"[context full: {limit} tokens. The next message drops the oldest turns]"
                       if session.context_full == "shift" and session.engine.tokenizer.chat_template else
                       f"[context full: {limit} tokens. Use /reset or /undo, or restart with a larger --max-seq-len]")
    if console.verbose:
        console.notice(f"[{stats_line(gen)}]")
    elif console.stats:
        s = gen.stats
        console.stats_line(f"[{plural(s.new_tokens, 'token')}, {s.decode_tokens_per_s:.1f} tok/s, "
                           f"first token {s.time_to_first_token * 1e3:.0f} ms]")
    return gen


def history_file() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "fa-chat" / "history"


def enable_history():
    """readline line editing, with history kept across runs; returns readline (None where there is none) and
    a function that saves the history."""
    try:
        import readline
    except ImportError:
        return None, lambda: None
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

    return readline, save


def run_command(text: str, session, convert_dtype: bool, console: Console):
    """Runs a /command; returns the (possibly new) session, or None to quit."""
    command, _, rest = text.partition(" ")
    rest = rest.strip()
    if command == "/set" and rest.partition(" ")[0] == "system":
        command, rest = "/system", rest.removeprefix("system").strip()
    if command == "/quit":
        return None
    if command == "/help":
        print(HELP)
    elif command == "/reset":
        session.reset()
        console.notice("[new conversation]")
    elif command == "/undo":
        session.undo()
        session.last_generation = None  # /stats: that answer is gone
        console.notice(f"[took back the last turn; {len(session.tokens)} tokens in context]")
    elif command == "/system":
        if not session.engine.tokenizer.chat_template:
            raise ValueError("this model has no chat template, so it has no system prompt")
        session.system = rest or None
        console.notice("[system prompt set]" if rest else "[system prompt removed]")
    elif command == "/set":
        set_option(session, rest)
        console.notice(f"[{rest.partition(' ')[0]} set]")
    elif command == "/show":
        print_settings(session)
    elif command == "/stats":
        print_stats(session)
    elif command in ("/save", "/load"):
        if not rest:
            raise ValueError(f"{command} needs a file path, e.g. {command} chat.safetensors")
        path = os.path.expanduser(rest)
        if command == "/save":
            session.save(path)
            console.notice(f"[saved {len(session.tokens)} tokens to {path} "
                           f"({os.path.getsize(path) / (1 << 20):.1f} MiB)]")
        else:
            loaded = session.engine.load_session(path, convert_dtype)  # raises before anything changes
            loaded.context_full = session.context_full
            session = loaded
            console.notice(f"[loaded {path}: {len(session.tokens)} tokens, "
                           f"{plural(len(session.messages), 'message')}]")
    else:
        raise ValueError(f"unknown command {command}; /help lists them")
    return session


def repl(session, args, console: Console) -> None:
    readline, save_history = enable_history()
    paste_mode = use_bracketed_paste(readline)
    console.notice('Type a message, """ for several lines, /help for commands, Ctrl-D to quit.')
    try:
        while True:
            try:
                message = read_message()
            except EOFError:
                print(file=sys.stderr)
                return
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            text = message.strip()
            if not text:
                continue
            try:
                if text.startswith("/") and "\n" not in text:
                    session = run_command(text, session, args.convert_dtype, console)
                    if session is None:
                        return
                else:
                    stream_answer(session, message, console)
            except BrokenPipeError:
                raise  # stdout's reader has gone: main exits
            except (FachatError, ValueError, OSError) as e:
                console.error(f"error: {e}")
    finally:
        if paste_mode:
            sys.stdout.write(PASTE_OFF)
        save_history()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(args.color, args.quiet, args.verbose)
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
        console.notice(f"Loading {source} ...")
        t0 = time.perf_counter()
        quantize = args.quantize or (saved.model_quantize if saved else "auto")
        engine = Engine.load(source, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                             quantize=quantize)
        console.notice(f"Loaded on {engine.device.type} ({str(engine.dtype).removeprefix('torch.')}) "
                       f"in {time.perf_counter() - t0:.1f} s")
        if args.verbose:
            console.notice(f"weights: {weights_line(engine)}")
            for type_name, stored_as in engine.stored_as.items():
                console.notice(f"  GGUF {type_name} matrices: {stored_as}")
            console.notice(f"attention backend: {engine.attention_backend} ({engine.attention_backend_reason})")
            console.notice(f"CUDA graphs: {'on' if engine.cuda_graphs else 'off'} ({engine.cuda_graphs_reason})")
            console.notice(f"CPU decode step: {engine.cpu_step.runs if engine.cpu_step else 'eager'} "
                           f"({engine.cpu_step_reason})")
        if args.resume:
            session = engine.load_session(args.resume, args.convert_dtype)
            session.configure(**flags)
            if args.system is not None:
                session.system = args.system
            console.notice(f"[resumed {args.resume}: {len(session.tokens)} tokens, "
                           f"{plural(len(session.messages), 'message')}]")
        else:
            session = engine.session(system=args.system, **(NEW_SESSION_DEFAULTS | flags))
        session.context_full = args.context_full
        if prompt is None:
            repl(session, args, console)
            return 0
        gen = stream_answer(session, prompt, console)
        return 130 if gen is None or gen.finish_reason == "interrupted" else 0
    except BrokenPipeError:
        # stdout's reader has gone (`fa-chat ... | head`): exit quietly with 128 + SIGPIPE, the status of a
        # Unix tool that SIGPIPE killed. stdout goes to devnull so that Python's flush at exit does not fail
        # again (Python's docs, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (FachatError, ValueError, OSError) as e:
        console.error(f"fa-chat: error: {e}")
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
