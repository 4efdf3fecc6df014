"""The claims of the README and the docs/ pages that name tests: every test they name exists under
that id (a parametrized id such as `test_x[SIGKILL]` included, which tests/test_docs.py's check
of tests/test_x.py::test_name paths does not cover)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# `test_name` or `test_name[param id]` in backticks; `tests/test_file.py` or `test_file.py`.
TEST_ID = re.compile(r"`(test_\w+(?:\[[^\]`]+\])?)`")
TEST_FILE = re.compile(r"`(?:tests/)?(test_\w+\.py)`")


def _collected_ids():
    """Every test id pytest collects under tests/, as "name" or "name[param id]"."""
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider", "tests"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return {line.split("::", 1)[1] for line in r.stdout.splitlines() if "::" in line}


def _named(pattern):
    """{name: [pages naming it]} over the README and the docs pages."""
    named = {}
    for page in PAGES:
        for name in pattern.findall(page.read_text(encoding="utf-8")):
            named.setdefault(name, []).append(str(page.relative_to(ROOT)))
    return named


def test_every_test_named_in_the_readme_and_docs_exists():
    named = _named(TEST_ID)
    # the parser reads the tables: the reliability page's table names this parametrized id
    assert "docs/reliability.md" in named.get("test_killed_run_resumes_exactly[SIGKILL]", [])
    assert "docs/pretrained.md" in named.get("test_logits_match_transformers", [])
    collected = _collected_ids()
    functions = {c.split("[", 1)[0] for c in collected}
    missing = sorted(f"{n} ({', '.join(pages)})" for n, pages in named.items()
                     if n not in (collected if "[" in n else functions))
    assert not missing, f"the docs name tests that do not exist: {missing}"
    files = _named(TEST_FILE)
    assert "test_reliability.py" in files
    missing_files = sorted(f for f in files if not (ROOT / "tests" / f).is_file())
    assert not missing_files, f"the docs name test files that do not exist: {missing_files}"
