"""The host allocator setting: XLA:CPU's per-call temporary buffer stays mapped between calls.

Each case runs in a fresh process (the setting is process-wide and must precede the first computation) and
counts the minor page faults of each of 9 calls of one jitted program whose temporary buffer (82 MB) is
larger than what glibc keeps by default, and compares the median call with the buffer's page count. Page
faults, not time: a count the kernel reports exactly. (With the setting, an occasional call still faults the
buffer in, when the heap places it anew: measured in 0 to 9 of the first 11 calls, none after them in 10
runs of 16 calls. The test leaves the first 12 out; the median call after them faults none.)
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from jaxcnn import host

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

SCRIPT = """
import json, resource, sys
from jaxcnn import host
applied = host.keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
x, w = jnp.ones((20000, 1024), jnp.float32), jnp.ones((1024, 8), jnp.float32)
compiled = jax.jit(lambda x, w: jnp.sum(jnp.sin(x) @ w)).lower(x, w).compile()
for _ in range(12):  # the heap settles its layout over the first calls
    compiled(x, w).block_until_ready()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    compiled(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults_per_call": sorted(faults)[len(faults) // 2],
                  "temp_pages": compiled.memory_analysis().temp_size_in_bytes / resource.getpagesize()}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the setting applies to glibc's malloc only")
def test_kept_memory_is_not_faulted_in_again_on_every_call():
    default, kept = _faults("default"), _faults("keep")
    assert default["temp_pages"] > 64 * 2**20 / 4096  # larger than any block glibc keeps by default
    # By default every call maps and faults in the whole temporary buffer again (median call)...
    assert default["faults_per_call"] >= 0.9 * default["temp_pages"], default
    # ...and with the setting the pages stay mapped from one call to the next.
    assert kept["applied"] is True
    assert kept["faults_per_call"] <= 0.05 * kept["temp_pages"], kept


@pytest.mark.skipif(GLIBC, reason="glibc is configured")
def test_other_c_libraries_are_left_alone():
    assert host.keep_freed_memory() is False


def test_the_command_honours_the_opt_out(monkeypatch):
    calls = []
    monkeypatch.setattr(host, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv(host.ENV, "0")
    assert host.configure_command() is False and calls == []
    monkeypatch.setenv(host.ENV, "1")
    assert host.configure_command() is True and calls == [1]
