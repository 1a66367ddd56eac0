"""Output folders of predict, evaluate and the demo: one run's outputs, never mixed with another's.

A run writes a list of what it wrote, `.patchcore-fast-outputs`, into its folder. A later run refuses
a folder that holds files (another run's outputs, or anything else) unless `overwrite`, which first
removes exactly the files the previous run listed; files it did not write are never removed, so a
folder holding files of unknown origin is refused even then.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

MANIFEST = ".patchcore-fast-outputs"


class OutputFolder:
    def __init__(self, path, overwrite: bool = False, flag: str = "--out"):
        self.path, self.overwrite, self.flag = Path(path), overwrite, flag

    def check(self) -> "OutputFolder":
        """Before any work: the folder can be written, and holds no other run's outputs (or may
        replace them). Nothing is written."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.flag} {self.path} is a file; give a folder")
        existing = next(p for p in [self.path, *self.path.parents] if p.exists())
        if not _can_create_in(existing):
            raise PermissionError(f"{self.flag} {self.path}: cannot write to {existing}")
        if not self.path.is_dir():
            return self
        present = [p for p in self.path.rglob("*") if p.is_file() and p.name != MANIFEST]
        ours = set(self._previous(present))
        foreign = [p for p in present if str(p.relative_to(self.path)) not in ours]
        if foreign and (self.overwrite or not ours):
            raise ValueError(f"{self.flag} {self.path} holds {len(foreign)} file(s) patchcore-fast did not write "
                             f"(e.g. {foreign[0].relative_to(self.path)}): choose an empty or new folder")
        if present and not self.overwrite:
            raise ValueError(f"{self.flag} {self.path} holds the outputs of an earlier run ({len(present)} files): "
                             "pass --overwrite to replace them, or choose another folder")
        return self

    def prepare(self) -> Path:
        """Creates the folder and removes the previous run's outputs (after `check`, with overwrite)."""
        self.path.mkdir(parents=True, exist_ok=True)
        present = [p for p in self.path.rglob("*") if p.is_file() and p.name != MANIFEST]
        for name in self._previous(present):
            (self.path / name).unlink(missing_ok=True)
        for folder in sorted((p for p in self.path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(folder.iterdir()):
                folder.rmdir()
        # Until finish(), everything in the folder is this run's (it held nothing else): an
        # interrupted run's partial outputs are then replaced by the next --overwrite.
        (self.path / MANIFEST).write_text(json.dumps({"complete": False, "files": []}))
        return self.path

    def finish(self) -> None:
        """Records the run's outputs: every file now in the folder."""
        found = sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file() and p.name != MANIFEST)
        (self.path / MANIFEST).write_text(json.dumps({"complete": True, "files": found}, indent=0))

    def _previous(self, present) -> list[str]:
        """The files an earlier run wrote here: those it listed, or all present if it did not finish."""
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            return []
        if not manifest.get("complete"):
            return [str(p.relative_to(self.path)) for p in present]
        return list(manifest.get("files", []))


def _can_create_in(folder: Path) -> bool:
    """Whether a file can really be created in `folder` (os.access says yes for root on /proc)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".patchcore-fast-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def check_writable_file(path, flag: str = "--out") -> Path:
    """Before any work: `path` can be created as a file (its folder exists and takes new files)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'model.pcf'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: no folder {parent}")
    if not _can_create_in(parent):
        raise PermissionError(f"{flag} {path}: cannot create files in {parent}")
    return path
