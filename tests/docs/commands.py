"""Every ``manage.py …`` the operator material shows, parsed by the command's real argparse parser.

Where commands are looked for (:func:`documents`): ``docs/**/*.md``, ``README.md``,
``keyvault/**/README.md`` and ``rotation/runbooks/*.md`` — in every fenced block that holds
shell (``console``, ``shell``, ``sh``, ``bash``, untagged), in YAML blocks (a list such as
``command: ["python", "manage.py", "rotation", "sweep"]``) and in inline ``code`` spans of the
prose; and the runbooks once more *as the console renders them* (``Runbook.html()``, the
panel beside each action), so what an operator copies from the console is what is checked;
and the ``<code>`` elements of the console's own templates (:func:`console_templates`).

How a line is read (:func:`invocations_in_shell`): continuation lines (``\\``) are joined,
heredoc bodies skipped, ``$(…)`` substitutions checked on their own and replaced by a
placeholder, and the line is split like a shell (``shlex``) at ``|``, ``||``, ``&&``, ``;``
and ``&``. In each piece, ``manage.py`` (also ``./manage.py``, ``python manage.py``,
``.venv/bin/python manage.py``, after ``VAR=value`` prefixes or a ``… --`` such as
``kubectl exec … --``) starts an invocation; redirections, ``2>&1`` and ``# comments`` end it.
Synopsis notation is understood: ``[--provider P]`` is checked as if written out, and an
unspaced ``a|b|c`` means "each of these" (every alternative must exist; required arguments
are then not demanded, as a synopsis leaves them out).

How it is checked (:func:`check`): the name must be a Django command of this project
(``get_commands()``), and the words after it must parse with that command's own parser
(``load_command_class(app, name).create_parser("manage.py", name)``): subcommands and flags
exist and are spelt out (no abbreviations), required arguments are there, typed values
convert. Names in capitals (``NAME``, ``RUN_ID``), ``<kek>``, ``$KEK``/``${KEK}``,
``…``/``...`` and a ``$(…)`` result are placeholders: accepted wherever a value goes, even
where the parser wants an int or one of a few choices — but never as a subcommand name.
"""

from __future__ import annotations

import argparse
import html
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from tests.docs.examples import ROOT, Block, blocks

SHELL_LANGUAGES = {"", "console", "shell", "sh", "bash"}
#: Words that may come before ``manage.py`` in a command (besides ``VAR=value``).
LAUNCHERS = re.compile(r"^(?:(?:\S*/)?python[0-9.]*|env|sudo|exec|time|nice|nohup)$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_-]*|<[^>]+>|…|\.\.\.|.*\$.*)$")
SUBSTITUTED = "$SUBSTITUTED"
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")", "|&"}
REDIRECTS = {">", ">>", "<", ">&", "<&", "&>", "&>>", ">|", "<>"}
HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")
#: An unspaced ``|`` between two words: synopsis alternatives, not a pipe.
ALTERNATION = re.compile(r"(?<=[\w\]-])\|(?=[\w\[-])")
ALT = "\x1f"
#: ``[--provider P]``: an optional part of a synopsis (not ``[ -f x ]``, a shell test).
OPTIONAL = re.compile(r"(?<![\w\[])\[(?=[-A-Z<])([^\[\]\n]*)\]")
#: ``<kek>``: a placeholder, not two redirections.
ANGLED = re.compile(r"<([A-Za-z][\w.-]*)>")
LT, GT = "\x1e", "\x1d"


@dataclass(frozen=True)
class Invocation:
    """One ``manage.py`` command as written: where, the words after ``manage.py``, how to read it."""

    where: str
    argv: tuple[str, ...]
    synopsis: bool = False

    def __str__(self) -> str:
        return f"{self.where}: manage.py {shlex.join(self.argv).replace(ALT, '|')}"


@dataclass(frozen=True)
class Problem:
    """Text that names ``manage.py`` but cannot be read as a command."""

    where: str
    message: str


# --- reading shell text -------------------------------------------------------------------


def _substitutions(text: str) -> tuple[str, list[str]]:
    """``text`` with each top-level ``$(…)`` replaced by a placeholder, and the inner texts."""
    out, inner, i, quote = [], [], 0, ""
    while i < len(text):
        char = text[i]
        if quote == "'" and char == "'":
            quote = ""
        elif not quote and char in "'\"":
            quote = char
        elif quote == '"' and char == '"':
            quote = ""
        elif quote != "'" and text.startswith("$(", i):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
            inner.append(text[i + 2 : j - 1])
            out.append(SUBSTITUTED)
            i = j
            continue
        out.append(char)
        i += 1
    return "".join(out), inner


def _without_comments(text: str) -> str:
    """``text`` without shell comments: ``#`` at the start of a word, outside quotes, to the end of its line."""
    out, quote, i = [], "", 0
    while i < len(text):
        char = text[i]
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        out.append(char)
        i += 1
    return "".join(out)


def _words(text: str) -> list[str]:
    text = _without_comments(text)
    text = ANGLED.sub(rf"{LT}\1{GT}", OPTIONAL.sub(r"\1", ALTERNATION.sub(ALT, text)))
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = ""
    return [word.replace(LT, "<").replace(GT, ">") for word in lexer]


def _pieces(words: list[str]) -> Iterator[list[str]]:
    piece: list[str] = []
    skip = False
    for index, word in enumerate(words):
        if skip:
            skip = False
        elif word in SEPARATORS:
            yield piece
            piece = []
        elif word in REDIRECTS or word.startswith(("<<",)):
            skip = True  # the redirection's target
        elif word.isdigit() and index + 1 < len(words) and words[index + 1] in REDIRECTS:
            continue  # the 2 of 2>&1
        else:
            piece.append(word)
    yield piece


def _command_position(prefix: list[str]) -> bool:
    if "--" in prefix:
        prefix = prefix[len(prefix) - prefix[::-1].index("--") :]
    return all(ASSIGNMENT.match(word) or LAUNCHERS.match(word) for word in prefix)


def invocations_in_line(text: str, where: str, *, strict: bool) -> Iterator[Invocation | Problem]:
    """The ``manage.py`` invocations in one logical shell line (continuations already joined)."""
    text, inner = _substitutions(text)
    for nested in inner:
        yield from invocations_in_line(nested, where, strict=strict)
    try:
        words = _words(text)
    except ValueError as exc:
        if "manage.py" in text:
            yield Problem(where, f"cannot split {text.strip()!r} like a shell: {exc}")
        return
    for piece in _pieces(words):
        at = next((i for i, word in enumerate(piece) if Path(word).name == "manage.py"), None)
        if at is None:
            continue
        if not _command_position(piece[:at]):
            if strict:
                yield Problem(where, f"'manage.py' is not where a command starts in {shlex.join(piece)!r}")
            continue
        argv = piece[at + 1 :]
        if not argv:
            continue  # the file named in prose ("every `manage.py` command")
        yield Invocation(where, tuple(argv), synopsis=any(ALT in word for word in argv))


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(offset of the first line, text) per shell line: continuations joined, heredoc bodies left out."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        start, joined = i, lines[i]
        while (joined.endswith("\\") or _unclosed(joined)) and i + 1 < len(lines):
            i += 1
            joined = (joined[:-1] + " " if joined.endswith("\\") else joined + "\n") + lines[i]
        i += 1
        heredoc = HEREDOC.search(joined)
        if heredoc:
            while i < len(lines) and lines[i].strip() != heredoc.group(2):
                i += 1
            i += 1
        yield start, joined


def _unclosed(text: str) -> bool:
    try:
        _words(_substitutions(text)[0])
    except ValueError:
        return True
    return False


def invocations_in_shell(text: str, path: Path, first_line: int, *, strict: bool) -> Iterator[Invocation | Problem]:
    for offset, line in logical_lines(text):
        if "manage.py" in line:
            yield from invocations_in_line(line, f"{_rel(path)}:{first_line + offset}", strict=strict)


def invocations_in_yaml(block: Block) -> Iterator[Invocation | Problem]:
    import yaml

    def walk(node) -> Iterator[list]:
        if isinstance(node, dict):
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            if any(isinstance(item, str) and Path(item).name == "manage.py" for item in node):
                yield node
            for value in node:
                yield from walk(value)

    try:
        documents = list(yaml.safe_load_all(block.text))
    except yaml.YAMLError:
        return  # test_yaml_samples_parse reports it
    for document in documents:
        for command in walk(document):
            words = [str(item) for item in command]
            at = next(i for i, word in enumerate(words) if Path(word).name == "manage.py")
            line = block.line + 1 + next((n for n, text in enumerate(block.text.splitlines()) if "manage.py" in text), 0)
            yield Invocation(f"{_rel(block.path)}:{line}", tuple(words[at + 1 :]))


# --- where the text comes from ------------------------------------------------------------


def documents() -> list[Path]:
    found = [*(ROOT / "docs").rglob("*.md"), ROOT / "README.md", *(ROOT / "keyvault").rglob("README.md"),
             *(ROOT / "rotation" / "runbooks").glob("*.md")]
    return sorted(set(found))


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


INLINE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)


def _prose(text: str, fenced: list[Block]) -> str:
    """``text`` with fenced blocks blanked (line numbers kept)."""
    lines = text.split("\n")
    for block in fenced:
        for n in range(block.line - 1, block.line + block.text.count("\n") + 1):
            if n < len(lines):
                lines[n] = ""
    return "\n".join(lines)


def invocations_in_markdown(path: Path, text: str | None = None) -> list[Invocation | Problem]:
    """Every invocation in a Markdown file: shell and YAML blocks, and inline code spans."""
    text = path.read_text() if text is None else text
    fenced = blocks(path, text)
    found: list[Invocation | Problem] = []
    for block in fenced:
        if block.language in SHELL_LANGUAGES:
            found += invocations_in_shell(block.text, path, block.line + 1, strict=block.language != "")
        elif block.language == "yaml":
            found += invocations_in_yaml(block)
    prose = _prose(text, fenced)
    for match in INLINE.finditer(prose):
        span = match.group(2)
        if "manage.py" in span:
            line = prose.count("\n", 0, match.start()) + 1
            if prose.split("\n")[line - 1].lstrip().startswith("|"):
                span = span.replace("\\|", "|")  # a table cell escapes its pipes, even in code (GFM)
            found += invocations_in_line(span.replace("\n", " "), f"{_rel(path)}:{line}", strict=True)
    return sorted(found, key=lambda item: int(item.where.rsplit(":", 1)[1]))  # in reading order


class _CodeText(HTMLParser):
    """The text of every ``<code>`` element of an HTML fragment (inline and ``<pre><code>``)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0
        self.codes: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "code":
            self.depth += 1
            self.codes.append("")

    def handle_endtag(self, tag):
        if tag == "code" and self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.codes[-1] += data


def invocations_in_rendered_runbook(slug: str, rendered_html: str, source: Path) -> list[Invocation | Problem]:
    """Invocations in a runbook as the console shows it, each located in its source file."""
    parser = _CodeText()
    parser.feed(rendered_html)
    lines = source.read_text().splitlines()
    found: list[Invocation | Problem] = []
    for code in parser.codes:
        if "manage.py" not in code:
            continue
        first = html.unescape(code).strip().splitlines()[0]
        line = next((n for n, text in enumerate(lines, 1) if first in text), 0)
        where = f"{_rel(source)}:{line} (as rendered in the console)"
        for invocation in invocations_in_shell(code, source, line, strict=True):
            if isinstance(invocation, Invocation):
                invocation = Invocation(where, invocation.argv, invocation.synopsis)
            found.append(invocation)
    return found


def console_templates() -> list[Path]:
    """The console's own templates that name a ``manage.py`` command (in ``<code>``)."""
    found = [*(ROOT / "keyvault").rglob("templates/**/*.html"), *(ROOT / "rotation").rglob("templates/**/*.html")]
    return sorted(path for path in found if "manage.py" in path.read_text())


def invocations_in_template(path: Path) -> list[Invocation | Problem]:
    """Invocations in the ``<code>`` elements of a console template, located by line."""
    text = path.read_text()
    parser = _CodeText()
    parser.feed(text)
    lines = text.splitlines()
    found: list[Invocation | Problem] = []
    for code in parser.codes:
        if "manage.py" in code:
            first = code.strip().splitlines()[0]
            line = next((n for n, source in enumerate(lines, 1) if first in source), 0)
            found += invocations_in_line(html.unescape(code), f"{_rel(path)}:{line}", strict=True)
    return found


def rendered_runbooks() -> list[Invocation | Problem]:
    from rotation import runbooks

    return [found for slug, runbook in runbooks.all_runbooks().items()
            for found in invocations_in_rendered_runbook(slug, runbook.html(), runbooks.RUNBOOK_DIR / f"{slug}.md")]


# --- checking against argparse ------------------------------------------------------------


def is_placeholder(value: str) -> bool:
    return bool(PLACEHOLDER.match(value))


class _AnyPlaceholder(list):
    """A ``choices`` list that also admits placeholders (argparse tests ``value in choices``)."""

    def __contains__(self, value) -> bool:
        return (isinstance(value, str) and is_placeholder(value)) or super().__contains__(value)


def _tolerant(convert):
    def convert_or_keep(value):
        return value if is_placeholder(value) else convert(value)

    convert_or_keep.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its error
    return convert_or_keep


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def _loosen(parser: argparse.ArgumentParser, *, synopsis: bool) -> None:
    """Accept placeholders as values; for a synopsis, also demand no required argument.

    Abbreviated flags (``--witnes`` for ``--witness``) are refused: argparse would take them,
    but a later flag with the same prefix would break the doc.
    """
    for each in _parsers(parser):
        each.allow_abbrev = False
        for action in each._actions:
            if isinstance(action, argparse._SubParsersAction):
                action.required = action.required and not synopsis  # subcommands must still exist
                continue
            if callable(action.type):
                action.type = _tolerant(action.type)
            if action.choices is not None:
                action.choices = _AnyPlaceholder(action.choices)
            if synopsis and action.required:
                action.required = False
            if synopsis and not action.option_strings and action.nargs is None:
                action.nargs = "?"
        if synopsis:
            for group in each._mutually_exclusive_groups:
                group.required = False


def _alternatives(argv: tuple[str, ...]) -> list[tuple[str, ...]]:
    for index, word in enumerate(argv):
        if ALT in word:
            return [alt for choice in word.split(ALT)
                    for alt in _alternatives((*argv[:index], choice, *argv[index + 1 :]))]
    return [argv]


def check(invocation: Invocation) -> str | None:
    """``None`` when ``manage.py`` would accept the words, else why not (argparse's own message)."""
    from django.core.management import get_commands, load_command_class
    from django.core.management.base import CommandError

    for argv in _alternatives(invocation.argv):
        name, args = argv[0], list(argv[1:])
        if name in {"help", "--help", "-h", "--version"}:
            if args and args[0] not in get_commands():
                return f"Unknown command: {args[0]!r}"
            continue
        commands = get_commands()
        if name not in commands:
            return f"Unknown command: {name!r} (not a Django command of this project)"
        parser = load_command_class(commands[name], name).create_parser("manage.py", name)
        _loosen(parser, synopsis=invocation.synopsis)
        try:
            parser.parse_args(args)
        except CommandError as exc:
            return str(exc)
        except SystemExit as exc:  # --help and friends print and exit
            if exc.code not in (0, None):
                return f"argparse exited {exc.code}"
    return None


def failures(found: Iterable[Invocation | Problem]) -> list[str]:
    """One line per command ``manage.py`` would refuse (or text that cannot be read as one)."""
    lines = []
    for item in found:
        if isinstance(item, Problem):
            lines.append(f"{item.where}: {item.message}")
        else:
            error = check(item)
            if error:
                lines.append(f"{item}\n    {error}")
    return lines
