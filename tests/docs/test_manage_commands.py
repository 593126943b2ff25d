"""Every ``manage.py`` command in the docs, the READMEs and the runbooks (as the console shows them) parses.

The rules of what is found and how it is checked are in :mod:`tests.docs.commands`.
"""

from __future__ import annotations

import pytest

from rotation import runbooks
from tests.docs import commands
from tests.docs.commands import Invocation, failures, invocations_in_markdown, invocations_in_rendered_runbook
from tests.docs.examples import ROOT


@pytest.mark.parametrize("doc", commands.documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_manage_py_command_in_the_document_parses(doc):
    # given every manage.py invocation written in the document
    found = invocations_in_markdown(doc)

    # then the command exists and its own argparse parser accepts the words
    bad = failures(found)
    assert bad == [], "manage.py would refuse:\n" + "\n".join(bad)


@pytest.mark.parametrize("slug", sorted(runbooks.all_runbooks()))
def test_every_manage_py_command_of_a_runbook_parses_as_the_console_renders_it(slug):
    runbook = runbooks.get(slug)
    found = invocations_in_rendered_runbook(slug, runbook.html(), runbooks.RUNBOOK_DIR / f"{slug}.md")

    bad = failures(found)
    assert bad == [], "manage.py would refuse (console runbook panel):\n" + "\n".join(bad)


@pytest.mark.parametrize("template", commands.console_templates(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_manage_py_command_a_console_page_shows_parses(template):
    found = commands.invocations_in_template(template)

    assert found, f"{template} names manage.py but no command was read from it"
    bad = failures(found)
    assert bad == [], "manage.py would refuse (console page):\n" + "\n".join(bad)


def _argvs(found) -> set[str]:
    return {" ".join(item.argv) for item in found if isinstance(item, Invocation)}


def test_the_checker_sees_blocks_inline_spans_and_the_console_panel():
    # given documents known to hold each kind of occurrence
    key_rotation = _argvs(invocations_in_markdown(ROOT / "docs" / "ops" / "key-rotation.md"))
    readme = _argvs(invocations_in_markdown(ROOT / "README.md"))
    panel = _argvs(commands.rendered_runbooks())

    # then each is found: console block, inline span, piped README block, rendered runbook
    # (YAML command lists: test_a_yaml_command_list_is_checked; no document holds one since the CronJob went)
    assert "kms create-key payments --description card data" in key_rotation
    assert "rotation rollback RUN_ID" in key_rotation  # inline, in the generated runbook section
    assert "kms decrypt --context tenant=b" in readme  # after a pipe, on a continuation line
    assert "kms create-key NAME --provider PROVIDER --rotation-period-days DAYS" in panel
    assert len(commands.documents()) >= 20


def _doc(tmp_path, text: str) -> list[str]:
    path = tmp_path / "scratch.md"
    path.write_text(text)
    return failures(invocations_in_markdown(path))


def test_a_broken_command_in_a_shell_block_is_reported_with_file_line_and_argparse_error(tmp_path):
    # given a doc with the command the issue found (kms create instead of kms create-key)
    bad = _doc(tmp_path, "Create it:\n\n```shell\npython manage.py kms health\npython manage.py kms create NAME\n```\n")

    # then exactly that line is reported, with argparse's reason
    assert len(bad) == 1
    assert bad[0].startswith(f"{tmp_path / 'scratch.md'}:5: manage.py kms create NAME")
    assert "invalid choice: 'create'" in bad[0]


def test_a_broken_inline_command_is_reported(tmp_path):
    bad = _doc(tmp_path, "Approve with `python manage.py rotation approve 3` and move on.\n")

    assert len(bad) == 1 and ":1: manage.py rotation approve 3" in bad[0]
    assert "the following arguments are required: --comment" in bad[0]


def test_a_command_that_is_not_a_django_command_is_reported(tmp_path):
    bad = _doc(tmp_path, "```console\n./manage.py frobnicate --now\n```\n")

    assert len(bad) == 1 and "Unknown command: 'frobnicate'" in bad[0]


def test_continuations_pipes_env_prefixes_and_substitutions_are_followed(tmp_path):
    # given a block mixing the shell forms operators write
    text = (
        "```console\n"
        "HMD_X=1 .venv/bin/python manage.py kms encrypt --key k \\\n"
        "  --nope < in.txt | python manage.py kms decrypt 2>&1 && echo ok\n"
        'python manage.py rotation status "$(python manage.py rotation list --limit many | cut -f1 | tr -d \'#\')"\n'
        "kubectl exec deploy/web -- python manage.py audit verify --jobz 2\n"
        "```\n"
    )
    bad = _doc(tmp_path, text)

    # then each broken piece is reported at the line where its command starts
    assert len(bad) == 3, bad
    assert ":2: manage.py kms encrypt --key k --nope" in bad[0] and "unrecognized arguments: --nope" in bad[0]
    assert ":4: manage.py rotation list --limit many" in bad[1] and "invalid int value: 'many'" in bad[1]
    assert ":5: manage.py audit verify --jobz 2" in bad[2]


def test_placeholders_comments_and_heredocs_do_not_fail(tmp_path):
    text = (
        "```shell\n"
        "python manage.py rotation status RUN_ID   # manage.py nosuch: a comment is not run\n"
        'python manage.py rotation approve "$RUN" --comment "#1 checked" --break-glass --user bella\n'
        "python manage.py rotation policy --kek <kek> --approvals N > out.txt\n"
        "python - <<'EOF'\n"
        "manage.py nosuch\n"
        "EOF\n"
        "```\n"
        "Also `manage.py kms create-key NAME [--provider P]` and `manage.py otp reset-throttle USER`.\n"
    )
    assert _doc(tmp_path, text) == []


def test_a_placeholder_never_stands_for_a_subcommand(tmp_path):
    bad = _doc(tmp_path, "`manage.py kms NAME`\n")

    assert len(bad) == 1 and "invalid choice: 'NAME'" in bad[0]


def test_every_alternative_of_a_synopsis_must_exist(tmp_path):
    # given a synopsis listing subcommands, one of them wrong
    bad = _doc(tmp_path, "CLI: `python manage.py rotation start|status|wait|frobnicate`\n")

    # then only the wrong one is reported (a synopsis leaves required arguments out)
    assert len(bad) == 1 and "invalid choice: 'frobnicate'" in bad[0]
    assert _doc(tmp_path, "| x | `manage.py kms\\|rotation\\|audit` |\n") == []


def test_a_yaml_command_list_is_checked(tmp_path):
    bad = _doc(tmp_path, '```yaml\ncommand: ["python", "manage.py", "rotation", "swep"]\n```\n')

    assert len(bad) == 1 and ":2: manage.py rotation swep" in bad[0]


def test_a_broken_command_in_a_runbook_is_reported_as_the_console_renders_it(tmp_path):
    # given a runbook whose step names the wrong command
    source = tmp_path / "kek-creation.md"
    source.write_text(
        "---\ntitle: Create\napplies_to:\n---\n## Steps\n"
        "- [manual:create.form] Create it (`python manage.py kms create NAME`).\n"
    )
    runbook = runbooks.parse("kek-creation", source.read_text())

    # when the console's HTML of it is checked
    bad = failures(invocations_in_rendered_runbook("kek-creation", runbook.html(), source))

    # then the step is reported at its source line
    assert len(bad) == 1
    assert "kek-creation.md:6 (as rendered in the console): manage.py kms create NAME" in bad[0]
    assert "invalid choice: 'create'" in bad[0]


def test_an_angled_placeholder_is_a_value_not_a_redirection(tmp_path):
    bad = _doc(tmp_path, "`manage.py rotation policy --kek <kek> --approvals`\n")

    assert len(bad) == 1 and "argument --approvals: expected one argument" in bad[0]


def test_the_rotation_cli_synopsis_names_every_subcommand():
    import argparse

    from django.core.management import load_command_class

    # given the subcommands `manage.py rotation` really has
    parser = load_command_class("rotation", "rotation").create_parser("manage.py", "rotation")
    real = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    # when key-rotation.md's one-line synopsis of the CLI is read
    found = invocations_in_markdown(ROOT / "docs" / "ops" / "key-rotation.md")
    synopses = [item for item in found if isinstance(item, Invocation) and item.synopsis and item.argv[0] == "rotation"]

    # then it lists them all (the checker already refuses any it lists that do not exist)
    assert len(synopses) == 1
    assert set(synopses[0].argv[1].split(commands.ALT)) == set(real)


def test_an_abbreviated_flag_is_reported(tmp_path):
    bad = _doc(tmp_path, "```shell\npython manage.py audit verify --witnes s3://bucket/prod/\n```\n")

    assert len(bad) == 1 and "unrecognized arguments: --witnes" in bad[0]
