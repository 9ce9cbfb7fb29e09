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

The pair switches as one unit (docs/contracts.md section 6): on every poll the model version of
the live pair, and that of a newer index waiting for its model, are pinned on the model server
(`embedder.RemoteModelSource.pin`), so the version the live index needs stays served whatever
the model server's version policy, until the new pair is live. A waiting index is not opened
again and again: its manifest is read once and only the model's availability is re-checked on
each poll. A pair that can never become consistent is refused for good (log line, metric
`ebr_retrieval_refused_pairs_total{reason}`): the index names a model version that is not
published while a newer one is (versions only grow, "Commit protocol"), or a tower version from
the index's up names another version in its metadata (a copied tower directory: embeddings
labelled with the old version may come from the new tower). Readiness follows whether the live
pair can answer: when its model version is not available on the model server, health says
NOT_SERVING until it is again.
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
                                config.model_tls_ca, pin_seconds=config.model_pin_seconds)


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
    pair keeps serving; one that does not match its model, or whose model can never appear,
    is refused for good. A storage error while listing is logged and the poll is skipped.
    `on_live(ok, reason)` reports whether the live pair can answer (its model available)."""

    def __init__(self, index: str, source, *, on_change: Callable[[Pair], None],
                 on_reload: Callable[[str], None] = lambda result: None,
                 on_refused: Callable[[str], None] = lambda reason: None,
                 on_live: Callable[[bool, str], None] = lambda ok, reason: None,
                 retry_seconds: float = 1.0, retry_max_seconds: float = 60.0):
        self.index = storage.normalize(index)
        self.source = source
        # INDEX_BASE/VERSION names one fixed version (artifacts.resolve's rule); else a base.
        self.fixed = artifacts.is_version(storage.basename(self.index)) and _isdir(self.index)
        self.pair: Pair | None = None
        self.waiting_for = "index"  # what readiness waits for, for UNAVAILABLE messages
        self.live_ok = False  # the live pair's model is available (health follows it)
        self.retry_seconds = max(float(retry_seconds), 0.01)
        self.retry_max_seconds = max(float(retry_max_seconds), self.retry_seconds)
        self._on_change = on_change
        self._on_reload = on_reload
        self._on_refused = on_refused
        self._on_live = on_live
        self._refused: dict[int, str] = {}  # index version -> reason (not retried)
        self._failed: dict[int, _Failure] = {}  # index version -> backoff state
        self._waiting: set = set()  # index versions already reported as waiting for a model
        self._manifests: dict[int, dict] = {}  # index version -> manifest (read once)
        self._needs: int | None = None  # model version of the newest index waiting for it
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
        self.live_ok = True
        self._needs = None
        self.source.release({pair.model_version})
        log.info("serving pair", extra={"index_version": pair.index_version,
                                        "model_version": pair.model_version,
                                        "index_path": pair.index_path, "backend": pair.backend,
                                        "previous": None if old is None else
                                        [old.index_version, old.model_version]})
        self._on_change(pair)

    # ---- the live pair's model ----------------------------------------------------------
    def _pin(self) -> dict[int, bool] | None:
        """Pins (renews) the live pair's model version and the one a waiting index needs;
        version -> usable now, None when the model source cannot say."""
        wanted = set()
        if self.pair is not None:
            wanted.add(self.pair.model_version)
        if self._needs is not None:
            wanted.add(self._needs)
        if not wanted:
            return {}
        try:
            return self.source.pin(wanted)
        except Exception as e:  # noqa: BLE001 - a failed check must not stop the poller
            log.warning("cannot check the model versions", extra={"reason": str(e)})
            return None

    def _set_live(self, ok: bool, reason: str) -> None:
        if ok == self.live_ok:
            return
        self.live_ok = ok
        if ok:
            log.info("the live pair's model is available again",
                     extra={"model_version": self.pair.model_version})
        else:
            self.waiting_for = reason
            log.error("the live pair's model is not available; not ready until it is",
                      extra={"model_version": self.pair.model_version, "reason": reason})
        self._on_live(ok, reason)

    def _check_live(self, available: dict[int, bool] | None) -> None:
        if self.pair is None:
            return
        mv = self.pair.model_version
        if available is None:
            self._set_live(False, f"the model server to answer (query tower version {mv})")
        else:
            self._set_live(available.get(mv, False),
                           f"query tower version {mv} on the model server")

    # ---- polling ------------------------------------------------------------------------
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

    def _never_consistent(self, target: int, needed: int) -> tuple[str, str] | None:
        """(reason kind, message) when index `target`'s model version `needed` can never make
        a consistent pair; None when it can (now or once the model is published)."""
        committed = self.source.committed()
        if committed is None:  # a remote model without --model: nothing to list
            return None
        newer = [v for v in committed if v > needed]
        if needed not in committed and newer:
            return ("model-never-appears",
                    f"index version {target} needs query tower version {needed}, which is not "
                    f"published while version {newer[-1]} is (versions only grow: it will never "
                    f"appear)")
        for v in [v for v in committed if v >= needed]:
            claimed = self.source.claimed_version(v)
            if claimed is not None and claimed != v:
                return ("copied-tower",
                        f"index version {target} needs query tower version {needed}, but tower "
                        f"version {v} names version {claimed} in its metadata (a copied tower "
                        f"directory: embeddings labelled version {claimed} may come from tower "
                        f"{v}); publish towers with `ebr train` / artifacts.publish_towers")
        return None

    def _refuse(self, target: int, kind: str, reason: str, at_start: bool) -> str:
        if at_start and self.pair is None:
            raise ModelIndexMismatch(reason)
        self._refused[target] = reason
        self._needs = None
        self._manifests.pop(target, None)
        log.error("refused new index version; previous pair keeps serving",
                  extra={"index_version": target, "kind": kind, "reason": reason})
        self._on_refused(kind)
        self._on_reload("refused")
        return "refused"

    def poll_once(self, *, at_start: bool = False) -> str:
        """Loads the newest index version if it is new; returns what happened.

        A mismatch raises at start and is refused (logged, old pair kept) afterwards; a model
        version the index needs that is not available yet is re-checked on the next poll (the
        index is not opened until it is); any other failure to load a new version (at start
        too: the service comes up NOT_SERVING) is retried with backoff. A fixed
        INDEX_BASE/VERSION that fails at start raises."""
        if self.fixed:
            self._check_live(self._pin())
            if self.pair is not None:
                return "current"
            target = None
        else:
            versions = self._list()
            if versions is None:
                self._check_live(self._pin())
                return "list-error"
            if not versions:
                self._check_live(self._pin())
                if self.pair is None:
                    self.waiting_for = f"an index version under {self.index}"
                return "no-index"
            target = versions[-1]
            if self.pair is not None and target <= self.pair.index_version:
                self._needs = None
                self._check_live(self._pin())
                return "current"
            if target in self._refused:
                self._check_live(self._pin())
                return "refused"
            failure = self._failed.get(target)
            if failure is not None and time.monotonic() < failure.retry_at:
                self._check_live(self._pin())
                return "backoff"
            try:  # what the new index needs, from its manifest alone (nothing opened yet)
                if target not in self._manifests:
                    from index.persistence import read_manifest

                    self._manifests = {target: read_manifest(storage.join(self.index, target))}
                needed = self._manifests[target].get("model_version")
            except Exception as e:  # noqa: BLE001 - storage errors, corrupt manifest
                self._check_live(self._pin())
                return self._failed_load(target, e)
            self._needs = int(needed) if needed is not None else None
            available = self._pin()
            self._check_live(available)
            if self._needs is not None:
                try:
                    verdict = self._never_consistent(target, self._needs)
                except Exception as e:  # noqa: BLE001 - listing the towers failed: retry
                    return self._failed_load(target, e)
                if verdict is not None:
                    return self._refuse(target, *verdict, at_start=at_start)
                if not (available or {}).get(self._needs, False):
                    return self._wait(target, f"query tower version {self._needs} is not "
                                              f"available yet ({self._where()})")
        try:
            pair = self._load(target)
        except embedder.ModelUnavailable as e:
            return self._wait(target, str(e))
        except (ModelIndexMismatch, artifacts.ModelMismatch) as e:
            if at_start or target is None:
                raise
            return self._refuse(target, "mismatch", str(e), at_start=False)
        except Exception as e:  # noqa: BLE001 - corrupt files, storage errors, reader failures
            if target is None:  # a fixed INDEX_BASE/VERSION that cannot load: nothing to retry
                raise
            return self._failed_load(target, e)
        self._failed.pop(target, None)
        self._manifests.pop(target, None)
        self._swap(pair)
        self._on_reload("ok")
        return "loaded"

    def _where(self) -> str:
        return getattr(self.source, "address", None) or getattr(self.source, "base", "")

    def _wait(self, target: int | None, reason: str) -> str:
        if self.pair is None:
            self.waiting_for = reason
        if target not in self._waiting:  # once per version, not once per poll
            self._waiting.add(target)
            log.warning("index waits for its model",
                        extra={"index_version": target, "reason": reason})
            self._on_reload("waiting")
        return "waiting"

    def _failed_load(self, target: int, e: Exception) -> str:
        previous = self._failed.get(target)
        attempts = previous.attempts + 1 if previous else 1
        delay = min(self.retry_max_seconds, self.retry_seconds * 2 ** (attempts - 1))
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        self._failed[target] = _Failure(attempts, time.monotonic() + delay, reason)
        self._manifests.pop(target, None)
        if self.pair is None:
            self.waiting_for = f"index version {target} to load ({reason})"
        log.error("new index version failed to load; previous pair keeps serving",
                  extra={"index_version": target, "attempt": attempts,
                         "retry_in_seconds": round(delay, 3), "reason": reason,
                         "error": type(e).__name__})
        self._on_reload("failed")
        return "failed"

    def start_polling(self, every: float) -> None:
        if every <= 0:
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
