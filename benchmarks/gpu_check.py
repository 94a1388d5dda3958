"""The GPU check: everything worth knowing about the CUDA path, from one command, into one results file.

    python3 dev.py gpu-check              # on a machine with CUDA: sized for at most 8 minutes on one GPU
    python3 dev.py gpu-check --dry-run    # anywhere: the same steps on the CPU with tiny sizes (~1 minute)

Steps, each with its own share of ``--budget`` seconds (default 450) so the whole fits in 8 minutes:

1. the CUDA tests (``tests/test_cuda.py`` and the CUDA halves of other test files), in a pytest process
   of its own, deterministic algorithms where a test asks for them;
2. the training and evaluation rows of the performance benchmark (``performance.py``): images/s of
   plain PyTorch, eager Pyro and the project's path per estimator and batch size, their epoch times,
   and the IS evaluation's seconds and ``cuda_peak_mb`` (``torch.cuda.max_memory_allocated``), each
   evaluator in a fresh process;
3. a short main job, ``pyro-vae train --device cuda`` on MNIST: epoch seconds, the test ELBO and the
   IS log-likelihood.

It writes ``benchmarks/results/gpu_check.md`` (``gpu_check_dry_run.md`` for a dry run, or ``--out``):
tables for people, then every raw number as a JSON block. The exit status is 0 when every step passed.

On a machine without CUDA it runs the dry run and says so: the same code with ``--device cpu`` and tiny
sizes, so the command is known to work before GPU time is spent on it (``tests/test_gpu_check.py``
runs it). The data are MNIST from ``--data-root`` (``data/mnist.npz``; copy it along to a machine
without network) or, for the dry run, any 784-value dataset given by ``--dataset npz --data-root F``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import performance  # noqa: E402
import torch  # noqa: E402

# the CUDA halves of tests outside test_cuda.py
OTHER_CUDA_TESTS = ["tests/test_data.py::test_batches_without_labels_and_on_a_device",
                    "tests/test_train.py::test_training_on_cuda_raises_the_elbo"]
# the dry run's share of test_cuda.py: one registry triple of the 273, and every other test
DRY_RUN_TESTS = "(not every_model and not cvae) or vae-diagonal-normal-elbo"
TIME_LIMIT = "past the time limit that gpu-check gave the tests"  # the skip reason in tests/test_cuda.py


def plan(dry_run: bool, cuda_available: bool) -> tuple[bool, str | None]:
    """(dry run?, the line that says why) for the options given and the machine found."""
    if dry_run:
        return True, "dry run (--dry-run): the same steps with --device cpu and tiny sizes"
    if not cuda_available:
        return True, ("no CUDA device on this machine: running the dry run instead (--device cpu, tiny sizes); "
                      "nothing here ran on a GPU")
    return False, None


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "device": str(device), "machine": performance.machine(device), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                   gpus_visible=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())
    return env


def _tail(text: str, n: int = 2000) -> str:
    return text[-n:] if text else ""


def run_tests(device: torch.device, dry: bool, work: Path, timeout: float) -> dict:
    """pytest on the CUDA tests in a process of its own; counts, failures and skip reasons from its JUnit XML."""
    junit = work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rs",
           f"--junitxml={junit}", "tests/test_cuda.py"]
    cmd += ["-k", DRY_RUN_TESTS] if dry else OTHER_CUDA_TESTS
    # tests that would start after the limit skip themselves (tests/test_cuda.py), so pytest still reports;
    # a kill a minute later is only the backstop for one test that hangs
    env = {**os.environ, "PYRO_VAE_TEST_DEVICE": device.type, "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
           "PYRO_VAE_TEST_DEADLINE": str(time.time() + timeout)}
    start = time.perf_counter()
    log = work / "pytest.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        try:
            proc.wait(timeout=timeout + 60)
            timed_out = None
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            timed_out = f"killed {timeout + 60:.0f} s after the start: a test hung"
    output = log.read_text()
    result = {"command": " ".join(cmd[1:]), "exit_code": proc.returncode, "seconds": time.perf_counter() - start,
              "passed": 0, "failed": [], "skipped": {}, "slowest": []}
    if timed_out:
        result["error"] = timed_out
    if not junit.is_file():
        return {**result, "ok": False, "error": timed_out or "pytest wrote no report", "output_tail": _tail(output)}
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        cases.append((float(case.get("time", 0)), name))
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            result["failed"].append({"test": name, "message": (bad.get("message") or "").strip()[:500]})
        elif skipped is not None:
            reason = (skipped.get("message") or "").strip()
            result["skipped"][reason] = result["skipped"].get(reason, 0) + 1
        else:
            result["passed"] += 1
    result["slowest"] = [{"test": n, "seconds": round(t, 2)} for t, n in sorted(cases, reverse=True)[:5]]
    cut = result["skipped"].get(TIME_LIMIT, 0)
    if cut:
        result["error"] = f"{cut} tests did not run: the {timeout:.0f} s limit of this step was reached"
    result["ok"] = proc.returncode == 0 and not result["failed"] and not timed_out and not cut
    if not result["ok"]:
        result["output_tail"] = _tail(output)
    return result


def run_benchmark(device: torch.device, dry: bool, a: argparse.Namespace, train_seconds: float,
                  eval_timeout: float) -> dict:
    """The performance benchmark's training rows (until ``train_seconds`` are used) and its evaluation rows."""
    from pyro_vae.data import load_dataset

    if dry:
        configs, batches, repeats, min_seconds, k, points = [("elbo", 1)], (20,), 1, 0.01, 2, 20
    else:
        configs, batches, repeats, min_seconds, k, points = (performance.CONFIGS, (128, 1024), 3, 0.2,
                                                             a.eval_k, a.eval_points)
    start = time.perf_counter()
    train, _ = load_dataset(a.dataset, a.data_root)
    rows = performance.training(train, device, repeats, min_seconds, batches, configs, compile=a.compile,
                                deadline=start + train_seconds)
    train_s = time.perf_counter() - start
    eval_rows, eval_error = [], None
    worker = argparse.Namespace(device=str(device), dataset=a.dataset, data_root=a.data_root)
    for kind in ("plain", "project"):
        try:
            eval_rows.append({**performance.run_eval(kind, k, points, worker, timeout=eval_timeout), "repeat": 0})
        except subprocess.TimeoutExpired:
            eval_error = f"the {kind} evaluator ran past {eval_timeout:.0f} s"
            break
        except subprocess.CalledProcessError as e:
            eval_error = f"the {kind} evaluator failed: {_tail(e.stderr, 1500)}"
            break
    summary = performance.summarize_eval(eval_rows) if len(eval_rows) == 2 else []
    planned = len(configs) * len(batches)
    done_jobs = len({(r["estimator"], r["k"], r["batch"]) for r in rows})
    return {"ok": eval_error is None and done_jobs == planned and bool(rows), "training_rows": rows,
            "training_jobs": {"planned": planned, "done": done_jobs}, "training_seconds": train_s,
            "evaluation_rows": eval_rows, "evaluation_summary": summary, "error": eval_error,
            "settings": {"repeats": repeats, "min_seconds": min_seconds, "batches": list(batches),
                         "configs": [list(c) for c in configs], "compile": a.compile, "eval_k": k,
                         "eval_points": points},
            "markdown": performance.markdown(rows, summary, device, "benchmarks/gpu_check.py (its step 2)", train_s)}


def run_main_job(device: torch.device, dry: bool, a: argparse.Namespace, work: Path, timeout: float) -> dict:
    """``pyro-vae train`` on ``device`` in a process of its own, and what its run folder records."""
    run = work / "main-job"
    cmd = [sys.executable, "-m", "pyro_vae", "train", "--device", str(device), "--dataset", a.dataset,
           "--data-root", a.data_root, "--out", str(run), "--quiet"]
    if dry:
        cmd += ["--epochs", "1", "--train-points", "200", "--test-points", "50", "--latent-dim", "2", "--hidden", "16",
                "--batch-size", "50", "--eval-samples", "5", "--eval-points", "20"]
    else:
        cmd += ["--epochs", str(a.main_epochs), "--eval-points", "2000"]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "command": " ".join(cmd[3:])}
    out = {"command": "pyro-vae " + " ".join(cmd[3:]), "exit_code": done.returncode,
           "wall_seconds": time.perf_counter() - start}
    if done.returncode != 0:
        return {**out, "ok": False, "error": _tail(done.stderr, 3000)}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluation = json.loads((run / "evaluation.json").read_text())
    versions = json.loads((run / "config.json").read_text())["versions"]
    plots = sorted(p.name for p in (run / "plots").glob("*.png"))
    return {**out, "ok": True, "epochs": rows, "evaluation": evaluation, "versions": versions, "plots": plots,
            "stdout": _tail(done.stdout, 1000)}


def markdown(results: dict) -> str:
    env, tests, bench, job = results["environment"], results["tests"], results["benchmark"], results["main_job"]
    lines = ["# GPU check" + (" (DRY RUN on the CPU: no GPU involved)" if results["dry_run"] else ""), "",
             f"{results['note']}" if results["note"] else "", "",
             f"Machine: {env['machine']}; CUDA runtime {env['cuda_runtime']}.  ",
             f"Command: `{results['command']}`; {results['wall_seconds'] / 60:.1f} min; "
             f"**{'all steps passed' if results['ok'] else 'SOME STEPS FAILED'}**.", "",
             "## 1. CUDA tests", ""]
    if "passed" in tests:
        lines.append(f"{tests['passed']} passed, {len(tests['failed'])} failed, "
                     f"{sum(tests['skipped'].values())} skipped in {tests['seconds']:.0f} s (`{tests['command']}`).")
        if tests.get("error"):
            lines.append(f"**{tests['error']}**")
        lines += [f"- FAILED `{f['test']}`: {f['message'][:300]}" for f in tests["failed"]]
        lines += [f"- skipped {n}: {reason}" for reason, n in tests["skipped"].items()]
    else:
        lines.append(f"did not finish: {tests.get('error')}")
    lines += ["", "## 2. Performance benchmark rows", ""]
    if bench.get("markdown"):
        jobs = bench["training_jobs"]
        lines.append(f"Training jobs run: {jobs['done']} of {jobs['planned']} "
                     f"({bench['training_seconds']:.0f} s); settings {json.dumps(bench['settings'])}.")
        lines += ["", bench["markdown"].split("\n", 1)[1].replace("\n## ", "\n### ")]
    if bench.get("error"):
        lines.append(f"error: {bench['error']}")
    lines += ["", "## 3. Main job", ""]
    if job.get("ok"):
        ev = job["evaluation"]
        lines += [f"`{job['command']}`: {job['wall_seconds']:.0f} s in all, on {job['versions'].get('gpu', 'the CPU')}.",
                  "", "| epoch | seconds | images/s | train ELBO | test ELBO |", "|---|---|---|---|---|"]
        lines += [f"| {r['epoch']} | {r['seconds']:.2f} | {r['images_per_s']:.0f} | {r['train_elbo']:.2f} | "
                  f"{r.get('test_elbo', math.nan):.2f} |" for r in job["epochs"]]
        if ev.get("log_likelihood") is not None:
            lines += ["", f"Test ELBO {ev['elbo']:.2f} ± {ev['elbo_se']:.2f}, IS log-likelihood "
                          f"{ev['log_likelihood']:.2f} ± {ev['log_likelihood_se']:.2f} nats (K={ev['num_samples']}, "
                          f"{ev['num_points']} points, {ev.get('seconds', math.nan):.1f} s). Plots: {', '.join(job['plots'])}."]
    else:
        lines.append(f"failed: {job.get('error')}")
    raw = {k: v for k, v in results.items()}
    raw["benchmark"] = {k: v for k, v in bench.items() if k != "markdown"}
    lines += ["", "## Raw results", "", "```json", json.dumps(raw, indent=1, default=str), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny sizes")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root", default=str(ROOT / "data"))
    p.add_argument("--out", type=Path, default=None, help="the results file (default: benchmarks/results/gpu_check*.md)")
    p.add_argument("--budget", type=float, default=450, help="seconds for all steps together (default 450)")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile contenders (slow to compile)")
    p.add_argument("--eval-k", type=int, default=5000)
    p.add_argument("--eval-points", type=int, default=10000)
    p.add_argument("--main-epochs", type=int, default=3)
    a = p.parse_args(argv)
    dry, note = plan(a.dry_run, torch.cuda.is_available())
    if note:
        print(f"gpu-check: {note}", file=sys.stderr)
    device = torch.device("cpu" if dry else "cuda")
    out = a.out or ROOT / "benchmarks" / "results" / ("gpu_check_dry_run.md" if dry else "gpu_check.md")
    # shares of the budget: tests 45%, training rows 15%, each evaluator 10%, the main job 20%
    b = a.budget
    start = time.perf_counter()
    results = {"dry_run": dry, "note": note, "command": "python3 dev.py gpu-check " + " ".join(argv or sys.argv[1:]),
               "environment": environment(device)}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        print("gpu-check: 1/3 CUDA tests", file=sys.stderr)
        results["tests"] = run_tests(device, dry, work, timeout=0.45 * b)
        print("gpu-check: 2/3 performance benchmark rows", file=sys.stderr)
        try:
            results["benchmark"] = run_benchmark(device, dry, a, train_seconds=0.15 * b, eval_timeout=0.1 * b)
        except Exception as e:  # the other steps still run and the file is still written
            results["benchmark"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print("gpu-check: 3/3 main job", file=sys.stderr)
        results["main_job"] = run_main_job(device, dry, a, work, timeout=0.2 * b)
    results["wall_seconds"] = time.perf_counter() - start
    results["ok"] = all(results[k].get("ok") for k in ("tests", "benchmark", "main_job"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results))
    print(f"gpu-check: {'all steps passed' if results['ok'] else 'some steps FAILED'}; results in {out}",
          file=sys.stderr)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
