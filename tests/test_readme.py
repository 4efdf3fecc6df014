"""The README's claims that name tests: every test it names exists under that id."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

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


def test_every_test_named_in_the_readme_exists():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    named = set(TEST_ID.findall(readme))
    assert "test_killed_run_resumes_exactly[SIGKILL]" in named  # the parser reads the table
    collected = _collected_ids()
    functions = {c.split("[", 1)[0] for c in collected}
    missing = sorted(n for n in named if n not in (collected if "[" in n else functions))
    assert not missing, f"README names tests that do not exist: {missing}"
    files = set(TEST_FILE.findall(readme))
    assert files and all((ROOT / "tests" / f).is_file() for f in files), files
