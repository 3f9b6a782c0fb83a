"""A 2-process CPU run (torchrun, gloo) follows the 1-process loss curve at the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "chitchat" / "smoke.yaml"


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "log_history.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "learning_rate" in r}


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun"
)
def test_two_process_run_matches_one_process(tmp_path):
    common = [
        f"data.prepared_dir={tmp_path / 'prepared'}",
        "training.max_steps=12",
        "training.logging_steps=1",
        "training.eval_steps=null",
        "training.save_steps=100",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run(
        [sys.executable, "-m", "ndm_seq.cli", "train", str(SMOKE), f"output_dir={tmp_path / 'one'}", *common],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = Path(sys.executable).parent / "torchrun"
    two = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "ndm_seq.cli", "train", str(SMOKE),
         f"output_dir={tmp_path / 'two'}", *common],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    # One launch, one report: only rank 0 prints the header and the trained model.
    assert two.stdout.count("trained model: ") == 1
    assert two.stderr.count(" parameters; ") == 1
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    # Same batches, same initial weights, gradients averaged across the two halves:
    # only the latent samples differ (each process draws its own noise).
    for step in a:
        assert abs(a[step] - b[step]) / abs(a[step]) < 0.02, (step, a[step], b[step])
    # And the processes really were one data-parallel job: both finished the same 12 steps.
    state = json.loads(
        (tmp_path / "two" / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text()
    )
    assert state["global_step"] == 12
    # Both ranks wrote their RNG state into the checkpoint before the main process
    # recorded the manifest (the completion waits for every process) and cleared the marker.
    from ndm_seq.training import CHECKPOINT_MANIFEST, PENDING_MARKER, checkpoint_problem

    checkpoint = tmp_path / "two" / "checkpoints" / "checkpoint-12"
    files = json.loads((checkpoint / CHECKPOINT_MANIFEST).read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(files)
    assert checkpoint_problem(checkpoint) is None
    assert not (checkpoint.parent / PENDING_MARKER).exists()
