"""The documentation: every command is documented, every relative link resolves, the README stays a front page."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.__main__ import _parser as components_parser
from devices.__main__ import _parser as devices_parser
from tests.support.harness import REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
README_MAX_LINES = 250
# Folders that are not the project's own files: version control, the venv, caches, build output, run data.
NOT_THE_REPO = {".git", ".venv", ".cache", "node_modules", "__pycache__", ".pytest_cache", ".mypy_cache",
                ".ruff_cache", ".hypothesis", "build", "dist", "var", "test-artifacts"}
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", flags=re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def all_docs() -> list[Path]:
    return [README, *DOCS]


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every subcommand path of ``parser``: ("run",), ("device", "add"), ..."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from subcommands(sub, (*prefix, name))


COMMANDS = [("components", path) for path in subcommands(components_parser())] + [
    ("devices", path) for path in subcommands(devices_parser())]


def without_code_blocks(text: str) -> str:
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for match in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", without_code_blocks(path.read_text()), flags=re.M):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_the_commands_are_found() -> None:
    paths = {path for _, path in COMMANDS}
    assert {("run",), ("device", "add"), ("settings-table",), ("simulate",), ("send",)} <= paths


@pytest.mark.parametrize(("program", "path"), COMMANDS, ids=[f"{m} {' '.join(p)}" for m, p in COMMANDS])
def test_every_subcommand_is_documented(program: str, path: tuple[str, ...]) -> None:
    wanted = re.compile(rf"python -m {program} {re.escape(' '.join(path))}(?![\w-])")
    assert any(wanted.search(doc.read_text()) for doc in all_docs()), \
        f"python -m {program} {' '.join(path)} is in neither README.md nor docs/*.md"


@pytest.mark.parametrize("doc", all_docs(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_points_to_a_file_and_heading_that_exist(doc: Path) -> None:
    broken = []
    for target in LINK.findall(without_code_blocks(doc.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(REPO) if linked.is_relative_to(REPO) else linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    assert not broken, broken


def test_the_readme_is_a_front_page() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move the detail into docs/"


def test_the_docs_exist() -> None:
    names = {p.name for p in DOCS}
    assert {"architecture.md", "configuration.md", "storage.md", "security.md", "operations.md",
            "performance.md", "docker.md"} <= names


def test_no_file_mentions_a_document_that_does_not_exist() -> None:
    needle = ("DESIGN" + ".md").encode()
    mentions = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in NOT_THE_REPO and not d.endswith(".egg-info")]
        for name in files:
            path = Path(root) / name
            try:
                if needle in path.read_bytes():
                    mentions.append(path.relative_to(REPO).as_posix())
            except OSError:  # a socket, or a file removed meanwhile
                continue
    assert not mentions, mentions
