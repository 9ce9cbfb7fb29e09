"""The serving pair (query-tower version, index version) and its reloading.

Place in the data flow: between the artifacts and the requests. The index manifest names the
model version its embeddings came from, and the service pins the query tower to that version,
so a query is never embedded by one model and searched in another's space. `PairManager` lists
INDEX_BASE's committed versions (`ebr.artifacts.versions`, any URI: local or gs://; a version
counts once its `_COMMITTED` marker is written, docs/contracts.md "Commit protocol"), loads a
newer one with its model beside the serving pair, checks they agree
(`artifacts.check_compatible`: dimension, schema hash, model version) and swaps one reference:
requests in flight finish on the old pair, none is dropped. A mismatching pair is refused with a
clear error and the old pair keeps serving (at start the process refuses to come up); a version
that fails to load (corrupt file, storage error) is retried with capped exponential backoff, and
a storage error while listing is logged and skipped, the old pair serving on.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

from ebr import artifacts, storage
from serving.retrieval import embedder
from serving.retrieval.config import ServeConfig

log = logging.getLogger(__name__)


class ModelIndexMismatch(artifacts.ModelMismatch):
    """The query tower and the index were not built from the same model / schema."""


@dataclasses.dataclass(frozen=True)
class Pair:
    encoder: object  # embedder.LocalEncoder | embedder.RemoteEncoder
    searcher: object  # index searcher (contracts section 5)
    index_version: int
    index_path: str
    backend: str

    @property
    def model_version(self) -> int:
        return self.encoder.info.version


def tower_base(model: str, model_name: str = "query_tower") -> str:
    """`--model`: MODEL_DIR (-> MODEL_DIR/<model_name>) or MODEL_DIR/<tower> itself, any URI."""
    model = storage.normalize(model)
    return model if storage.basename(model) in artifacts.TOWERS else storage.join(model, model_name)


def open_model_source(config: ServeConfig):
    """Remote when an address is set (metadata from --model when given), else in-process."""
    base = tower_base(config.model, config.model_name) if config.model else None
    return embedder.open_source(base, config.model_address, config.model_name,
                                config.model_tls_ca)


def check_pair(model: embedder.ModelInfo, manifest: dict, index_path: str) -> None:
    """The query tower against the index manifest: same dimension and feature schema (and the
    model version the index's embeddings came from, when it names one)."""
    try:
        artifacts.check_compatible(
            f"query tower {model.source} and index {index_path}", manifest,
            schema_hash=model.schema_hash, dimension=model.dimension,
            model_version=model.version if manifest.get("model_version") is not None else None)
    except artifacts.ModelMismatch as e:
        raise ModelIndexMismatch(str(e)) from None


def _isdir(uri: str) -> bool:
    try:
        return storage.isdir(uri)
    except storage.StorageError:
        return True  # unreachable now: a numeric last component names a version all the same


@dataclasses.dataclass
class _Failure:
    """A new index version whose load failed: retried with exponential backoff."""
    attempts: int
    retry_at: float  # time.monotonic()
    reason: str


class PairManager:
    """Holds the serving pair and swaps in newer index versions with their model.

    INDEX_BASE (any URI) is polled through `artifacts.versions`: committed versions only. A
    new version that fails to load (corrupt or missing file, storage error) is retried with
    exponential backoff (`retry_seconds` doubling up to `retry_max_seconds`) while the current
    pair keeps serving; one that does not match its model is refused for good. A storage error
    while listing is logged and the poll is skipped."""

    def __init__(self, index: str, source, *, on_change: Callable[[Pair], None],
                 on_reload: Callable[[str], None] = lambda result: None,
                 retry_seconds: float = 1.0, retry_max_seconds: float = 60.0):
        self.index = storage.normalize(index)
        self.source = source
        # INDEX_BASE/VERSION names one fixed version (artifacts.resolve's rule); else a base.
        self.fixed = artifacts.is_version(storage.basename(self.index)) and _isdir(self.index)
        self.pair: Pair | None = None
        self.waiting_for = "index"  # what readiness waits for, for UNAVAILABLE messages
        self.retry_seconds = max(float(retry_seconds), 0.01)
        self.retry_max_seconds = max(float(retry_max_seconds), self.retry_seconds)
        self._on_change = on_change
        self._on_reload = on_reload
        self._refused: dict[int, str] = {}  # index version -> reason (not retried)
        self._failed: dict[int, _Failure] = {}  # index version -> backoff state
        self._waiting: set = set()  # index versions already reported as waiting for a model
        self._list_error: str | None = None  # the last listing error (logged once per streak)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _load(self, version: int | None) -> Pair:
        import index as index_pkg

        path = self.index if version is None else storage.join(self.index, version)
        searcher = index_pkg.open_index(path)
        manifest = dict(searcher.manifest)
        model_version = manifest.get("model_version")
        encoder = self.source.open(int(model_version) if model_version is not None else None)
        check_pair(encoder.info, manifest, searcher.path)
        # Warm up before the pair takes traffic: the first call of a loaded SavedModel traces
        # and allocates (tens of ms), which must not land on a request.
        encoder.embed(embedder.build_inputs([{}]), timeout=30.0)
        if version is None:
            version = artifacts.version_of(searcher.path)
        return Pair(encoder, searcher, version, searcher.path, str(manifest.get("backend", "")))

    def _swap(self, pair: Pair) -> None:
        old, self.pair = self.pair, pair
        self.waiting_for = ""
        self.source.release({pair.model_version})
        log.info("serving pair", extra={"index_version": pair.index_version,
                                        "model_version": pair.model_version,
                                        "index_path": pair.index_path, "backend": pair.backend,
                                        "previous": None if old is None else
                                        [old.index_version, old.model_version]})
        self._on_change(pair)

    def _list(self) -> list[int] | None:
        """Committed index versions, or None after a (logged) storage error."""
        try:
            versions = artifacts.versions(self.index)
        except Exception as e:  # noqa: BLE001 - StorageError mostly; never stops the poller
            if self._list_error != str(e):  # once per streak of the same error, not per poll
                log.warning("cannot list index versions; the serving pair is kept",
                            extra={"index": self.index, "reason": str(e)})
            self._list_error = str(e)
            if self.pair is None:
                self.waiting_for = f"an index version under {self.index} ({e})"
            self._on_reload("list-error")
            return None
        if self._list_error is not None:
            log.info("index versions listed again", extra={"index": self.index})
            self._list_error = None
        return versions

    def poll_once(self, *, at_start: bool = False) -> str:
        """Loads the newest index version if it is new; returns what happened.

        A mismatch raises at start and is refused (logged, old pair kept) afterwards; a model
        version the index needs that is not available yet is retried on the next poll; any
        other failure to load a new version (at start too: the service comes up NOT_SERVING)
        is retried with backoff. A fixed INDEX_BASE/VERSION that fails at start raises."""
        if self.fixed:
            if self.pair is not None:
                return "current"
            target = None
        else:
            versions = self._list()
            if versions is None:
                return "list-error"
            if not versions:
                self.waiting_for = f"an index version under {self.index}"
                return "no-index"
            target = versions[-1]
            if self.pair is not None and target <= self.pair.index_version:
                return "current"
            if target in self._refused:
                return "refused"
            failure = self._failed.get(target)
            if failure is not None and time.monotonic() < failure.retry_at:
                return "backoff"
        try:
            pair = self._load(target)
        except embedder.ModelUnavailable as e:
            self.waiting_for = str(e)
            if target not in self._waiting:  # once per version, not once per poll
                self._waiting.add(target)
                log.warning("index waits for its model",
                            extra={"index_version": target, "reason": str(e)})
                self._on_reload("waiting")
            return "waiting"
        except (ModelIndexMismatch, artifacts.ModelMismatch) as e:
            if at_start or target is None:
                raise
            self._refused[target] = str(e)
            log.error("refused new index version; previous pair keeps serving",
                      extra={"index_version": target, "reason": str(e)})
            self._on_reload("refused")
            return "refused"
        except Exception as e:  # noqa: BLE001 - corrupt files, storage errors, reader failures
            if target is None:  # a fixed INDEX_BASE/VERSION that cannot load: nothing to retry
                raise
            return self._failed_load(target, e)
        self._failed.pop(target, None)
        self._swap(pair)
        self._on_reload("ok")
        return "loaded"

    def _failed_load(self, target: int, e: Exception) -> str:
        previous = self._failed.get(target)
        attempts = previous.attempts + 1 if previous else 1
        delay = min(self.retry_max_seconds, self.retry_seconds * 2 ** (attempts - 1))
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        self._failed[target] = _Failure(attempts, time.monotonic() + delay, reason)
        if self.pair is None:
            self.waiting_for = f"index version {target} to load ({reason})"
        log.error("new index version failed to load; previous pair keeps serving",
                  extra={"index_version": target, "attempt": attempts,
                         "retry_in_seconds": round(delay, 3), "reason": reason,
                         "error": type(e).__name__})
        self._on_reload("failed")
        return "failed"

    def start_polling(self, every: float) -> None:
        if self.fixed or every <= 0:
            return

        def loop():
            while not self._stop.wait(every):
                try:
                    self.poll_once()
                except Exception:  # a poll must never kill the poller
                    log.exception("index poll failed")

        self._thread = threading.Thread(target=loop, name="index-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
