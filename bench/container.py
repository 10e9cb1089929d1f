"""Build deploy/Dockerfile and run the image, with podman or docker, whichever can build on
this machine: `rustgpt-cli --help`, the C kernels (their OpenMP runtime is in the image) and
two MPI ranks. Without a working engine it says why and exits 0.

    python bench/container.py [--tag rustgpt:VERSION]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import rustgpt

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("podman", "docker")


def find_engine() -> tuple[str | None, list[str]]:
    """The first engine that answers `info` (it can build), and why each other one cannot."""
    reasons = []
    for engine in ENGINES:
        if shutil.which(engine) is None:
            reasons.append(f"{engine}: not installed")
            continue
        info = subprocess.run([engine, "info"], capture_output=True, text=True)
        if info.returncode == 0:
            return engine, reasons
        detail = (info.stderr.strip().splitlines() or ["no output"])[-1]
        reasons.append(f"{engine}: installed, but `{engine} info` fails: {detail}")
    return None, reasons


def run(command: list[str]) -> str:
    """Run a command, echoing it; its stdout, or exit with its status when it fails."""
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    print(result.stdout, end="")
    if result.returncode != 0:
        sys.exit(result.returncode)
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default=f"rustgpt:{rustgpt.__version__}",
                        help="image name:tag to build (default %(default)s)")
    tag = parser.parse_args().tag

    engine, reasons = find_engine()
    if engine is None:
        print("skipped: no container engine can build here (" + "; ".join(reasons) + ")")
        return
    start = time.perf_counter()
    run([engine, "build", "-f", str(ROOT / "deploy" / "Dockerfile"), "-t", tag, str(ROOT)])
    seconds = time.perf_counter() - start
    size = int(run([engine, "image", "inspect", "--format", "{{.Size}}", tag]))
    print(f"built {tag} with {engine} in {seconds:.0f} s, {size / 2**20:.0f} MiB")
    run([engine, "run", "--rm", tag, "--help"])
    # --help does not load the C extension; this does, with its OpenMP runtime
    run([engine, "run", "--rm", "--entrypoint", "python", tag, "-c",
         "import rustgpt; print(rustgpt.kernels_info())"])
    run([engine, "run", "--rm", "--entrypoint", "mpiexec", tag, "-n", "2", "python", "-c",
         "from mpi4py import MPI; print('rank', MPI.COMM_WORLD.rank, 'of', MPI.COMM_WORLD.size)"])


if __name__ == "__main__":
    main()
