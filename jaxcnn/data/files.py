"""Finding, verifying and, when missing, downloading the files of a named dataset.

Lookup order for each file of dataset ``<name>`` (the first directory that has it wins):

1. ``data_dir`` itself, then ``data_dir/<name>`` (the ``data_dir=`` argument / ``--data-dir``);
2. ``$JAXCNN_DATA/<name>``;
3. the user cache, ``$XDG_CACHE_HOME/jaxcnn/<name>`` (``~/.cache/jaxcnn/<name>`` by default);
4. system locations, ``/usr/share/datasets/<name>`` and ``/usr/local/share/datasets/<name>``
   (Debian's ``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist``).

In each directory the gzip file (``train-images-idx3-ubyte.gz``), the uncompressed file and the
dotted spelling (``train-images.idx3-ubyte``) are accepted. A missing file is downloaded into
``$JAXCNN_DATA/<name>`` when that variable is set, else into the user cache. Every file, found or
downloaded, is verified against the published checksums before use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import catalog
from .catalog import DatasetSpec, FileSpec
from .download import Downloader, DownloadError
from .errors import DataError, file_error
from .idx import read_idx_file

SYSTEM_DATASET_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"), Path("/usr/local/share/datasets"))
"""System-wide roots searched last, each holding one directory per dataset."""

_TRUTHY = frozenset({"1", "true", "yes", "on"})


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jaxcnn`` when that is an absolute path, else ``~/.cache/jaxcnn``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "jaxcnn"


def offline_requested() -> bool:
    """Whether ``$JAXCNN_OFFLINE`` forbids network access (``1``, ``true``, ``yes`` or ``on``)."""
    return os.environ.get("JAXCNN_OFFLINE", "").strip().lower() in _TRUTHY


def mirrors_for(spec: DatasetSpec, mirrors: Sequence[str] | None = None) -> tuple[str, ...]:
    """The mirrors to try: ``mirrors`` if given, else ``$JAXCNN_MIRRORS``, else the public ones.

    ``$JAXCNN_MIRRORS`` is a comma- or space-separated list of base URLs; ``{dataset}`` in a URL is
    replaced by the dataset name (``mnist``, ``fashion-mnist``).
    """
    if mirrors is None:
        configured = os.environ.get("JAXCNN_MIRRORS", "").replace(",", " ").split()
        mirrors = configured or spec.mirrors
    return tuple(mirror.replace("{dataset}", spec.name) for mirror in mirrors)


def download_dir(spec: DatasetSpec) -> Path:
    """Where missing files of ``spec`` are downloaded to."""
    root = os.environ.get("JAXCNN_DATA")
    return (Path(root).expanduser() if root else user_cache_dir()) / spec.name


def search_dirs(spec: DatasetSpec, data_dir: str | os.PathLike | None) -> list[Path]:
    """The directories searched for the files of ``spec``, in order (see the module docstring).

    Raises:
        DataError: ``data_dir`` was given but is not an existing directory.
    """
    directories = []
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        if not data_dir.is_dir():
            raise DataError(
                f"{data_dir}: the data directory does not exist or is not a directory.",
                remedy=f"Pass a directory that holds the {spec.title} IDX files, or leave it out to use the "
                f"default locations ({download_dir(spec)}).",
            )
        directories += [data_dir, data_dir / spec.name]
    if root := os.environ.get("JAXCNN_DATA"):
        directories.append(Path(root).expanduser() / spec.name)
    directories.append(user_cache_dir() / spec.name)
    directories += [root / spec.name for root in SYSTEM_DATASET_DIRS]
    return list(dict.fromkeys(directories))


def find_file(role: str, directories: Sequence[Path]) -> Path | None:
    """The first file in ``directories`` accepted for ``role``, or ``None``."""
    for directory in directories:
        for name in catalog.candidate_names(role):
            if (directory / name).is_file():
                return directory / name
    return None


def load_verified(path: Path, spec: DatasetSpec, file_spec: FileSpec, *, label: str | None = None) -> np.ndarray:
    """Reads an IDX file and checks it against the published checksums of ``file_spec``.

    Accepted when the gzip bytes match the published MD5 or the decompressed bytes match the
    published SHA-256. ``label`` replaces the path in messages.

    Raises:
        DataError: the file is unreadable or corrupt, or is not the published file.
    """
    name = label or str(path)
    contents = read_idx_file(path, label=label)
    if contents.gzip_md5 == file_spec.gzip_md5 or (
        file_spec.data_sha256 is not None and contents.data_sha256 == file_spec.data_sha256
    ):
        return contents.array
    expected = f"gzip MD5 {file_spec.gzip_md5}"
    if file_spec.data_sha256 is not None:
        expected += f" or SHA-256 {file_spec.data_sha256} of the decompressed data"
    else:
        expected += " (no checksum of the decompressed data is published, so only the original .gz verifies)"
    found = f"SHA-256 {contents.data_sha256} of the decompressed data"
    if contents.gzip_md5 is not None:
        found = f"gzip MD5 {contents.gzip_md5}, {found}"
    match = catalog.identify(contents.gzip_md5, contents.data_sha256)
    if match is not None:
        other_spec, other_file = match
        found += f" (this is {other_spec.title}'s {other_file.filename})"
    raise file_error(
        name,
        f"checksum mismatch for {spec.title} {file_spec.filename}",
        expected=expected,
        found=found,
        remedy="Delete the file so that it is downloaded again, or replace it with the published file. "
        "To load a directory of IDX files without checksums, pass the directory itself as the dataset name.",
    )


class Obtained(NamedTuple):
    """A verified file: its array and the directory it came from."""

    array: np.ndarray
    directory: Path


class Unavailable(DataError):
    """A file of a named dataset that is neither present nor downloadable.

    ``reason`` is a short phrase for one-line logs. ``cause`` is ``"disabled"`` (downloads are
    off), ``"unwritable"`` (the download directory cannot be written) or ``"failed"`` (no mirror
    gave a valid file); with ``detail`` it lets :func:`unavailable_error` report several missing
    files in one message.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        file_spec: FileSpec,
        *,
        searched: str,
        detail: str,
        destination: Path,
        cause: str,
        reason: str,
    ):
        super().__init__(
            f"{spec.title} {file_spec.filename}: not found in {searched}; {detail}",
            remedy=placement_remedy([file_spec], destination, cause=cause),
        )
        self.file_spec = file_spec
        self.searched = searched
        self.detail = detail
        self.destination = destination
        self.cause = cause
        self.reason = reason


def placement_remedy(file_specs: Sequence[FileSpec], destination: Path, *, cause: str) -> str:
    """What to do about missing files: where to put them, with their published MD5s."""
    listed = ", ".join(f"{file_spec.filename} (MD5 {file_spec.gzip_md5})" for file_spec in file_specs)
    elsewhere = "in a directory passed as data_dir= / --data-dir"
    if cause == "unwritable":
        return f"Set JAXCNN_DATA to a writable directory to download them there, or place {listed} {elsewhere}."
    retry = "Check the network connection and try again, or place" if cause == "failed" else "Place"
    return f"{retry} {listed} in {destination}, or {elsewhere}."


def unavailable_error(spec: DatasetSpec, errors: Sequence[Unavailable]) -> DataError:
    """One error for all the missing files of ``spec``: where they were looked for, what failed, what to do.

    Each distinct failure is shown in full once; files that failed the same way are listed after it.
    """
    if len(errors) == 1:
        return errors[0]
    names = ", ".join(error.file_spec.filename for error in errors)
    causes = list(dict.fromkeys(error.cause for error in errors))
    if causes == ["disabled"]:
        problem = f"{spec.title}: {names} not found in {errors[0].searched}; downloading is disabled."
    else:
        lines = [f"{spec.title}: {names} not found in {errors[0].searched}."]
        shown: dict[str, list[str]] = {}
        for error in errors:
            if error.reason not in shown:
                shown[error.reason] = []
                lines.append(error.detail)
            else:
                shown[error.reason].append(error.file_spec.filename)
        lines += [f"{', '.join(others)}: {reason}, likewise." for reason, others in shown.items() if others]
        problem = "\n".join(lines)
    return DataError(
        problem,
        remedy=placement_remedy(
            [error.file_spec for error in errors],
            errors[0].destination,
            cause="unwritable" if "unwritable" in causes else causes[0],
        ),
    )


def obtain(
    spec: DatasetSpec,
    role: str,
    directories: Sequence[Path],
    downloader: Downloader | None,
) -> Obtained:
    """Returns the verified array for one file of ``spec``, downloading it if allowed and missing.

    ``downloader`` is ``None`` when downloads are disabled.

    Raises:
        Unavailable: the file is missing and could not be downloaded.
        DataError: a file was found but is corrupt or not the published one (it is left in place).
    """
    file_spec = spec.files[role]
    path = find_file(role, directories)
    if path is not None:
        return Obtained(load_verified(path, spec, file_spec), path.parent)
    destination = download_dir(spec)
    searched = ", ".join(str(directory) for directory in directories)
    if downloader is None:
        raise Unavailable(
            spec,
            file_spec,
            searched=searched,
            detail="downloading is disabled.",
            destination=destination,
            cause="disabled",
            reason="not found, downloads disabled",
        )
    try:
        array = downloader.fetch(
            file_spec.filename,
            destination,
            lambda temporary, url: load_verified(temporary, spec, file_spec, label=url),
        )
    except DownloadError as error:
        raise Unavailable(
            spec,
            file_spec,
            searched=searched,
            detail=error.problem,
            destination=destination,
            cause="unwritable" if error.unwritable else "failed",
            reason=f"not found, download failed: {error.summary}",
        ) from None
    return Obtained(array, destination)
