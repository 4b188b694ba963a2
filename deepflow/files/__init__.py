"""The OpenAI files API's store (uploads for fine-tuning and batch, the platform's result files)."""

from deepflow.files.store import FileObject, FilePurpose, FileStore, FileTooLarge, NoSuchFile, jsonl_errors

__all__ = ["FileObject", "FilePurpose", "FileStore", "FileTooLarge", "NoSuchFile", "jsonl_errors"]
