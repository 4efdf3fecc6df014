"""The house's budgets (docs/design.md, "Layout"): a small core, no file over 500 lines, no
function over 100, class GPT <= 150 lines, at most 12 modules directly in minigpt/, and the
learner's path (config, model, the naive reference attention, the training loop) <= 1,200 lines
with docstrings. Counted on the source text, as `wc -l` counts."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "minigpt"
SOURCES = sorted(p for p in PACKAGE.rglob("*.py")) + [ROOT / "train.py", ROOT / "sample.py",
                                                       ROOT / "setup.py"]
LEARNERS_PATH = ["minigpt/config.py", "minigpt/model.py", "minigpt/attention/reference.py",
                 "minigpt/train/loop.py"]


def lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def definitions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield node, node.end_lineno - start + 1


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_over_500_lines(path):
    assert lines(path) <= 500


def test_no_function_over_100_lines():
    long = [f"{p.relative_to(ROOT)}:{node.name} ({n} lines)" for p in SOURCES
            for node, n in definitions(p)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and n > 100]
    assert long == []


def test_class_gpt_is_at_most_150_lines():
    sizes = {node.name: n for node, n in definitions(PACKAGE / "model.py")
             if isinstance(node, ast.ClassDef)}
    assert sizes["GPT"] <= 150


def test_at_most_12_modules_directly_in_the_package():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 12, modules


def test_the_learners_path_is_at_most_1200_lines():
    sizes = {name: lines(ROOT / name) for name in LEARNERS_PATH}
    assert sum(sizes.values()) <= 1200, sizes


def test_the_readme_gives_the_learners_path_in_order():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Read the code"):]
    positions = [section.find(name) for name in LEARNERS_PATH]
    assert -1 not in positions and positions == sorted(positions), positions


def test_the_model_does_not_import_the_hugging_face_loader():
    tree = ast.parse((PACKAGE / "model.py").read_text(encoding="utf-8"))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in top_level if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if n.startswith(("minigpt.hf", "transformers"))]
