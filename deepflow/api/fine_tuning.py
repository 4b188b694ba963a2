"""OpenAI's files and fine-tuning routes: `/v1/files` and `/v1/fine_tuning/jobs[...]`.

A fine-tuning request becomes three internal jobs (preprocess, train, evaluate: deepflow/finetune/jobs.py)
run by a worker process that `FineTuneManager` keeps alive; `FineTuningService.run` polls it every second
for as long as the app serves. Files and jobs live under the server's home (`$DEEPFLOW_HOME`), shared by
every job executor of the host through SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from deepflow.api.body import parse_body
from deepflow.api.errors import APIError, invalid
from deepflow.api.state import ServedModels
from deepflow.files import FilePurpose, FileStore, FileTooLarge, NoSuchFile, jsonl_errors
from deepflow.finetune.jobs import FineTuneStore, FTStatus, Hyperparameters, NoSuchJob
from deepflow.finetune.manager import FineTuneManager

__all__ = ["FineTuningService", "fine_tuning_router"]


class HyperparametersBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | str = Field("auto")
    batch_size: int | str = Field("auto")
    learning_rate_multiplier: float | str = Field("auto")


class FineTuneCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: HyperparametersBody | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)


def _check_hyperparameters(h: HyperparametersBody) -> Hyperparameters:
    for name, low, high in (("n_epochs", 1, 50), ("batch_size", 1, 256)):
        v = getattr(h, name)
        if isinstance(v, str) and v != "auto":
            raise invalid(f"{name} must be 'auto' or an integer", param=f"hyperparameters.{name}")
        if isinstance(v, int) and not low <= v <= high:
            raise invalid(f"{name} must be in [{low}, {high}]", param=f"hyperparameters.{name}")
    lr = h.learning_rate_multiplier
    if (isinstance(lr, str) and lr != "auto") or (not isinstance(lr, str) and not 0 < lr <= 100):
        raise invalid("learning_rate_multiplier must be 'auto' or in (0, 100]",
                      param="hyperparameters.learning_rate_multiplier")  # fmt: skip
    return Hyperparameters(n_epochs=h.n_epochs, batch_size=h.batch_size, learning_rate_multiplier=lr)


def _not_found(kind: str, ident: str) -> APIError:
    return APIError(f"No such {kind}: '{ident}'", status_code=404, param="id", code=f"{kind}_not_found")


class FineTuningService:
    def __init__(self, home: Path, *, max_upload_bytes: int = 512 << 20, max_workers: int = 1) -> None:
        self.home = Path(home)
        (self.home / "fine_tuning").mkdir(parents=True, exist_ok=True)
        self.files = FileStore(self.home, max_bytes=max_upload_bytes)
        self.jobs = FineTuneStore(self.home / "fine_tuning.sqlite")
        self.manager = FineTuneManager(self.home, self.jobs, max_workers=max_workers)
        self._task: asyncio.Task[None] | None = None

    async def run(self, period_s: float = 1.0) -> None:
        while True:
            await asyncio.to_thread(self.manager.poll)
            await asyncio.sleep(period_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.manager.shutdown()
        self.files.close()
        self.jobs.close()


def fine_tuning_router(service: FineTuningService, served: ServedModels, max_body_bytes: int) -> APIRouter:
    """The routes (mounted under /v1 with the API key); tenant "" until tenants are wired in."""
    r = APIRouter()
    tenant = ""

    # ---- files ----------------------------------------------------------------------------------------
    @r.post("/files")
    async def upload(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> JSONResponse:
        try:
            kind = FilePurpose(purpose)
        except ValueError:
            raise invalid(f"purpose must be one of fine-tune, batch, user_data; not {purpose!r}",
                          param="purpose") from None  # fmt: skip
        if not kind.uploadable:
            raise invalid(f"files with purpose {purpose!r} are written by the platform", param="purpose")
        data = await file.read(service.files.max_bytes + 1)
        if kind in (FilePurpose.FINE_TUNE, FilePurpose.BATCH):
            errors = await asyncio.to_thread(jsonl_errors, data)
            if errors:
                raise invalid("invalid JSONL: " + "; ".join(errors), param="file", code="invalid_file")
        try:
            obj = service.files.create(data, file.filename or "upload", kind, tenant)
        except FileTooLarge as exc:
            raise APIError(str(exc), status_code=413, param="file", code="file_too_large") from None
        return JSONResponse(msgspec.to_builtins(obj))

    @r.get("/files")
    async def list_files(
        purpose: str | None = None,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    ) -> JSONResponse:
        # Cursor pages (the client follows `after` while `has_more`), newest first.
        files = service.files.list(tenant, purpose)
        if after is not None:
            ids = [f.id for f in files]
            files = files[ids.index(after) + 1 :] if after in ids else []
        page = [msgspec.to_builtins(f) for f in files[:limit]]
        return JSONResponse({"object": "list", "data": page, "has_more": len(files) > limit,
                             "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None})  # fmt: skip

    @r.get("/files/{file_id}")
    async def get_file(file_id: str) -> JSONResponse:
        try:
            return JSONResponse(msgspec.to_builtins(service.files.get(file_id, tenant)))
        except NoSuchFile:
            raise _not_found("file", file_id) from None

    @r.get("/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        try:
            return Response(service.files.content(file_id, tenant), media_type="application/octet-stream")
        except NoSuchFile:
            raise _not_found("file", file_id) from None

    @r.delete("/files/{file_id}")
    async def delete_file(file_id: str) -> JSONResponse:
        try:
            service.files.delete(file_id, tenant)
        except NoSuchFile:
            raise _not_found("file", file_id) from None
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    # ---- fine-tuning jobs -----------------------------------------------------------------------------
    def job_or_404(job_id: str):
        try:
            return service.jobs.get(job_id, tenant)
        except NoSuchJob:
            raise _not_found("fine_tuning_job", job_id) from None

    @r.post("/fine_tuning/jobs")
    async def create(request: Request) -> JSONResponse:
        body = await parse_body(request, FineTuneCreate, max_body_bytes)
        state = served.get(body.model)  # 404 model_not_found for an unknown model
        for param, file_id in (
            ("training_file", body.training_file),
            ("validation_file", body.validation_file),
        ):
            if file_id is None:
                continue
            try:
                f = service.files.get(file_id, tenant)
            except NoSuchFile:
                raise invalid(f"no file {file_id!r}", param=param, code="invalid_file") from None
            if f.purpose != FilePurpose.FINE_TUNE:
                raise invalid(f"file {file_id!r} has purpose {f.purpose!r}, not 'fine-tune'", param=param)
        hp = _check_hyperparameters(body.hyperparameters or HyperparametersBody())
        job = service.jobs.create(
            model=state.served_model_name,
            base_model_path=str(state.engine.model_path),
            training_file=body.training_file,
            validation_file=body.validation_file,
            hyperparameters=hp,
            suffix=body.suffix,
            seed=body.seed if body.seed is not None else 0,
            tenant=tenant,
        )
        job = service.jobs.update(job.id, lambda j: setattr(j, "status", FTStatus.QUEUED))
        service.start()
        await asyncio.to_thread(service.manager.poll)
        return JSONResponse(service.jobs.get(job.id).to_openai())

    @r.get("/fine_tuning/jobs")
    async def list_jobs(
        after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
    ) -> JSONResponse:
        jobs = service.jobs.list(tenant, limit + 1, after)
        return JSONResponse({"object": "list", "data": [j.to_openai() for j in jobs[:limit]],
                             "has_more": len(jobs) > limit})  # fmt: skip

    @r.get("/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str) -> JSONResponse:
        job = job_or_404(job_id)
        body: dict[str, Any] = job.to_openai()
        body["deepflow"] = job.to_platform()  # the three internal jobs, beside OpenAI's fields
        return JSONResponse(body)

    @r.post("/fine_tuning/jobs/{job_id}/cancel")
    async def cancel(job_id: str) -> JSONResponse:
        job = job_or_404(job_id)
        if job.status.terminal:
            raise invalid(f"the job is already {job.status.value}", param="id", code="job_not_cancellable")
        return JSONResponse(service.manager.cancel(job_id).to_openai())

    @r.get("/fine_tuning/jobs/{job_id}/events")
    async def events(job_id: str, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> JSONResponse:  # fmt: skip
        job_or_404(job_id)
        data = service.jobs.events(job_id, limit + 1, after)
        return JSONResponse({"object": "list", "data": data[:limit], "has_more": len(data) > limit})

    @r.get("/fine_tuning/jobs/{job_id}/checkpoints")
    async def checkpoints(job_id: str, limit: Annotated[int, Query(ge=1, le=100)] = 10) -> JSONResponse:
        job_or_404(job_id)
        data = service.jobs.checkpoints(job_id, limit)
        return JSONResponse({"object": "list", "data": data, "has_more": False})

    return r
