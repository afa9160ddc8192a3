"""Where run directories live: a local path, `gs://bucket/path` or `s3://bucket/path`, all through
this module's functions (local paths through os, buckets through fsspec: gcsfs, s3fs) and
TensorStore (through orbax) for the checkpoint arrays.

Object stores have no atomic rename and no append. So: a checkpoint step on a bucket is committed
by orbax's `commit_success.txt` marker (written last; a step without it is not a checkpoint), a
small file is written as one object (`write_bytes`: an object appears whole or not at all), and
files that grow (metrics) are rewritten whole.

TensorStore reaches `gs://` with its gcs driver (`TENSORSTORE_GCS_HTTP_URL` points it at an
emulator); for `s3://` orbax has no route yet, so `use_bucket` installs one: the s3 kvstore driver
with the endpoint and region of the AWS environment variables (`AWS_ENDPOINT_URL`,
`AWS_DEFAULT_REGION`; credentials from the usual chain).
"""

import atexit
import os
import re
import shutil
import tempfile
from typing import Any, Optional, Union
from urllib import parse

from ftjax.errors import StorageError, WriteError

# gcsfs's experimental client (read when gcsfs is imported) probes each bucket for hierarchical
# namespaces with an API that emulators and plain buckets may not answer (a 60 s wait); ftjax
# needs plain object semantics only.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

SCHEMES = ("gs", "s3")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
PathLike = Union[str, os.PathLike]


def is_url(path: Optional[PathLike]) -> bool:
  return bool(path) and bool(_URL.match(str(path)))


def scheme(path: PathLike) -> str:
  return str(path).split("://", 1)[0].lower() if is_url(path) else ""


def absolute(p: PathLike) -> str:
  """`p` as orbax wants it: a URL as it is, a local path made absolute."""
  return str(p) if is_url(p) else os.path.abspath(p)


def _fs(p: PathLike):
  """(fsspec file system, path within it) of a URL; one client per store, without a listings
  cache (orbax writes through another client: a cached listing would go stale). Its calls raise
  OSError for a store that cannot be reached or refuses a request (`_OSErrors`)."""
  import fsspec
  fs, key = fsspec.core.url_to_fs(str(p), use_listings_cache=False)
  return _OSErrors(fs), key


class _OSErrors:
  """An fsspec file system whose method calls raise the clients' own errors that are not
  OSErrors (botocore's, e.g. EndpointConnectionError when the store is gone; gcsfs's HttpError;
  aiohttp's) as OSError: callers handle one kind of error for local paths and buckets."""

  def __init__(self, fs):
    self._fs = fs

  def __getattr__(self, name):
    attr = getattr(self._fs, name)
    if not callable(attr):
      return attr

    def call(*args, **kwargs):
      try:
        return attr(*args, **kwargs)
      except OSError:
        raise
      except _client_errors() as e:
        raise OSError(_first_line(e)) from e
    return call


def _client_errors() -> tuple:
  """The error types of the bucket clients loaded in this process that are not OSErrors."""
  import sys
  found = [getattr(sys.modules.get(module), name, None) for module, name in (
      ("botocore.exceptions", "BotoCoreError"), ("botocore.exceptions", "ClientError"),
      ("gcsfs.retry", "HttpError"), ("aiohttp", "ClientError"))]
  return tuple(kind for kind in found if isinstance(kind, type))


def write_bytes(p: PathLike, data: bytes, sync: bool = False) -> None:
  """Writes `p` whole, atomically: locally through a temporary file and a rename (`sync`: flushed
  to the disk first), on a bucket as one object (one request)."""
  if is_url(p):
    fs, key = _fs(p)
    fs.pipe_file(key, data)
    return
  tmp = f"{p}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    if sync:
      f.flush()
      os.fsync(f.fileno())
  os.replace(tmp, p)


def read_bytes(p: PathLike) -> bytes:
  """The bytes of `p` (OSError when it is missing or unreadable)."""
  if is_url(p):
    fs, key = _fs(p)
    return fs.cat_file(key)
  with open(p, "rb") as f:
    return f.read()


def read_range(p: PathLike, offset: int, length: int) -> bytes:
  """`length` bytes of `p` from `offset` (fewer at its end); one ranged request on a bucket
  (none for `length` 0: an empty HTTP range is not a valid one)."""
  if length <= 0:
    return b""
  if is_url(p):
    fs, key = _fs(p)
    return fs.cat_file(key, start=offset, end=offset + length)
  with open(p, "rb") as f:
    f.seek(offset)
    return f.read(length)


def _either(p: PathLike, remote: str, local):
  """fsspec's `remote` method for a URL, `local(p)` for a local path."""
  if is_url(p):
    fs, key = _fs(p)
    return getattr(fs, remote)(key)
  return local(p)


def exists(p: PathLike) -> bool:
  return _either(p, "exists", os.path.exists)


def isdir(p: PathLike) -> bool:
  return _either(p, "isdir", os.path.isdir)


def isfile(p: PathLike) -> bool:
  return _either(p, "isfile", os.path.isfile)


def size(p: PathLike) -> int:
  return _either(p, "size", os.path.getsize)


def listdir(p: PathLike) -> list[str]:
  """The names in directory `p` ([] for a bucket prefix with nothing under it)."""
  if not is_url(p):
    return os.listdir(p)
  fs, key = _fs(p)
  try:
    return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(key, detail=False))
  except FileNotFoundError:
    return []


def makedirs(p: PathLike) -> None:
  """Creates directory `p` and its parents (a bucket needs none: a prefix exists with its
  objects)."""
  if not is_url(p):
    os.makedirs(p, exist_ok=True)


def remove(p: PathLike) -> None:
  """Deletes file `p` (FileNotFoundError when it is not there)."""
  if is_url(p):
    fs, key = _fs(p)
    if not fs.exists(key):
      raise FileNotFoundError(str(p))
    fs.rm_file(key)
  else:
    os.remove(p)


def remove_tree(p: PathLike) -> None:
  """Deletes directory `p` and everything under it."""
  if is_url(p):
    fs, key = _fs(p)
    fs.rm(key.rstrip("/") + "/", recursive=True)
  else:
    shutil.rmtree(p)


def files_under(directory: PathLike) -> list[str]:
  """The paths, relative to `directory`, of every file below it, sorted."""
  if not is_url(directory):
    return sorted(os.path.relpath(os.path.join(root, name), directory)
                  for root, _, names in os.walk(directory) for name in names)
  fs, key = _fs(directory)
  prefix = key.rstrip("/") + "/"
  return sorted(f[len(prefix):] for f in fs.find(prefix) if f.startswith(prefix))


def glob(pattern: str) -> list[str]:
  """The files matching `pattern` (`**` crosses folders), sorted; URLs for a bucket pattern."""
  if not is_url(pattern):
    import glob as glob_lib
    return sorted(f for f in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                  if os.path.isfile(f))
  fs, key = _fs(pattern)
  found = fs.glob(key, detail=True)
  return sorted(f"{scheme(pattern)}://{name}" for name, info in found.items()
                if info.get("type") == "file")


def local_copy(p: PathLike) -> str:
  """A local path holding the file `p`, for libraries that read files by name (tokenizers,
  array_record shards, safetensors): `p` itself when local; a bucket's file is downloaded into
  the cache folder (`FTJAX_CACHE_DIR`, kept across runs; default a temporary folder of this
  process) unless a copy of the same size is already there."""
  if not is_url(p):
    return str(p)
  target = _cached(p)
  if not (os.path.exists(target) and os.path.getsize(target) == size(p)):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fs, key = _fs(p)
    tmp = f"{target}.tmp{os.getpid()}"
    fs.get_file(key, tmp)
    os.replace(tmp, target)
  return target


def local_tree(directory: PathLike) -> str:
  """A local folder holding every file under `directory` (itself when local; a bucket's files are
  copied as `local_copy` copies one)."""
  if not is_url(directory):
    return str(directory)
  names = files_under(directory)
  if not names:
    raise FileNotFoundError(f"{directory}: no files")
  for rel in names:
    local_copy(join(directory, rel))
  return _cached(directory)


def _cached(url: PathLike) -> str:
  """Where the cache folder keeps the bucket file or folder `url`."""
  parts = parse.urlparse(str(url))
  return os.path.join(_cache_dir(), scheme(url), parts.netloc, parts.path.strip("/"))


def upload_tree(local: str, directory: PathLike, last: tuple = (), only: tuple = ()) -> None:
  """Copies every file under the local folder `local` (or `only` these, relative to it) to
  `directory` (a bucket prefix or a local folder), skipping those already there with the same
  size; the names in `last` go last (a marker such as metadata.json: a reader that sees it sees
  the rest)."""
  names = list(only) or files_under(local)
  names = [n for n in names if n not in last] + [n for n in names if n in last]
  for rel in names:
    source, target = os.path.join(local, rel), join(directory, rel)
    if exists(target) and size(target) == os.path.getsize(source):
      continue
    makedirs(os.path.dirname(target))
    if is_url(target):
      fs, key = _fs(target)
      fs.put_file(source, key)
    else:
      shutil.copyfile(source, target)


def join(directory: PathLike, *names: str) -> str:
  """`directory`/names, with `/` on a bucket."""
  if is_url(directory):
    return "/".join([str(directory).rstrip("/"), *names])
  return os.path.join(directory, *names)


def _cache_dir() -> str:
  global _CACHE
  if _CACHE is None:
    _CACHE = os.environ.get("FTJAX_CACHE_DIR") or ""
    if _CACHE:
      os.makedirs(_CACHE, exist_ok=True)
    else:
      _CACHE = tempfile.mkdtemp(prefix="ftjax-bucket-files-")
      atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  return _CACHE


_CACHE = None


class LocalMirror:
  """A local folder standing in for a run directory's growing files on a bucket (metrics.jsonl,
  tb/, wandb/, profile/: an object store cannot append to an object): the `fetch` names are
  copied down when it is made (e.g. metrics.jsonl of the run being resumed), every file changed
  since the last `sync()` is uploaded whole, the last time when the `with` block it guards ends
  (which also removes the local folder). For a local run directory the mirror is the directory
  itself and `sync` does nothing. An upload the store refuses raises `error(os_error, step)`
  (default: the OSError itself)."""

  def __init__(self, workdir: PathLike, fetch: tuple = (), error=None):
    self.remote = self.path = str(workdir)
    self._sent = {}
    self._error = error
    if is_url(self.remote):
      self.path = tempfile.mkdtemp(prefix="ftjax-run-")
      for name in fetch:
        if exists(os.path.join(self.remote, name)):
          write_bytes(os.path.join(self.path, name), read_bytes(os.path.join(self.remote, name)))
          self._sent[name] = _stamp(os.path.join(self.path, name))

  def __enter__(self) -> "LocalMirror":
    return self

  def sync(self, step: Optional[int] = None) -> None:
    """Uploads the files changed since the last sync (`step`: the one being logged, for the
    error)."""
    if self.path == self.remote:
      return
    try:
      for rel in files_under(self.path):
        stamp = _stamp(os.path.join(self.path, rel))
        if self._sent.get(rel) != stamp:
          write_bytes(os.path.join(self.remote, rel), read_bytes(os.path.join(self.path, rel)))
          self._sent[rel] = stamp
    except OSError as e:
      if self._error is None:
        raise
      raise self._error(e, step) from None

  def __exit__(self, kind, error, traceback) -> None:
    if self.path == self.remote:
      return
    try:
      # Not after a failed write (SaveError included): the store may be what failed, and the
      # upload would wait out the client's retries to fail as well. The rows a resumed run keeps
      # were uploaded when they were logged, before its checkpoint was saved.
      if not isinstance(error, WriteError):
        self.sync()
    except Exception:  # noqa: BLE001 (the error in flight, if any, is the one to report)
      if error is None:
        raise
    finally:
      shutil.rmtree(self.path, ignore_errors=True)


def _stamp(p: str) -> tuple:
  info = os.stat(p)
  return info.st_size, info.st_mtime_ns


def unsupported(p: PathLike) -> Optional[str]:
  """Why `p` cannot be used, when it is a URL of a scheme ftjax does not speak; else None."""
  if is_url(p) and scheme(p) not in SCHEMES:
    return f"{p}: only local paths, gs:// and s3:// are supported"
  return None


def use_bucket(p: PathLike) -> None:
  """Prepares the clients for the bucket of `p` (idempotent; nothing for a local path) and checks
  that it can be reached: StorageError (one line) for a missing bucket or credentials."""
  if not is_url(p):
    return
  if unsupported(p):
    raise StorageError(unsupported(p))
  bucket = parse.urlparse(str(p)).netloc
  if scheme(p) == "s3":
    _route_s3_through_tensorstore()
  _limit_tensorstore_retries()
  _quiet_client_logs()
  try:
    found = exists(f"{scheme(p)}://{bucket}")
  except Exception as e:  # noqa: BLE001 (each client raises its own kinds)
    raise StorageError(f"cannot reach {scheme(p)}://{bucket} ({_first_line(e)}): check the "
                       f"credentials ({_CREDENTIALS[scheme(p)]})") from None
  if not found:
    raise StorageError(f"the bucket {scheme(p)}://{bucket} does not exist (or these credentials "
                       "cannot see it): create it first")


_CREDENTIALS = {"gs": "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default "
                      "login`", "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE; "
                      "AWS_ENDPOINT_URL for a non-AWS store"}


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return (text[0] if text else type(e).__name__)[:300]


def checkpoint_options(directory: PathLike) -> dict:
  """Extra `ocp.CheckpointManagerOptions` for `directory`: on s3, commit by marker file (orbax
  already does so on gs://; an s3 "rename" is a copy and a delete, not atomic)."""
  if scheme(directory) != "s3":
    return {}
  from orbax.checkpoint._src.path import atomicity
  return {"temporary_path_class": atomicity.CommitFileTemporaryPath}


# TensorStore's gcs and s3 drivers try a failed request 32 times, waiting up to 32 s between
# tries: a store that goes away would hold a checkpoint save (and the run) for about a quarter of
# an hour before it fails. Its requests get gcsfs's budget instead (6 tries, waits doubling from
# 1 s: about 30 s), the one of ftjax's other requests to the bucket; then the save fails and the
# run ends with one line (SaveError).
TENSORSTORE_RETRIES = {"max_retries": 6, "initial_delay": "1s", "max_delay": "16s"}


def _limit_tensorstore_retries() -> None:
  """Gives the TensorStore contexts orbax builds from here on `TENSORSTORE_RETRIES`, and, when
  the AWS keys are in the environment, s3 credentials from there alone (the default chain also
  reads ~/.aws/config and ~/.aws/credentials, and logs five error lines per checkpoint save where
  those files do not exist)."""
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
  for context in (ts_utils._BASE_TS_CONTEXT, ts_utils._DEFAULT_OCDBT_TS_CONTEXT):
    for resource in ("gcs_request_retries", "s3_request_retries"):
      context.setdefault(resource, dict(TENSORSTORE_RETRIES))
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
      context.setdefault("aws_credentials", {"type": "environment"})


def _quiet_client_logs() -> None:
  """The bucket clients log each request that failed for good (gcsfs: a traceback) and aiohttp
  the requests a dropped connection left unfinished ("Task exception was never retrieved"); the
  failure itself reaches ftjax as an OSError and is reported there, in one line. Those records
  are dropped (installed once)."""
  import logging
  gcsfs_log = logging.getLogger("gcsfs")
  if not any(isinstance(f, _DropClientErrors) for f in gcsfs_log.filters):
    gcsfs_log.addFilter(_DropClientErrors())
    logging.getLogger("asyncio").addFilter(_DropClientErrors())


class _DropClientErrors:
  """A logging filter: drops the gcsfs logger's error records, and asyncio's records of tasks
  that ended with a client's connection error."""

  def filter(self, record) -> bool:
    import logging
    if record.name.startswith("gcsfs"):
      return record.levelno < logging.ERROR
    error = record.exc_info[1] if record.exc_info else None
    return not ("never retrieved" in str(record.msg) and
                isinstance(error, (OSError, *_client_errors())))


def _route_s3_through_tensorstore() -> None:
  """Teaches orbax's TensorStore specs the s3 kvstore driver (orbax 0.12 builds file or gcs specs
  only); installed once."""
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
  if getattr(ts_utils, "_ftjax_s3", False):
    return
  use_gcs, normalize, gcs_spec = (ts_utils._use_gcs_driver, ts_utils._normalize_path,
                                  gcs_utils.get_kvstore_for_gcs)

  def s3_spec(ckpt_path: str) -> dict[str, Any]:
    if not str(ckpt_path).startswith("s3://"):
      return gcs_spec(ckpt_path)
    url = parse.urlparse(str(ckpt_path))
    spec = {"driver": "s3", "bucket": url.netloc, "path": url.path.lstrip("/"),
            "aws_region": os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION",
                                                                              "us-east-1"))}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
      spec["endpoint"] = endpoint
    return spec

  ts_utils._use_gcs_driver = lambda d: str(d).startswith("s3://") or use_gcs(d)
  ts_utils._normalize_path = lambda p: (normalize(p).replace("s3:/", "s3://", 1)
                                        if str(p).startswith("s3://") else normalize(p))
  gcs_utils.get_kvstore_for_gcs = s3_spec
  ts_utils._ftjax_s3 = True
