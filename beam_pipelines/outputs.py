"""Publishing a pipeline's output as a new committed version of an artifact (any URI).

Place in the data flow: every pipeline (`examples`, `embed`, `mine_negatives`) writes its
output as `OUT/VERSION/...` + `OUT/VERSION/_COMMITTED` (docs/contracts.md, "Commit protocol";
`ebr.artifacts`). Object stores have no rename, so nothing is moved: the Beam sinks write
their shards straight into the version directory that `artifacts.begin_version` returns, the
driver writes the small json files, then the commit marker LAST, then prunes versions older
than the newest `KEEP` committed ones (a reader mid-read of the previous version still has its
files). A failed run never touches the committed versions:

  Python exception   the uncommitted version directory is removed here;
  kill (SIGKILL)     it stays, readers ignore it (no marker), and the next writer's
                     `begin_version` removes it.

    with outputs.NewVersion(OUT, "examples") as out:
        ...Beam sinks write below out.dir...
        out.commit({"stats.json": stats}, info={"kind": "examples"})

Driver-side file I/O goes through `ebr.storage` (tf.io.gfile); Beam's FileSystems is only
needed inside the sinks.
"""
from __future__ import annotations

import json
import logging

from ebr import artifacts, storage

log = logging.getLogger(__name__)

KEEP = 2  # committed versions kept per output (docs/contracts.md, "Commit protocol")
# A run's own counters (JSON lines a pipeline writes beside its output): the driver reads them
# with `NewVersion.take_counts`, which removes them before the commit.
COUNTS_DIR = "_counts"


def check_writable(out: str, what: str) -> None:
    """Refuses to write versions into an unrelated non-empty directory: `out` must be absent,
    empty, or an artifact base (holding numeric version directories). Called before a run so
    a wrong --output fails fast instead of mixing our versions into someone's files."""
    out = storage.normalize(out)
    if not storage.exists(out):
        return
    if not storage.isdir(out):
        raise ValueError(f"check output {out}: exists and is not a directory")
    names = storage.listdir(out)
    if not names or any(artifacts.is_version(n) for n in names):
        return
    raise ValueError(f"check output {out}: is a non-empty directory that is not a {what} "
                     f"artifact (no numeric version directories, found {names[:5]}); refusing "
                     "to write into it (choose an empty or new --output)")


class NewVersion:
    """The next version of the artifact at `base`, written in place and committed last."""

    def __init__(self, base: str, what: str, keep: int | None = KEEP):
        self.base = storage.normalize(base)
        self.what = what
        self.keep = keep
        self.dir: str | None = None
        self.marker: dict | None = None

    def __enter__(self) -> "NewVersion":
        check_writable(self.base, self.what)
        self.dir = artifacts.begin_version(self.base)
        # The directory exists from here on (on object stores: a placeholder object), so a
        # reader or a test sees the publish in progress.
        storage.makedirs(self.dir)
        log.info("writing %s version %s", self.what, self.dir)
        return self

    def path(self, *parts: str) -> str:
        return storage.join(self.dir, *parts)

    def take_counts(self) -> list:
        """Every JSON line the run wrote under COUNTS_DIR; then removes them, so the committed
        version holds the artifact only."""
        lines = []
        for path in storage.glob(self.path(COUNTS_DIR, "*")):
            lines += [json.loads(ln) for ln in storage.read_text(path).splitlines() if ln]
        storage.remove(self.path(COUNTS_DIR))
        return lines

    def commit(self, json_files: dict | None = None, info: dict | None = None) -> dict:
        """Writes `json_files` ({relative name: object}), then the commit marker, then prunes."""
        for name, obj in (json_files or {}).items():
            storage.write_json(self.path(name), obj)
        self.marker = artifacts.commit(self.dir, {"kind": self.what, **(info or {})})
        pruned = artifacts.prune(self.base, self.keep)
        if pruned:
            log.info("%s: pruned old %s version(s) %s (keeping %s)", self.base, self.what,
                     pruned, self.keep)
        log.info("committed %s", self.dir)
        return self.marker

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or self.dir is None or self.marker is not None:
            return
        try:
            storage.remove(self.dir)
        except storage.StorageError as e:  # the next begin_version removes it
            log.warning("could not remove the failed version %s: %s", self.dir, e)
