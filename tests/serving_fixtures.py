"""Real model/index pairs for the serving tests: a tiny trained two-tower model exported with
`trainer.export.export_towers`, its doc tower run over a small corpus, and the embeddings
indexed with `index.build_index`. Versions are published the way the real stages publish them
(staged locally, uploaded, `_COMMITTED` last: `ebr.artifacts`) so the services' pollers see what
production would.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ebr import features

REPO = Path(__file__).resolve().parents[1]


def tiny_config(data_dir: str, model_dir: str, seed: int = 0):
    from trainer.config import TrainConfig

    return TrainConfig(data_dir=data_dir, model_dir=model_dir, embedding_dim=16, feature_dim=8,
                       text_dim=8, hidden_units=[16], hash_bucket_cap=512, text_char_buckets=512,
                       text_word_buckets=512, batch_size=64, epochs=1, steps_per_epoch=3,
                       seed=seed, eval_ks=[10],
                       eval_pattern="no-eval/*")  # serving tests need weights, not metrics


class Stack:
    """One work directory: training data, MODEL_DIR (query_tower, doc_tower) and INDEX_BASE."""

    def __init__(self, root: Path):
        import trainer_fixtures

        self.root = Path(root)
        self.data = self.root / "data"
        self.model_dir = self.root / "models"
        self.index_base = self.root / "index"
        self.index_base.mkdir(parents=True, exist_ok=True)
        trainer_fixtures.write_dataset(str(self.data), n_docs=120, n_searchers=30, n_examples=400)
        self.docs, self.searchers, _ = trainer_fixtures.build_log(120, 30, 400)
        self._doc_cache: dict = {}

    def fork(self, root: Path) -> "Stack":
        """A copy with its own MODEL_DIR and INDEX_BASE (same data and trained weights), for
        tests that publish versions."""
        other = Stack.__new__(Stack)
        other.__dict__.update(self.__dict__)
        other._doc_cache = {}  # its model versions may differ from ours
        other.root = Path(root)
        other.model_dir = other.root / "models"
        other.index_base = other.root / "index"
        shutil.copytree(self.model_dir, other.model_dir)
        shutil.copytree(self.index_base, other.index_base)
        return other

    @property
    def query_tower(self) -> Path:
        return self.model_dir / "query_tower"

    def publish_model(self, version: int, seed: int = 0) -> Path:
        """Trains a tiny model (a few steps, `trainer.task.train`) and exports it as `version`."""
        import dataclasses

        from trainer.task import train

        cfg = dataclasses.replace(tiny_config(str(self.data), str(self.model_dir), seed + version),
                                  version=version,
                                  checkpoint_dir=str(self.root / f"ckpt-{version}"),
                                  tensorboard_dir=str(self.root / f"tb-{version}"))
        train(cfg)
        return self.query_tower / str(version)

    def doc_embeddings(self, version: int) -> tuple[list[str], np.ndarray, list[list[str]]]:
        """The exported doc tower of `version` over the corpus (what `ebr embed` computes)."""
        from trainer.export import load_tower

        if version in self._doc_cache:
            return self._doc_cache[version]

        tower = load_tower(str(self.model_dir / "doc_tower" / str(version)))
        rows = [features.document_values(d) for d in self.docs]
        X = tower({name: [r[name] for r in rows] for name in features.DOC_INPUTS})
        ids = [d["doc_id"] for d in self.docs]
        terms = [features.document_filter_terms(r) for r in rows]
        self._doc_cache[version] = ids, X, terms
        return ids, X, terms

    def republish_model(self, version: int, as_version: int) -> None:
        """Publishes the towers of `version` again as `as_version` (same weights), the way
        `trainer.export` publishes (`artifacts.publish_towers`)."""
        import json
        import tempfile

        from ebr import artifacts

        with tempfile.TemporaryDirectory() as staging:
            staged = {}
            for tower in artifacts.TOWERS:
                dst = Path(staging) / tower
                shutil.copytree(self.model_dir / tower / str(version), dst,
                                ignore=shutil.ignore_patterns(artifacts.COMMIT_MARKER))
                meta = json.loads((dst / artifacts.MODEL_METADATA).read_text())
                (dst / artifacts.MODEL_METADATA).write_text(json.dumps(dict(meta, version=as_version)))
                staged[tower] = str(dst)
            artifacts.publish_towers(staged, str(self.model_dir), as_version)

    def publish_index(self, version: int, model_version: int, *, dimension: int | None = None,
                      schema_hash: str | None = None, backend: str = "exact",
                      base=None) -> str:
        """Indexes the doc tower's embeddings of `model_version` as INDEX_BASE/`version`.

        `dimension` / `schema_hash` forge a mismatching index (random vectors, other schema)."""
        import index
        from index.embeddings import write_embeddings

        ids, X, terms = self.doc_embeddings(model_version)
        if dimension is not None and dimension != X.shape[1]:
            rng = np.random.default_rng(version)
            X = rng.normal(size=(len(ids), dimension)).astype(np.float32)
            X /= np.linalg.norm(X, axis=1, keepdims=True)
        emb = self.root / f"emb-{version}"
        shutil.rmtree(emb, ignore_errors=True)
        write_embeddings(emb, ids, X, terms, schema_hash=schema_hash or features.schema_hash(),
                         model_version=model_version)
        path = index.build_index(str(emb), str(base or self.index_base), backend=backend)
        assert path.rsplit("/", 1)[-1] == str(version), f"published {path}, expected {version}"
        return path


_SHARED: dict[str, Stack] = {}


def shared_stack(tmp_path_factory) -> Stack:
    """One trained model (version 1) and its index (version 1) for the whole session."""
    if "stack" not in _SHARED:
        s = Stack(tmp_path_factory.mktemp("serving"))
        s.publish_model(1)
        s.publish_index(1, model_version=1)
        _SHARED["stack"] = s
    return _SHARED["stack"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli_server(args: list[str], log_path: Path) -> subprocess.Popen:
    """`ebr serve ...` in a fresh process (what k8s runs), stderr to `log_path`."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "ebr.cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=open(log_path, "wb"), env=env,
                            cwd=str(REPO), text=True)


def wait_serving(address: str, proc: subprocess.Popen | None = None, timeout: float = 90.0,
                 log_path: Path | None = None) -> None:
    from serving.retrieval.client import RetrievalClient

    deadline = time.monotonic() + timeout
    with RetrievalClient(address) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: "
                                   + (log_path.read_text()[-3000:] if log_path else ""))
            if client.health(timeout=1.0) == "SERVING":
                return
            time.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {timeout}s: "
                       + (log_path.read_text()[-3000:] if log_path else ""))
