"""The main host's HTTP API (FastAPI on hypercorn's trio worker).

Every `/api/` route needs the admin key (`DATA/admin.key`) as a bearer token. This module owns
routes and authentication only; what a route returns comes from the running `MainHost`.
"""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Any

import trio
from fastapi import Depends, FastAPI, HTTPException, Request
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from pydantic import BaseModel, ConfigDict

from mainhost import announce
from mainhost.config import ADMIN_KEY

if TYPE_CHECKING:
    from mainhost.service import MainHost


def build_app(host: MainHost) -> FastAPI:
    admin_key = (host.data / ADMIN_KEY).read_text().strip()
    app = FastAPI(title="branchpbx main host", version="0.1")

    def require_admin(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Bytes: compare_digest refuses non-ASCII str, which would make a bad header a 500.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), admin_key.encode()
        ):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong admin key (Authorization: Bearer <DATA/admin.key>)",
            )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/status", dependencies=[Depends(require_admin)])
    async def status() -> dict[str, Any]:
        return await host.snapshot()

    @app.get("/api/offices/{name}/log", dependencies=[Depends(require_admin)])
    async def office_log(name: str) -> list[dict[str, Any]]:
        return await trio.to_thread.run_sync(host.store.office_log, name)

    @app.get("/api/announcements", dependencies=[Depends(require_admin)])
    async def announcements() -> list[dict[str, Any]]:
        return await trio.to_thread.run_sync(lambda: announce.summaries(host.store, time.time()))

    @app.post("/api/announcements", dependencies=[Depends(require_admin)], status_code=201)
    async def add_announcement(request: AnnouncementRequest) -> dict[str, Any]:
        try:
            sent = await trio.to_thread.run_sync(
                lambda: announce.announce(
                    host.store,
                    request.text,
                    now=time.time(),
                    office=request.office,
                    extensions=request.extensions(),
                    expires=request.expires,
                )
            )
        except announce.AnnounceError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        host.trunk.announcer.poke()
        rows = await trio.to_thread.run_sync(lambda: announce.summaries(host.store, time.time()))
        return next(row for row in rows if row["id"] == sent.id)

    return app


class AnnouncementRequest(BaseModel):
    """The body of `POST /api/announcements`, as `mainhost announce` takes it."""

    model_config = ConfigDict(extra="forbid")
    text: str
    office: str | None = None
    ext: list[str] | str | None = None
    expires: float = announce.DEFAULT_EXPIRES

    def extensions(self) -> list[str]:
        if self.ext is None:
            return []
        return [self.ext] if isinstance(self.ext, str) else self.ext


async def serve_api(
    host: MainHost,
    listen: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    config = HypercornConfig()
    config.bind = [f"{listen}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0
    await serve(build_app(host), config, task_status=task_status)  # type: ignore[arg-type]
