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


# --------------------------------------------------------------------- one line, never a traceback


def _run_console(args: list[str], timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_console_script(), *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


@pytest.mark.parametrize("command", ["sample", "chat", "evaluate", "analyze"])
@pytest.mark.parametrize(
    "device, message",
    [
        ("bogus", "argument --device: 'bogus' is not a torch device; use cpu, cuda, cuda:N or mps"),
        ("cuda:x", "argument --device: 'cuda:x' is not a torch device"),
        ("", "argument --device: '' is not a torch device"),
    ],
)
def test_a_device_torch_cannot_parse_is_refused_when_parsed(command, device, message, capsys):
    argv = {"sample": ["--context", "hi"], "evaluate": ["--data", "D"], "analyze": ["--data", "D"]}
    with pytest.raises(SystemExit) as stop:
        _parse([command, "M", *argv.get(command, []), "--device", device])
    assert stop.value.code == 2
    assert (
        capsys.readouterr().err.splitlines()[-1].startswith(f"ndm-seq {command}: error: {message}")
    )


def test_a_device_this_machine_lacks_is_one_line_from_the_console_script(tiny_ndm_gru):
    # No GPU is visible (a CPU-only torch, or CUDA_VISIBLE_DEVICES empty): the model never loads.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = _run_console(
        ["sample", str(tiny_ndm_gru), "--context", "hi", "--device", "cuda"], env=env
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.splitlines()[-1]
    assert re.fullmatch(
        r"ndm-seq sample: error: argument --device: 'cuda': (this torch \(.*\) was built "
        r"without CUDA|torch sees no CUDA GPU \(driver, CUDA_VISIBLE_DEVICES\)); use --device cpu",
        last,
    ), last
    assert out.stdout == ""


def test_sample_into_a_closed_pipe_exits_quietly(tiny_ndm_gru):
    """`ndm-seq sample ... | head -1`: the reader goes away; sample stops as a Unix tool does
    (status 141, the shell's code for SIGPIPE) with nothing on stderr."""
    proc = subprocess.Popen(
        [_console_script(), "sample", str(tiny_ndm_gru), "--context", "hi", "-n", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before the first response is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err[-2000:]
    assert err == ""


def test_responses_print_on_an_ascii_stdout(tiny_ndm_gru):
    # The untrained model answers with bytes of any kind (U+FFFD and the like).
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    args = ["sample", str(tiny_ndm_gru), "--context", "hi", "-n", "3", "--seed", "0"]
    out = _run_console(args, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all(line.isascii() for line in lines)
    assert "\\u" in out.stdout or "\\x" in out.stdout  # the non-ASCII text, escaped
    assert out.stderr == ""


def test_chat_on_a_terminal_edits_lines_and_recalls_history(tiny_ndm_gru):
    """On a terminal, chat reads turns through readline: the Up arrow recalls the previous
    turn (in-memory history) instead of sending "^[[A" as a turn."""
    pytest.importorskip("readline")
    pty = pytest.importorskip("pty")
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat, on the pseudo-terminal
        args = ["chat", str(tiny_ndm_gru), "-n", "1", "--max-new-tokens", "2", "--max-history", "8"]
        try:
            os.execv(_console_script(), [_console_script(), *args])
        finally:
            os._exit(127)
    output = b""

    def read_until(marker: bytes, timeout: float = 300) -> None:
        nonlocal output
        import time

        end = time.monotonic() + timeout
        while marker not in output and time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    output += os.read(fd, 4096)
                except OSError:  # the child closed the terminal
                    return

    try:
        read_until(b"you> ")
        os.write(fd, b"hello there\r")
        read_until(b"bot[1]*")
        read_until(b"you> ")
        os.write(fd, b"\x1b[A\r")  # Up arrow, Enter: the last turn again
        read_until(b"bot[1]*", timeout=120)
        os.write(fd, b"/history\r")
        read_until(b"  3. ")
        os.write(fd, b"/quit\r")
        read_until(b"bye")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = output.decode("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]
    history = re.findall(r"^  (\d)\. (.*?)\r?$", text, flags=re.M)
    assert history[0] == ("1", "hello there") and history[2] == ("3", "hello there"), text
    assert "\x1b[A" not in "".join(turn for _, turn in history)
