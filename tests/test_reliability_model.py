"""Bad model files and bad input to `sample` / `chat`: one clear error, never a traceback.

* a ``model.safetensors`` whose tensors do not fit ``config.json`` (missing, unexpected,
  wrong shape) or hold NaN/inf is refused by ``NDMForConversation.from_pretrained`` (and
  so by ``AutoModelForSeq2SeqLM`` and the CLI) before transformers could re-initialise
  anything;
* text that is not valid UTF-8 (lone surrogates: what Python makes of undecodable argv
  or stdin bytes) gets a clear error naming the argument, the file line or the chat
  line, and a chat goes on;
* Ctrl-C in ``chat`` exits with status 130 and no traceback;
* ``constraints.txt`` pins every runtime dependency of ``pyproject.toml``.

The model is an untrained tiny GRU NDM saved with its tokenizer (as in
test_reliability_load.py); the chat and Ctrl-C checks run ``ndm-seq`` in a real child
process with a piped stdin.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSeq2SeqLM

import ndm_seq
from ndm_seq.cli import main
from ndm_seq.evaluation import ChatSession, chat_loop, check_text, load_model

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
CLI = [sys.executable, "-m", "ndm_seq.cli"]


@pytest.fixture(scope="module")
def model_dir(tiny_ndm_gru) -> Path:
    return tiny_ndm_gru


def _edited(model_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the model folder whose model.safetensors went through ``edit(state_dict)``."""
    path = tmp_path / "edited"
    shutil.copytree(model_dir, path)
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _set(key, value):
    return lambda sd: sd.__setitem__(key, value)


def _poison(key, value):
    def edit(sd):
        sd[key] = sd[key].clone()
        sd[key].view(-1)[1] = value

    return edit


WEIGHT_CASES = {
    "missing": (
        lambda sd: sd.pop("latent.memory.query.weight"),
        "missing tensors: latent.memory.query.weight",
    ),
    "unexpected": (_set("extra.weight", torch.zeros(2)), "unexpected tensors: extra.weight"),
    "shape": (
        _set("latent.memory.query.weight", torch.zeros(3, 8)),
        "wrong shapes: latent.memory.query.weight expected [8, 8] found [3, 8]",
    ),
    "nan": (
        _poison("decoder.out_proj.bias", float("nan")),
        "NaN or inf values in: decoder.out_proj.bias",
    ),
    "inf": (
        _poison("encoder.embed.weight", float("-inf")),
        "NaN or inf values in: encoder.embed.weight",
    ),
}


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_weights_that_do_not_fit_the_config_are_refused(case, model_dir, tmp_path, capfd):
    edit, expected = WEIGHT_CASES[case]
    path = _edited(model_dir, tmp_path, edit)
    for loader in (
        ndm_seq.NDMForConversation.from_pretrained,
        AutoModelForSeq2SeqLM.from_pretrained,
    ):
        with pytest.raises(ValueError) as err:
            loader(path)
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"{path / 'model.safetensors'}: refusing to load"), message
        assert expected in message, message
    # Refused before transformers loaded anything (it reports re-initialised keys).
    assert "LOAD REPORT" not in capfd.readouterr().err


def test_first_offending_tensors_are_named_and_the_rest_counted(model_dir, tmp_path):
    dropped = [
        "latent.memory.query.weight",
        "latent.memory.query.bias",
        "decoder.out_proj.bias",
        "decoder.attn_query.weight",
    ]
    path = _edited(model_dir, tmp_path, lambda sd: [sd.pop(k) for k in dropped])
    with pytest.raises(ValueError, match=r"missing tensors: \S+, \S+, \S+ \(\+1 more\)$"):
        ndm_seq.NDMForConversation.from_pretrained(path)


def test_a_sharded_checkpoint_is_checked_shard_by_shard(model_dir, tmp_path):
    model = ndm_seq.NDMForConversation.from_pretrained(model_dir)
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert ndm_seq.NDMForConversation.from_pretrained(path)  # intact shards load
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = path / weight_map["decoder.out_proj.bias"]
    tensors = load_file(shard)
    tensors["decoder.out_proj.bias"] = torch.full_like(
        tensors["decoder.out_proj.bias"], float("nan")
    )
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"NaN or inf values in: decoder\.out_proj\.bias"):
        ndm_seq.NDMForConversation.from_pretrained(path)


def test_intact_weights_load_unchanged(model_dir):
    model = ndm_seq.NDMForConversation.from_pretrained(model_dir)
    saved = load_file(model_dir / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(saved)
    assert all(torch.equal(state[k], saved[k]) for k in saved)


@pytest.mark.parametrize("command", ["sample", "chat", "evaluate"])
def test_cli_reports_bad_weights_in_one_line(command, model_dir, tmp_path, capsys, monkeypatch):
    path = _edited(model_dir, tmp_path, lambda sd: sd.pop("latent.memory.query.weight"))
    args = {"sample": ["--context", "hi"], "chat": [], "evaluate": ["--data", str(tmp_path)]}
    if command == "evaluate":  # the data is read first: give a (tiny) prepared split
        import datasets

        split = datasets.Dataset.from_dict({"context": [["hi"]], "response": ["hello"]})
        datasets.DatasetDict({"test": split}).save_to_disk(str(tmp_path / "data"))
        args["evaluate"] = ["--data", str(tmp_path / "data"), "--output", str(tmp_path / "ev")]
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    capsys.readouterr()  # not what main printed: datasets' progress bar
    assert main([command, str(path), *args[command]]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"ndm-seq {command}: error: {path / 'model.safetensors'}: ")
    assert "missing tensors: latent.memory.query.weight" in lines[0]
    assert captured.out == ""
    assert not (tmp_path / "ev").exists()  # evaluate wrote nothing


def test_cli_reports_a_multiline_config_error_in_one_line(model_dir, tmp_path, capsys):
    path = tmp_path / "badcfg"
    shutil.copytree(model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["num_slots"] = 0
    (path / "config.json").write_text(json.dumps(config))
    assert main(["sample", str(path), "--context", "hi"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ndm-seq sample: error: {path / 'config.json'}: ")
    assert "num_slots must be a positive integer; got 0" in lines[0]


# ----------------------------------------------------------------------------- text


def test_check_text_names_the_byte_or_the_surrogate():
    check_text("café ☕ 😀", "x")
    with pytest.raises(
        ValueError, match=r"^arg is not valid UTF-8 text \(byte 0xff at character 4"
    ):
        check_text("caf\udcff", "arg")
    with pytest.raises(ValueError, match=r"\(U\+D800 at character 1"):
        check_text("\ud800x", "arg")


def test_sample_refuses_an_undecodable_context_argument(model_dir, capsys):
    # `--context $'caf\xff'`: Python decodes argv with surrogateescape, giving '\udcff'.
    code = main(["sample", str(model_dir), "--context", "hello", "--context", "caf\udcff"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "ndm-seq sample: error: --context 2 ('caf\\udcff') is not valid UTF-8 text (byte 0xff "
        "at character 4, a lone surrogate or an undecodable byte)"
    ]


def test_sample_refuses_undecodable_argv_bytes_in_a_real_process(model_dir):
    result = subprocess.run(
        [*CLI, "sample", str(model_dir), "--context", b"caf\xff"],
        capture_output=True, env=ENV, timeout=300,
    )  # fmt: skip
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, err
    assert "Traceback" not in err
    assert "ndm-seq sample: error: --context 1 ('caf\\udcff') is not valid UTF-8 text" in err


@pytest.mark.parametrize(
    "bad", [b'["caf\xff"]\n', b'{"context": ["hi", "caf\\udcff"]}\n'], ids=["byte", "escape"]
)
def test_sample_contexts_file_with_invalid_utf8_names_file_and_line(
    bad, model_dir, tmp_path, capsys
):
    path = tmp_path / "contexts.jsonl"
    path.write_bytes(b'["hi", "how are you?"]\n' + bad)
    args = ["--contexts", str(path), "--batch-size", "1", "-n", "1", "--seed", "0"]
    assert main(["sample", str(model_dir), *args]) == 1
    out, err = capsys.readouterr()
    last = err.splitlines()[-1]  # after transformers' "Loading weights" bar
    assert re.match(
        rf"ndm-seq sample: error: {re.escape(str(path))}:2: turn \d is not valid UTF-8", last
    )
    assert "Traceback" not in err
    assert json.loads(out.splitlines()[0])["context"] == ["hi", "how are you?"]


def test_chat_loop_skips_an_invalid_turn_and_goes_on(model_dir):
    model, tok = load_model(model_dir, "cpu")
    sampling = ChatSession.DEFAULT_SAMPLING.replace(num_samples=1, max_new_tokens=3)
    session = ChatSession(model, tok, sampling, max_history=4, seed=0)
    stdout, stderr = io.StringIO(), io.StringIO()
    stdin = io.StringIO("hello\ncaf\udcff au lait\n/history\n")
    assert chat_loop(session, stdin, stdout, stderr=stderr) == 0
    assert stderr.getvalue() == (
        "ndm-seq chat: line 2: the input is not valid UTF-8 text (byte 0xff at character 4, "
        "a lone surrogate or an undecodable byte); turn skipped\n"
    )
    assert len(session.history) == 2 and session.history[0] == "hello"  # no trace of line 2
    assert "  1. hello\n" in stdout.getvalue()
    with pytest.raises(ValueError, match="the turn is not valid UTF-8"):
        session.respond("\ud83d")  # the API refuses it too, the history unchanged
    assert len(session.history) == 2


def test_chat_with_an_invalid_utf8_line_on_stdin_goes_on(model_dir):
    # Python reads stdin with errors="strict" under a UTF-8 locale such as en_US.UTF-8
    # (under C or C.UTF-8 it picks surrogateescape itself): force the strict case.
    env = dict(ENV, PYTHONIOENCODING="utf-8:strict")
    result = subprocess.run(
        [*CLI, "chat", str(model_dir), "-n", "1", "--max-new-tokens", "3", "--seed", "0"],
        input=b"hello\ncaf\xff\n/history\n", capture_output=True, env=env, timeout=300,
    )  # fmt: skip
    err = result.stderr.decode("utf-8", "replace")
    out = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, err
    assert "Traceback" not in err
    assert "ndm-seq chat: line 2: the input is not valid UTF-8 text (byte 0xff" in err
    assert "  1. hello\n" in out and "  2. " in out and "  3. " not in out  # /history ran


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_chat_exits_130_without_a_traceback(model_dir):
    cmd = [*CLI, "chat", str(model_dir), "-n", "1", "--max-new-tokens", "3", "--seed", "0"]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        # A shell starts background jobs with SIGINT ignored, and the child would inherit
        # that (then EOF ends the chat with 0): give it the terminal's default disposition.
        preexec_fn=_default_sigint,
    )
    try:
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        first = proc.stdout.readline()  # the answer: the child now waits for the next line
        assert first.startswith(b"bot[1]*"), first
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err.decode("utf-8", "replace")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.rstrip().endswith("ndm-seq chat: interrupted")


# ----------------------------------------------------------------------------- installs


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower().replace("_", "-")] = spec.version
    return pins


def test_constraints_pin_every_runtime_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    required = [Requirement(r) for r in project["dependencies"]]
    required += [
        Requirement(r) for extra in project["optional-dependencies"].values() for r in extra
    ]
    for req in required:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
    assert "ndm-seq" not in pins
    makefile = (ROOT / "Makefile").read_text()
    torch_spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, re.M).group(1)
    assert pins["torch"].split("+")[0] == torch_spec.split("+")[0]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_passes_the_constraints_to_pip(tmp_path):
    def pip_lines(*extra):
        dry = subprocess.run(
            ["make", "-n", "install", f"VENV={tmp_path / 'venv'}", *extra],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return [line for line in dry.stdout.splitlines() if "pip install" in line]

    package = [line for line in pip_lines() if '-e ".[' in line]
    assert len(package) == 1 and " -c constraints.txt " in package[0], package
    assert not any(" -c " in line for line in pip_lines("CONSTRAINTS=")), "CONSTRAINTS= lifts pins"
