"""The docs cannot drift from the code: every ```bash block marked ``<!-- runnable -->`` in README.md and docs/*.md
runs as it is (README's first, which makes the quick start's ``engines/tiny``; then each page in a fresh folder with a
copy of it), every ``sdtrt`` command of every ```bash block parses with the CLI's own parser, every link to a page or
heading resolves, and .ci/run runs README's install and test commands."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<mark><!-- runnable -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)^```$", re.M | re.S)


def blocks(page: Path, runnable_only: bool = False) -> list[str]:
    """The ```bash blocks of a page (only those marked runnable, or all)."""
    return [m["body"] for m in FENCE.finditer(page.read_text(encoding="utf-8"))
            if m["lang"] == "bash" and (m["mark"] or not runnable_only)]


def run_blocks(page: Path, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for body in blocks(page, runnable_only=True):
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=900, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"{page.name}: this block failed ({proc.returncode}):\n{body}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """README's runnable blocks, in order, in an empty folder: the quick start makes engines/tiny."""
    cwd = tmp_path_factory.mktemp("readme")
    run_blocks(ROOT / "README.md", cwd)
    assert (cwd / "engines" / "tiny" / "manifest.json").is_file() and (cwd / "astronaut.png").is_file()
    return cwd


def test_readme_runs(quick_start):
    assert (quick_start / "cat-lora.png").is_file()
    assert not (quick_start / "engines" / "tiny" / "astronaut.png").exists()  # the image is not in the engine folder


SLOW_PAGES = {"runtime.md", "export.md"}  # ~50 s each: in `-m slow` (their commands still parse below, every run)


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_PAGES else p
                                  for p in PAGES[1:] if blocks(p, runnable_only=True)], ids=lambda p: p.name)
def test_docs_page_runs(page, quick_start, tmp_path):
    shutil.copytree(quick_start / "engines" / "tiny", tmp_path / "engines" / "tiny")
    shutil.copy(quick_start / "cat.png", tmp_path / "cat.png")
    run_blocks(page, tmp_path)


def _commands(body: str) -> list[list[str]]:
    """The argument lists of the ``sdtrt`` commands in a shell block (one logical line at a time)."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current = None
        for token in lexer:
            if token and set(token) <= set(";&|"):
                current = None
            elif current is None:
                current = [] if token == "sdtrt" else False
                if current == []:
                    commands.append(current)
            elif current is not False:
                current.append(token)
    return commands


def _all_commands():
    return [(page.name, argv) for page in PAGES for body in blocks(page) for argv in _commands(body)]


@pytest.mark.parametrize("page, argv", _all_commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_sdtrt_command_in_the_docs_parses(page, argv):
    from sdtrt.cli import build_parser
    from sdtrt.errors import UsageError

    try:
        build_parser().parse_args(argv)
    except UsageError as ex:
        pytest.fail(f"{page}: `sdtrt {' '.join(argv)}`: {ex}")


def test_the_docs_name_every_command():
    from sdtrt.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = "\n".join(p.read_text(encoding="utf-8") for p in PAGES)
    assert not [name for name in sub.choices if f"sdtrt {name}" not in text]


def _anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_to_pages_and_headings_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor:
                headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target}")
    assert not broken


def test_readme_is_a_front_door_and_ci_runs_its_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install, run, *_ = blocks(ROOT / "README.md")
    tests = next(b for b in blocks(ROOT / "README.md") if "pytest" in b)
    for command in (install, run, tests):
        assert command.strip() in ci, command
    assert "python3 -m venv --clear" in ci  # CI installs into a new environment, never into what was left there
    assert "-c constraints.txt" in install and "-c constraints.txt" in tests
