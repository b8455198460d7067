"""A reader for the MindSpeed-MM launch script: read, never run.

A small lexer splits the script into commands (backslash continuations, comments, quotes kept),
then expands words against the variables assigned so far: `$VAR`, `${VAR}`, `${VAR:-x}` and
`$((...))` integer arithmetic. Anything only running the script could tell (`$(date)`) becomes an
`_Unknown` value whose message says why, reported where a carried value depends on it. `parse_script`
returns the variables, the commands and the torchrun / python launch line with its arguments.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["ScriptError", "Token", "Var", "Script", "parse_script", "NAME_PATTERN"]


class ScriptError(ValueError):
    """A script the lexer cannot split (an unterminated quote or substitution); names the line."""


class _Unknown(Exception):
    """A value only running the script would give; the message says why."""


# Shell lexing: commands as raw words (quotes kept), then expansion against the variables so far.

NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*"
_ASSIGN = re.compile(rf"({NAME_PATTERN})=(.*)", re.S)
_SEPARATORS = ("&&", "||", ";", "|", "&", "\n")


def _line_of(text: str, i: int) -> int:
    return text.count("\n", 0, i) + 1


def _closing(text: str, i: int) -> int:
    """Index just past the quote / substitution opening at `i` (', ", `, $( or ${)."""
    opener = text[i : i + 2] if text[i] == "$" else text[i]
    j = i + len(opener)
    depth = 1
    while j < len(text):
        c = text[j]
        if c == "\\" and opener != "'":
            j += 2
            continue
        if opener == "'" and c == "'" or opener == '"' and c == '"' or opener == "`" and c == "`" or opener == "${" and c == "}":
            return j + 1
        if opener in ('"', "$(") and (c == "`" or text.startswith(("$(", "${"), j)):
            j = _closing(text, j)
            continue
        if opener == "$(" and c in "'\"":
            j = _closing(text, j)
            continue
        if opener == "$(" and c in "()":
            depth += 1 if c == "(" else -1
            if depth == 0:
                return j + 1
        j += 1
    raise ScriptError(f"line {_line_of(text, i)}: unterminated {opener}")


def _commands(text: str) -> list[tuple[int, list[str]]]:
    """(line, raw words) per simple command; pipes, `;`, `&&` and newlines separate commands."""
    out: list[tuple[int, list[str]]] = []
    words: list[str] = []
    word: list[str] = []
    start, i = 0, 0

    def end_word() -> None:
        if word:
            words.append("".join(word))
            word.clear()

    while i < len(text):
        c = text[i]
        if not words and not word:
            start = _line_of(text, i)
        if c == "\\" and text.startswith("\\\n", i):  # continuation
            i += 2
        elif c == "\\":
            word.append(text[i : i + 2])
            i += 2
        elif c in "'\"`" or text.startswith(("$(", "${"), i):
            j = _closing(text, i)
            word.append(text[i:j])
            i = j
        elif c == "#" and not word:  # a comment runs to the end of the line
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
        elif c in " \t\r":
            end_word()
            i += 1
        elif c == "&" and (i > 0 and text[i - 1] in "<>" or text.startswith("&>", i)):  # 2>&1, &>file
            word.append(c)
            i += 1
        elif sep := next((s for s in _SEPARATORS if text.startswith(s, i)), None):
            end_word()
            if words:
                out.append((start, list(words)))
                words.clear()
            i += len(sep)
        else:
            word.append(c)
            i += 1
    end_word()
    if words:
        out.append((start, words))
    return out


def _lookup_var(name: str, env: Mapping[str, Var]) -> str:
    var = env.get(name)
    if var is None:
        raise _Unknown(f"{name} is not set in the script")
    if var.value is None:
        raise _Unknown(var.why)
    return var.value


def _arith(expr: str, env: Mapping[str, Var]) -> int:
    """Bash integer arithmetic over + - * / % and parentheses; names are the script's variables."""
    source = re.sub(rf"\$\{{({NAME_PATTERN})\}}|\$({NAME_PATTERN})", lambda m: m.group(1) or m.group(2), expr)
    try:
        tree = ast.parse(source.strip(), mode="eval").body
    except SyntaxError:
        raise _Unknown(f"$(({expr})) is not simple integer arithmetic") from None

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name):
            text = _lookup_var(node.id, env)
            if not re.fullmatch(r"-?\d+", text.strip()):
                raise _Unknown(f"{node.id}={text!r} is not an integer")
            return int(text)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div | ast.Mod):
            a, b = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add | ast.Sub | ast.Mult):
                return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
            if b == 0:
                raise _Unknown(f"$(({expr})) divides by zero")
            quotient = abs(a) // abs(b) * (1 if (a < 0) == (b < 0) else -1)  # bash truncates toward zero
            return quotient if isinstance(node.op, ast.Div) else a - b * quotient
        raise _Unknown(f"$(({expr})) uses operations the migration does not evaluate")

    return value(tree)


def _pieces(raw: str, env: Mapping[str, Var]) -> list[tuple[str, bool]]:
    """Expand one raw word into (text, split) pieces; `split` marks unquoted expansions."""
    out: list[tuple[str, bool]] = []
    quoted, i = False, 0
    while i < len(raw):
        c = raw[i]
        if c == "'" and not quoted:
            j = _closing(raw, i)
            out.append((raw[i + 1 : j - 1], False))
            i = j
        elif c == '"':
            quoted, i = not quoted, i + 1
        elif c == "\\" and i + 1 < len(raw):
            nxt = raw[i + 1]
            if nxt != "\n" and (not quoted or nxt in '$`"\\'):
                out.append((nxt, False))
            elif quoted and nxt != "\n":
                out.append(("\\" + nxt, False))
            i += 2
        elif raw.startswith("$((", i):
            j = _closing(raw, i)
            out.append((str(_arith(raw[i + 3 : j - 2], env)), not quoted))
            i = j
        elif raw.startswith("$(", i) or c == "`":
            raise _Unknown(f"command substitution {raw[i:_closing(raw, i)]} is only known when the script runs")
        elif raw.startswith("${", i):
            j = _closing(raw, i)
            inner = raw[i + 2 : j - 1]
            m = re.fullmatch(rf"({NAME_PATTERN})(?::-(.*))?", inner, re.S)
            if not m:
                raise _Unknown(f"${{{inner}}} is a parameter expansion the migration does not evaluate")
            name, default = m.groups()
            text = env[name].value if name in env and env[name].value else None
            out.append((text if text is not None else default if default is not None else _lookup_var(name, env), not quoted))
            i = j
        elif c == "$" and (m := re.match(NAME_PATTERN, raw[i + 1 :])):
            out.append((_lookup_var(m.group(0), env), not quoted))
            i += 1 + m.end()
        elif c == "$" and i + 1 < len(raw) and raw[i + 1] not in " \t\n\"":
            raise _Unknown(f"${raw[i + 1]} is only known when the script runs")
        else:
            out.append((c, False))
            i += 1
    return out


def _expand(raw: str, env: Mapping[str, Var]) -> str:
    """The word's value without field splitting (an assignment's right-hand side)."""
    return "".join(text for text, _ in _pieces(raw, env))


def _fields(raw: str, env: Mapping[str, Var]) -> list[str]:
    """The word as command arguments: unquoted expansions are split on whitespace."""
    fields: list[str] = []
    current: str | None = None
    for text, split in _pieces(raw, env):
        if not split:
            current = (current or "") + text
            continue
        parts = text.split()
        if current is not None and (not parts and text or text[:1].isspace()):
            fields.append(current)
            current = None
        for k, part in enumerate(parts):
            if k and current is not None:
                fields.append(current)
                current = None
            current = (current or "") + part
        if parts and text[-1].isspace():
            fields.append(current)
            current = None
    return fields if current is None else [*fields, current]


@attrs.frozen
class Token:
    """One argument of the launch line: `raw` as written, `value` None when unknowable (`why`)."""

    raw: str
    value: str | None
    line: int
    why: str = ""


@attrs.frozen
class Var:
    """A shell variable: its value when assigned (None: unknowable, `why`), its raw text, and the
    value as argument tokens (for `$GPT_ARGS`-style use on the launch line)."""

    value: str | None
    raw: str
    line: int
    why: str = ""
    tokens: tuple[Token, ...] = ()
    exported: bool = False
    comments: bool = False  # `# ...` inside the quotes (bash passes those on as arguments)


def _word_tokens(word: str, env: Mapping[str, Var], line: int, *, quoted: bool = False) -> list[Token]:
    """The arguments one word gives (`quoted`: a word from inside a double-quoted string)."""
    try:
        return [Token(word, v, line) for v in _fields(f'"{word}"' if quoted else word, env)]
    except _Unknown as e:
        return [Token(word, None, line, str(e))]


def _string_tokens(raw: str, env: Mapping[str, Var], line: int) -> tuple[list[Token], bool]:
    """A double-quoted argument string (GPT_ARGS="...") as tokens that keep each word's raw text.
    Lines of the README's annotated form (`--flag \\ # comment`) lose the comment."""
    tokens: list[Token] = []
    comments = False
    for k, text in enumerate(raw[1:-1].split("\n")):
        text = text.removesuffix("\\")  # a continuation
        i = 0
        while i < len(text):
            if text[i].isspace():
                i += 1
                continue
            j = i
            while j < len(text) and not text[j].isspace():
                j = _closing(text, j) if text[j] == "`" or text.startswith(("$(", "${"), j) else j + 1
            word = text[i:j]
            if word.startswith("#"):
                comments = True
                break
            if word != "\\":  # the README's `--flag \\ # comment` leaves a lone backslash
                tokens += _launch_tokens([word], env, line + k, quoted=True)
            i = j
    return [t for t in tokens if t.value != ""], comments


def _assign(raw: str, env: Mapping[str, Var], line: int, exported: bool) -> tuple[str, Var]:
    name, value_raw = _ASSIGN.fullmatch(raw).groups()
    try:
        value, why = _expand(value_raw, env), ""
    except _Unknown as e:
        value, why = None, f"{name}={value_raw} (line {line}): {e}"
    if re.fullmatch(r'"[^"]*"', value_raw, re.S):
        tokens, comments = _string_tokens(value_raw, env, line)
    else:
        tokens, comments = _word_tokens(value_raw, env, line), False
    return name, Var(value, value_raw, line, why, tuple(tokens), exported, comments)


@attrs.frozen
class Script:
    """What the migration reads from a launch script (nothing is run)."""

    variables: Mapping[str, Var]
    commands: tuple[tuple[int, str, str], ...]  # (line, name, text): sources, post-processing, unknown commands
    launch_line: int = 0
    runner: tuple[tuple[str, str | None], ...] = ()  # torchrun's own flags: (name, value)
    entry: Token | None = None  # pretrain_vlm.py
    args: tuple[Token, ...] = ()  # the program's flags


_POST_REPORT = ("echo", "printf", "grep", "awk", "sed", "tail", "head", "cat", "bc")


def _post_name(words: list[str]) -> str:
    """The recipe_map command a statement after the launch belongs to."""
    if words[0] in ("tee", "chmod") or words[0] == "find" and "chmod" in words:
        return "tee" if words[0] == "tee" else "chmod"
    if _ASSIGN.fullmatch(words[0]) or words[0] in _POST_REPORT:
        return "throughput report"
    return words[0]


def _is_launcher(words: list[str]) -> int:
    """How many words start the launcher (torchrun / python -m torch.distributed.run), 0 if none."""
    if words[0].rsplit("/", 1)[-1] == "torchrun":
        return 1
    module = words[1:3] in (["-m", "torch.distributed.run"], ["-m", "torch.distributed.launch"])
    if re.fullmatch(r"python3?", words[0].rsplit("/", 1)[-1]) and module:
        return 3
    return 0


def _launch_tokens(words: list[str], env: Mapping[str, Var], line: int, *, quoted: bool = False) -> list[Token]:
    """Argument tokens; a lone `$GPT_ARGS` brings that variable's tokens, each with its own raw text."""
    tokens: list[Token] = []
    for word in words:
        m = re.fullmatch(rf"\$(?:({NAME_PATTERN})|\{{({NAME_PATTERN})\}})", word.strip('"'))
        var = env.get(m.group(1) or m.group(2)) if m else None
        if var is not None and len(var.tokens) > 1:
            tokens += var.tokens
        elif var is not None:
            tokens += [attrs.evolve(t, raw=word.strip('"')) for t in var.tokens]
        else:
            tokens += _word_tokens(word, env, line, quoted=quoted)
    return tokens


_RUNNER_SWITCHES = {"standalone", "no_python", "run_path", "module"}
_REDIRECT = re.compile(r"(\d*|&)(>>?|<)(&?\S*)")


def _without_redirections(words: list[str]) -> list[str]:
    """Drop `2>&1`, `> file`, `>>log` and the like: they never reach the program."""
    out, skip = [], False
    for word in words:
        m = None if skip else _REDIRECT.fullmatch(word)
        if not skip and m is None:
            out.append(word)
        skip = bool(m) and not m.group(3)  # a bare operator: its target is the next word
    return out


def parse_script(text: str) -> Script:
    """Read a launch script without running it: variables, the launch line, the other commands."""
    env: dict[str, Var] = {}
    commands: list[tuple[int, str, str]] = []
    launch: dict[str, Any] = {}
    for line, words in _commands(text):
        if launch:
            commands.append((line, _post_name(words), " ".join(words)))
            continue
        words = _without_redirections(words)
        if not words:
            continue
        exported = words[0] == "export"
        rest = words[1:] if exported else words
        while rest and _ASSIGN.fullmatch(rest[0]):  # NAME=value, possibly before a command
            name, var = _assign(rest.pop(0), env, line, exported or bool(rest))
            env[name] = var
        if exported:
            for name in rest:
                env[name] = attrs.evolve(env[name], exported=True) if name in env else Var(None, "", line, f"{name} is not set", exported=True)
            continue
        if not rest:
            continue
        skip = _is_launcher(rest)
        if not skip:
            commands.append((line, "source" if rest[0] == "." else rest[0], " ".join(rest)))
            continue
        tokens = _launch_tokens(rest[skip:], env, line)
        runner: list[tuple[str, str | None]] = []
        while tokens and tokens[0].value is not None and tokens[0].value.startswith("-"):
            name, eq, value = tokens.pop(0).value.partition("=")
            switch = name.lstrip("-").replace("-", "_") in _RUNNER_SWITCHES
            runner.append((name, value if eq or switch else tokens.pop(0).value if tokens else None))
        launch = {"launch_line": line, "runner": tuple(runner), "entry": tokens[0] if tokens else None, "args": tuple(tokens[1:])}
    return Script(variables=env, commands=tuple(commands), **launch)
