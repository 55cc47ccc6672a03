"""A directory laid out as the kubelet lays out a mounted ConfigMap, updated as it updates one."""

from __future__ import annotations

import os
from pathlib import Path


class ConfigMapVolume:
    """``dir/KEY -> ..data/KEY``, ``..data -> ..<version>/``; an update writes a new version directory and
    swaps the ``..data`` symlink atomically, so the file's own path never changes and its mtime can be
    anything (here: the old file's, to show that only content tells the change)."""

    def __init__(self, root: Path, key: str, content: str) -> None:
        self.root = root
        self.key = key
        self._version = 0
        root.mkdir(parents=True, exist_ok=True)
        self._write(content, mtime=None)
        os.symlink(f"..data/{key}", root / key)

    @property
    def path(self) -> Path:
        return self.root / self.key

    def update(self, content: str) -> None:
        self._write(content, mtime=os.stat(self.path).st_mtime)

    def _write(self, content: str, mtime: float | None) -> None:
        self._version += 1
        version = self.root / f"..{self._version}"
        version.mkdir()
        (version / self.key).write_text(content, encoding="utf-8")
        if mtime is not None:
            os.utime(version / self.key, (mtime, mtime))
        os.symlink(version.name, self.root / "..data_tmp")
        os.replace(self.root / "..data_tmp", self.root / "..data")
