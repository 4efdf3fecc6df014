"""The documentation points at things that exist: every relative link and picture in README.md and
docs/ resolves to a file or folder of the repository, every test file and test function the
pages name exists, and the README stays short enough to read (the rest lives in docs/)."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_BYTES = 20_000

# [text](target) and ![alt](target); the target ends at the first space or ")" (an optional
# "title" after a space is ignored).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# tests/test_x.py, optionally ::test_name (a [param id] after the name is not part of it).
TEST_REF = re.compile(r"\btests/(test_\w+\.py)(?:::(test_\w+))?")


def relative_links(text: str):
    """The link targets of a markdown text that point into the repository: http(s), mailto and
    in-page (#anchor) links are left out, and a target's #anchor is stripped."""
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        yield target.split("#", 1)[0]


def broken_links(page: Path):
    """The relative links of one page that resolve to nothing, relative to the page's folder."""
    text = page.read_text(encoding="utf-8")
    return [t for t in relative_links(text) if not (page.parent / t).exists()]


def functions_in(path: Path):
    """The names of the test functions in a test file (module level and in classes)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")}



def missing_tests(text: str):
    """The tests/test_x.py and tests/test_x.py::test_name references of a text that name no file or
    no function."""
    missing, cache = [], {}
    for file, name in TEST_REF.findall(text):
        path = ROOT / "tests" / file
        if not path.is_file():
            missing.append(f"tests/{file}")
        elif name:
            if file not in cache:
                cache[file] = functions_in(path)
            if name not in cache[file]:
                missing.append(f"tests/{file}::{name}")
    return missing


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert not broken_links(page), f"{page.relative_to(ROOT)}: links to nothing: {broken_links(page)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_test_the_docs_name_exists(page):
    missing = missing_tests(page.read_text(encoding="utf-8"))
    assert not missing, f"{page.relative_to(ROOT)} names tests that do not exist: {missing}"


def test_the_checks_catch_what_they_look_for(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md#top) ![gone](images/none.png) [web](https://example.org/x.md) "
                    "[here](#anchor) [gone too](../nowhere.md)\n", encoding="utf-8")
    assert broken_links(page) == ["images/none.png", "../nowhere.md"]
    text = ("see tests/test_docs.py::test_the_checks_catch_what_they_look_for, "
            "tests/test_docs.py::test_no_such_test and tests/test_no_such_file.py")
    assert missing_tests(text) == ["tests/test_docs.py::test_no_such_test",
                                   "tests/test_no_such_file.py"]


def test_the_docs_have_their_pages():
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"README.md", "design.md", "kernels.md", "training.md", "pretrained.md",
            "experiments.md", "reliability.md", "platforms.md"} <= names


def test_the_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail to a docs/ page"


def test_the_quickstart_block_holds_two_commands():
    """.ci/run runs the two indented lines of the README's quickstart block exactly as written."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^<!-- quickstart.*?-->\n(.*?)^<!-- /quickstart -->", text, re.M | re.S)
    assert block, "README.md has no <!-- quickstart --> block"
    commands = [line for line in block.group(1).splitlines() if line.startswith("    ")]
    assert len(commands) == 2 and commands[1].strip() == "python -m pytest -q", commands


def test_the_package_carries_its_license_types_and_changelog():
    """MIT: LICENSE at the top, the license set in setup.py (a dynamic field of pyproject.toml, the
    one form setuptools before and after 77 both accept without a warning), which the sdist and
    the wheel carry with the file; py.typed shipped as package data; the version has a changelog
    entry."""
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "license" in meta["project"]["dynamic"] and "license" not in meta["project"]
    setup_call = next(n for n in ast.walk(ast.parse((ROOT / "setup.py").read_text(encoding="utf-8")))
                      if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    assert {k.arg: getattr(k.value, "value", None) for k in setup_call.keywords}["license"] == "MIT"
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("MIT License")
    assert "Copyright (c) 2026 the minigpt authors" in license_text
    assert (ROOT / "minigpt" / "py.typed").is_file()
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["minigpt"]
    version = re.search(r'^__version__ = "([^"]+)"', (ROOT / "minigpt" / "__init__.py")
                        .read_text(encoding="utf-8"), re.M).group(1)
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## \[?{re.escape(version)}\]?", changelog, re.M), version


# `from minigpt.x import a, b` in a page; the names may continue on the same line only.
IMPORT = re.compile(r"^\s*from (minigpt(?:\.\w+)*) import ([\w, ]+)$", re.M)
# A dotted name the pages show in backticks: `minigpt.x.y` or `minigpt.x.y(...)`.
DOTTED = re.compile(r"`(minigpt(?:\.\w+)+)(?:\([^`]*\))?`")


def unresolved_names(text: str):
    """The imports and dotted names of a page that do not resolve: a module that cannot be
    imported, or a name it lacks. A dotted name resolves as the longest importable module prefix
    followed by attributes."""
    import importlib

    def resolve(dotted: str) -> bool:
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                return False
            return True
        return False

    bad = [f"from {m} import {n}" for m, names in IMPORT.findall(text)
           for n in (x.strip() for x in names.split(",")) if n and not resolve(f"{m}.{n}")]
    return bad + [d for d in DOTTED.findall(text) if not resolve(d)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_name_the_docs_show_exists(page):
    assert unresolved_names(page.read_text(encoding="utf-8")) == []


def test_the_name_check_catches_a_missing_name():
    assert unresolved_names("    from minigpt.model import GPT, NoSuchThing\n`minigpt.nope.x`") == [
        "from minigpt.model import NoSuchThing", "minigpt.nope.x"]
