"""Integrity data of stored files: checksummed JSON records and SHA-256 manifests.

`write_checked` / `read_checked`: a small JSON file behind a first line holding the SHA-256 of
its bytes (data-stream states, markers, run-file lists). `write_checksums` / `verify_files`: the
manifest of a checkpoint step directory, `checksums.json`, with the size and SHA-256 of every
other file of the step, hashed by several threads and by 64 MiB segments for large files; some
entries may come ready-made (`file_entries`, from the process that wrote those files). A file
that does not match raises `Unreadable`, naming it. Files are reached through `ftjax.storage`
(local paths and buckets alike). This module knows nothing of runs, configs or orbax.
"""

import concurrent.futures
import errno
import hashlib
import json
import os
from typing import Any, Callable, Optional

from ftjax import storage

CHECKSUMS = "checksums.json"  # in each step directory, written as part of the commit
# The first step saved with checksums in a directory: steps before it (saved by an older ftjax)
# restore unverified; a step from it on without valid checksums is damaged.
CHECKSUMS_SINCE = "checksums_since.json"
_CHUNK = 1 << 22
# A step's files are hashed by this many threads at once (hashlib and file reads release the
# GIL), files over _SEGMENT bytes in segments, so that a large checkpoint is hashed at the
# disk's speed rather than one core's. Such a file's digest is _SEGMENTED followed by the
# SHA-256 of its segments' SHA-256 digests, in order; other files' is their SHA-256.
HASH_THREADS = min(16, os.cpu_count() or 1)
_SEGMENT = 1 << 26
_SEGMENTED = "sha256-of-64MiB-segments:"
# orbax's marker of a committed step (on a bucket: written last; locally after the rename): not
# covered.
COMMIT_MARKER = "commit_success.txt"
_NOT_COVERED = {CHECKSUMS, COMMIT_MARKER}
# orbax adds the commit time to the step's metadata file when it renames the directory: that
# file is covered as JSON without that field.
_STEP_METADATA, _COMMIT_TIME = "_CHECKPOINT_METADATA", "commit_timestamp_nsecs"


class Unreadable(Exception):
  """A damaged or missing file (its message names it; `path`: the file, where known)."""

  def __init__(self, message: str, path: Optional[str] = None) -> None:
    super().__init__(message)
    self.path = path


def file_sha256(path: str) -> str:
  if storage.is_url(path):  # one request (files over _SEGMENT are hashed by segments)
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def write_checked(path: str, obj: Any, sync: bool = False) -> None:
  """Writes `obj` as JSON behind a first line holding the SHA-256 of the JSON bytes, atomically
  (`sync`: flushed to the disk before the rename; the training thread's writes skip it)."""
  body = json.dumps(obj, sort_keys=True).encode()
  storage.write_bytes(path, b"sha256:" + hashlib.sha256(body).hexdigest().encode() + b"\n" + body,
                      sync=sync)


def read_checked(path: str, legacy_ok: bool = False) -> Any:
  """The object `write_checked` wrote; Unreadable if the bytes do not match their checksum.
  `legacy_ok`: a plain JSON file (written before checksums existed) is accepted as it is."""
  try:
    raw = storage.read_bytes(path)
  except OSError as e:
    raise Unreadable(f"{os.path.basename(path)}: {e.strerror or e}", path) from e
  head, _, body = raw.partition(b"\n")
  if not head.startswith(b"sha256:"):
    if legacy_ok and raw.startswith(b"{"):
      try:
        return json.loads(raw)
      except ValueError:
        pass
    raise Unreadable(f"{os.path.basename(path)}: not a checksummed file", path)
  if hashlib.sha256(body).hexdigest().encode() != head[len(b"sha256:"):]:
    raise Unreadable(f"{os.path.basename(path)}: checksum mismatch", path)
  return json.loads(body)


def _digest(step_dir: str, rel: str) -> Optional[str]:
  """SHA-256 of a file of a step (for the step metadata: of its JSON without the commit time);
  None when that file is not valid JSON."""
  path = os.path.join(step_dir, rel)
  if rel != _STEP_METADATA:
    return file_sha256(path)
  try:
    meta = json.loads(storage.read_bytes(path))
    meta.pop(_COMMIT_TIME, None)
  except (ValueError, AttributeError):
    return None
  return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _range_sha256(path: str, offset: int, length: int) -> bytes:
  h = hashlib.sha256()
  for at in range(offset, offset + length, _CHUNK):
    h.update(storage.read_range(path, at, min(_CHUNK, offset + length - at)))
  return h.digest()


def _digests(step_dir: str, rels: list[str],
             segmented: Callable[[str], bool]) -> dict[str, Optional[str]]:
  """The digest of each file of `rels`: by segments where `segmented(rel)` (see _SEGMENTED),
  else `_digest`. Files and segments are hashed by up to HASH_THREADS threads."""
  jobs = []  # (rel, offset, length); offset None: the whole file
  for rel in rels:
    if segmented(rel):
      size = storage.size(os.path.join(step_dir, rel))
      jobs += [(rel, at, min(_SEGMENT, size - at)) for at in range(0, size, _SEGMENT)]
    else:
      jobs.append((rel, None, None))

  def run(job):
    rel, offset, length = job
    if offset is None:
      return _digest(step_dir, rel)
    return _range_sha256(os.path.join(step_dir, rel), offset, length)

  with concurrent.futures.ThreadPoolExecutor(max(1, min(HASH_THREADS, len(jobs)))) as pool:
    results = list(pool.map(run, jobs))
  digests, segments = {}, {}
  for (rel, offset, _), result in zip(jobs, results):
    if offset is None:
      digests[rel] = result
    else:
      segments.setdefault(rel, []).append(result)
  for rel, parts in segments.items():
    digests[rel] = _SEGMENTED + hashlib.sha256(b"".join(parts)).hexdigest()
  return digests


def file_entries(step_dir: str, rels: list[str]) -> dict[str, list]:
  """The manifest entries, [size, digest], of the files `rels` of `step_dir`."""
  sizes = {rel: None if rel == _STEP_METADATA else storage.size(os.path.join(step_dir, rel))
           for rel in rels}
  digests = _digests(step_dir, rels, lambda rel: (sizes[rel] or 0) > _SEGMENT)
  return {rel: [sizes[rel], digests[rel]] for rel in rels}


def write_checksums(step_dir: str, hashed: Optional[dict[str, list]] = None) -> None:
  """Writes `step_dir/checksums.json`: size and SHA-256 of every file under `step_dir`.
  `hashed`: entries (`file_entries`) already made for some of them, e.g. by the processes that
  wrote them; the other files are hashed here. FileNotFoundError if one of those is gone."""
  hashed = hashed or {}
  rels = [rel for rel in storage.files_under(step_dir) if rel not in _NOT_COVERED]
  gone = sorted(set(hashed) - set(rels))
  if gone:
    raise FileNotFoundError(errno.ENOENT, "hashed, then gone before the commit",
                            os.path.join(step_dir, gone[0]))
  files = {**file_entries(step_dir, [rel for rel in rels if rel not in hashed]), **hashed}
  write_checked(os.path.join(step_dir, CHECKSUMS), {"files": files}, sync=True)


def verify_files(step_dir: str, share: tuple[int, int] = (0, 1)) -> None:
  """Checks the files of a committed step against its checksums; raises Unreadable naming the
  first file (in sorted order) that differs. `share` = (i, n): check only every n-th file from
  the i-th (each of n processes checks its share)."""
  manifest = read_checked(os.path.join(step_dir, CHECKSUMS))
  files = manifest["files"]
  on_disk = set(storage.files_under(step_dir)) - _NOT_COVERED
  extra = sorted(on_disk - set(files))
  if extra:
    raise Unreadable(f"{extra[0]}: a file the checksums do not list", extra[0])
  index, count = share
  mine = sorted(files)[index::count]
  for rel in mine:
    size = files[rel][0]
    path = os.path.join(step_dir, rel)
    if not storage.exists(path):
      raise Unreadable(f"{rel}: missing", rel)
    if size is not None and storage.size(path) != size:
      raise Unreadable(f"{rel}: checksum mismatch", rel)
  digests = _digests(step_dir, mine, lambda rel: str(files[rel][1]).startswith(_SEGMENTED))
  for rel in mine:
    if digests[rel] != files[rel][1]:
      raise Unreadable(f"{rel}: checksum mismatch", rel)
