"""Benchmark: social-data generator and `ebr pipeline examples` throughput.

Prints JSON: generator sessions/s, examples-pipeline sessions/s on the local in-memory runner
and on the multi-processing runner (2 workers), medians of `--repeats` runs, and the ratio
between the runners (baseline = in-memory, measured in the same run). CPU seconds (this
process plus worker subprocesses) are reported beside wall time because the machine may be
shared. `--profile` adds the top functions of a cProfile'd in-memory run (where time goes).

    python bench/pipeline_bench.py                 # 100k sessions, 3 repeats
    python bench/pipeline_bench.py --sessions 20000 --repeats 1
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from beam_pipelines import examples, split  # noqa: E402
from beam_pipelines.config import ExamplesConfig  # noqa: E402
from ebr.datasets.social import generate_social  # noqa: E402


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn):
    c0, t0 = _cpu(), time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, _cpu() - c0, result


def _summary(sessions: int, walls: list[float], cpus: list[float]) -> dict:
    wall = statistics.median(walls)
    return {"sessions_per_s": round(sessions / wall, 1), "wall_s_median": round(wall, 3),
            "wall_s": [round(w, 3) for w in walls], "cpu_s_median": round(statistics.median(cpus), 3),
            "sessions_per_cpu_s": round(sessions / statistics.median(cpus), 1)}


def _profile(raw: str, out: str, top: int) -> list[dict]:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    examples.run(ExamplesConfig(raw, out))
    prof.disable()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [{"function": f"{os.path.basename(fn)}:{line}({name})", "calls": nc,
             "tottime_s": round(tt, 3), "cumtime_s": round(ct, 3)}
            for (fn, line, name), (_, nc, tt, ct, _) in rows]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--documents", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="add a cProfile of one in-memory run")
    ap.add_argument("--work-dir", help="where data and outputs go (default: a temp dir)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    work = args.work_dir or tempfile.mkdtemp(prefix="pipeline-bench-")
    os.makedirs(work, exist_ok=True)
    raw = os.path.join(work, "raw")
    try:
        gen_walls, gen_cpus, gen_rates = [], [], []
        for _ in range(args.repeats):
            wall, cpu, summary = _timed(lambda: generate_social(
                raw, documents=args.documents, sessions=args.sessions, seed=args.seed,
                progress=False))
            gen_walls.append(wall)
            gen_cpus.append(cpu)
            gen_rates.append(summary["sessions_per_s"])
        result = {
            "sessions": args.sessions, "documents": args.documents, "repeats": args.repeats,
            "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
            "generator": {**_summary(args.sessions, gen_walls, gen_cpus),
                          "session_phase_sessions_per_s": statistics.median(gen_rates)},
        }
        runners = {
            "in_memory": ["--direct_running_mode=in_memory"],
            f"multi_processing_{args.workers}": ["--direct_running_mode=multi_processing",
                                                 f"--direct_num_workers={args.workers}"],
        }
        written = None
        for name, beam_args in runners.items():
            walls, cpus = [], []
            for i in range(args.repeats):
                out = os.path.join(work, f"out-{name}")
                wall, cpu, stats = _timed(lambda: examples.run(
                    ExamplesConfig(raw, out, split.SplitConfig()), beam_args))
                walls.append(wall)
                cpus.append(cpu)
                written = stats["written"]
            result[name] = _summary(args.sessions, walls, cpus)
        base = result["in_memory"]["sessions_per_s"]
        multi = result[f"multi_processing_{args.workers}"]["sessions_per_s"]
        result["ratio_multi_processing_vs_in_memory"] = round(multi / base, 3)
        result["examples_written"] = written
        result["target_sessions_per_s"] = 10_000
        result["meets_target"] = max(base, multi) >= 10_000
        result["loadavg_end"] = os.getloadavg()
        if args.profile:
            result["profile_top_cumulative"] = _profile(raw, os.path.join(work, "out-prof"), 30)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
