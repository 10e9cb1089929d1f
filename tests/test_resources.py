"""resources: the thread bound, OMP_NUM_THREADS capped before OpenMP loads, memory estimates
checked against the memory available (injected here)."""

import logging
import os

import pytest

from rustgpt import resources as R
from rustgpt.errors import ArchitectureError, ValidationError


def test_check_memory_refuses_what_does_not_fit():
    R.check_memory(1000, "x needs", available=1000)
    with pytest.raises(ValidationError, match=r"^generate: beam_width = 9 needs about 1.5 GB of "
                                              r"memory, 512.0 MB is available$"):
        R.check_memory(3 * 2**29, "generate: beam_width = 9 needs", available=2**29)
    with pytest.raises(ArchitectureError, match="about 2 KB of memory, 1000 bytes is"):
        R.check_memory(2048, "[model] ... need", ArchitectureError, available=1000)


def test_check_memory_asks_the_system_when_not_told(monkeypatch):
    assert R.available_memory() > 0  # Linux MemAvailable, else the free pages
    monkeypatch.setattr(R, "available_memory", lambda: None)  # the system does not say
    R.check_memory(10**30, "anything needs")
    monkeypatch.setattr(R, "available_memory", lambda: 10)
    with pytest.raises(ValidationError, match="10 bytes is available"):
        R.check_memory(11, "anything needs")


@pytest.mark.parametrize("nbytes,text", [(5, "5 bytes"), (2000, "2 KB"), (5e6, "4.8 MB"),
                                         (3.3e9, "3.1 GB"), (4e12, "3.6 TB"),
                                         (1e20, "9.1e+07 TB")])
def test_size_text(nbytes, text):
    assert R.size_text(nbytes) == text


def test_allocating_turns_out_of_memory_into_one_line(monkeypatch):
    import errno

    monkeypatch.setattr(R, "available_memory", lambda: 2**30)
    for failure in (MemoryError(), OSError(errno.ENOMEM, "Cannot allocate memory")):
        with pytest.raises(ValidationError, match=r"^x: out of memory, 1.0 GB is available$"):
            with R.allocating("x"):
                raise failure
    with pytest.raises(PermissionError):
        with R.allocating("x"):
            raise PermissionError(errno.EACCES, "denied")


@pytest.mark.parametrize("value,bounded", [("100000", "{b}"), ("3,100000", "3,{b}"), ("2", "2"),
                                           ("lots", "lots"), ("", "")])
def test_omp_num_threads_is_capped_with_one_warning(monkeypatch, caplog, value, bounded):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    R.bound_omp_num_threads()
    assert os.environ["OMP_NUM_THREADS"] == bounded.format(b=R.max_threads())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == (bounded != value)
    R.bound_omp_num_threads()  # bounded now: nothing more to say
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == len(warnings)


def test_cgroup_limit_bounds_the_available_memory(tmp_path):
    from rustgpt.resources import _cgroup_room

    (tmp_path / "proc").write_text("0::/box/run\n")
    group = tmp_path / "cg" / "box" / "run"
    group.mkdir(parents=True)
    (group / "memory.max").write_text("1000000\n")
    (group / "memory.current").write_text("400000\n")
    assert _cgroup_room(str(tmp_path / "cg"), str(tmp_path / "proc")) == 600000
    (group / "memory.max").write_text("max\n")
    assert _cgroup_room(str(tmp_path / "cg"), str(tmp_path / "proc")) is None
    assert _cgroup_room(str(tmp_path / "none"), str(tmp_path / "proc")) is None
