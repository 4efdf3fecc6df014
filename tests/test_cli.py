"""python -m minigpt <command>: every flag of every command has help text and shows its default in
--help; the entry point's usage and errors; bench-generate's one-line errors for bad sizes."""

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt.bench import generate as bench_generate
from minigpt.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
# Commands whose help texts name their defaults by hand (train.py: its defaults resolve after
# parsing, from presets and config files): "default" anywhere in the help is enough there.
HAND_WRITTEN_DEFAULTS = {"train"}


def _parsers(parser: argparse.ArgumentParser, name: str):
    """(name, parser) for parser and, recursively, each of its sub-commands' parsers."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _shown_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text --help prints for action: the parser's formatter's expansion of it, which
    appends "(default: X)" where the formatter does."""
    return parser._get_formatter()._expand_help(action) if action.help else ""


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_has_help_and_shows_its_default(command):
    module = importlib.import_module(COMMANDS[command][0])
    assert hasattr(module, "build_parser"), f"{COMMANDS[command][0]} has no build_parser()"
    problems = []
    for name, parser in _parsers(module.build_parser(), command):
        page = "".join(parser.format_help().split())  # textwrap breaks lines at hyphens too
        for action in _options(parser):
            flag = "/".join(action.option_strings)
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                problems.append(f"{name} {flag}: no help text")
                continue
            shown = " ".join(_shown_help(parser, action).split())
            assert "".join(shown.split()) in page, (name, flag, shown)
            if action.default is None or action.default == argparse.SUPPRESS:
                continue
            wanted = "default" if command in HAND_WRITTEN_DEFAULTS else "(default: "
            if wanted not in shown:
                problems.append(f"{name} {flag}: --help does not show its default "
                                f"{action.default!r}: {shown!r}")
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_flag_without_help_or_default():
    """The walk above sees sub-commands, and a flag whose help hides its default."""
    parser = argparse.ArgumentParser(formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers().add_parser("run")
    sub.add_argument("--steps", type=int, default=3, help="how many")
    sub.add_argument("--quiet", action="store_true")
    (_, _), (name, found) = list(_parsers(parser, "x"))
    steps, quiet = _options(found)
    assert name == "x run" and "(default: " not in _shown_help(found, steps)
    assert _shown_help(found, quiet) == ""


def _minigpt(*args):
    return subprocess.run([sys.executable, "-m", "minigpt", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_no_command_prints_the_usage_and_exits_2():
    out = _minigpt()
    assert out.returncode == 2 and out.stderr.startswith("usage: python -m minigpt <command>")
    for command in COMMANDS:
        assert f"\n  {command} " in out.stderr, command


def test_an_unknown_command_is_one_line_and_exits_2():
    out = _minigpt("trian", "--max-iters", "3")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "unknown command 'trian'" in out.stderr
    assert "train, sample" in out.stderr


def test_sample_help():
    out = _minigpt("sample", "--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: ")
    assert "--temperature" in out.stdout and "(default: 0.8)" in out.stdout


@pytest.mark.parametrize("flags, named", [
    (["--layers", "0"], "--layers"),
    (["--heads", "0"], "--heads"),
    (["--embd", "0"], "--embd"),
    (["--vocab", "-1"], "--vocab"),
    (["--heads", "5"], "--embd"),  # 768 is not a multiple of 5
    (["--block", "0"], "--block"),
    (["--block", "300"], "--block"),  # < --prompt 256 + --new 256
    (["--prompt", "0"], "--prompt"),
    (["--new", "0"], "--new"),
    (["--repeats", "0"], "--repeats"),
    (["--threads", "0"], "--threads"),
    (["--backend", "fast"], "--backend"),
])
def test_bench_generate_refuses_bad_sizes_in_one_line(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_generate.main(flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and f"error: argument {named}" in err, err
    assert "Traceback" not in err
