"""Writing files so that a reader sees the old content or the whole new one, never half of it.

Why our own: MONAI and ignite write their own checkpoints atomically, but not manifests, datalists, exported
encoders or pictures. The temporary file sits in the target's folder (a rename within one file system is atomic),
is created with the process's umask (colleagues on a shared cluster can read the result, unlike `mkstemp`'s 0600),
and is flushed to disk with its folder, so a node crash cannot leave an empty file under the target's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Iterator

from voco.errors import ConfigError

# The temporary file `atomic_write` writes before the rename: ".<target name>.<pid>.<8 hex digits>.tmp".
TEMPORARY_FILE = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, checksum: bool = False) -> Iterator[Path]:
    """``with atomic_write(path) as temporary: <write temporary>``: on leaving the block without an error the
    temporary file replaces `path`; on an error it is deleted and `path` stays as it was.

    With `checksum`, the SHA-256 of the content is recorded beside it (`checksum_path`, in ``sha256sum`` format)
    once the file is in place, so that a reader can tell a file damaged later (`verify_checksum`)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the path of the file to write (one inside it, for example).")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        _sync(temporary)
        digest = sha256_of(temporary) if checksum else None
        os.replace(temporary, path)
        _sync(path.parent)
    finally:
        temporary.unlink(missing_ok=True)
    if digest is not None:  # after the rename: a crash in between leaves a file that fails verification, not passes
        with atomic_write(checksum_path(path)) as temporary:
            temporary.write_text(f"{digest}  {path.name}\n")


def checksum_path(path: str | os.PathLike) -> Path:
    """Where `atomic_write` records a file's SHA-256: ``<name>.sha256`` beside it (``sha256sum -c`` reads it)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, in hex (read in 8 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(path: str | os.PathLike) -> bool | None:
    """True where the file's content matches the SHA-256 recorded when it was written, False where it does not
    (a bit flipped on disk, a copy cut short), None where none was recorded (a file voco did not write)."""
    recorded = checksum_path(path)
    try:
        expected = recorded.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return sha256_of(path) == expected


def remove_with_checksum(path: str | os.PathLike) -> None:
    """Delete a file and the checksum recorded beside it."""
    Path(path).unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def write_json_atomically(content: Any, path: str | os.PathLike, **dump_options: Any) -> Path:
    """`content` as JSON (indent 1 unless given, a final newline) written with `atomic_write`."""
    path = Path(path)
    with atomic_write(path) as temporary, temporary.open("w", encoding="utf-8") as stream:
        json.dump(content, stream, **{"indent": 1, **dump_options})
        stream.write("\n")
    return path


def with_umask_mode(folder: str | os.PathLike) -> Path:
    """Give a folder made by `tempfile.mkdtemp` (mode 0700) the mode a plain mkdir gives under the umask, so that
    colleagues on a shared cluster can read what is renamed into place."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    return Path(folder)


def _sync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk; a no-op where the system cannot."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
