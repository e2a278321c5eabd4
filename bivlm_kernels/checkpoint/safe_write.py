"""Writing checkpoints without ever losing data: what an output path may be, what may be replaced, and how.

Rules (used by :func:`bivlm_kernels.save_quantized` for directories, :func:`bivlm_kernels.checkpoint.save` for
single files):

* :func:`check_output_path`: an empty path, the current directory (or a directory above it), a filesystem
  root and the home directory are never outputs: ``os.path.abspath("")`` is the current directory, so an unset
  shell variable would otherwise replace it.
* :func:`check_replaceable`: an existing path is replaced only when it is provably ours: a checkpoint of this
  package (the caller's ``is_ours`` test) or an empty directory. Anything else, and any symbolic link, is
  refused with a message naming the path.
* New contents are written beside the path (same directory, so renames are atomic), fsync'ed, then renamed
  into place. A directory swap moves the old one aside first and moves it back if installing the new one
  fails, so at every moment the path holds the old or the new complete checkpoint.

Leftovers of interrupted writes (a killed process cannot clean up after itself), all in the output's parent:

* ``NAME.partial-XXXXXXXX/``  a directory being written (holds the marker file ``.bivlm-partial``)
* ``NAME.old-XXXXXXXX/``      the previous checkpoint, moved aside during the swap
* ``.NAME.tmp-XXXXXXXX``      a single ``.safetensors`` file being written

:func:`clean_leftovers` (run by every successful save of ``NAME``) removes the ones that are provably ours:
partial directories with the marker or a complete checkpoint, old directories holding a checkpoint or nothing
(only when the save was allowed to overwrite ``NAME``), temporary files whose header is one of ours.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from typing import Callable, Optional

MARKER = ".bivlm-partial"


def check_output_path(path, option: str = "path") -> str:
    """``path`` as an absolute path, or ``ValueError`` naming ``option`` for a path no checkpoint may take."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{option} must be a str or os.PathLike, got {type(path).__name__}")
    raw = os.fspath(path)
    if not isinstance(raw, str):
        raise TypeError(f"{option} must be a text path, got {type(raw).__name__}")
    if not raw.strip():
        raise ValueError(f"{option} is empty ({raw!r}); give the checkpoint's own path, e.g. 'ckpt/' "
                         f"(an empty path would mean the current directory)")
    full = os.path.abspath(raw)
    real = os.path.realpath(full)
    cwd = os.path.realpath(os.getcwd())
    home = os.path.realpath(os.path.expanduser("~"))
    why = None
    if os.path.dirname(real) == real:
        why = "a filesystem root"
    elif real == cwd:
        why = "the current directory"
    elif cwd.startswith(real.rstrip(os.sep) + os.sep):
        why = "a directory that contains the current directory"
    elif real == home:
        why = "the home directory"
    if why is not None:
        raise ValueError(f"{option} {raw!r} is {why}; a checkpoint needs a path of its own, e.g. "
                         f"{os.path.join(raw, 'ckpt')!r}")
    return full


def is_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def check_replaceable(path: str, overwrite: bool, is_ours: Callable[[str], bool], *, what: str = "checkpoint",
                      option: str = "path", allow_empty_dir: bool = True) -> None:
    """Raise unless ``path`` is free, or ``overwrite`` is set and ``path`` is provably ours (or empty)."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {type(overwrite).__name__} {overwrite!r}")
    if not os.path.lexists(path):
        return
    if os.path.islink(path):
        raise FileExistsError(f"{option} {path!r} is a symbolic link; give the real path (links are never "
                              f"replaced)")
    if not overwrite:
        raise FileExistsError(f"{option} {path!r} already exists; pass overwrite=True (CLI: --overwrite) to "
                              f"replace it")
    if (allow_empty_dir and is_empty_dir(path)) or is_ours(path):
        return
    allowed = f"a {what} of bivlm_kernels" + (" or an empty directory" if allow_empty_dir else "")
    raise FileExistsError(f"{option} {path!r} exists and is not {allowed}; only those are replaced, so nothing "
                          f"was written (choose another path, or move it away yourself)")


def fsync_path(path: str) -> None:
    """Flush a file, or a directory's entries, to disk (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_path(os.path.join(dirpath, f))
        fsync_path(dirpath)


def _token() -> str:
    return secrets.token_hex(4)


# ------------------------------------------------------------------ directories

def make_partial_dir(path: str) -> str:
    """A fresh ``NAME.partial-XXXXXXXX`` beside ``path`` (parents created), marked as ours."""
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=base + ".partial-", dir=parent)
    open(os.path.join(tmp, MARKER), "w").close()
    return tmp


def install_dir(tmp: str, path: str) -> None:
    """Rename the complete directory ``tmp`` to ``path``; an existing ``path`` is moved aside first and moved
    back if the install fails (so ``path`` is never left empty). The old one is removed afterwards; if that
    fails, it stays as ``NAME.old-*`` for :func:`clean_leftovers`."""
    parent, base = os.path.split(path)
    os.remove(os.path.join(tmp, MARKER))
    fsync_path(tmp)
    old = None
    if os.path.lexists(path):
        old = os.path.join(parent, f"{base}.old-{_token()}")
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            try:
                os.replace(old, path)
            except OSError as e:
                raise OSError(f"installing the new checkpoint at {path!r} failed and so did restoring the "
                              f"previous one: it is at {old!r}; rename it back ({e})") from e
        raise
    fsync_path(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_leftovers(path: str, is_ours: Callable[[str], bool], *, include_old: bool,
                    is_our_file: Optional[Callable[[str], bool]] = None) -> list:
    """Remove leftovers of earlier interrupted writes of ``path`` that are provably ours; return their paths.

    ``include_old``: also remove ``NAME.old-*`` directories (only a save allowed to replace ``NAME`` may, since
    such a directory can be the only copy of the previous checkpoint)."""
    parent, base = os.path.split(path)
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        full = os.path.join(parent, entry)
        if os.path.islink(full):
            continue
        ours = False
        if entry.startswith(base + ".partial-") and os.path.isdir(full):
            ours = os.path.isfile(os.path.join(full, MARKER)) or is_ours(full)
        elif include_old and entry.startswith(base + ".old-") and os.path.isdir(full):
            ours = is_empty_dir(full) or is_ours(full)
        elif is_our_file is not None and entry.startswith(f".{base}.tmp-") and os.path.isfile(full):
            ours = is_our_file(full)
        if not ours:
            continue
        try:
            shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
            removed.append(full)
        except OSError:
            pass
    return removed


# ------------------------------------------------------------------ single files

def write_file(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into ``.NAME.tmp-XXXXXXXX`` beside ``path``, fsync, then ``os.replace`` onto ``path``
    (callers check first that ``path`` may be replaced). A failure removes the temporary file."""
    parent, base = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", dir=parent or ".")
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.remove(tmp)
    fsync_path(parent or ".")
