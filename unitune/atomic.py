"""Writes that a kill at any moment cannot tear: a temp name, flush, fsync, rename.

A reader (a resumed run, PEFT, a person) sees either the old file or the new one, never half of
one. Directories are built under a temp name and swapped in the same way; the rename of a
directory is atomic, and the parent directory is fsynced so the rename itself survives a crash.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP = ".tmp"  # every temporary name unitune writes ends with this; stale ones are swept on start
OLD = ".old"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (any descriptor opened read-only can be fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file below `path`, then the directories, deepest first."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            fsync_path(Path(root, name))
        fsync_path(Path(root))


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def temp_path(path: Path) -> Iterator[Path]:
    """A temp file name beside `path` for writers that take a path (matplotlib); renamed in on success."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}{TMP}{path.suffix}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def directory(final: Path) -> Iterator[Path]:
    """Build a directory under a temp name; on success it replaces `final` in two renames.

    The old copy is renamed aside before the new one is renamed in, so at every moment either
    `final` or `final.old` holds a complete copy (`recover` puts the old one back after a kill).
    """
    final = Path(final)
    tmp = final.with_name(final.name + TMP)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)
    old = final.with_name(final.name + OLD)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_tree(path: Path) -> None:
    """Delete a directory so that a kill midway never leaves a half-deleted one under its name."""
    path = Path(path)
    if path.exists():
        doomed = path.with_name(path.name + OLD + TMP)
        shutil.rmtree(doomed, ignore_errors=True)
        path.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def recover(folder: Path) -> None:
    """After a kill: put back a copy that was renamed aside and never replaced; drop temp leftovers."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.endswith(OLD) and p.is_dir():
            final = p.with_name(p.name[: -len(OLD)])
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.rename(final)
    for p in folder.iterdir():
        if p.name.endswith(TMP) or TMP + "." in p.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
