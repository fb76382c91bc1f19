"""How long the command line takes to answer, against importing torch and timm alone (what every
command, ``--help`` included, waited for while a command module imported them at its top).

    python bench/cli_start.py [--repeat 3]

Each line runs a fresh interpreter ``--repeat`` times and prints the fastest wall time.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = "import sys; from jobs.cli import main; sys.exit(main())"


def seconds(argv: list[str], repeat: int) -> float:
    """Fastest wall time of ``python argv`` over ``repeat`` runs (each must exit 0)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as registry:
        runs = {
            "python (nothing)": ["-c", "pass"],
            "copydet --help": ["-c", CLI, "--help"],
            "copydet models list": ["-c", CLI, "models", "list", "--registry", registry],
            "import torch, timm": ["-c", "import torch, timm"],
        }
        times = {name: seconds(argv, args.repeat) for name, argv in runs.items()}
    for name, s in times.items():
        print(f"{name:22s} {s:6.2f} s")
    print(f"copydet --help takes x{times['copydet --help'] / times['import torch, timm']:.2f} "
          "the time of importing torch and timm")


if __name__ == "__main__":
    main()
