"""Where run folders live: a local (or shared) directory, or a URI of any file system pyarrow
knows (`s3://bucket/runs`, `gs://...`, `hdfs://...`), as Ray Train and Ray Tune take them.

    location("runs")                 -> pathlib.Path, absolute
    location("s3://bucket/runs")     -> UriPath: the pathlib calls this package uses, through pyarrow.fs
    arrow_path(location)             -> (path, filesystem) for pyarrow and Ray's RunConfig
    write_bytes_atomic / write_text_atomic / read_json / remove_tree / download_dir

On a cluster whose nodes share nothing but a bucket, every file a run writes (config.yaml,
metrics.json, TensorBoard events, checkpoints, predictions, grid records) goes through the
file system of its URI, so any node, and a rerun on another machine, sees it.

Credentials never appear in a URI or a config: pyarrow reads them from each process's
environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, an instance role,
~/.aws), and an S3-compatible store's address from AWS_ENDPOINT_URL (or `?endpoint_override=
host:port&scheme=http` in the URI, kept with it). A UriPath pickles as its URI: the file system
is made again in the process that uses it, from that process's environment.

Writes are atomic as readers see them: locally through a temporary name and a rename; on an
object store a single PUT (or a completed multipart upload) is all or nothing by itself.
"""
from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from fvae_dist.errors import ConfigError

READ_ATTEMPTS = 5


def is_uri(text: str | os.PathLike) -> bool:
    return isinstance(text, UriPath) or "://" in str(text)


def location(text: "str | os.PathLike | UriPath") -> "Path | UriPath":
    """A directory or file named by the user: a URI stays a URI, anything else becomes an
    absolute local path (relative ones are taken from the working directory)."""
    if isinstance(text, UriPath):
        return text
    if isinstance(text, Path):
        return text.expanduser().resolve()
    text = str(text)
    if "://" in text:
        return UriPath.parse(text)
    return Path(text).expanduser().resolve()


class UriPath:
    """A path on the file system of a URI, with the part of pathlib's interface this package
    uses (/, name, parent, read/write, glob of one level, mkdir, unlink). Object stores have no
    directories: mkdir is a no-op there, and a "directory" exists when something lies under it."""

    def __init__(self, scheme: str, path: str, query: str = ""):
        self.scheme = scheme
        self.path = path.strip("/")  # "bucket/a/b" for s3
        self.query = query
        self._fs: pafs.FileSystem | None = None

    @classmethod
    def parse(cls, uri: str) -> "UriPath":
        parts = urlsplit(uri)
        if not parts.scheme or not (parts.netloc or parts.path.strip("/")):
            raise ConfigError(f"{uri!r}: expected a URI such as s3://bucket/folder")
        if "@" in parts.netloc:
            raise ConfigError(f"{_without_query(uri)}: credentials do not belong in a storage URI; pyarrow "
                              "reads them from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        path = posixpath.normpath(f"{parts.netloc}/{parts.path.lstrip('/')}").strip("/")
        return cls(parts.scheme, path, parts.query)

    # -- identity -------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    def __repr__(self) -> str:
        return f"UriPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UriPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __reduce__(self):
        return (UriPath, (self.scheme, self.path, self.query))

    @property
    def fs(self) -> pafs.FileSystem:
        """The file system, made on first use in this process (credentials from its environment)."""
        if self._fs is None:
            root = f"{self.scheme}://{self.path.split('/', 1)[0]}" + (f"?{self.query}" if self.query else "")
            try:
                self._fs, _ = pafs.FileSystem.from_uri(root)
            except (ValueError, OSError) as exc:
                raise ConfigError(f"{self}: pyarrow cannot open this file system ({exc})") from None
        return self._fs

    # -- pathlib ---------------------------------------------------------------------------
    def __truediv__(self, part: str) -> "UriPath":
        joined = UriPath(self.scheme, posixpath.join(self.path, str(part)), self.query)
        joined._fs = self._fs
        return joined

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> "UriPath":
        parent = UriPath(self.scheme, posixpath.dirname(self.path) or self.path, self.query)
        parent._fs = self._fs
        return parent

    def with_name(self, name: str) -> "UriPath":
        return self.parent / name

    def relative_to(self, other: "UriPath") -> "PurePosixPath":
        if not isinstance(other, UriPath) or (other.scheme, other.query) != (self.scheme, self.query) or not (
                self.path == other.path or self.path.startswith(other.path + "/")):
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(posixpath.relpath(self.path, other.path))

    def expanduser(self) -> "UriPath":
        return self

    def resolve(self) -> "UriPath":
        return self

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def iterdir(self) -> Iterator["UriPath"]:
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        for info in self.fs.get_file_info(selector):
            yield self / posixpath.basename(info.path)

    def glob(self, pattern: str) -> Iterator["UriPath"]:
        """Entries of this directory whose name matches `pattern` (one level, as used here)."""
        if "/" in pattern:
            raise ValueError(f"UriPath.glob takes a name pattern, not {pattern!r}")
        return (child for child in self.iterdir() if fnmatch.fnmatchcase(child.name, pattern))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        """The object's bytes, whole. pyarrow reads an object by asking its size and then reading
        that many bytes; an object replaced in between (metrics.json is rewritten every epoch)
        would come back cut to the old size, so the read is repeated until it agrees with the
        object's size afterwards."""
        for _ in range(READ_ATTEMPTS):
            try:
                with self.fs.open_input_stream(self.path) as stream:
                    data = stream.read()
                size = self.fs.get_file_info(self.path).size
            except FileNotFoundError:
                raise FileNotFoundError(f"{self}: not found") from None
            if size == len(data):
                return data
        raise OSError(f"{self}: changed while it was read, {READ_ATTEMPTS} times in a row")

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        with self.fs.open_output_stream(self.path) as stream:
            stream.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise


# ----------------------------------------------------------------------------------------------
# What works the same on both kinds of path
# ----------------------------------------------------------------------------------------------

def arrow_path(path: "Path | UriPath") -> tuple[str, pafs.FileSystem | None]:
    """(path, filesystem) as pyarrow and Ray take them (pq.read_table(path, filesystem=...),
    RunConfig(storage_path=..., storage_filesystem=...)): for a URI the file system itself is
    passed, so its query (endpoint_override) is kept; None for a local path."""
    if isinstance(path, UriPath):
        return path.path, path.fs
    return str(path), None


def write_bytes_atomic(path: "Path | UriPath", data: bytes) -> None:
    """Readers see the old content or the new one, never a torn file."""
    if isinstance(path, UriPath):
        path.write_bytes(data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; run files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: "str | Path | UriPath", text: str) -> None:
    write_bytes_atomic(path if isinstance(path, UriPath) else Path(path), text.encode("utf-8"))


def read_json(path: "Path | UriPath") -> Any:
    """The JSON document at `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def remove_tree(path: "Path | UriPath") -> None:
    """Delete a directory and everything under it. Locally it is first renamed out of the way,
    so a crash midway never leaves a half-deleted directory under its own name."""
    if isinstance(path, UriPath):
        path.fs.delete_dir(path.path)
        return
    import shutil

    doomed = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def files_under(path: "Path | UriPath", name_pattern: str = "*") -> list:
    """Every file at any depth under the directory whose name matches the pattern."""
    if not isinstance(path, UriPath):
        return sorted(p for p in Path(path).rglob(name_pattern) if p.is_file()) if Path(path).is_dir() else []
    selector = pafs.FileSelector(path.path, allow_not_found=True, recursive=True)
    infos = path.fs.get_file_info(selector)
    found = []
    for info in infos:
        if info.type == pafs.FileType.File and fnmatch.fnmatchcase(posixpath.basename(info.path), name_pattern):
            found.append(path / posixpath.relpath(info.path, path.path))
    return sorted(found, key=str)


def download_dir(path: "Path | UriPath", destination: Path) -> Path:
    """A local copy of the directory (the directory itself when it is local already)."""
    if not isinstance(path, UriPath):
        return Path(path)
    destination.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path.path, str(destination), source_filesystem=path.fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return destination


def upload_file(local: Path, path: "Path | UriPath") -> None:
    """Copy a local file to `path` (atomically as readers see it)."""
    write_bytes_atomic(path, Path(local).read_bytes())


def read_parquet(path: "Path | UriPath"):
    """A Parquet file as a pandas DataFrame, from either kind of path."""
    import pyarrow.parquet as pq

    if isinstance(path, UriPath):
        return pq.read_table(path.path, filesystem=path.fs).to_pandas()
    return pq.read_table(path).to_pandas()


def _without_query(uri: str) -> str:
    return uri.split("?", 1)[0]
