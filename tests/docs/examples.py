"""Reading the runnable examples out of the operator docs.

In ``docs/**/*.md`` and ``README.md``:

- a fenced block tagged ``console`` is executed, in order, by ``tests/docs/test_examples.py``
  against a scratch instance (SQLite, the local provider, a real Celery worker on the
  embedded broker). Lines are bash; ``# expect: TEXT`` asserts the block's output
  contains TEXT; ``# expect-fail`` means the block must exit non-zero.
- a document with ``console openbao`` / ``console moto`` blocks gets its own fresh OpenBao
  dev server (KV v2 at ``secret/``, nothing else enabled) / moto server, and every block
  of it sees ``HMD_TEST_VAULT_ADDR`` and ``HMD_TEST_VAULT_TOKEN`` / ``HMD_TEST_AWS_ENDPOINT``
  plus fake AWS credentials; real ``AWS_*`` profiles, ``VAULT_*``/``BAO_*`` and
  ``GOOGLE_*`` variables are removed. Each block is a separate ``bash -euo pipefail``.
- a document with ``console server`` blocks also gets the scratch instance served by gunicorn
  on a free port, whose URL every block sees as ``KEYVAULT_URL`` (blocks default it to
  ``make run``'s ``http://127.0.0.1:8000``, so they work as written beside ``make run``).
- ``json``, ``yaml`` and ``hcl`` blocks are parsed.
- ``shell`` (``sh``, ``bash``, or untagged) blocks are shown to people, never run. The rule
  for choosing: a shell example that works as written against the scratch instance above is a
  ``console`` block, so it runs. It stays ``shell`` only when it cannot: it acts on production
  systems (systemd, Kubernetes, a cloud account, a production database), never ends
  (``make run``), runs the test suite itself (``make test``), lists configuration rather than
  commands, or names placeholders to fill in (``--kek NAME``, ``RUN_ID``).
- every ``manage.py …`` in any block, YAML command list or inline ``code`` span — here, in
  ``keyvault/**/README.md`` and in the runbooks as the console renders them — is parsed by
  the real argparse parser of that command (``tests/docs/commands.py``,
  ``tests/docs/test_manage_commands.py``), so a ``shell`` block or a sentence cannot name a
  subcommand or a flag that does not exist.
- the Python snippets of ``keyvault/kms/README.md`` run, each against the backend its fence
  names (``python local``, ``python aws`` …; ``tests/docs/test_kms_readme.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").rglob("*.md"))
#: The documents whose examples run or parse: the docs and the top-level README.
EXAMPLE_DOCS = [*DOCS, ROOT / "README.md"]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    info: str
    text: str

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def tags(self) -> set[str]:
        return set(self.info.split()[1:])

    @property
    def expectations(self) -> list[str]:
        return [m.group(1).strip() for m in re.finditer(r"#\s*expect:\s*(.+)$", self.text, re.MULTILINE)]

    @property
    def expect_failure(self) -> bool:
        return bool(re.search(r"#\s*expect-fail\b", self.text))

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path, text: str | None = None) -> list[Block]:
    """The fenced blocks of ``path`` (or of ``text``, read as if it were that file)."""
    text = path.read_text() if text is None else text
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(path=path, line=line, info=match.group(1).strip(), text=match.group(2)))
    return found


def all_blocks(language: str) -> list[Block]:
    return [block for path in EXAMPLE_DOCS for block in blocks(path) if block.language == language]
