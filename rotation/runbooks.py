"""Runbooks: one Markdown file per action, the single source for the console and the docs.

A runbook file in ``rotation/runbooks/`` looks like::

    ---
    title: Planned KEK rotation
    applies_to: kek:planned, kek:on_demand
    ---
    Free text shown above the checklist.

    ## Pre-rotation checklist
    - [auto:precheck.provider] The KEK's provider answers a health check.
    - [manual:precheck.owners] The key's owners know a rotation is coming.

    ## Steps
    ## Verification
    ## Rollback

Items tagged ``[auto:key]`` are ticked by the rotation engine when it completes
that step; ``[manual:key]`` items are ticked by a person in the console (who and
when are recorded). Untagged list items and other Markdown are guidance only.
The same files are rendered into ``docs/ops/key-rotation.md`` (see
``manage.py runbooks``) and beside every console action, so they cannot diverge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import markdown as markdown_lib
from django.utils.safestring import SafeString, mark_safe

RUNBOOK_DIR = Path(__file__).resolve().parent / "runbooks"
SECTIONS = {
    "pre-rotation checklist": "pre_checks",
    "pre-checks": "pre_checks",
    "steps": "steps",
    "verification": "verification",
    "rollback": "rollback",
}
SECTION_TITLES = {
    "pre_checks": "Pre-rotation checklist",
    "steps": "Steps",
    "verification": "Verification",
    "rollback": "Rollback",
}
_ITEM = re.compile(r"^- \[(auto|manual):([a-z0-9_.-]+)\]\s+(.+)$")


class RunbookError(ValueError):
    """A runbook file does not follow the format."""


@dataclass(frozen=True)
class RunbookStep:
    section: str
    key: str
    text: str
    automatic: bool


@dataclass(frozen=True)
class Runbook:
    slug: str
    title: str
    applies_to: tuple[str, ...]
    intro: str
    sections: dict[str, str] = field(default_factory=dict)
    steps: tuple[RunbookStep, ...] = ()

    def html(self) -> SafeString:
        """The whole runbook as HTML (for the console panel)."""
        return render_markdown(self.markdown(heading_level=3, with_title=False))

    def guidance(self, section: str) -> str:
        """A section's Markdown without its tagged checklist items (the run page lists those live)."""
        kept: list[str] = []
        skipping = False
        for line in self.sections.get(section, "").splitlines():
            if _ITEM.match(line.strip()):
                skipping = True  # the item and its indented continuation lines
                continue
            if skipping and line.startswith((" ", "\t")) and line.strip():
                continue
            skipping = False
            kept.append(line)
        return "\n".join(kept).strip()

    def markdown(self, *, heading_level: int = 2, with_title: bool = True) -> str:
        """The runbook as Markdown, with tags turned into ☐ (manual) and ⚙ (automatic) marks."""
        hashes = "#" * heading_level
        parts = [f"{'#' * (heading_level - 1)} {self.title}\n"] if with_title else []
        if self.intro:
            parts.append(self.intro.strip() + "\n")
        for key, title in SECTION_TITLES.items():
            if key in self.sections:
                parts.append(f"{hashes} {title}\n\n{_untag(self.sections[key]).strip()}\n")
        return "\n".join(parts)


def _untag(text: str) -> str:
    def repl(match: re.Match) -> str:
        mark = "⚙ *(automatic)*" if match.group(1) == "auto" else "☐"
        return f"- {mark} {match.group(3)}"

    return "\n".join(_ITEM.sub(repl, line) for line in text.splitlines())


def render_markdown(text: str) -> SafeString:
    # Runbooks are files in this repository, reviewed like code; raw HTML in them is escaped anyway.
    html = markdown_lib.markdown(text, extensions=["fenced_code", "tables"], output_format="html")
    return mark_safe(html)  # noqa: S308 - produced by Python-Markdown from our own files


def render_inline(text: str) -> SafeString:
    """One line of runbook Markdown (a checklist item) as inline HTML: `code`, **bold**, links."""
    html = markdown_lib.markdown(text, output_format="html").strip()
    if html.startswith("<p>") and html.endswith("</p>") and html.count("<p>") == 1:
        html = html[3:-4]
    return mark_safe(html)  # noqa: S308 - Python-Markdown output of our own reviewed files


def parse(slug: str, text: str) -> Runbook:
    """Parse one runbook file.

    :raises RunbookError: missing front matter, unknown section, duplicate step key.
    """
    if not text.startswith("---\n"):
        raise RunbookError(f"{slug}: runbooks start with a '---' front-matter block")
    front, _, body = text[4:].partition("\n---\n")
    meta = {}
    for line in front.splitlines():
        name, sep, value = line.partition(":")
        if not sep:
            raise RunbookError(f"{slug}: bad front-matter line {line!r}")
        meta[name.strip()] = value.strip()
    if "title" not in meta:
        raise RunbookError(f"{slug}: front matter needs a title")
    intro_lines: list[str] = []
    sections: dict[str, list[str]] = {}
    current: list[str] = intro_lines
    for line in body.splitlines():
        if line.startswith("## "):
            name = line[3:].strip().lower()
            if name not in SECTIONS:
                raise RunbookError(f"{slug}: unknown section {line[3:].strip()!r}; use {sorted(SECTION_TITLES.values())}")
            current = sections.setdefault(SECTIONS[name], [])
            continue
        current.append(line)
    steps = []
    seen = set()
    for section, lines in sections.items():
        for line in lines:
            match = _ITEM.match(line.strip())
            if match:
                kind, key, text_ = match.groups()
                if key in seen:
                    raise RunbookError(f"{slug}: step key {key!r} used twice")
                seen.add(key)
                steps.append(RunbookStep(section=section, key=key, text=text_, automatic=kind == "auto"))
    order = list(SECTION_TITLES)
    steps.sort(key=lambda step: order.index(step.section))
    applies = tuple(part.strip() for part in meta.get("applies_to", "").split(",") if part.strip())
    return Runbook(
        slug=slug,
        title=meta["title"],
        applies_to=applies,
        intro="\n".join(intro_lines).strip(),
        sections={name: "\n".join(lines).strip() for name, lines in sections.items()},
        steps=tuple(steps),
    )


@cache
def all_runbooks() -> dict[str, Runbook]:
    """Every runbook in ``rotation/runbooks``, by slug (file name without ``.md``)."""
    return {path.stem: parse(path.stem, path.read_text()) for path in sorted(RUNBOOK_DIR.glob("*.md"))}


def get(slug: str) -> Runbook | None:
    return all_runbooks().get(slug)


def for_run(target_type: str, kind: str) -> Runbook | None:
    """The runbook that applies to a run of ``kind`` on a ``target_type`` (e.g. ``kek``, ``planned``)."""
    wanted = f"{target_type}:{kind}"
    for runbook in all_runbooks().values():
        if wanted in runbook.applies_to:
            return runbook
    return None
