"""Key files on disk, trusted only the way OpenSSH trusts ``~/.ssh``.

A key directory, and every file in it, must be owned by the current user or
root and writable by nobody else; a key file must also be readable by nobody
else. Otherwise another local user could have planted a manifest and a key
that would then sign. The directory is never a symbolic link, and the files in
it are opened relative to the opened directory (``dir_fd``) with
``O_NOFOLLOW``: every check is made on the open descriptor (``fstat``), never
on the path, so nothing can be swapped between the check and the read.

A refusal is a ``KeySourceError`` whose message names the path and the command
that fixes it, never any file contents.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection
from contextlib import suppress

from .errors import InvalidRequest, KeySourceError

__all__ = ["open_dir", "read_file", "read_path", "remove_except", "write_private"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
# O_NONBLOCK: a FIFO planted under a key file's name must not hang the open.
_READ = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0)
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
# What O_NOFOLLOW raises for a symbolic link: ELOOP on Linux, EMLINK on FreeBSD.
_SYMLINK_ERRNOS = {errno.ELOOP, errno.EMLINK}
_GROUP_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH
_GROUP_OTHER_ANY = stat.S_IRWXG | stat.S_IRWXO


def open_dir(path: str | os.PathLike[str], *, create: bool = False) -> int:
    """A descriptor of the key directory ``path``, after checking it can be trusted.

    With ``create`` (``save_dir``) the directory is made if missing and set to
    0700; without, it must already be writable by its owner only.
    """
    where = os.fspath(path)
    if create:
        os.makedirs(where, mode=0o700, exist_ok=True)
    try:
        fd = os.open(where, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)
    except OSError as exc:
        if exc.errno in _SYMLINK_ERRNOS or os.path.islink(where):
            raise KeySourceError(
                f"key directory {where} is a symbolic link, which jitbroker does not follow: "
                f"pass the real path ({os.path.realpath(where)}) instead"
            ) from exc
        raise InvalidRequest(
            f"{where} is not a readable jitbroker key directory: {exc.strerror}"
        ) from exc
    try:
        _check_dir(os.fstat(fd), where, fix=create)
        if create:
            os.fchmod(fd, 0o700)  # owner-only, whatever the umask or the old mode
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_dir(info: os.stat_result, where: str, *, fix: bool) -> None:
    _check_owner(info, "key directory", where)
    if not fix and info.st_mode & _GROUP_OTHER_WRITE:
        raise KeySourceError(
            f"key directory {where} is writable by group or others "
            f"(mode {_mode(info)}): run `chmod 700 {where}`"
        )


def read_file(dir_fd: int, name: str, where: str, *, kind: str, secret: bool) -> bytes:
    """The file ``name`` of the opened directory (at path ``where``), never through a symlink.

    ``secret`` (a key file) also refuses a file readable by group or others.
    """
    try:
        fd = os.open(name, _READ, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _SYMLINK_ERRNOS:
            raise KeySourceError(
                f"{kind} {where} is a symbolic link, which jitbroker does not follow: "
                "replace it with the file itself"
            ) from exc
        raise
    return _checked_read(fd, where, kind=kind, secret=secret)


def read_path(path: str | os.PathLike[str]) -> bytes:
    """The key file at ``path`` (``from_file``), if nobody but its owner could write it.

    An explicit path may be a symbolic link (Kubernetes secret volumes are
    made of them): the checks apply to the file it opens. Read access is not
    checked, as container secrets are mounted 0444 or 0644 by design.
    """
    fd = os.open(path, _READ & ~_NOFOLLOW)
    return _checked_read(fd, os.fspath(path), kind="key file", secret=False)


def _checked_read(fd: int, where: str, *, kind: str, secret: bool) -> bytes:
    with os.fdopen(fd, "rb") as fh:
        _check_file(os.fstat(fd), where, kind=kind, secret=secret)
        return fh.read()


def _check_file(info: os.stat_result, where: str, *, kind: str, secret: bool) -> None:
    """Refuse a file (by its ``fstat``) that someone else could have written or read."""
    if not stat.S_ISREG(info.st_mode):
        raise InvalidRequest(f"{kind} {where} is not a regular file")
    _check_owner(info, kind, where)
    if info.st_mode & _GROUP_OTHER_WRITE:
        raise KeySourceError(
            f"{kind} {where} is writable by group or others (mode {_mode(info)}): "
            f"run `chmod 600 {where}`"
        )
    if secret and info.st_mode & _GROUP_OTHER_ANY:
        raise KeySourceError(
            f"{kind} {where} is accessible by group or others (mode {_mode(info)}): "
            f"run `chmod 600 {where}`, and rotate the key if someone may have read it"
        )


def _check_owner(info: os.stat_result, kind: str, where: str) -> None:
    me = os.geteuid()
    if info.st_uid not in (me, 0):  # root could replace anything anyway
        raise KeySourceError(
            f"{kind} {where} is owned by uid {info.st_uid}, not by you (uid {me}) or root, "
            f"so its owner could have planted a key: `chown {me} {where}` if you trust "
            "it, or use a key directory of your own"
        )


def _mode(info: os.stat_result) -> str:
    return f"{stat.S_IMODE(info.st_mode):04o}"


def write_private(dir_fd: int, name: str, data: bytes) -> None:
    """Write ``name`` in the opened directory, mode 0600 from the start, atomically:
    a temporary file, synced, renamed over ``name``, then the directory synced.
    A reader (a ring following the directory) sees the old file or the new one,
    never half of one, and after a crash the rename is either done or not."""
    tmp = name + ".tmp"
    # A leftover temporary file (or a planted symlink) would keep its own mode
    # or redirect the write: remove it and create afresh, never following links.
    with suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = os.open(tmp, _WRITE, 0o600, dir_fd=dir_fd)
    os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)  # the rename itself durable


def remove_except(dir_fd: int, suffix: str, keep: Collection[str]) -> None:
    """Remove the files of the opened directory containing ``suffix``, except ``keep``."""
    for name in os.listdir(dir_fd):
        if suffix in name and name not in keep:
            os.unlink(name, dir_fd=dir_fd)
