"""Where a measurement was made, and how results are written: the machine, the versions, JSON.

Every result this project writes (``jaxcnn bench --json``, the scripts under ``experiments/``) records
its provenance with these helpers, so that numbers from different machines are not compared blindly:

* :func:`cpu_name` and :func:`vector_extensions`: the CPU model and the SIMD/matrix extensions it
  reports (``avx2``, ``fma``, ``avx512f``, ``avx512_bf16``, ``amx_tile``, ``asimd``, ``sve`` ...; from
  ``/proc/cpuinfo``): XLA:CPU and PyTorch pick their kernels by these, so they explain most differences
  in speed between two CPUs;
* :func:`versions`, :func:`machine`, :func:`load_average`, :func:`utc_now`;
* :func:`jsonable`, :func:`dumps` and :func:`write_json`: JSON of NumPy and JAX values (arrays, scalars,
  NaN and infinities), written atomically.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The extensions worth recording, in the order they are reported: x86 (``flags``) then Arm (``Features``).
VECTOR_EXTENSIONS = (
    "sse4_1",
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512dq",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512ifma",
    "avx512vbmi",
    "avx512_vbmi2",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
    "asimd",
    "asimdhp",
    "asimddp",
    "bf16",
    "i8mm",
    "sve",
    "sve2",
    "sme",
)
# Libraries whose versions change the numbers; the optional ones are recorded when installed.
PACKAGES = ("jax", "jaxlib", "optax", "numpy")
OPTIONAL_PACKAGES = ("flax", "torch")
CPUINFO = Path("/proc/cpuinfo")


# ---------------------------------------------------------------------------------------------------
# The machine


@functools.cache
def _cpuinfo(path: Path = CPUINFO) -> dict[str, str]:
    """The fields of the first processor listed in ``/proc/cpuinfo`` (``{}`` where there is none)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:  # the first processor's block is enough: they all report the same
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name(path: Path = CPUINFO) -> str:
    """The CPU model, e.g. ``"AMD EPYC 7763 64-Core Processor"`` (``platform``'s guess off Linux)."""
    info = _cpuinfo(path)
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine() or "unknown"


def cpu_flags(path: Path = CPUINFO) -> frozenset[str] | None:
    """Every feature flag the CPU reports (x86 ``flags``, Arm ``Features``); ``None`` when unknown."""
    info = _cpuinfo(path)
    flags = info.get("flags") or info.get("Features")
    return None if flags is None else frozenset(flags.split())


def vector_extensions(path: Path = CPUINFO) -> list[str] | None:
    """The CPU's vector and matrix extensions among :data:`VECTOR_EXTENSIONS`, in that order (``[]``:
    none of them; ``None``: this system does not say)."""
    flags = cpu_flags(path)
    return None if flags is None else [f for f in VECTOR_EXTENSIONS if f in flags]


def versions(packages: Sequence[str] = PACKAGES, optional: Sequence[str] = OPTIONAL_PACKAGES) -> dict[str, str]:
    """``{"python": ..., package: version}`` for ``packages`` (``"not installed"`` when missing) and for
    those of ``optional`` that are installed, read from the installed metadata (nothing is imported)."""
    out = {"python": platform.python_version()}
    for name in (*packages, *optional):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name in packages:
                out[name] = "not installed"
    return out


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the system has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def utc_now() -> str:
    """The current time, ISO 8601 in UTC to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def machine(device=None) -> dict:
    """The host and the JAX device a measurement ran on: CPU model and vector extensions, cores, OS, JAX
    backend and devices. ``device`` (a ``jax.Device``) defaults to JAX's first device."""
    import jax

    dev = device if device is not None else jax.devices()[0]
    return {
        "cpu": cpu_name(),
        "cpu_vector_extensions": vector_extensions(),
        "cores": os.cpu_count(),
        "architecture": platform.machine(),
        "platform": platform.platform(),
        "backend": dev.platform,
        "device": str(dev),
        "device_kind": getattr(dev, "device_kind", ""),
        "devices": len(jax.devices(dev.platform)),
    }


# ---------------------------------------------------------------------------------------------------
# JSON


def jsonable(value: Any, *, nonfinite: str = "string") -> Any:
    """A copy of ``value`` that :func:`json.dumps` writes as standard JSON.

    Mappings become objects (keys as strings), tuples and arrays (NumPy or JAX) lists, NumPy and 0-d JAX
    scalars Python numbers, paths strings. Non-finite floats become ``"nan"``/``"inf"``/``"-inf"``
    (``nonfinite="string"``, readable) or ``null`` (``nonfinite="null"``). Anything else is written as
    its ``str``.
    """
    if nonfinite not in ("string", "null"):
        raise ValueError(f"jsonable: nonfinite must be 'string' or 'null', got {nonfinite!r}")
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, nonfinite=nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, nonfinite=nonfinite) for v in value]
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isfinite(value):
            return value
        return None if nonfinite == "null" else str(value)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), nonfinite=nonfinite)
    if hasattr(value, "__array__") and hasattr(value, "shape"):  # a JAX array (or another array type)
        return jsonable(np.asarray(value), nonfinite=nonfinite)
    return str(value)


def dumps(obj: Any, *, nonfinite: str = "null", indent: int | None = 1) -> str:
    """``obj`` as strict JSON (no ``NaN`` or ``Infinity`` literals), through :func:`jsonable`."""
    return json.dumps(jsonable(obj, nonfinite=nonfinite), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, *, nonfinite: str = "string", indent: int | None = 2) -> Path:
    """Writes :func:`dumps` of ``obj`` and a final newline to ``path`` atomically (a reader sees the old
    file or the whole new one); returns the path."""
    path = Path(path)
    text = dumps(obj, nonfinite=nonfinite, indent=indent) + "\n"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
