"""One path policy for everything that names files from data: manifests, importers, shard indexes.

    from medvlp.data_shards.paths import PathPolicy, plain_name
    policy = PathPolicy.for_source(manifest.parent, extra_roots=[args.root] if args.root else (),
                                   follow_symlinks=False)
    real = policy.resolve(row_value, base=manifest.parent, what="line 3: column 'image'")   # -> Path, or PathError
    policy.check(path_already_joined, what="files/p10/s1.txt")                          # the same, for a built path
    name = plain_name(entry["name"], where="index.json shards[3]")                  # a file name, never a path

Rules (what `resolve`/`check` refuse, with one line naming the item):
* a path that, written out (`..` folded, no file system access), lies outside every root: `../../etc/passwd`, or an
  absolute path elsewhere. The root is the manifest's folder (or the importer's source folder) by default; more
  roots widen it (`shards build --root DIR`, an importer's `root=`/`volumes=` options);
* a path whose real location (symlinks followed) lies outside every root, unless `follow_symlinks` is set
  (`shards build --follow-symlinks`, importer option `follow_symlinks=true`): the user says the links are theirs;
* a FIFO, socket or device (opening one blocks or reads a stream); a folder is checked file by file (a DICOM
  series) with the same rules.
Missing files are not this module's business (`FileNotFoundError` from whoever opens them).

`plain_name` is the rule for names stored in an index.json: a shard name is one file name (no `/`, `\\`, `..`,
NUL or control characters, not empty), so an index can neither read nor make a file outside its folder.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable


class PathError(ValueError):
    """A path that the policy refuses; the message names the item and why. `reason`: "outside" (the written path
    leaves every root), "symlink" (its real location does), "special" (a FIFO, socket or device), or "" (a name)."""

    user_facing = True

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return (PathError, (str(self), self.reason))


def plain_name(name: object, where: str = "") -> str:
    """`name` when it is a plain file name; PathError otherwise (a path, `..`, empty, control characters)."""
    pre = f"{where}: " if where else ""
    if not isinstance(name, str) or not name:
        raise PathError(f"{pre}shard name {name!r} is not a file name")
    if name in (".", "..") or "/" in name or "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise PathError(f"{pre}shard name {name!r} is not a plain file name (no folders, '..' or control "
                        "characters); the index was edited or crafted")
    return name


def _under(p: str, roots: Iterable[str]) -> bool:
    return any(p == r or p.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


@dataclass(frozen=True)
class PathPolicy:
    """Paths from data must stay under one of `roots` (lexically and, unless `follow_symlinks`, really)."""

    roots: tuple[str, ...]  # absolute, normalised (not symlink-resolved) root folders
    follow_symlinks: bool = False  # True: a symlink may point outside the roots
    real_roots: tuple[str, ...] = field(default=(), compare=False)  # the roots with their symlinks resolved

    @classmethod
    def for_source(cls, root: str | os.PathLike, extra_roots: Iterable[str | os.PathLike] = (),
                   follow_symlinks: bool = False) -> "PathPolicy":
        """The policy of a manifest / source tree at `root`, widened by `extra_roots`."""
        roots = [os.path.abspath(os.fspath(r)) for r in (root, *extra_roots) if os.fspath(r)]
        return cls(tuple(dict.fromkeys(roots)), follow_symlinks, tuple(dict.fromkeys(os.path.realpath(r)
                                                                                      for r in roots)))

    def _what_roots(self) -> str:
        return ", ".join(self.roots) if len(self.roots) > 1 else self.roots[0]

    def resolve(self, given: str | os.PathLike, base: str | os.PathLike | None = None, what: str = "",
                walk: bool = True) -> Path:
        """`given` (relative to `base`, default the first root) checked against the policy; returns the path."""
        base = os.fspath(base) if base is not None else self.roots[0]
        p = os.fspath(given)
        return self.check(p if os.path.isabs(p) else os.path.join(base, p), what=what, given=p, walk=walk)

    def check(self, path: str | os.PathLike, what: str = "", given: str | None = None, walk: bool = True) -> Path:
        """A path already joined to its base, checked against the policy (see the module doc). `walk=False`: a
        folder is checked itself, not file by file (for callers that check each file they then open)."""
        pre = f"{what}: " if what else ""
        shown = given if given is not None else os.fspath(path)
        lex = os.path.abspath(os.fspath(path))
        if not _under(lex, self.roots):
            raise PathError(f"{pre}{shown!r} lies outside the data root {self._what_roots()}; paths in a manifest "
                            "resolve under its folder (widen it with --root DIR, importers: root=DIR)", "outside")
        self._check_real(lex, pre, shown)
        if walk and os.path.isdir(lex):
            for dirpath, dirnames, filenames in os.walk(lex, followlinks=self.follow_symlinks):
                for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                    self._check_real(os.path.join(dirpath, name), pre, os.path.join(shown, os.path.relpath(
                        os.path.join(dirpath, name), lex)))
        return Path(lex)

    def _check_real(self, lex: str, pre: str, shown: str) -> None:
        real = os.path.realpath(lex)
        if not self.follow_symlinks and not _under(real, self.real_roots):
            raise PathError(f"{pre}{shown!r} is a symlink to {real}, outside the data root {self._what_roots()}; "
                            "refused (allow with --follow-symlinks, importers: follow_symlinks=true)", "symlink")
        try:
            mode = os.stat(real).st_mode
        except OSError:
            return  # missing: the caller reports it
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
            raise PathError(f"{pre}{shown!r} is {kind}, not a file (reading it would block or never end)",
                            "special")

    def read_text(self, path: str | os.PathLike, what: str = "") -> str:
        """The text of a file the policy allows: UTF-8 (a BOM is dropped), no NUL bytes; PathError naming the file
        and the first bad byte otherwise (a Latin-1 or binary report is refused, not stored with U+FFFD / NUL)."""
        p = self.check(path, what=what)
        return decode_text(p.read_bytes(), what or str(path))


def decode_text(raw: bytes, what: str) -> str:
    """Strict UTF-8 text of a report file (BOM dropped); PathError naming `what` and the offending byte."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise PathError(f"{what}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); convert it to UTF-8 "
                        "(e.g. iconv -f latin1 -t utf-8)") from None
    if "\0" in text:
        line = text[:text.index("\0")].count("\n") + 1
        raise PathError(f"{what}: holds NUL bytes (line {line}): a binary file, not a report")
    return text
