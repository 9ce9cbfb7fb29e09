"""Which SavedModel versions the model server holds, kept in step with TF Serving's base path.

Place in the data flow: the serving end of the towers (docs/contracts.md 3), behind
`serving.model_server.server` (`ebr serve model --model-base-path MODEL_DIR`).

Layout: `BASE/NAME/VERSION/{saved_model.pb, variables/, ebr_metadata.json, _COMMITTED}` on any
URI (local or gs://, read through `ebr.storage` / tf.io.gfile; tf.saved_model.load reads gs://
itself). Every entry of BASE holding versions is a model. Only committed versions exist for
the registry (`ebr.artifacts.versions`: the commit marker is an export's last write, and a
tower version counts once both towers committed it), so a version being uploaded, or left
behind by a killed exporter, is never loaded. The largest committed versions are served
(`num_versions`, TF Serving's `latest` policy, default 1). The storage is polled (default every
second). A new version is loaded fully and checked (the files its commit marker lists are
there, it parses, it loads, it has the required signature) before one reference swap makes it
current; the version it replaces is unloaded only after the requests holding it finish (TF
Serving's availability-preserving policy).

A version that fails to load is never served: it is recorded with its error (GetModelStatus
shows it, state END) and retried with exponential backoff up to a maximum delay (TF Serving
retries failed loads: `--max_num_load_retries`, `--load_retry_interval_micros`), which covers a
transient storage error while reading. A storage error while listing (or a base path that
vanished) unloads nothing: the poll is logged and skipped, the served versions keep serving and
the next poll looks again (TF Serving's `servable_versions_always_present` behaviour).

Pins (docs/contracts.md section 6, "the pair switches as one unit"): a client may ask that a
version stay loaded for a while beyond the version policy (`pin`; over gRPC a GetModelStatus
naming the version with the request metadata `ebr-keep-loaded-seconds`). A pinned version
committed on disk is loaded (again) if it is not, and is not retired while the pin lasts; the
retrieval service renews the pin of the version its live index needs on every poll, so with
the default `--num-versions 1` that version stays served until the new pair is live.

`reload_config` is TF Serving's HandleReloadConfigRequest (`model_servers/server_core.cc`,
`ReloadConfig`): from then on the models are the ModelConfigList's (each with its own base path
and version policy: latest N, all, specific), models left out are unloaded, new ones loaded
before it answers, and version labels are assigned to available versions.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

import grpc

from ebr import artifacts, storage
from serving.model_server.config import (DEFAULT_LOAD_RETRY_SECONDS,
                                         DEFAULT_MAX_LOAD_RETRY_SECONDS, DEFAULT_POLL_SECONDS,
                                         DEFAULT_SIGNATURE)

log = logging.getLogger(__name__)

# ModelVersionStatus.State values (tensorflow_serving/apis/get_model_status.proto).
START, LOADING, AVAILABLE, UNLOADING, END = 10, 20, 30, 40, 50


# Longest pin a client may ask for: a pin is a lease that its holder renews, not a setting.
MAX_PIN_SECONDS = 3600.0


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """TF Serving's ServableVersionPolicy: `latest` (newest `num_versions`), `all`, `specific`."""
    kind: str = "latest"
    num_versions: int = 1
    versions: frozenset = frozenset()


@dataclasses.dataclass(frozen=True)
class ConfiguredModel:
    """One ModelConfig entry of a reloaded configuration."""
    name: str
    base_path: str  # holds VERSION directories directly
    policy: VersionPolicy
    labels: tuple = ()  # (label, version) pairs


class ServingError(Exception):
    """A request the server refuses: carries the gRPC status TF Serving would answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def read_signature_defs(version_dir: str) -> dict:
    """The `serve` MetaGraph's SignatureDefs, as TF Serving returns them in GetModelMetadata."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    pb = storage.join(version_dir, "saved_model.pb")
    if storage.exists(pb):
        saved.ParseFromString(storage.read_bytes(pb))
    else:
        text_format.Parse(storage.read_text(storage.join(version_dir, "saved_model.pbtxt")), saved)
    for meta in saved.meta_graphs:
        if "serve" in meta.meta_info_def.tags:
            return dict(meta.signature_def)
    raise ValueError(f"{version_dir}: no MetaGraph tagged 'serve' "
                     f"(tags: {[list(m.meta_info_def.tags) for m in saved.meta_graphs]})")


class Servable:
    """One loaded SavedModel version; counts the requests that hold it."""

    def __init__(self, name: str, version: int, path: str, require_signature: str = ""):
        import tensorflow as tf

        self.name, self.version, self.path = name, version, path
        artifacts.verify(path)  # every file the commit marker lists is there, whole
        self.signature_defs = read_signature_defs(path)
        if require_signature and require_signature not in self.signature_defs:
            raise ValueError(f"{path}: no signature {require_signature!r} "
                             f"(has {sorted(self.signature_defs)})")
        self.model = tf.saved_model.load(path, tags=["serve"])
        self.functions = dict(self.model.signatures)
        if require_signature and require_signature not in self.functions:
            raise ValueError(f"{path}: signature {require_signature!r} did not load")
        if not self.functions:
            raise ValueError(f"{path}: SavedModel has no serving signatures")
        self._inflight = 0
        self._cond = threading.Condition()

    def enter(self) -> None:
        with self._cond:
            self._inflight += 1

    def exit(self) -> None:
        with self._cond:
            self._inflight -= 1
            if self._inflight == 0:
                self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._inflight == 0, timeout)

    def release(self) -> None:
        self.model = None
        self.functions = {}


@dataclasses.dataclass
class VersionRecord:
    version: int
    path: str
    state: int = START
    error: str = ""  # why the version is not served (failed check or load)
    failures: int = 0  # failed loads in a row
    retry_at: float = 0.0  # time.monotonic() of the next load attempt after a failure
    servable: Servable | None = None


class _Lease:
    """Context manager returned by `ModelRegistry.acquire`: the servable stays loaded inside."""

    def __init__(self, servable: Servable):
        self.servable = servable

    def __enter__(self) -> Servable:
        return self.servable

    def __exit__(self, *exc) -> None:
        self.servable.exit()


class ModelRegistry:
    def __init__(self, base_path, *, poll_seconds: float = DEFAULT_POLL_SECONDS,
                 num_versions: int = 1, require_signature: str = DEFAULT_SIGNATURE,
                 on_change: Callable[["ModelRegistry"], None] | None = None,
                 load_retry_seconds: float = DEFAULT_LOAD_RETRY_SECONDS,
                 max_load_retry_seconds: float = DEFAULT_MAX_LOAD_RETRY_SECONDS):
        self.base_path = storage.normalize(base_path)
        self.poll_seconds = poll_seconds
        self.load_retry_seconds = max(0.0, load_retry_seconds)
        self.max_load_retry_seconds = max(self.load_retry_seconds, max_load_retry_seconds)
        self.num_versions = max(1, num_versions)
        self.require_signature = require_signature
        self.on_change = on_change
        self._lock = threading.Lock()
        self._models: dict[str, dict[int, VersionRecord]] = {}
        # name -> servables currently served, newest first; replaced (never mutated) on a swap.
        self._serving: dict[str, tuple[Servable, ...]] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()  # a new pin: poll now rather than at the next period
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()
        self._pins: dict[str, dict[int, float]] = {}  # name -> version -> monotonic expiry
        # None: every entry of the base path is a model (latest `num_versions`); else the
        # models of the last reloaded ModelConfigList.
        self._configured: dict[str, ConfiguredModel] | None = None
        self._labels: dict[str, dict[str, int]] = {}

    # ---- requests ---------------------------------------------------------------------------
    def acquire(self, name: str, version: int | None = None, label: str = "") -> _Lease:
        """The servable for a ModelSpec; raises ServingError with TF Serving's status."""
        if not name:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               "Missing ModelSpec name: the request names no model")
        if label:
            version = self.label_version(name, label)
        with self._lock:
            servables = self._serving.get(name, ())
            chosen = None
            if version is None:
                chosen = servables[0] if servables else None
            else:
                chosen = next((s for s in servables if s.version == version), None)
            if chosen is None:
                what = f"Latest({name})" if version is None else f"Specific({name}, {version})"
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Servable not found for request: {what}")
            chosen.enter()  # under the lock, so a concurrent swap cannot unload it first
        return _Lease(chosen)

    def status(self, name: str, version: int | None = None) -> list[VersionRecord]:
        if not name:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing model name in request.")
        with self._lock:
            records = self._models.get(name)
            if not records:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Could not find any versions of model {name}")
            if version is None:
                return [dataclasses.replace(r) for _, r in sorted(records.items())]
            if version not in records:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Could not find version {version} of model {name}")
            return [dataclasses.replace(records[version])]

    def label_version(self, name: str, label: str) -> int:
        """The version a label names (labels come from a reloaded config, server_core.cc)."""
        with self._lock:
            version = self._labels.get(name, {}).get(label)
        if version is None:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Unrecognized servable version label: {label}")
        return version

    # ---- pins -------------------------------------------------------------------------------
    def pin(self, name: str, version: int, seconds: float) -> None:
        """Keeps `version` of `name` loaded (loading it if committed but not loaded) for
        `seconds` beyond the version policy; renewing replaces the expiry."""
        seconds = min(max(0.0, float(seconds)), MAX_PIN_SECONDS)
        with self._lock:
            pins = self._pins.setdefault(name, {})
            new = version not in pins
            pins[version] = time.monotonic() + seconds
            records = self._models.get(name, {})
            loaded = version in records and records[version].servable is not None
        if new and not loaded:
            self._wake.set()

    def pinned(self, name: str) -> set[int]:
        now = time.monotonic()
        with self._lock:
            pins = self._pins.get(name, {})
            for v in [v for v, until in pins.items() if until <= now]:
                del pins[v]
            return set(pins)

    def all_pins(self) -> dict[str, list[int]]:
        return {n: sorted(self.pinned(n)) for n in list(self._pins)}

    # ---- configuration (HandleReloadConfigRequest) ------------------------------------------
    def reload_config(self, models: list[ConfiguredModel], timeout: float = 300.0) -> None:
        """Applies a ModelConfigList: ServingError with TF Serving's status when it is invalid
        or a new model does not become available (server_core.cc ReloadConfig)."""
        names = [m.name for m in models]
        for m in models:
            if names.count(m.name) > 1:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"Illegal to list model {m.name} multiple times in config list")
        with self._lock:
            before = set(self._models)
            self._configured = {m.name: m for m in models}
            # Labels are assigned once the versions they name are available (below).
        added = [n for n in names if n not in before]
        log.info("model config reloaded: %s (new: %s, left out and unloaded: %s)",
                 names, added, sorted(before - set(names)))
        deadline = time.monotonic() + timeout
        while True:
            self.poll_once()
            available = self.available()
            missing = [n for n in added if not available.get(n)]
            if not missing:
                break
            with self._lock:  # a new model whose versions all failed to load is an error
                failed = [n for n in missing if self._models.get(n) and all(
                    r.error and r.state == END for r in self._models[n].values())]
                empty = [n for n in missing if not self._models.get(n)]
            if failed or empty or time.monotonic() > deadline:
                raise ServingError(grpc.StatusCode.UNKNOWN,
                                   "Some models did not become available: {"
                                   + ", ".join(f"{{name: {n} version: latest}}" for n in missing)
                                   + "}")
            time.sleep(0.05)
        labels = {}
        for m in models:
            for label, version in m.labels:
                if version not in available.get(m.name, []):
                    raise ServingError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"Request to assign label to version {version} of model {m.name}, "
                        f"which is not currently available for inference")
                labels.setdefault(m.name, {})[label] = version
        with self._lock:
            self._labels = labels

    def _policy(self, name: str) -> VersionPolicy:
        configured = self._configured
        if configured is not None and name in configured:
            return configured[name].policy
        return VersionPolicy("latest", self.num_versions)

    def _model_dir(self, name: str) -> str:
        configured = self._configured
        if configured is not None and name in configured:
            return configured[name].base_path
        return storage.join(self.base_path, name)

    def knows(self, name: str) -> bool:
        with self._lock:
            return name in self._models

    def model_names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def available(self) -> dict[str, list[int]]:
        """Model name -> served versions, newest first."""
        with self._lock:
            return {n: [s.version for s in ss] for n, ss in self._serving.items() if ss}

    # ---- polling ----------------------------------------------------------------------------
    def start(self) -> None:
        """Polls in a background thread (call `poll_once` first to load before serving)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="model-registry-poll",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - a bad poll must not end polling
                log.exception("polling %s failed", self.base_path)

    def poll_once(self) -> None:
        """One look at the base path. Listing errors (and a vanished base path) change nothing:
        what serves keeps serving until a poll lists again."""
        with self._poll_lock:
            configured = self._configured
            if configured is not None:
                changed = False
                for name in sorted(set(configured) | set(self._models)):
                    changed |= (self._reconcile(name) if name in configured
                                else self._retire_model(name))
                if changed and self.on_change is not None:
                    self.on_change(self)
                return
            try:
                if not storage.exists(self.base_path):
                    log.warning("model base path %s does not exist (yet); keeping %s",
                                self.base_path, self.available() or "nothing loaded")
                    return
                names = {n for n in storage.listdir(self.base_path) if not n.startswith((".", "_"))}
            except storage.StorageError as e:
                log.warning("listing model base path failed, keeping %s and polling again: %s",
                            self.available() or "nothing loaded", e)
                return
            changed = False
            for name in sorted(names | set(self._models)):
                changed |= self._reconcile(name)
            if changed and self.on_change is not None:
                self.on_change(self)

    def _on_disk(self, name: str) -> dict[int, str] | None:
        """Committed versions of model `name` -> version dir; None when listing failed."""
        model_dir = self._model_dir(name)
        try:
            versions = artifacts.versions(model_dir)
        except storage.StorageError as e:
            log.warning("listing %s failed, keeping its versions and polling again: %s",
                        model_dir, e)
            return None
        return {v: storage.join(model_dir, v) for v in versions}

    def _reconcile(self, name: str) -> bool:
        on_disk = self._on_disk(name)
        with self._lock:
            serving = bool(self._serving.get(name))
        if on_disk is None or (not on_disk and serving):
            if on_disk is not None:
                # Every version gone at once while one serves: a renamed or unreachable model
                # directory rather than a retirement, which keeps serving (poll again).
                log.warning("model %s: no committed version listed under %s; keeping %s",
                            name, self._model_dir(name), self.available().get(name))
            return False
        with self._lock:
            records = self._models.setdefault(name, {})
        changed = False
        now = time.monotonic()
        policy, pinned = self._policy(name), self.pinned(name)
        for version in sorted(on_disk, reverse=True):
            rec = records.get(version)
            if rec is not None and rec.servable is not None:
                continue
            if rec is not None and rec.state == LOADING:
                continue
            if version not in pinned and not self._aspired(policy, records, on_disk, version):
                continue  # e.g. enough newer versions already serve (latest policy)
            if rec is not None and rec.error and now < rec.retry_at:
                continue  # failed before: retried once its backoff has passed
            failures = rec.failures if rec is not None else 0
            rec = VersionRecord(version, on_disk[version], LOADING, failures=failures)
            with self._lock:
                records[version] = rec
            changed = True
            self._load(name, rec)
        changed |= self._swap(name, on_disk)
        return changed

    def _aspired(self, policy: VersionPolicy, records, on_disk, version: int) -> bool:
        if policy.kind == "all":
            return True
        if policy.kind == "specific":
            return version in policy.versions
        return self._newest_loaded_count(records, on_disk, above=version) < policy.num_versions

    def _keep(self, name: str, loaded: list, pinned: set[int]) -> list:
        """The loaded records (newest first) to serve: the policy's, plus pinned ones."""
        policy = self._policy(name)
        if policy.kind == "all":
            return loaded
        if policy.kind == "specific":
            return [r for r in loaded if r.version in policy.versions or r.version in pinned]
        return [r for i, r in enumerate(loaded) if i < policy.num_versions or r.version in pinned]

    def _retire_model(self, name: str) -> bool:
        """A model left out of a reloaded config: every version unloads (server_core.cc)."""
        return self._swap(name, {}, removed=True)

    @staticmethod
    def _newest_loaded_count(records: dict[int, VersionRecord], on_disk: dict[int, str],
                             above: int) -> int:
        return sum(1 for v, r in records.items()
                   if v > above and v in on_disk and r.servable is not None)

    def _retry_delay(self, failures: int) -> float:
        return min(self.max_load_retry_seconds, self.load_retry_seconds * 2 ** max(0, failures - 1))

    def _load(self, name: str, rec: VersionRecord) -> None:
        started = time.monotonic()
        log.info("loading %s version %d from %s", name, rec.version, rec.path)
        try:
            servable = Servable(name, rec.version, rec.path, self.require_signature)
        except Exception as e:  # noqa: BLE001 - any failure means: do not serve this one (yet)
            msg = f"{type(e).__name__}: {e}".strip()[:2000]
            with self._lock:
                rec.failures += 1
                delay = self._retry_delay(rec.failures)
                rec.state, rec.error = END, msg
                rec.retry_at = time.monotonic() + delay
            log.error("cannot load %s version %d (%s), attempt %d, retrying in %.1fs: %s",
                      name, rec.version, rec.path, rec.failures, delay, msg)
            return
        with self._lock:
            rec.servable, rec.failures, rec.error = servable, 0, ""
        log.info("loaded %s version %d in %.2fs (signatures %s)", name, rec.version,
                 time.monotonic() - started, sorted(servable.functions))

    def _swap(self, name: str, on_disk: dict[int, str], removed: bool = False) -> bool:
        """Makes the newest loaded versions current in one assignment; retires the others."""
        pinned = set() if removed else self.pinned(name)
        with self._lock:
            records = self._models.get(name)
            if records is None:
                return False
            changed = False
            for v in [v for v, r in records.items()
                      if v not in on_disk and r.servable is None and r.state != LOADING]:
                records.pop(v)  # deleted from disk and not loaded: forget it
                changed = True
            loaded = sorted((r for v, r in records.items() if r.servable is not None
                             and v in on_disk and r.state != UNLOADING),
                            key=lambda r: r.version, reverse=True)
            keep = [] if removed else self._keep(name, loaded, pinned)
            keep_versions = {r.version for r in keep}
            new = tuple(r.servable for r in keep)
            old = self._serving.get(name, ())
            for r in keep:
                r.state = AVAILABLE
            retired = [r for r in records.values() if r.servable is not None
                       and r.version not in keep_versions and r.state != UNLOADING]
            for r in retired:
                r.state = UNLOADING
            switched = [s.version for s in new] != [s.version for s in old]
            if switched:
                self._serving[name] = new  # the one reference swap requests see
            if not records:
                self._models.pop(name)
                self._serving.pop(name, None)
        if switched:
            log.info("%s now serves versions %s", name, [s.version for s in new])
        for r in retired:
            threading.Thread(target=self._unload, args=(name, r), daemon=True,
                             name=f"unload-{name}-{r.version}").start()
        return changed or switched or bool(retired)

    def _unload(self, name: str, rec: VersionRecord) -> None:
        servable = rec.servable
        servable.wait_idle()  # requests that acquired it before the swap finish on it
        with self._lock:
            rec.servable = None
            rec.state = END
        servable.release()
        log.info("unloaded %s version %d", name, rec.version)

    def unload_all(self) -> None:
        with self._lock:
            self._serving = {}
            for records in self._models.values():
                for r in records.values():
                    if r.servable is not None:
                        r.servable.release()
                        r.servable, r.state = None, END
