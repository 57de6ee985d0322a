"""Remote shard reads that survive faults: http(s) and fsspec URLs (``s3://`` through s3fs).

``RemoteFile`` is a read-only stream over one remote object. It reads in chunks of
``RemoteOptions.chunk_bytes`` and remembers the byte offset it has received. When a read fails
with a transient error (connection refused, reset or dropped, a socket timeout, HTTP 408 / 425 /
429 / 5xx, a body shorter than its ``Content-Length``), it waits ``backoff_s * 2**k`` seconds
(k = 0, 1, ...; times a jitter in [1, 1.5), at most 60 s) and reopens the object *at the offset
reached* (HTTP ``Range: bytes=OFFSET-``; fsspec: a ranged ``cat_file``), so a recovered read
yields exactly the bytes of an uninterrupted one. ``retries`` failures in a row without a byte
of progress, or a permanent error (HTTP 4xx other than the above, a missing object, a shard
whose ETag changed between two requests), end the read with ``RemoteReadError`` and one warning
naming the URL. Every retry is counted in the caller's ``IOStats``.

Timeouts are per socket operation (connect, each read): a server that stalls for
``timeout_s`` fails that attempt; a slow server that keeps sending is read to the end.

``pipe:`` commands and local files are not read here (``shardio.open_url``).
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import os
import random
import re
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

log = logging.getLogger("mmpretrain.data")

WARN_INTERVAL_S = 30.0
_last_warning: dict[str, float] = {}


@dataclasses.dataclass(frozen=True)
class RemoteOptions:
    """Retry policy of remote reads (``data.remote_retries``, ``remote_backoff_s``, ``remote_timeout_s``)."""

    retries: int = 5
    """Retries after a failure, in a row without progress (the count starts over once bytes arrive)."""
    backoff_s: float = 1.0
    """First wait before a retry; doubled for each further one in a row."""
    timeout_s: float = 30.0
    """Per socket operation: connect, and each read."""
    chunk_bytes: int = 1 << 20
    """Bytes per read from the network (fsspec: per ranged request)."""

    @classmethod
    def from_config(cls, cfg) -> "RemoteOptions":
        return cls(retries=int(cfg.remote_retries), backoff_s=float(cfg.remote_backoff_s),
                   timeout_s=float(cfg.remote_timeout_s))


class IOStats:
    """Counters of one reading context (a loader worker, or the main process at start-up)."""

    __slots__ = ("retries", "failed_reads")

    def __init__(self) -> None:
        self.retries = 0
        self.failed_reads = 0


class RemoteReadError(OSError):
    """A remote read that failed for good (retries exhausted, or a permanent error)."""

    def __init__(self, url: str, offset: int, attempts: int, cause: str, permanent: bool):
        self.url, self.offset, self.attempts, self.cause, self.permanent = url, offset, attempts, cause, permanent
        tries = "a permanent error" if permanent else f"{attempts} attempts"
        super().__init__(f"{url}: read failed at byte {offset} after {tries} ({cause})")


class NotFound(RemoteReadError):
    """The object does not exist (HTTP 404 / 410, ``FileNotFoundError``)."""


class _Transient(Exception):
    pass


class _Permanent(Exception):
    def __init__(self, msg: str, not_found: bool = False):
        super().__init__(msg)
        self.not_found = not_found


_RETRY_STATUS = (408, 425, 429)
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class _HTTPSource:
    """One GET per attempt, streamed; a resumed attempt asks for ``Range: bytes=OFFSET-``."""

    def __init__(self, url: str, opts: RemoteOptions):
        self.url, self.opts = url, opts
        self.resp: http.client.HTTPResponse | None = None
        self.total: int | None = None
        self.etag: str | None = None

    def _open(self, off: int) -> None:
        if self.total is not None and off >= self.total:
            return
        headers = {"User-Agent": "mmpretrain", "Accept-Encoding": "identity"}
        if off:
            headers["Range"] = f"bytes={off}-"
        req = urllib.request.Request(self.url, headers=headers)
        try:
            resp = urllib.request.urlopen(req, timeout=self.opts.timeout_s)  # noqa: S310 - shard URLs
        except urllib.error.HTTPError as e:
            code = e.code
            e.close()
            if code == 416 and off and self.total is None:
                self.total = off  # asked past the end: the body ended exactly here
                return
            if code in _RETRY_STATUS or code >= 500:
                raise _Transient(f"HTTP {code}") from None
            raise _Permanent(f"HTTP {code} {e.reason}", not_found=code in (404, 410)) from None
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets
            raise _Transient(_describe(e)) from None
        etag = resp.headers.get("ETag")
        if self.etag is not None and etag is not None and etag != self.etag:
            resp.close()
            raise _Permanent(f"the shard changed on the server during the read (ETag {self.etag} -> {etag})")
        self.etag = self.etag or etag
        skip = 0
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != off:
                resp.close()
                raise _Transient(f"bad Content-Range {resp.headers.get('Content-Range')!r} for bytes={off}-")
            total = None if m.group(3) == "*" else int(m.group(3))
        else:
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None and length.isdigit() else None
            skip = off  # the server ignored the Range header: read and drop the part we have
        if self.total is not None and total is not None and total != self.total:
            resp.close()
            raise _Permanent(f"the shard changed on the server during the read ({self.total} -> {total} bytes)")
        self.total = self.total if self.total is not None else total
        self.resp = resp
        while skip:
            got = resp.read(min(skip, self.opts.chunk_bytes))
            if not got:
                raise _Transient(f"body ended at byte {off - skip} while skipping to byte {off}")
            skip -= len(got)

    def read(self, off: int, n: int) -> bytes:
        if self.resp is None:
            self._open(off)
            if self.resp is None:
                return b""  # at the end
        try:
            data = self.resp.read1(n)  # what one socket read gives: progress is kept when the next one fails
        except (OSError, http.client.HTTPException) as e:  # resets, timeouts, IncompleteRead (chunked)
            raise _Transient(_describe(e)) from None
        if not data and n and self.total is not None and off < self.total:
            raise _Transient(f"body ended at byte {off} of {self.total}")
        return data

    def reset(self) -> None:
        if self.resp is not None:
            try:
                self.resp.close()
            except Exception:  # noqa: BLE001 - a broken connection
                pass
        self.resp = None

    close = reset


_FS_CACHE: dict[tuple, object] = {}


def _filesystem(protocol: str, timeout_s: float):
    """An fsspec filesystem for remote reads, one per process (workers fork: keyed by pid).
    s3fs: our timeouts, and its own and botocore's retries off, so that every retry is ours
    (counted, with our backoff)."""
    key = (os.getpid(), protocol, timeout_s)
    if key not in _FS_CACHE:
        import fsspec

        if protocol in ("s3", "s3a"):
            try:
                fs = fsspec.filesystem(protocol, config_kwargs={
                    "connect_timeout": timeout_s, "read_timeout": timeout_s,
                    "retries": {"total_max_attempts": 1}})
            except ImportError as e:
                raise ImportError(f"{protocol}:// shards need s3fs (pip install 'mmpretrain[remote]'): {e}") from None
            fs.retries = 1
        else:
            fs = fsspec.filesystem(protocol)
        _FS_CACHE[key] = fs
    return _FS_CACHE[key]


class _FSSpecSource:
    """Ranged reads (``cat_file(path, start, end)``) of at most ``chunk_bytes`` each."""

    def __init__(self, url: str, opts: RemoteOptions):
        self.url, self.opts = url, opts
        self.protocol = urlparse(url).scheme
        self.total: int | None = None

    def read(self, off: int, n: int) -> bytes:
        try:
            fs = _filesystem(self.protocol, self.opts.timeout_s)
            if self.total is None:
                self.total = int(fs.size(self.url))
            if off >= self.total:
                return b""
            end = min(off + n, self.total)
            data = fs.cat_file(self.url, start=off, end=end)
        except ImportError as e:
            raise _Permanent(str(e)) from None
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise _Permanent(_describe(e), not_found=isinstance(e, FileNotFoundError)) from None
        except PermissionError as e:
            raise _Permanent(_describe(e)) from None
        except Exception as e:  # noqa: BLE001 - botocore / aiohttp / asyncio errors: retried
            raise _Transient(_describe(e)) from None
        if len(data) != end - off:
            raise _Transient(f"range {off}-{end} returned {len(data)} bytes")
        return data

    def reset(self) -> None:
        pass

    close = reset


def _describe(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _warn_failed(err: RemoteReadError) -> None:
    now = time.monotonic()
    if now - _last_warning.get(err.url, -1e9) >= WARN_INTERVAL_S:
        _last_warning[err.url] = now
        log.warning("remote shard %s: read failed at byte %d after %s (%s); the rest of this piece is "
                    "skipped (counted in loader.skipped['remote_read_failed'])", err.url, err.offset,
                    "a permanent error" if err.permanent else f"{err.attempts} attempts", err.cause)


class RemoteFile:
    """A read-only, retrying stream over one remote object (see the module docstring)."""

    def __init__(self, url: str, opts: RemoteOptions | None = None, stats: IOStats | None = None,
                 warn: bool = True):
        self.url = url
        self.opts = opts or RemoteOptions()
        self.stats = stats if stats is not None else IOStats()
        self.warn = warn
        scheme = urlparse(url).scheme
        self._src = _HTTPSource(url, self.opts) if scheme in ("http", "https") else _FSSpecSource(url, self.opts)
        self._buf = b""
        self._pos = 0
        self.offset = 0
        """Bytes received from the network so far."""
        self._eof = False
        self._rng = random.Random()

    # -- the retry loop
    def _chunk(self) -> bytes:
        failures = 0
        while True:
            try:
                data = self._src.read(self.offset, self.opts.chunk_bytes)
                self.offset += len(data)
                return data
            except _Permanent as e:
                self._src.reset()
                err_cls = NotFound if e.not_found else RemoteReadError
                self._fail(err_cls(self.url, self.offset, failures + 1, str(e), True))
            except _Transient as e:
                self._src.reset()
                failures += 1
                if failures > self.opts.retries:
                    self._fail(RemoteReadError(self.url, self.offset, failures, str(e), False))
                self.stats.retries += 1
                wait = min(60.0, self.opts.backoff_s * 2 ** (failures - 1)) * (1 + 0.5 * self._rng.random())
                log.debug("remote shard %s: %s at byte %d; retry %d of %d in %.2f s", self.url, e, self.offset,
                          failures, self.opts.retries, wait)
                time.sleep(wait)

    def _fail(self, err: RemoteReadError) -> None:
        self.stats.failed_reads += 1
        if self.warn:
            _warn_failed(err)
        raise err

    # -- file API
    def read(self, n: int = -1) -> bytes:
        avail = len(self._buf) - self._pos
        if 0 <= n <= avail:
            out = self._buf[self._pos:self._pos + n]
            self._pos += n
            return out
        parts = [self._buf[self._pos:]] if avail else []
        need = n - avail
        self._buf, self._pos = b"", 0
        while (n < 0 or need > 0) and not self._eof:
            data = self._chunk()
            if not data:
                self._eof = True
                break
            if n >= 0 and len(data) > need:
                parts.append(data[:need])
                self._buf, self._pos = data, need
                need = 0
                break
            parts.append(data)
            need -= len(data)
        return b"".join(parts)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._src.close()
        self._buf = b""

    def __enter__(self) -> "RemoteFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_remote(url: str, opts: RemoteOptions | None = None, stats: IOStats | None = None) -> bytes | None:
    """The whole object, or None when it does not exist (no retries for that). Other failures
    raise ``RemoteReadError`` after the retries."""
    try:
        with RemoteFile(url, opts, stats, warn=False) as f:
            return f.read()
    except NotFound:
        return None
