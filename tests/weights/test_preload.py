"""DRAM pre-loading on a real file: residency is measured (mincore), evict empties it, preload fills it."""

from __future__ import annotations

import os

import pytest

from deepflow.weights.preload import evict, model_files, preload, residency

SIZE = 8 << 20


@pytest.fixture
def weights(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(SIZE))
    (folder / "config.json").write_text("{}")
    return folder


def test_model_files_lists_weights_first(weights, tmp_path):
    files = model_files(weights)
    assert [p.name for p in files] == ["model.safetensors", "config.json"]
    with pytest.raises(FileNotFoundError):
        model_files(tmp_path)


def test_evict_then_preload(weights):
    files = model_files(weights)
    if residency(files).resident_bytes is None:
        pytest.skip("mincore is not available here")
    after_evict = evict(files)
    assert after_evict.total_bytes == SIZE + 2
    # DONTNEED on clean pages of an unmapped file drops them (ext4, tmpfs aside); allow a page of slack.
    if after_evict.resident_bytes > 2 * os.sysconf("SC_PAGE_SIZE"):
        pytest.skip(f"this filesystem keeps evicted pages ({after_evict.resident_bytes} bytes)")
    assert after_evict.is_hit() is False
    result = preload(files)
    assert result.bytes_read == SIZE + 2
    assert result.before.is_hit() is False
    assert residency(files).is_hit() is True
    # A second preload starts from a hit.
    assert preload(files).before.is_hit() is True
