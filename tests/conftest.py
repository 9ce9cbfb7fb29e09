"""Shared pytest setup: legacy Keras for TFRS before any TensorFlow import, fixed seeds."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys
import tempfile
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from gcs_emulator import GcsEmulator  # noqa: E402

# The Cloud Storage emulator (tests/gcs_emulator.py, docs/contracts.md "Testing against an
# emulator"). Its addresses are exported now, before any test imports the Google clients
# (google-auth reads GCE_METADATA_* at import); the servers start on first use. Until then
# HTTPS_PROXY points at a closed loopback port, so no test can reach the internet over HTTPS.
_EMULATOR = GcsEmulator(workdir=tempfile.mkdtemp(prefix="ebr-gcs-"))
os.environ.update(_EMULATOR.env)
BUCKET = "ebr-test"


@pytest.fixture(scope="session")
def gcs_emulator():
    _EMULATOR.start()
    _EMULATOR.create_bucket(BUCKET)
    yield _EMULATOR
    _EMULATOR.stop()


@pytest.fixture
def gcs_root(gcs_emulator) -> str:
    """A fresh gs:// prefix in the emulator's bucket; this process already points at it."""
    return f"gs://{BUCKET}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def gcs_env(gcs_emulator) -> dict:
    """The environment of a subprocess that should reach the emulator."""
    return {**os.environ, **gcs_emulator.env}
