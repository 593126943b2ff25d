"""Every HMD_* variable the code reads is in the configuration table, and nothing else is.

The table lives twice, identically: in README.md and in docs/ops/secrets.md (between
``<!-- env-table:start -->`` and ``<!-- env-table:end -->``). Adding a setting without
documenting it fails here, and so does documenting it in one place only.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("keyvault", "rotation", "deploy")
#: Process definitions read variables as shell expansions (``${HMD_X:-default}``).
SHELL_FILES = ("Procfile",)
SHELL_VARIABLE = re.compile(r"\$\{?(HMD_[A-Z0-9_]*[A-Z0-9])")
TABLES = (ROOT / "README.md", ROOT / "docs" / "ops" / "secrets.md")
VARIABLE = re.compile(r"""["'](HMD_[A-Z0-9_]*[A-Z0-9])["']""")
ROW = re.compile(r"^\| `(HMD_[A-Z0-9_]+)` \|", re.MULTILINE)
#: Settings read through ``get_secret`` (settings.py's ``_secret`` / ``_get_secret``): these accept ``HMD_X_REF``.
SECRET_READ = re.compile(r"""\b_?(?:get_)?secret\(\s*["'](HMD_[A-Z0-9_]+)["']""")


def _code() -> list[str]:
    return [path.read_text() for folder in CODE_DIRS for path in (ROOT / folder).rglob("*.py")]


def variables_in_code() -> set[str]:
    found = set()
    for text in _code():
        found |= set(VARIABLE.findall(text))
    for name in SHELL_FILES:
        found |= set(SHELL_VARIABLE.findall((ROOT / name).read_text()))
    # HMD_X_FILE (every variable) and HMD_X_REF (secrets) are variants of HMD_X, documented with it.
    return {
        name
        for name in found
        if not any(name.endswith(suffix) and name[: -len(suffix)] in found for suffix in ("_FILE", "_REF"))
    }


def secret_variables_in_code() -> set[str]:
    return {name for text in _code() for name in SECRET_READ.findall(text)}


def table(path: Path) -> str:
    text = path.read_text()
    assert "<!-- env-table:start -->" in text and "<!-- env-table:end -->" in text, f"{path.name} has no env table"
    return text.split("<!-- env-table:start -->", 1)[1].split("<!-- env-table:end -->", 1)[0]


def documented(path: Path) -> list[str]:
    return ROW.findall(table(path))


@pytest.mark.parametrize("path", TABLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_table_documents_every_variable_the_code_reads(path):
    in_table = documented(path)

    missing = variables_in_code() - set(in_table)
    stale = set(in_table) - variables_in_code()

    assert not missing, f"add these to {path.name}'s configuration table: {sorted(missing)}"
    assert not stale, f"{path.name} documents variables the code no longer reads: {sorted(stale)}"
    assert len(in_table) == len(set(in_table)), "a variable is listed twice"


def test_readme_and_secrets_doc_carry_the_same_table():
    readme, secrets_doc = (table(path).strip() for path in TABLES)

    assert readme == secrets_doc, "copy README.md's env table into docs/ops/secrets.md (or back): they must be identical"


def test_every_secret_setting_says_it_takes_a_reference():
    rows = {match.group(1): line for line in table(TABLES[0]).splitlines() if (match := ROW.match(line))}

    secrets = secret_variables_in_code()

    assert {"HMD_SECRET_KEY", "HMD_DATABASE_PASSWORD", "HMD_LOCAL_KMS_MASTER_KEY"} <= secrets
    unmarked = sorted(name for name in secrets if "`_REF`" not in rows.get(name, ""))
    assert not unmarked, f"mark these rows 'Secret: also `_FILE` or `_REF`': {unmarked}"


def test_the_scan_finds_variables():
    names = variables_in_code()

    assert {"HMD_DEBUG", "HMD_SECRET_KEY", "HMD_DATABASE_URL", "HMD_KMS_PROVIDER"} <= names
    assert "HMD_DATABASE_PASSWORD_REF" not in names and "HMD_DATABASE_PASSWORD" in names
    assert {"HMD_WEB_WORKERS", "HMD_WORKER_CONCURRENCY"} <= names  # deploy/ and the Procfile count too


# -- every variable a document names exists ----------------------------------------------------

#: A variable named in prose or a sample: ``HMD_DATABASE_PASSWORD_REF``, ``HMD_SECRET_KEY_FILE``.
NAMED = re.compile(r"\b(HMD_[A-Z0-9_]*[A-Z0-9])\b")
#: Names that stand for a family, not one variable: ``HMD_X_FILE``, ``HMD_<NAME>_REF``,
#: ``HMD_MANAGED_PAYMENTS_API`` (a managed secret's value), ``HMD_TEST_*`` (the docs harness).
PLACEHOLDER = re.compile(r"^HMD_(?:X|MANAGED|TEST)(?:_|$)")
#: Settings read through ``get_secret`` take ``_REF``; every setting takes ``_FILE``.
SECRET_SUFFIXES, ANY_SUFFIXES = ("_REF",), ("_FILE",)


def documents() -> list[Path]:
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return paths + sorted(ROOT.glob("keyvault/**/README.md")) + sorted((ROOT / "rotation").rglob("*.md"))


def unknown_variables(text: str, known: set[str], secrets: set[str]) -> set[str]:
    unknown = set()
    for name in set(NAMED.findall(text)):
        if PLACEHOLDER.match(name) or name in known or name.endswith("_"):
            continue
        if any(name.endswith(s) and name[: -len(s)] in known for s in ANY_SUFFIXES):
            continue
        if any(name.endswith(s) and name[: -len(s)] in secrets for s in SECRET_SUFFIXES):
            continue
        unknown.add(name)
    return unknown


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_variable_a_document_names_is_read_by_the_code(path):
    # HMD_X_REF only for the settings read through get_secret: HMD_VAULT_TOKEN_REF would be ignored
    text = re.sub(r"<[A-Z_]+>", "X", path.read_text())  # HMD_<NAME>_FILE is a pattern, not a variable
    assert unknown_variables(text, variables_in_code(), secret_variables_in_code()) == set()


def test_the_document_scan_refuses_what_does_not_exist():
    known, secrets = {"HMD_DATABASE_PASSWORD", "HMD_VAULT_TOKEN"}, {"HMD_DATABASE_PASSWORD"}
    assert unknown_variables("HMD_DATABASE_PASSWORD_REF HMD_VAULT_TOKEN_FILE HMD_X_REF", known, secrets) == set()
    assert unknown_variables("HMD_VAULT_TOKEN_REF HMD_DB_PASSWORD", known, secrets) == {
        "HMD_VAULT_TOKEN_REF", "HMD_DB_PASSWORD"}
