"""Publishing bench: a 1M-document index published to Cloud Storage (the emulator of
tests/gcs_emulator.py) against local disk, in one run.

    python bench/publish_bench.py                  # 1M synthetic documents, 3 repeats
    python bench/publish_bench.py --docs 100000 --repeats 5

Builds the default FAISS index once (index.builder over index.synthetic vectors), then times
with the same staged files, alternating targets within each repeat:
- publish: `artifacts.publish_dir` (every file, `manifest.json` last, then `_COMMITTED`),
- open: `index.open_index` of the new version (a remote one is copied to the local cache and
  sha256-checked, a local one only checked) and one search.
Prints JSON with medians and the gs:// / local ratios (the baseline is local disk, same run).
The emulator runs on loopback on the same 2 cores: these are protocol and client costs, not
Cloud Storage's network.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ebr import config  # noqa: E402


@dataclasses.dataclass
class PublishBenchConfig:
    docs: int = 1_000_000  # synthetic documents in the index
    dim: int = 64  # their dimension
    repeats: int = 3  # publish + open rounds per target (medians reported)
    output: str | None = None  # also write the JSON to this file (any URI)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    config.add_arguments(ap, PublishBenchConfig)
    try:
        cfg = config.from_args(PublishBenchConfig, ap.parse_args(argv))
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    # stderr is this bench's JSON-lines progress log: the resolved configuration comes first
    print(json.dumps({"config": config.as_dict(cfg)}), file=sys.stderr, flush=True)

    from gcs_emulator import GcsEmulator

    emulator = GcsEmulator()
    os.environ.update(emulator.env)  # before TensorFlow and google-auth are imported
    emulator.start()
    bucket = emulator.create_bucket("ebr-bench")
    try:
        return run(cfg, bucket)
    finally:
        emulator.stop()


def run(cfg, bucket: str) -> int:
    import numpy as np

    import index
    from ebr import artifacts, storage
    from index import synthetic
    from index.builder import build_index

    work = Path(tempfile.mkdtemp(prefix="ebr-publish-bench-"))
    try:
        ids, X, terms, Q = synthetic.mixture(cfg.docs, 100, cfg.dim, seed=0)
        t0 = time.perf_counter()
        built = build_index((ids, X, terms, {"source": "synthetic"}), str(work / "built"))
        build_s = time.perf_counter() - t0
        staged = work / "staged"
        shutil.copytree(built, staged, ignore=shutil.ignore_patterns(artifacts.COMMIT_MARKER))
        files = storage.walk_files(str(staged))
        total = sum((staged / f).stat().st_size for f in files)
        print(json.dumps({"built": built, "seconds": round(build_s, 1), "files": len(files),
                          "bytes": total}), file=sys.stderr, flush=True)
        targets = {"local": str(work / "published"), "gs": f"{bucket}/index"}
        times = {t: {"publish": [], "open": []} for t in targets}
        for r in range(cfg.repeats):
            for name, base in targets.items():
                t0 = time.perf_counter()
                vdir = artifacts.publish_dir(str(staged), base, last=(artifacts.INDEX_MANIFEST,),
                                             keep=1)
                times[name]["publish"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                searcher = index.open_index(vdir)
                searcher.search(np.ascontiguousarray(Q[:1]), 10)
                times[name]["open"].append(time.perf_counter() - t0)
                print(json.dumps({"repeat": r, "target": name, "publish_s":
                                  round(times[name]["publish"][-1], 2), "open_s":
                                  round(times[name]["open"][-1], 2)}), file=sys.stderr, flush=True)
        med = {t: {k: statistics.median(v) for k, v in d.items()} for t, d in times.items()}
        out = {
            "bench": "publish_bench",
            "docs": cfg.docs, "dimension": cfg.dim, "index_files": len(files),
            "index_bytes": total, "repeats": cfg.repeats,
            "median_seconds": {t: {k: round(v, 3) for k, v in d.items()} for t, d in med.items()},
            "publish_MB_per_s": {t: round(total / 1e6 / med[t]["publish"], 1) for t in med},
            "ratio_gs_over_local": {k: round(med["gs"][k] / med["local"][k], 2)
                                    for k in ("publish", "open")},
            "baseline": "local disk, same run, same staged files",
            "note": "emulator on loopback on the same cores: protocol and client cost only",
        }
        text = json.dumps(out, indent=1)
        print(text)
        if cfg.output:
            storage.write_bytes(cfg.output, text.encode())
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
