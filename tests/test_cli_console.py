"""The `ndm-seq` console script itself: what `--help` and `--version` load, the help text.

These drive the installed console script in a subprocess (what a user runs); the
other CLI tests call `ndm_seq.cli.main` in-process.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

import pytest

from ndm_seq import __version__
from ndm_seq.cli import build_parser

HEAVY = ("torch", "transformers", "datasets")  # datasets: a second more


def _console_script() -> str:
    exe = shutil.which("ndm-seq", path=os.path.dirname(sys.executable)) or shutil.which("ndm-seq")
    if exe is None:
        pytest.skip("the ndm-seq console script is not installed (pip install -e .)")
    return exe


def _imported_modules(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run the console script with Python's import log on; the top-level modules it loaded."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    out = subprocess.run(
        [_console_script(), *args], capture_output=True, text=True, timeout=120, env=env
    )
    names = set()
    for line in out.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", line)
        if match:
            names.add(match.group(1).split(".")[0])
    return out, names


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["sample", "--help"]])
def test_help_and_version_load_neither_torch_nor_transformers(args):
    out, modules = _imported_modules(args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ndm_seq" in modules and "argparse" in modules  # the import log is read
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    if args == ["--version"]:
        assert out.stdout.strip() == f"ndm-seq {__version__}"
        assert __version__ == importlib.metadata.version("ndm-seq")


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_import_ndm_seq_still_registers_the_auto_classes():
    printed = _python(
        "import sys, ndm_seq\n"
        "from transformers import AutoConfig, AutoModelForSeq2SeqLM\n"
        "from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING\n"
        "config = AutoConfig.for_model('ndm')\n"
        "print(type(config).__name__, type(AutoModelForSeq2SeqLM.from_config(config)).__name__,\n"
        "      TOKENIZER_MAPPING[type(config)].__name__, 'torch' in sys.modules)\n"
    )
    assert printed.split() == ["NDMConfig", "NDMForConversation", "NDMTokenizer", "True"]


def test_behind_the_console_script_the_classes_load_and_register_on_first_use():
    printed = _python(
        "import sys, ndm_seq_cli, ndm_seq\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
        "name = ndm_seq.NDMForConversation.__name__\n"
        "from transformers import AutoConfig\n"
        "print(name, type(AutoConfig.for_model('ndm')).__name__)\n"
    )
    assert printed.split() == ["False", "False", "NDMForConversation", "NDMConfig"]


def test_every_default_is_shown_once_in_every_subcommand_help():
    subparsers = build_parser()._subparsers._group_actions[0].choices
    for name, sub in subparsers.items():
        formatter = sub.formatter_class(prog=sub.prog)
        for action in sub._actions:
            text = formatter._expand_help(action) if action.help else ""
            assert text.lower().count("default") <= 1, (name, action.dest, text)
            assert "(default: None)" not in text and "(default: False)" not in text, (name, text)
    out = subprocess.run(
        [_console_script(), "prepare", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "(default 3)" in out.stdout  # --max-context-turns
    assert "(default: None)" not in out.stdout


# --------------------------------------------------------------------------- one name per thing


def _parse(argv: list[str]):
    return build_parser().parse_args(argv)


def test_samples_is_one_option_in_evaluate_sample_and_chat(capsys):
    for command in (
        ["evaluate", "M", "--data", "D"],
        ["sample", "M", "--context", "hi"],
        ["chat", "M"],
    ):
        for flag in ("-n", "--samples"):
            args = _parse([*command, flag, "4"])
            assert (args.samples if command[0] == "evaluate" else args.num_samples) == 4
    assert capsys.readouterr().err == ""
    old = _parse(["sample", "M", "--context", "hi", "--num-samples", "3"])
    assert old.num_samples == 3
    err = capsys.readouterr().err
    assert err == "ndm-seq sample: warning: --num-samples is deprecated, use -n/--samples\n"
    assert (
        "--num-samples"
        not in build_parser()._subparsers._group_actions[0].choices["sample"].format_help()
    )


def test_token_limits_are_named_as_in_the_run_config(capsys):
    args = _parse(["prepare", "jsonl", "--max-context-tokens", "50", "--max-response-tokens", "9"])
    assert (args.max_context_tokens, args.max_response_tokens) == (50, 9)
    assert capsys.readouterr().err == ""
    old = _parse(["prepare", "jsonl", "--max-source-tokens", "40", "--max-target-tokens", "7"])
    assert (old.max_context_tokens, old.max_response_tokens) == (40, 7)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "ndm-seq prepare: warning: --max-source-tokens is deprecated, use --max-context-tokens",
        "ndm-seq prepare: warning: --max-target-tokens is deprecated, use --max-response-tokens",
    ]
    defaults = _parse(["prepare", "jsonl"])
    assert (defaults.max_context_tokens, defaults.max_response_tokens) == (128, 64)
    for command in ("evaluate", "sample", "analyze"):
        sub = build_parser()._subparsers._group_actions[0].choices[command]
        flags = {f for a in sub._actions for f in a.option_strings}
        assert "--max-context-tokens" in flags and "--max-source-tokens" not in flags


def test_compare_takes_overrides_as_train_does(tmp_path, monkeypatch, capsys):
    import ndm_seq.compare
    from ndm_seq.cli import main

    seen = []

    def fake_compare(configs, output, overrides, **kwargs):
        seen.append((list(configs), output, list(overrides)))
        return "table\n"

    monkeypatch.setattr(ndm_seq.compare, "compare", fake_compare)
    a, b = tmp_path / "a.yaml", tmp_path / "b=1.yaml"  # a config whose name holds "="
    a.write_text("x: 1\n")
    b.write_text("x: 1\n")
    want = ([str(a), str(b)], "out", ["training.max_steps=5", "seed=2"])
    assert (
        main(["compare", str(a), str(b), "training.max_steps=5", "seed=2", "--output", "out"]) == 0
    )
    assert (
        main(["compare", str(a), str(b), "--output", "out", "training.max_steps=5", "seed=2"]) == 0
    )
    assert capsys.readouterr().err == ""
    old = ["compare", str(a), str(b), "--output", "out", "--set", "training.max_steps=5"]
    assert main([*old, "--set", "seed=2"]) == 0
    assert "--set is deprecated, use KEY=VALUE after the configs" in capsys.readouterr().err
    assert seen == [want, want, want]
    with pytest.raises(SystemExit) as stop:
        main(["compare", str(a), "--output", "out", "--bogus"])
    assert stop.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_every_command_of_the_readme_parses():
    """The README's ndm-seq lines are valid command lines (their long runs are not run here;
    the recipes' smoke runs and the docs' tests run commands end to end)."""
    import shlex
    from pathlib import Path

    from ndm_seq.cli.compare import split_overrides

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [ln for b in blocks for ln in b.splitlines() if ln.startswith("ndm-seq ")]
    assert len(lines) >= 8
    for line in lines:
        argv = shlex.split(line.split("  #")[0])[1:]
        args, extra = build_parser().parse_known_args(argv)
        if args.command == "compare":
            configs, _ = split_overrides([*args.configs, *extra])
            assert all((root / c).is_file() for c in configs), line
        else:
            assert not extra, line
        if args.command == "train":
            assert (root / args.config).is_file(), line
