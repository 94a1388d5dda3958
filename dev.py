#!/usr/bin/env python3
"""Set up (once) and run pyro-vae from a fresh clone, with nothing but python3 on the machine.

    python3 dev.py main [pyro-vae train options]   train + evaluate the default VAE on MNIST
    python3 dev.py test [pytest options]           ruff, then the full test suite (what CI runs)
    python3 dev.py gpu-check [--dry-run]           the CUDA tests, benchmark rows and a main job on a GPU, one
                                                   results file (benchmarks/gpu_check.py; without CUDA: a dry run)
    python3 dev.py shell-cmd ARGS...               run a command inside the project's environment

The first call makes ./.venv and installs the project with its dev extra; later calls reuse it and
reinstall only when pyproject.toml changed.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".pyro-vae-install"


def ensure_env() -> None:
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text().strip() == want:
        return
    if not (BIN / "python").exists():
        print(f"[dev] creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("[dev] installing pyro-vae and its dependencies (first time: a few minutes)", flush=True)
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(want + "\n")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("main", "test", "gpu-check", "shell-cmd"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        ensure_env()
    except subprocess.CalledProcessError as e:
        print(f"[dev] set-up failed: {' '.join(e.cmd)} exited with {e.returncode}", file=sys.stderr)
        return 1
    cmd, rest = argv[0], argv[1:]
    if cmd == "main":
        args = [str(BIN / "pyro-vae"), "train", *rest]
    elif cmd == "test":
        # the lint is part of the test command: a tree ruff rejects does not pass
        lint = subprocess.run([str(BIN / "ruff"), "check", "--quiet", "."], cwd=ROOT).returncode
        if lint:
            print("[dev] ruff found problems (above); fix them or run `.venv/bin/ruff check --fix .`", file=sys.stderr)
            return lint
        args = [str(BIN / "python"), "-m", "pytest", *rest]
    elif cmd == "gpu-check":
        args = [str(BIN / "python"), str(ROOT / "benchmarks" / "gpu_check.py"), *rest]
    else:
        args = rest
    return subprocess.run(args, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
