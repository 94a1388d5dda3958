"""The GPU check command, run as its dry run: every step on the CPU with tiny sizes, before GPU time is spent."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import prototype_images

ROOT = Path(__file__).resolve().parents[1]


def _raw(text: str) -> dict:
    return json.loads(text.split("```json\n", 1)[1].split("\n```", 1)[0])


def test_the_dry_run_runs_every_step_of_the_gpu_check(tmp_path):
    images, labels = prototype_images(300, side=28)  # 784 values, as the benchmark's networks expect
    data = tmp_path / "digits.npz"
    np.savez(data, x_train=images[:250], y_train=labels[:250], x_test=images[250:], y_test=labels[250:])
    out = tmp_path / "gpu_check.md"  # not benchmarks/results: a test run leaves the repository as it was
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--dataset", "npz",
                           "--data-root", str(data), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    text = out.read_text()
    assert text.startswith("# GPU check (DRY RUN on the CPU") and "all steps passed" in text
    raw = _raw(text)
    assert raw["dry_run"] is True and raw["environment"]["device"] == "cpu"
    tests = raw["tests"]
    # the GPU-path tests ran (on the CPU), none skipped: the command would run them on a GPU the same way
    assert tests["passed"] >= 15 and not tests["failed"] and not tests["skipped"], tests
    bench = raw["benchmark"]
    assert {r["path"] for r in bench["training_rows"]} == {"plain", "eager", "project"}  # compile left out
    assert all(r["images_per_s"] > 0 and np.isfinite(r["loss_project"]) for r in bench["training_rows"])
    (row,) = bench["evaluation_summary"]
    assert row["memory"] == "rss_growth_mb" and row["ll_plain"] == row["ll_project"]
    job = raw["main_job"]
    assert job["ok"] and [r["epoch"] for r in job["epochs"]] == [1] and job["versions"]["device"] == "cpu"
    assert np.isfinite(job["evaluation"]["log_likelihood"]) and "latents_2d.png" in job["plots"]


def test_without_cuda_the_command_runs_the_dry_run_and_says_so():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    dry, note = gpu_check.plan(dry_run=False, cuda_available=False)
    assert dry and "no CUDA device" in note and "nothing here ran on a GPU" in note
    assert gpu_check.plan(dry_run=False, cuda_available=True) == (False, None)
    assert gpu_check.plan(dry_run=True, cuda_available=True)[0]
