"""The files store: durable content, tenant isolation, size limit, JSONL line errors."""

from __future__ import annotations

import pytest

from deepflow.files import FilePurpose, FileStore, FileTooLarge, NoSuchFile, jsonl_errors


@pytest.fixture
def store(tmp_path):
    s = FileStore(tmp_path, max_bytes=1000, clock=lambda: 1234.0)
    yield s
    s.close()


def test_create_get_content_list_delete(store, tmp_path):
    f = store.create(b'{"a": 1}\n', "train.jsonl", FilePurpose.FINE_TUNE, tenant="t1")
    assert f.id.startswith("file-") and f.bytes == 9 and f.created_at == 1234 and f.purpose == "fine-tune"
    assert store.get(f.id, "t1") == f
    assert store.content(f.id, "t1") == b'{"a": 1}\n'
    assert [x.id for x in store.list("t1")] == [f.id]
    assert store.list("t1", purpose="batch") == []
    # Another process sees it (SQLite + files on disk).
    other = FileStore(tmp_path)
    assert other.content(f.id, "t1") == b'{"a": 1}\n'
    other.close()
    store.delete(f.id, "t1")
    with pytest.raises(NoSuchFile):
        store.get(f.id, "t1")
    assert not (tmp_path / "files" / f.id).exists()


def test_another_tenant_sees_nothing(store):
    f = store.create(b"{}", "x.jsonl", "batch", tenant="t1")
    for call in (store.get, store.content, store.delete):
        with pytest.raises(NoSuchFile):
            call(f.id, "t2")
    assert store.list("t2") == [] and store.get(f.id, "t1")


def test_limits_and_purposes(store):
    with pytest.raises(FileTooLarge):
        store.create(b"x" * 1001, "big", "batch")
    with pytest.raises(ValueError):
        store.create(b"{}", "x", "not-a-purpose")
    assert FilePurpose.BATCH.uploadable and not FilePurpose.BATCH_OUTPUT.uploadable


def test_jsonl_errors_name_their_lines():
    data = b'{"ok": 1}\n\n[1]\n{bad\n\xff\xfe\n{"ok": 2}\n'
    errors = jsonl_errors(data)
    assert [e.split(":")[0] for e in errors] == ["line 3", "line 4", "line 5"]
    assert "not a JSON object" in errors[0] and "not valid JSON" in errors[1] and "not UTF-8" in errors[2]
    assert jsonl_errors(b'{"a": 1}\n{"b": 2}') == []
