"""Writing files so that a reader sees the old content or the whole new one, never half of it.

Why our own: MONAI and ignite write their own checkpoints atomically, but not manifests, datalists, exported
encoders or pictures. The temporary file sits in the target's folder (a rename within one file system is atomic),
is created with the process's umask (colleagues on a shared cluster can read the result, unlike `mkstemp`'s 0600),
and is flushed to disk with its folder, so a node crash cannot leave an empty file under the target's name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Iterator

# The temporary file `atomic_write` writes before the rename: ".<target name>.<pid>.<8 hex digits>.tmp".
TEMPORARY_FILE = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_write(path) as temporary: <write temporary>``: on leaving the block without an error the
    temporary file replaces `path`; on an error it is deleted and `path` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        _sync(temporary)
        os.replace(temporary, path)
        _sync(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


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
