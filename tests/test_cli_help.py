"""The command line itself: every option documented, and `t2r --help` without torch (the console script,
t2r_launch.py, defers `import t2r` until a command runs)."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from t2r.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _options(parser, path=("t2r",)):
    """(command path, action) for every action of the parser and its subcommands, help actions left out."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:  # the subcommand's line in `t2r --help`
                yield (*path, choice.dest), choice
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
            continue
        yield path, action


def test_every_option_of_every_subcommand_has_a_help_line():
    options = list(_options(build_parser()))
    commands = {p[1] for p, _ in options if len(p) > 1}
    assert {"convert", "generate", "finetune", "eval", "export"} <= commands
    missing = [f"{' '.join(p)} {'/'.join(a.option_strings) or a.dest}" for p, a in options
               if not (a.help or "").strip() or a.help == argparse.SUPPRESS]
    assert not missing, f"options without a help line: {missing}"


def _launch(code: str) -> dict:
    """Run ``code`` (which calls t2r_launch.main) in a fresh interpreter; what it printed last, as JSON."""
    script = ("import json, sys\nimport t2r_launch\n" + code
              + "\nprint(json.dumps({'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules,"
                " 't2r': sorted(m for m in sys.modules if m == 't2r' or m.startswith('t2r.'))}))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout, json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"], ["finetune", "--help"], ["eval", "--help"],
                                  ["export", "--help"], ["generate", "--help"], ["--version"]])
def test_help_and_version_import_no_torch(argv):
    printed, loaded = _launch(f"try:\n    t2r_launch.main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0")
    assert "usage: t2r" in printed or printed.startswith("t2r ")
    assert not loaded["torch"] and not loaded["transformers"]
    assert loaded["t2r"] == []  # no half-imported package left behind: a later `import t2r` starts afresh


def test_a_usage_error_exits_2_without_torch():
    printed, loaded = _launch("try:\n    t2r_launch.main(['convert'])\nexcept SystemExit as e:\n    assert e.code == 2")
    assert not loaded["torch"]


def test_a_command_run_by_the_console_script_finishes_import_t2r(tmp_path):
    """The command runs with the package imported in full: the model type registered with transformers."""
    printed, loaded = _launch(
        f"assert t2r_launch.main(['convert', 'tiny-random-llama', '--out', {str(tmp_path / 'c')!r}]) == 0\n"
        "import t2r\n"
        f"from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'c')!r})\n"
        "assert type(m) is t2r.T2RForCausalLM and t2r.__version__, type(m)")
    assert loaded["torch"] and "t2r.models" in loaded["t2r"]


def test_the_parser_options_limit_is_the_kernels_limit():
    from t2r import options
    from t2r.kernels.gsa.utils import MAX_DIM

    assert options.MAX_DIM == MAX_DIM
