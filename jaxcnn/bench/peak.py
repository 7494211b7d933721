"""The hardware's float32 peak as ``jaxcnn bench`` measures it, and a step's fraction of it.

No single program reaches a CPU's peak, so the peak is the best of several, run in the same rounds as the
train steps, each kind its own contender family ``"peak:KIND"`` (so that none is pruned for taking longer
than another: their work differs), each record's ``peak_kind`` saying which:

* ``fma``: an FMA-throughput microbenchmark: one XLA fusion that runs :data:`FMA_CHAINS` independent chains
  of :data:`FMA_DEPTH` multiply-adds per element over a vector that stays in the caches, so that the cores
  do nothing but multiply-adds (the chains hide the instruction's latency);
* ``matmul_xla``: a float32 ``n x n @ n x n`` compiled by XLA under each compile-option set;
* ``matmul_numpy``: the same product in NumPy (its BLAS, all cores);
* ``matmul_torch``: the same product in PyTorch (``cfg.torch_threads`` threads), when it is installed and
  a peer.

A step's ``peak_fraction`` is the median over rounds of its GFLOP/s over the best of these in the same
round, and ``peak_fractions`` gives the same against each kind, so that load on the machine cancels out.
"""

from __future__ import annotations

import statistics

from jaxcnn.bench.config import BenchConfig
from jaxcnn.bench.harness import Contender, compile_with, measure
from jaxcnn.bench.peers import installed

PEAK_KINDS = ("fma", "matmul_xla", "matmul_numpy", "matmul_torch")
FMA_CHAINS = 8  # independent multiply-add chains per element: enough to cover the FMA latency on x86 cores
FMA_DEPTH = 256  # multiply-adds per chain; XLA fuses the 8 x 256 into one loop (much more and it splits it)


def matmul_size(cfg: BenchConfig) -> int:
    return 512 if cfg.quick else 2048


def fma_size(cfg: BenchConfig) -> int:
    """Elements of the FMA benchmark's vector: 128 KiB of float32, within every core's L2 cache."""
    return 4096 if cfg.quick else 32768


def fma_chains(x, a, b):
    """``sum_k f^DEPTH(x + k / 1000)`` with ``f(c) = c * a + b``: :data:`FMA_CHAINS` x :data:`FMA_DEPTH`
    multiply-adds per element of ``x``, the chains independent of each other."""
    chains = [x + k * 1e-3 for k in range(FMA_CHAINS)]
    for _ in range(FMA_DEPTH):
        chains = [c * a + b for c in chains]
    out = chains[0]
    for c in chains[1:]:
        out = out + c
    return out


def _contender(name: str, kind: str, fn, flops: int, **info) -> Contender:
    return Contender(name, f"peak:{kind}", fn, info={"peak_kind": kind, "flops": flops, **info})


def is_peak(record: dict) -> bool:
    """Whether ``record`` times one of the peak programs."""
    return "peak_kind" in record


def fma_contenders(cfg: BenchConfig, opts: dict) -> list[Contender]:
    import jax.numpy as jnp

    n = fma_size(cfg)
    x, a, b = jnp.full((n,), 0.5, jnp.float32), jnp.float32(0.999), jnp.float32(1e-4)
    out = []
    for oname, o in opts.items():
        f = compile_with(fma_chains, (x, a, b), o)
        fn = lambda f=f: f(x, a, b).block_until_ready()  # noqa: E731
        out.append(_contender(f"fma{n}[{oname}]", "fma", fn, 2 * FMA_CHAINS * FMA_DEPTH * n, options=oname, n=n))
    return out


def matmul_contenders(cfg: BenchConfig, opts: dict) -> list[Contender]:
    """float32 ``n x n @ n x n``: XLA's under each option set, NumPy's, and PyTorch's when it is a peer."""
    import numpy as np

    import jax
    import jax.numpy as jnp

    n = matmul_size(cfg)
    flops = 2 * n**3
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    out = []
    for oname, o in opts.items():
        f = compile_with(lambda a, b: a @ b, (a, b), o)
        fn = lambda f=f: f(a, b).block_until_ready()  # noqa: E731
        out.append(_contender(f"matmul{n}[{oname}]", "matmul_xla", fn, flops, options=oname, n=n))
    an, bn = np.array(a), np.array(b)  # writable copies, as torch.from_numpy wants
    out.append(_contender(f"numpy matmul{n}", "matmul_numpy", lambda: an @ bn, flops, n=n))
    if cfg.device == "cpu" and {"torch", "torch.compile"} & set(cfg.peers) and installed("torch"):
        import torch

        torch.set_num_threads(cfg.torch_threads)
        at, bt = torch.from_numpy(an), torch.from_numpy(bn)
        out.append(
            _contender(f"torch matmul{n}", "matmul_torch", lambda: at @ bt, flops, n=n, threads=cfg.torch_threads)
        )
    return out


def peak_contenders(cfg: BenchConfig, opts: dict) -> list[Contender]:
    """Every peak program of this run (the ``fma`` and ``matmul_*`` kinds above)."""
    return fma_contenders(cfg, opts) + matmul_contenders(cfg, opts)


def bench_peak(cfg: BenchConfig, opts: dict, log) -> tuple[list[dict], float]:
    """The peak programs on their own; returns the records and the best median GFLOP/s of any of them."""
    recs = measure("peak", peak_contenders(cfg, opts), cfg, log)
    for r in recs:
        if r["status"] == "ok":
            r["gflops"] = r["flops"] / (r["median_ms"] * 1e-3) / 1e9
            r["gflops_best_round"] = r["flops"] / (r["min_ms"] * 1e-3) / 1e9
    return recs, max((r["gflops"] for r in recs if "gflops" in r), default=float("nan"))


def _round_peaks(peaks: list[dict], kinds) -> list[float]:
    """Per round, the highest FLOP/s of the peak records of ``kinds``."""
    mine = [p for p in peaks if p["peak_kind"] in kinds]
    rounds = len(mine[0]["samples_ms"]) if mine else 0
    return [max(p["flops"] / (p["samples_ms"][k] * 1e-3) for p in mine) for k in range(rounds)]


def add_peak_fractions(recs: list[dict], flops: float) -> dict[str, float]:
    """Sets ``gflops``, ``images_per_s``, ``peak_fraction`` (against the best peak program of each round) and
    ``peak_fractions`` (kind -> fraction against that kind's best in each round) of every timed record of one
    step benchmark whose contenders included the peak programs; ``flops`` is the step's. Returns, per kind
    and as ``"best"``, the median over rounds of that peak in GFLOP/s."""
    peaks = [r for r in recs if is_peak(r) and r["status"] == "ok"]
    for p in peaks:
        p["gflops"] = p["flops"] / (p["median_ms"] * 1e-3) / 1e9
    kinds = {"best": PEAK_KINDS, **{k: (k,) for k in PEAK_KINDS if any(p["peak_kind"] == k for p in peaks)}}
    per_round = {name: _round_peaks(peaks, ks) for name, ks in kinds.items()}
    for r in recs:
        if is_peak(r):
            continue
        if r.get("median_ms"):
            r["gflops"] = flops / (r["median_ms"] * 1e-3) / 1e9
            r["images_per_s"] = r["batch"] / (r["median_ms"] * 1e-3)
        if r["status"] != "ok" or not per_round["best"]:
            continue
        fractions = {
            name: float(statistics.median(flops / (t * 1e-3) / pk for t, pk in zip(r["samples_ms"], peak, strict=True)))
            for name, peak in per_round.items()
        }
        r["peak_fraction"] = fractions.pop("best")
        r["peak_fractions"] = fractions
    return {name: statistics.median(peak) / 1e9 for name, peak in per_round.items() if peak}
