"""The dashboard's Starlette app: JSON views of run directories and a server-sent-events stream of
each run's metrics.jsonl, read from the files alone (nothing from a request is executed or imported;
a run name must be one of the listed directories)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fedloom.tracking.rundir import CONFIG, GRAPH, METRICS, PARTITION, SUMMARY, to_json

STATIC = Path(__file__).with_name("static")
PAGE = Path(__file__).with_name("index.html")


def read_complete(path: Path, offset: int = 0) -> tuple[list[tuple[int, dict]], int]:
    """The records on the complete lines after byte ``offset``, each with the offset after its line, and
    the offset after the last complete line: a torn last line waits for its newline."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    records = []
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines(keepends=True):
        offset += len(line)
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a corrupt line: skipped, not fatal to a view
        if isinstance(record, dict):
            records.append((offset, record))
    return records, offset


def _summary(run: Path) -> dict | None:
    try:
        return json.loads((run / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def list_runs(root: Path) -> dict[str, Path]:
    """Run directories directly under ``root``, by name."""
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir())
            if p.is_dir() and any((p / f).is_file() for f in (CONFIG, METRICS, SUMMARY))}


def run_info(name: str, run: Path) -> dict:
    """Name, status (``running``: metrics but no summary yet), rounds done and the last central metric."""
    summary = _summary(run)
    records = [r for _, r in read_complete(run / METRICS)[0]]
    status = summary.get("status", "unknown") if summary else "running" if (run / METRICS).is_file() else "starting"
    rounds = max((r["round"] for r in records if isinstance(r.get("round"), int)), default=0)
    metric = value = None
    for record in reversed(records):
        keys = [k for k in record if k.startswith("central_") and k != "central_loss"] or \
            [k for k in record if k == "central_loss"]
        if keys:
            metric = "central_accuracy" if "central_accuracy" in keys else keys[0]
            value = record[metric]
            break
    return {"name": name, "status": status, "rounds": rounds, "metric": metric, "value": value}


def create_app(root: str | Path, poll_s: float = 0.5) -> Starlette:
    """The dashboard's Starlette app over the run directories under ``root``: the page, its scripts, the runs'
    JSON views and a server-sent event stream per run, which polls metrics.jsonl every ``poll_s`` seconds."""
    root = Path(root)

    def run_dir(request: Request) -> Path:
        name = request.path_params["name"]
        runs = list_runs(root)
        if "/" in name or "\\" in name or ".." in name or name not in runs:
            raise HTTPException(404, f"no run {name!r}")
        return runs[name]

    def json_file(filename: str):
        async def endpoint(request: Request) -> FileResponse:
            path = run_dir(request) / filename
            if not path.is_file():
                raise HTTPException(404, f"the run has no {filename}")
            return FileResponse(path, media_type="application/json")
        return endpoint

    async def page(request: Request) -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    async def runs(request: Request) -> JSONResponse:
        return JSONResponse([run_info(name, path) for name, path in list_runs(root).items()])

    async def metrics(request: Request) -> JSONResponse:
        return JSONResponse([r for _, r in read_complete(run_dir(request) / METRICS)[0]])

    async def stream(request: Request) -> StreamingResponse:
        run = run_dir(request)
        start = request.headers.get("last-event-id", "0")  # an EventSource reconnecting resumes there
        offset = int(start) if start.isdigit() else 0
        return StreamingResponse(_events(run, offset, poll_s), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    routes = [Route("/", page), Route("/api/runs", runs), Route("/api/runs/{name}/metrics", metrics),
              Route("/api/runs/{name}/stream", stream), Route("/api/runs/{name}/partition", json_file(PARTITION)),
              Route("/api/runs/{name}/graph", json_file(GRAPH)), Route("/api/runs/{name}/summary", json_file(SUMMARY)),
              Mount("/static", StaticFiles(directory=STATIC))]
    return Starlette(routes=routes)


async def _events(run: Path, offset: int, poll_s: float):
    """Each complete metrics line from ``offset`` on as an SSE message (id: the offset after it), polling the
    file every ``poll_s``; an ``end`` event once the run has its summary and nothing more is left to send."""
    path = run / METRICS
    while True:
        done = (run / SUMMARY).is_file()  # before reading: lines written before the summary are all sent
        records, offset = read_complete(path, offset)
        for end, record in records:
            yield f"id: {end}\ndata: {to_json(record)}\n\n"
        if done:
            yield "event: end\ndata: {}\n\n"
            return
        await asyncio.sleep(poll_s)
