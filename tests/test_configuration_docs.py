"""Every HMD_* variable the code reads is in README's configuration table, and nothing else is.

Adding a setting without documenting it fails here.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("keyvault", "rotation")
VARIABLE = re.compile(r"""["'](HMD_[A-Z0-9_]*[A-Z0-9])["']""")
ROW = re.compile(r"^\| `(HMD_[A-Z0-9_]+)` \|", re.MULTILINE)


def variables_in_code() -> set[str]:
    found = set()
    for folder in CODE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            found |= set(VARIABLE.findall(path.read_text()))
    # HMD_X_FILE is implied by HMD_X (every variable can come from a file).
    return {name for name in found if not (name.endswith("_FILE") and name[: -len("_FILE")] in found)}


def documented(path: Path) -> list[str]:
    text = path.read_text()
    table = text.split("<!-- env-table:start -->", 1)[1].split("<!-- env-table:end -->", 1)[0]
    return ROW.findall(table)


def test_readme_documents_every_variable_the_code_reads():
    in_readme = documented(ROOT / "README.md")

    missing = variables_in_code() - set(in_readme)
    stale = set(in_readme) - variables_in_code()

    assert not missing, f"add these to README.md's configuration table: {sorted(missing)}"
    assert not stale, f"README.md documents variables the code no longer reads: {sorted(stale)}"
    assert len(in_readme) == len(set(in_readme)), "a variable is listed twice"


def test_the_scan_finds_variables():
    names = variables_in_code()

    assert {"HMD_DEBUG", "HMD_SECRET_KEY", "HMD_DATABASE_URL", "HMD_KMS_PROVIDER"} <= names
