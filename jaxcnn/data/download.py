"""Downloading a dataset file from a list of mirrors, verified before it takes its final name.

Each mirror is tried in order. A download streams into a temporary file next to its destination,
is checked by a caller-supplied ``verify`` function (checksum, IDX structure) and only then renamed
into place, so a partial, corrupt or HTML file never sits under the final name. Failures are sorted
into three kinds:

* the host cannot be reached (name resolution, refused connection, connect timeout): the host is
  remembered as unreachable and skipped for the rest of the :class:`Downloader`'s life, so with no
  network at all a whole dataset load gives up after one short attempt per mirror;
* transient trouble once connected (HTTP 5xx, 408 or 429, a connection dropped or stalled
  mid-transfer): retried on the same mirror after a short backoff;
* a definite answer that is wrong (HTTP 404, an HTML page, a file that fails verification): the
  next mirror is tried.
"""

from __future__ import annotations

import errno
import http.client
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from .errors import DataError

T = TypeVar("T")

DEFAULT_TIMEOUT_SECONDS = 5.0
"""Socket timeout: bounds the connection attempt and every wait for more data."""
DEFAULT_RETRIES = 2
"""Extra attempts on one mirror after a transient failure."""
DEFAULT_BACKOFF_SECONDS = 0.25
"""Pause before the first retry; doubled before each further one."""

_CHUNK_BYTES = 1 << 16
_PROGRESS_MIN_BYTES = 1 << 20
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH})


class DownloadError(DataError):
    """A file could not be downloaded.

    ``summary`` is a short phrase saying why, for one-line logs; ``unwritable`` is true when the
    destination directory could not be written, so that no download was attempted.
    """

    def __init__(self, problem: str, *, summary: str, unwritable: bool = False):
        super().__init__(problem)
        self.summary = summary
        self.unwritable = unwritable


class _MirrorFailure(Exception):
    """One failed attempt; ``retry`` says whether the same mirror is worth another try."""

    def __init__(self, reason: str, *, retry: bool = False, unreachable: bool = False):
        super().__init__(reason)
        self.retry = retry
        self.unreachable = unreachable


class Downloader:
    """Fetches files from mirrors; remembers unreachable hosts across the files of one load.

    Args:
        mirrors: base URLs, tried in order; the file name is appended to each.
        timeout: socket timeout in seconds.
        retries: extra attempts on a mirror after a transient failure.
        backoff: seconds to wait before the first retry, doubled for each further one.
        log: called with one line per completed download.
    """

    def __init__(
        self,
        mirrors: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF_SECONDS,
        log: Callable[[str], None] = print,
    ):
        self.mirrors = tuple(mirrors)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.log = log
        self.unreachable_hosts: set[str] = set()

    def fetch(self, filename: str, destination: Path, verify: Callable[[Path, str], T]) -> T:
        """Downloads ``filename`` into the directory ``destination`` and returns ``verify``'s result.

        ``verify(temporary_path, url)`` must raise :class:`DataError` for content that is not the
        expected file; ``url`` is the name to use in its messages. The verified file is renamed to
        ``destination / filename``; nothing is left behind on failure.

        Raises:
            DownloadError: ``destination`` cannot be created or written, or no mirror gave a file
                that verified; the message lists every mirror and what went wrong with it.
        """
        try:
            destination.mkdir(parents=True, exist_ok=True)
            handle, temporary_name = tempfile.mkstemp(dir=destination, prefix=f".{filename}.", suffix=".part")
        except OSError as error:
            raise DownloadError(
                f"{destination}: cannot write to the download directory ({error.strerror or error}).",
                summary=f"cannot write to {destination}",
                unwritable=True,
            ) from None
        os.close(handle)
        temporary = Path(temporary_name)
        failures = []
        reachable = False
        try:
            for mirror in self.mirrors:
                url = f"{mirror.rstrip('/')}/{filename}"
                host = urllib.parse.urlsplit(url).netloc
                if host in self.unreachable_hosts:
                    failures.append(f"{url}: skipped, {host} was unreachable a moment ago")
                    continue
                try:
                    self._download_with_retries(url, temporary)
                    result = verify(temporary, url)
                except _MirrorFailure as failure:
                    if failure.unreachable:
                        self.unreachable_hosts.add(host)
                    else:
                        reachable = True
                    failures.append(f"{url}: {failure}")
                    continue
                except DataError as error:
                    reachable = True
                    failures.append(error.problem)
                    continue
                os.chmod(temporary, 0o644)
                os.replace(temporary, destination / filename)
                self.log(f"downloaded {filename} from {url} into {destination}")
                return result
        finally:
            temporary.unlink(missing_ok=True)
        if not self.mirrors:
            failures.append("no mirrors configured")
        raise DownloadError(
            f"could not download {filename}:\n" + "\n".join(f"  - {line}" for line in failures),
            summary="no mirror gave a valid file" if reachable else "no mirror reachable",
        )

    def _download_with_retries(self, url: str, temporary: Path) -> None:
        for attempt in range(self.retries + 1):
            try:
                self._download_once(url, temporary)
                return
            except _MirrorFailure as failure:
                if not failure.retry or attempt == self.retries:
                    if failure.retry:
                        raise _MirrorFailure(f"{failure} (after {attempt + 1} attempts)") from None
                    raise
            time.sleep(self.backoff * 2**attempt)

    def _download_once(self, url: str, temporary: Path) -> None:
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "jaxcnn"})
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            raise _MirrorFailure(f"HTTP {error.code} {error.reason}", retry=error.code in _RETRYABLE_STATUS) from None
        except urllib.error.URLError as error:
            reason = error.reason
            if isinstance(reason, (socket.gaierror, TimeoutError)) or (
                isinstance(reason, OSError) and reason.errno in _UNREACHABLE_ERRNOS
            ):
                raise _MirrorFailure(f"unreachable ({_describe(reason)})", unreachable=True) from None
            raise _MirrorFailure(f"connection failed ({_describe(reason)})", retry=True) from None
        except (OSError, http.client.HTTPException) as error:
            raise _MirrorFailure(f"no response ({_describe(error)})", retry=True) from None
        except ValueError as error:
            raise _MirrorFailure(f"not a usable URL ({error})") from None
        with response:
            if response.headers.get_content_type() == "text/html":
                raise _MirrorFailure("served an HTML page (Content-Type text/html) instead of the file")
            length_header = response.headers.get("Content-Length")
            length = int(length_header) if length_header and length_header.isdigit() else None
            received = 0
            try:
                with (
                    open(temporary, "wb") as output,
                    tqdm(
                        total=length,
                        unit="B",
                        unit_scale=True,
                        desc=Path(urllib.parse.urlsplit(url).path).name,
                        leave=False,
                        disable=not (sys.stderr.isatty() and (length or 0) >= _PROGRESS_MIN_BYTES),
                    ) as progress,
                ):
                    while chunk := response.read(_CHUNK_BYTES):
                        if received == 0 and chunk.lstrip().startswith(b"<"):
                            raise _MirrorFailure("served an HTML page instead of the file")
                        output.write(chunk)
                        received += len(chunk)
                        progress.update(len(chunk))
            except (OSError, http.client.HTTPException) as error:
                raise _MirrorFailure(
                    f"transfer interrupted after {received:,} bytes ({_describe(error)})", retry=True
                ) from None
            if length is not None and received != length:
                raise _MirrorFailure(f"transfer ended after {received:,} of {length:,} bytes", retry=True)


def _describe(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, http.client.IncompleteRead):
        return "connection closed early"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__
