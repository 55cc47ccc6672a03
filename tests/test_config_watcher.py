"""The --config watcher notices a ConfigMap-style update (symlink swap, unchanged mtime) and nothing else."""

from __future__ import annotations

import os
import threading

from filter_worker.service.config_watcher import ConfigWatcher
from tests.k8s_config import ConfigMapVolume

_INTERVAL_S = 0.02
_SETTLE_S = 20 * _INTERVAL_S  # long enough for many polls


def test_a_content_change_behind_a_symlink_swap_is_noticed_once(tmp_path):
    volume = ConfigMapVolume(tmp_path / "mount", "filter-worker.toml", "[routing]\nshadow = false\n")
    changed = threading.Event()
    calls: list[int] = []

    def on_change() -> None:
        calls.append(1)
        changed.set()

    watcher = ConfigWatcher(str(volume.path), on_change, interval_s=_INTERVAL_S).start()
    try:
        assert not changed.wait(_SETTLE_S), "nothing changed yet"
        before = os.stat(volume.path).st_mtime
        volume.update("[routing]\nshadow = true\n")
        assert os.stat(volume.path).st_mtime == before, "the test must not rely on the mtime"
        assert changed.wait(5), "the new content was not noticed"
        changed.clear()
        assert not changed.wait(_SETTLE_S), "one change, one reload"
        volume.update("[routing]\nshadow = true\n")  # same content, new version directory
        assert not changed.wait(_SETTLE_S), "a rewrite with the same content is not a change"
    finally:
        watcher.stop()
    assert calls == [1]


def test_a_missing_file_is_no_change_and_its_return_with_new_content_is(tmp_path):
    path = tmp_path / "filter.toml"
    path.write_text("[routing]\nshadow = false\n")
    changed = threading.Event()
    watcher = ConfigWatcher(str(path), changed.set, interval_s=_INTERVAL_S).start()
    try:
        path.unlink()
        assert not changed.wait(_SETTLE_S), "a file that is gone (mid-update) keeps the last rules"
        path.write_text("[routing]\nshadow = true\n")
        assert changed.wait(5)
    finally:
        watcher.stop()
