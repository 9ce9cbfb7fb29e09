"""ebr.storage and ebr.artifacts on local disk and on the Cloud Storage emulator.

The gs:// cases run TensorFlow's own GCS file system against tests/gcs_emulator.py.
"""
import json
import os
import subprocess
import sys
import urllib.request

import pytest

from ebr import artifacts, storage
from gcs_emulator import check_loopback


def test_emulator_addresses_are_loopback_and_other_hosts_are_refused(gcs_emulator):
    for key in ("STORAGE_EMULATOR_HOST", "HTTPS_PROXY", "GCE_METADATA_HOST"):
        check_loopback(os.environ[key])
    with pytest.raises(RuntimeError, match="non-loopback"):
        check_loopback("192.0.2.1:443")  # TEST-NET-1: never contacted, only resolved
    # The front tunnels only to the two GCS hosts: anything else is refused before any
    # connection is made (the proxy answers 403 to the CONNECT).
    proxy = urllib.request.ProxyHandler({"https": os.environ["HTTPS_PROXY"]})
    with pytest.raises(OSError, match="403"):
        urllib.request.build_opener(proxy).open("https://example.com/", timeout=5)


@pytest.mark.parametrize("where", ["local", "gs"])
def test_roundtrip_list_and_remove(where, tmp_path, request):
    root = str(tmp_path / "a") if where == "local" else request.getfixturevalue("gcs_root")
    storage.write_json(storage.join(root, "x", "m.json"), {"k": 1})
    storage.write_bytes(storage.join(root, "x", "sub", "b.bin"), b"\0" * 1000)
    assert storage.read_json(storage.join(root, "x", "m.json")) == {"k": 1}
    assert storage.listdir(storage.join(root, "x")) == ["m.json", "sub"]
    assert storage.walk_files(root) == ["x/m.json", "x/sub/b.bin"]
    assert storage.size(storage.join(root, "x", "sub", "b.bin")) == 1000
    storage.remove(storage.join(root, "x"))
    assert storage.walk_files(root) == []
    with pytest.raises(storage.NotFound, match=r"read .*m\.json"):
        storage.read_bytes(storage.join(root, "x", "m.json"))


def test_errors_name_operation_and_path(gcs_emulator, tmp_path):
    with pytest.raises(storage.StorageError, match=r"unknown URI scheme 'nosuch'.*nosuch://b/x"):
        storage.read_bytes("nosuch://b/x")
    with pytest.raises(storage.StorageError, match=r"write gs://no-such-bucket-ebr/x"):
        storage.write_bytes("gs://no-such-bucket-ebr/x", b"1")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() != 0:  # root ignores permission bits
        with pytest.raises(storage.StorageError, match=r"write .*locked/f"):
            storage.write_bytes(str(locked / "f"), b"1")


@pytest.mark.parametrize("where", ["local", "gs"])
def test_commit_protocol_readers_see_only_committed(where, tmp_path, request):
    base = str(tmp_path / "art") if where == "local" else request.getfixturevalue("gcs_root")
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "data.bin").write_bytes(b"v1")
    (stage / "manifest.json").write_text("{}")
    v1 = artifacts.publish_dir(str(stage), base, last=("manifest.json",))
    assert artifacts.resolve(base) == v1 and v1.endswith("/1")
    artifacts.verify(v1, checksums=True)
    # A writer killed mid-publish: files of version 2 but no commit marker.
    storage.write_bytes(storage.join(base, "2", "data.bin"), b"half")
    assert artifacts.versions(base) == [1]
    assert artifacts.resolve(base) == v1
    with pytest.raises(artifacts.UncommittedVersion, match="not committed"):
        artifacts.resolve(storage.join(base, "2"))
    # The next writer removes the leftover and publishes version 3.
    v3 = artifacts.publish_dir(str(stage), base, keep=1)
    assert v3.endswith("/3") and artifacts.versions(base) == [3]
    assert not storage.exists(storage.join(base, "2")) and not storage.exists(v1)
    storage.write_bytes(storage.join(v3, "data.bin"), b"changed!")
    with pytest.raises(artifacts.ArtifactError, match="truncated or altered"):
        artifacts.verify(v3)


def test_tower_pair_commits_as_one_unit(tmp_path):
    model_dir = str(tmp_path / "models")
    staged = {}
    for name in artifacts.TOWERS:
        d = tmp_path / f"stage-{name}"
        d.mkdir()
        (d / "saved_model.pb").write_bytes(b"x")
        staged[name] = str(d)
    artifacts.publish_towers(staged, model_dir)
    # Interrupted second export: the doc tower committed, the query tower did not.
    dirs = {n: artifacts.begin_version(artifacts.tower_base(model_dir, n), 2) for n in artifacts.TOWERS}
    for n, d in dirs.items():
        artifacts.upload(staged[n], d)
    artifacts.commit(dirs["doc_tower"])
    for n in artifacts.TOWERS:
        assert artifacts.resolve(os.path.join(model_dir, n)).endswith(f"{n}/1")
    with pytest.raises(artifacts.UncommittedVersion, match="every tower"):
        artifacts.resolve(os.path.join(model_dir, "doc_tower", "2"))
    assert artifacts.publish_towers(staged, model_dir)["query_tower"].endswith("/3")


def _ebr(argv, env, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "ebr.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ebr ")]
    return proc.returncode, lines, proc.stderr


def test_cli_storage_failures_are_one_line_naming_path_and_operation(gcs_env, tmp_path):
    """Unknown scheme, missing bucket, and an unreachable server (the emulator's address with
    nothing listening: TensorFlow's bounded retries, then a connection error)."""
    import socket

    code, lines, err = _ebr(["index", "build", "--embeddings", "nosuch://b/emb", "--output",
                             str(tmp_path / "i")], gcs_env)
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert "unknown URI scheme 'nosuch'" in lines[0] and "nosuch://b/emb" in lines[0]
    code, lines, err = _ebr(["index", "inspect", "--index", "gs://no-such-bucket-ebr/index"], gcs_env)
    assert code == 2 and len(lines) == 1 and "gs://no-such-bucket-ebr/index" in lines[0], err[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = {**gcs_env, "HTTPS_PROXY": f"http://127.0.0.1:{closed}",
            "https_proxy": f"http://127.0.0.1:{closed}"}
    code, lines, err = _ebr(["index", "inspect", "--index", "gs://ebr-test/anything"], down)
    assert code == 2 and len(lines) == 1 and "gs://ebr-test/anything" in lines[0], err[-2000:]
    assert not list(tmp_path.iterdir())  # nothing half-published


@pytest.mark.parametrize("bucket,kind", [("ebr-fault-denied", "PermissionDenied"),
                                         ("ebr-fault-unavailable", "503"),
                                         ("ebr-fault-stall", "")])
def test_cli_permission_server_error_and_timeout_are_one_line(bucket, kind, gcs_env, tmp_path):
    """The emulator's fault buckets (tests/gcs_emulator.py): 403, 503 and a server that never
    answers (client timeouts lowered so TensorFlow's bounded retries end within seconds)."""
    env = {**gcs_env, "GCS_REQUEST_IDLE_TIMEOUT_SECS": "2", "GCS_METADATA_REQUEST_TIMEOUT_SECS": "2",
           "GCS_READ_REQUEST_TIMEOUT_SECS": "2", "GCS_WRITE_REQUEST_TIMEOUT_SECS": "2",
           "GCS_RETRY_CONFIG_MAX_RETRIES": "1"}
    write = ["data", "social", "--out", f"gs://{bucket}/raw", "--documents", "30", "--sessions",
             "60", "--seed", "1"]
    read = ["index", "inspect", "--index", f"gs://{bucket}/index"]
    for argv, path in ((write, f"gs://{bucket}/raw"), (read, f"gs://{bucket}/index")):
        code, lines, err = _ebr(argv, env, timeout=240)
        assert code == 2 and len(lines) == 1, err[-3000:]
        assert path in lines[0] and kind in lines[0], lines[0]


def test_local_copy_of_remote_versions_is_checked_reused_and_pruned(gcs_root, tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    cache = str(tmp_path / "cache")
    copies = []
    for i in range(3):
        (stage / "data.bin").write_bytes(b"x" * (i + 1))
        vdir = artifacts.publish_dir(str(stage), gcs_root)
        copies.append(artifacts.local_copy(vdir, cache))
        assert open(os.path.join(copies[-1], "data.bin"), "rb").read() == b"x" * (i + 1)
    assert artifacts.local_copy(vdir, cache) == copies[-1]  # complete: reused
    # only the newest two versions of the base stay cached
    assert [os.path.exists(c) for c in copies] == [False, True, True]
    with open(os.path.join(copies[-1], "data.bin"), "wb") as f:
        f.write(b"x")  # a truncated copy is fetched again (sha256 is the index's own check)
    assert open(os.path.join(artifacts.local_copy(vdir, cache), "data.bin"), "rb").read() == b"xxx"
