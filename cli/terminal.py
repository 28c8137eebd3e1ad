"""What the REPL does with the terminal: messages typed, pasted or opened with \"\"\", and fa-chat's own lines
(notices, errors, the stats line) in colour where the terminal wants it."""
from __future__ import annotations

import os
import sys

PASTE_ON, PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"  # bracketed paste: the terminal marks a paste with
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"  # these, so that its lines arrive as one message
FENCE = '"""'  # opens and closes a message of several typed lines, as in ollama
DIM, RED, RESET = "\x1b[2m", "\x1b[31m", "\x1b[0m"


def wants_color(stream, mode: str) -> bool:
    """--color: always, never, or auto: on a terminal that is not dumb, unless NO_COLOR is set (no-color.org)."""
    if mode != "auto":
        return mode == "always"
    return not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb" and stream.isatty()


class Console:
    """fa-chat's own lines: notices and errors on stderr, the stats line after an answer on stdout."""

    def __init__(self, color: str = "never", quiet: bool = True, verbose: bool = False):
        self.err_color = wants_color(sys.stderr, color)
        self.out_color = wants_color(sys.stdout, color)
        self.stats = not quiet and sys.stdout.isatty()  # a piped answer stays just the answer
        self.verbose = verbose

    def notice(self, text: str) -> None:
        print(paint(text, DIM, self.err_color), file=sys.stderr)

    def error(self, text: str) -> None:
        print(paint(text, RED, self.err_color), file=sys.stderr)

    def stats_line(self, text: str) -> None:
        print(paint(text, DIM, self.out_color), flush=True)


def paint(text: str, color: str, on: bool) -> str:
    return f"{color}{text}{RESET}" if on else text


def use_bracketed_paste(readline) -> bool:
    """Asks the terminal to mark pastes. GNU readline then takes a pasted block as one line with its
    newlines; Python turns its handling off, so it is turned back on here. libedit knows no paste marks, so
    there pastes stay line by line. Without readline (None) the REPL writes the mode itself and read_message
    joins the marked lines; returns whether it did, so that it turns the mode off again at the end."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return False
    if readline is not None:
        if "libedit" not in (readline.__doc__ or ""):
            readline.parse_and_bind("set enable-bracketed-paste on")
        return False
    sys.stdout.write(PASTE_ON)
    sys.stdout.flush()
    return True


def read_message(prompt: str = ">>> ", more: str = "... ") -> str:
    """One message: a line, a pasted block, or lines between \"\"\" fences. Raises EOFError at the end of the
    input, KeyboardInterrupt (Ctrl-C) to discard what was typed so far."""
    line = input(prompt)
    if PASTE_START in line:  # a paste that readline did not take in: its lines come one by one
        while PASTE_END not in line:
            line += "\n" + input()
        return line.replace(PASTE_START, "").replace(PASTE_END, "")
    if "\n" in line or not line.lstrip().startswith(FENCE):
        return line
    lines, text = [], line.lstrip()[len(FENCE):]
    while not text.rstrip().endswith(FENCE):
        lines.append(text)
        text = input(more)
    lines.append(text.rstrip()[:-len(FENCE)])
    return "\n".join(lines).strip("\n")
