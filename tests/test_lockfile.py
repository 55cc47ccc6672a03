"""Lock files on real model files: pull from a hub cache, verify, and the worker's refusal to load a mismatch."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from filter_worker.config import ModelSettings
from filter_worker.model import lockfile
from filter_worker.model.classifier import Classifier, ModelLoadError
from tests.conftest import HUB_COMMIT, HUB_REPO


@pytest.fixture
def pulled(hub_cache, tmp_path):
    target = tmp_path / "pulled"
    lock = lockfile.pull(HUB_REPO, None, target, cache_dir=hub_cache, local_files_only=True)
    return target, lock


def flip_byte(path, position: int = -100) -> None:
    """In the tensor data, not the header: the file still parses, only the hash can tell."""
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def test_pull_copies_config_tokenizer_and_safetensors_and_locks_the_resolved_commit(pulled, keyword_model):
    target, lock = pulled
    expected = sorted(p.name for p in keyword_model.iterdir() if p.is_file())
    assert sorted(p.name for p in target.iterdir() if p.name != lockfile.LOCK_NAME) == expected
    assert not (target / "pytorch_model.bin").exists() and not (target / "README.md").exists()
    document = json.loads((target / lockfile.LOCK_NAME).read_text())
    assert document["model_id"] == HUB_REPO and document["revision"] == HUB_COMMIT
    weights = (keyword_model / "model.safetensors").read_bytes()
    entry = next(f for f in document["files"] if f["path"] == "model.safetensors")
    assert entry == {"path": "model.safetensors", "size": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
    assert document["weights_sha256"] == lock.weights_sha256 == hashlib.sha256(weights).hexdigest()
    assert lockfile.read_lock(target) == lock
    assert lockfile.verify_directory(target, lock) == []


def test_pull_refuses_a_non_empty_directory_and_an_unknown_revision(hub_cache, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(lockfile.LockError, match="not an empty directory"):
        lockfile.pull(HUB_REPO, None, tmp_path, cache_dir=hub_cache, local_files_only=True)
    with pytest.raises(lockfile.LockError, match="revision v9.* is not in the local cache"):
        lockfile.pull(HUB_REPO, "v9", tmp_path / "new", cache_dir=hub_cache, local_files_only=True)


def test_verify_names_a_flipped_byte_a_truncation_a_missing_file_and_an_unlocked_pickle(pulled):
    target, lock = pulled
    flip_byte(target / "model.safetensors")
    with (target / "tokenizer.json").open("r+b") as f:
        f.truncate(10)
    (target / "config.json").unlink()
    (target / "pytorch_model.bin").write_bytes(b"pickle")
    (target / "notes.md").write_text("not loadable, so not reported")
    problems = {p.path: p.problem for p in lockfile.verify_directory(target, lock)}
    assert set(problems) == {"model.safetensors", "tokenizer.json", "config.json", "pytorch_model.bin"}
    assert problems["model.safetensors"].startswith("sha256 ") and lock.weights_sha256 in problems["model.safetensors"]
    assert problems["tokenizer.json"].startswith("size 10 bytes")
    assert problems["config.json"] == "missing"
    assert problems["pytorch_model.bin"] == "not in the lock file"


def test_weights_hash_of_shards_is_sha256sum_output_hashed():
    hashes = {"model-2.safetensors": "b" * 64, "model-1.safetensors": "a" * 64, "config.json": "c" * 64}
    listing = f"{'a' * 64}  model-1.safetensors\n{'b' * 64}  model-2.safetensors\n"
    assert lockfile.weights_sha256(hashes) == hashlib.sha256(listing.encode()).hexdigest()
    assert lockfile.weights_sha256({"model.safetensors": "d" * 64, "config.json": "c" * 64}) == "d" * 64


def test_a_locked_directory_loads_under_its_model_id_and_commit(pulled):
    target, lock = pulled
    model = Classifier.load(ModelSettings(name=str(target)))
    assert (model.name, model.revision, model.weights_sha256) == (HUB_REPO, HUB_COMMIT, lock.weights_sha256)
    assert model.identity == f"{HUB_REPO}@{HUB_COMMIT}#sha256:{lock.weights_sha256[:16]}"


def test_a_mismatch_stops_the_load_naming_the_file_unless_verification_is_off(pulled):
    target, _ = pulled
    flip_byte(target / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: sha256 ") as err:
        Classifier.load(ModelSettings(name=str(target)))
    assert "FILTER_MODEL__VERIFY=false" in str(err.value)
    model = Classifier.load(ModelSettings(name=str(target), verify=False))
    assert model.revision == "local", "an unverified lock's claims are not reported"
    assert model.weights_sha256 == hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest()


def test_verify_true_requires_a_lock_file(keyword_model, tmp_path):
    copy = tmp_path / "unlocked"
    shutil.copytree(keyword_model, copy)
    with pytest.raises(ModelLoadError, match=f"no {lockfile.LOCK_NAME}"):
        Classifier.load(ModelSettings(name=str(copy), verify=True))
    with pytest.raises(ModelLoadError, match="needs a local model directory"):
        Classifier.load(ModelSettings(name=HUB_REPO, verify=True))
    Classifier.load(ModelSettings(name=str(copy)))  # auto: no lock, nothing to verify


def test_missing_model_files_names_what_a_directory_lacks(keyword_model, tmp_path):
    assert lockfile.missing_model_files(keyword_model) == []
    assert lockfile.missing_model_files(tmp_path) == ["config.json", "tokenizer.json", "*.safetensors weights"]
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vocab.txt").write_text("[PAD]\n")  # a fast tokenizer can be converted from a vocabulary
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    assert lockfile.missing_model_files(tmp_path) == ["*.safetensors weights"]
