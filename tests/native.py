"""The C test programs in tests/: kernel paths this CPU lacks, run anyway
(bf16_emulated.c: the AVX512-BF16 and AMX kernels with their instructions emulated;
avx512_generic.c: attention's AVX-512 variants compiled for this CPU), built with the
system's C compiler from the source tree."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_c_test(tmp_path: Path, program: str, *sources: str) -> str:
    """Build tests/`program`.c with csrc/`sources` and run it; returns its output after
    checking that it exited 0 and ended with "ok". Skips, saying why, off x86, outside the
    source tree or without a C compiler."""
    csrc = ROOT / "csrc"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"tests/{program}.c runs x86 kernel paths")
    if not (csrc / "rustgpt_kernels.h").exists():
        pytest.skip("needs the source tree (csrc/), not an installed package alone")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip(f"no C compiler ($CC, cc or gcc) to build tests/{program}.c")
    exe = tmp_path / program
    files = [ROOT / "tests" / f"{program}.c", *(csrc / s for s in sources)]
    for openmp in (["-fopenmp"], []):  # two threads where the compiler has OpenMP
        build = subprocess.run([cc, "-O2", *openmp, "-Wno-psabi", f"-I{csrc}",
                                *map(str, files), "-lm", "-o", str(exe)],
                               capture_output=True, text=True)
        if build.returncode == 0:
            break
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.endswith("\nok\n"), run.stdout + run.stderr
    return run.stdout
