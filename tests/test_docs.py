"""The documentation's links and `make` commands point at things that exist (README.md, docs/*.md).

A relative Markdown link or image must name an existing file (resolved from the page that holds
it, any #anchor dropped); a `make <target>` in a code block or inline code must name a target of
the Makefile. Fast, no network: the pages and the Makefile are read as text.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).parents[1]

FENCE = re.compile(r"^ {0,3}(```|~~~)[^\n]*\n.*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
# Inline code may run over a line break, not over a blank line.
INLINE_CODE = re.compile(r"(`+)((?:(?!\n[ \t]*\n).)+?)\1", re.DOTALL)
# [text](target "title") and ![alt](target); <target> allowed.
LINK = re.compile(
    r"!?\[(?P<text>[^\]]*)\]\(\s*<?(?P<target>[^)\s>]*)>?(?:\s+[\"'][^)]*[\"'])?\s*\)"
)
# [label]: target
REFERENCE = re.compile(r"^ {0,3}\[(?P<text>[^\]]+)\]:\s*<?(?P<target>[^\s>]+)>?", re.MULTILINE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, mailto:, ...
# `make` where a shell command starts: line start, after whitespace, ; & | ( or $(.
# The arguments are read ahead, so that a second `make` on the same line is found too.
MAKE = re.compile(r"(?:^|(?<=[\s;&|(]))make[ \t]+(?=(?P<args>[^\n]*))")
TARGET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RULE = re.compile(
    r"^(?P<names>[A-Za-z0-9_.-]+(?:[ \t]+[A-Za-z0-9_.-]+)*)[ \t]*::?(?![:=])(?P<rest>.*)$"
)


def doc_pages(root: Path = ROOT) -> list[Path]:
    """README.md and every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def shown(page: Path) -> str:
    """The page as the messages name it: docs/tuning.md, or its name outside the repository."""
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name


def split_code(text: str) -> tuple[str, list[str]]:
    """(the prose with code blocks and inline code removed, the code blocks and inline code)."""
    code = [m.group(0) for m in FENCE.finditer(text)]
    prose = FENCE.sub("\n", text)
    code += [m.group(2).replace("\n", " ") for m in INLINE_CODE.finditer(prose)]
    return INLINE_CODE.sub(" ", prose), code


def broken_links(page: Path) -> list[str]:
    """One message per relative link or image of a Markdown page whose file does not exist."""
    prose, _ = split_code(page.read_text(encoding="utf-8"))
    broken = []
    for match in [*LINK.finditer(prose), *REFERENCE.finditer(prose)]:
        target = match.group("target")
        path = unquote(target.split("#", 1)[0])
        if not path or SCHEME.match(target):
            continue  # a pure #anchor, or http(s):, mailto: and other URLs
        resolved = (page.parent / path).resolve()
        if not resolved.exists():
            broken.append(
                f"{shown(page)}: link [{match.group('text')}]({target}) points at {resolved}, "
                f"which does not exist (expected a file relative to {page.parent})"
            )
    return broken


def makefile_targets(makefile: Path) -> set[str]:
    """Targets of a Makefile: `name: ...` rules at the start of a line, and the .PHONY list."""
    targets = set()
    for line in makefile.read_text(encoding="utf-8").splitlines():
        rule = RULE.match(line)
        if not rule:
            continue
        names = rule.group("names").split()
        if names == [".PHONY"]:
            targets |= set(rule.group("rest").split("#", 1)[0].split())
        else:
            targets |= set(names)
    return targets


def make_targets_named(text: str) -> list[str]:
    """The targets of every `make ...` command in the code blocks and inline code of a page."""
    named = []
    for code in split_code(text)[1]:
        for match in MAKE.finditer(code):
            args = match.group("args")
            lexer = shlex.shlex(args, posix=True, punctuation_chars=True)  # ; && | ( ) apart
            lexer.whitespace_split = True
            try:
                words = list(lexer)
            except ValueError:  # an unbalanced quote: plain words are enough here
                words = args.split("#", 1)[0].split()
            for word in words:
                if "=" in word or word.startswith("-"):
                    continue  # VAR=value, or an option
                if not TARGET.match(word):
                    break  # && | ; ... : the command ends
                named.append(word)
    return named


def unknown_make_targets(page: Path, targets: set[str]) -> list[str]:
    """One message per `make <target>` of a page that the Makefile does not define."""
    return [
        f"{shown(page)}: `make {name}` names no target of the Makefile "
        f"(expected one of: {', '.join(sorted(targets))})"
        for name in dict.fromkeys(make_targets_named(page.read_text(encoding="utf-8")))
        if name not in targets
    ]


def test_the_pages_are_found() -> None:
    pages = doc_pages()
    assert all(page.is_file() for page in pages), pages
    assert len(pages) > 2, f"expected README.md and pages under docs/, found {pages}"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda page: page.name)
def test_relative_links_point_at_files(page: Path) -> None:
    broken = broken_links(page)
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("page", doc_pages(), ids=lambda page: page.name)
def test_make_commands_name_makefile_targets(page: Path) -> None:
    unknown = unknown_make_targets(page, makefile_targets(ROOT / "Makefile"))
    assert not unknown, "\n".join(unknown)


def test_the_checks_find_a_broken_link_and_an_unknown_target(tmp_path: Path) -> None:
    """The checks are not hollow: on a copy with faults, each fault is named, and nothing else."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n")
    (tmp_path / "docs" / "shot.png").write_bytes(b"")
    (tmp_path / "Makefile").write_text(
        ".PHONY: help tune phony-only\n"
        "VENV := .venv\n"
        "help: ## list targets\n"
        "tune train-best: setup ## two targets on one rule\n"
        "$(VENV)/bin/.installed: pyproject.toml\n"
    )
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Readme\n\n"
        "[ok](docs/page.md) [ok with anchor](docs/page.md#page) [anchor](#readme)\n"
        "![ok image](docs/shot.png) [web](https://example.com/x.md) [mail](mailto:a@b.c)\n"
        "[broken](docs/missing.md#part) ![broken image](docs/missing.png)\n"
        "`[not a link](nowhere.md)`; `make help; make tune`, `make nosuchtarget DATA=x`\n\n"
        "```bash\n"
        "make tune train-best PRESET=cpu DATA=...   # then: make phony-only\n"
        "make SAMPLER_ARGS='{\"a\": 1}' tune && make bogus-target\n"
        "[also not a link](nowhere.md)\n"
        "```\n"
    )
    (tmp_path / "docs" / "relative.md").write_text("[up](../README.md) [sibling](page.md)\n")

    assert [page.name for page in doc_pages(tmp_path)] == ["README.md", "page.md", "relative.md"]
    broken = broken_links(readme)
    assert len(broken) == 2, broken
    assert "README.md: link [broken](docs/missing.md#part)" in broken[0]
    assert str(tmp_path / "docs" / "missing.md") in broken[0]
    assert "README.md: link [broken image](docs/missing.png)" in broken[1]
    assert broken_links(tmp_path / "docs" / "relative.md") == []

    targets = makefile_targets(tmp_path / "Makefile")
    assert targets == {"help", "tune", "train-best", "phony-only"}
    assert make_targets_named(readme.read_text()) == [
        *["tune", "train-best", "phony-only", "tune", "bogus-target"],  # the code block
        *["help", "tune", "nosuchtarget"],  # inline code
    ]
    unknown = unknown_make_targets(readme, targets)
    assert [message.split(" names")[0] for message in unknown] == [
        "README.md: `make bogus-target`",
        "README.md: `make nosuchtarget`",
    ]
    assert "expected one of: help, phony-only, train-best, tune" in unknown[0]


def test_the_real_makefile_has_the_documented_targets() -> None:
    """The parser reads this Makefile's rules, not only its .PHONY line."""
    targets = makefile_targets(ROOT / "Makefile")
    assert {"tune", "train-best", "serve", "bench-serve", "help", "setup"} <= targets


def test_make_help_names_every_documented_target() -> None:
    """`make help` lists each target with a ## description by its own name (the Makefile
    includes settings.mk, so a grep over both files must not prefix the file's name)."""
    shown = subprocess.run(
        ["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    listed = re.findall(r"(?m)^  make (\S+) ", shown)
    described = re.findall(r"(?m)^([a-z-]+):.*## ", (ROOT / "Makefile").read_text())
    assert listed == described and "test" in listed
