"""Tests mirror the package layout: tests/keyvault/audit/ tests keyvault/audit/, and so on.

A newcomer looking for the tests of a module looks in the same path under tests/; a
test folder with no package of that name would send them nowhere.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MIRRORED = ("keyvault", "rotation")


def _test_folders():
    return [
        folder
        for top in MIRRORED
        for folder in sorted((ROOT / "tests" / top).rglob("*"))
        # Folders of fixtures and vectors (tests/keyvault/kms/backends) hold no tests themselves.
        if folder.is_dir() and any(folder.glob("test_*.py"))
    ]


def test_every_test_folder_mirrors_a_package():
    orphans = [
        str(folder.relative_to(ROOT))
        for folder in _test_folders()
        if not (ROOT / folder.relative_to(ROOT / "tests") / "__init__.py").is_file()
    ]
    assert orphans == [], f"test folders with no package of that name: {orphans}"


def test_the_layer_packages_have_their_own_test_folders():
    layers = [p.parent.name for p in (ROOT / "keyvault").glob("*/__init__.py")
              if p.parent.name not in {"management", "migrations", "models"}]
    missing = [name for name in layers if not (ROOT / "tests" / "keyvault" / name).is_dir()]
    assert missing == [], f"keyvault packages without tests/keyvault/<name>/: {missing}"
