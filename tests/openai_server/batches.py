"""OpenAI's Batch API for the local test server: ``/v1/files`` and ``/v1/batches``.

A batch is a JSONL file of chat completion requests (``files.create(purpose="batch")``) run by
``batches.create``; it goes ``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed``,
and its answers come back as an output file (and an error file for the requests that failed), one
JSON line per request, matched by ``custom_id``. Here each request is answered by the same
deterministic logic as a live request (:func:`~tests.openai_server.server.answer_for`, markers
included, so ``[[fail=400]]`` in a prompt puts that row in the error file), and the clock is the
server's:

- ``batch_delay_s``: seconds from creation until every request is done; request ``i`` of ``n`` is
  done at ``(i + 1) / n`` of it, so the counts move and a cancel keeps the answers done so far;
- ``batch_expire_s``: a batch not done this long after creation expires, keeping what was done;
- both are read when a batch is looked at, so a test can finish a waiting batch by setting the
  delay to 0.

Every batch created is kept in :attr:`BatchState.batches` so tests can count them, across processes.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["BatchState", "add_batch_routes"]

_TERMINAL = ("completed", "expired", "cancelled", "failed")


@dataclass
class StoredFile:
    id: str
    purpose: str
    filename: str
    data: bytes
    created_at: int

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}


@dataclass
class StoredBatch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None
    created: float  # time.time()
    lines: list[dict[str, Any]]  # the requests, in file order
    status: str = "validating"
    cancelled_at: float | None = None
    ended_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    done: int = 0  # requests answered when the batch ended


@dataclass
class BatchState:
    """Files and batches the server holds; the settings tests change."""

    batch_delay_s: float = 0.0
    batch_expire_s: float | None = None
    validate_s: float = 0.0
    files: dict[str, StoredFile] = field(default_factory=dict)
    batches: dict[str, StoredBatch] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: int = 0

    def new_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{int(time.time() * 1000):x}{self.counter:04d}"

    def reset(self) -> None:
        with self.lock:
            self.files.clear()
            self.batches.clear()
        self.batch_delay_s, self.batch_expire_s, self.validate_s = 0.0, None, 0.0


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                        "code": None}}, status=status)


def _batch_json(batch: StoredBatch) -> dict[str, Any]:
    total = len(batch.lines)
    failed = sum(1 for line in batch.lines[: batch.done] if line.get("_status", 200) != 200)
    created = int(batch.created)
    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint, "errors": None,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": batch.status, "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
        "created_at": created, "in_progress_at": None, "expires_at": created + 86400, "finalizing_at": None,
        "completed_at": int(batch.ended_at) if batch.status == "completed" and batch.ended_at else None,
        "failed_at": None,
        "expired_at": int(batch.ended_at) if batch.status == "expired" and batch.ended_at else None,
        "cancelling_at": int(batch.cancelled_at) if batch.cancelled_at else None,
        "cancelled_at": int(batch.ended_at) if batch.status == "cancelled" and batch.ended_at else None,
        "request_counts": {"total": total, "completed": batch.done - failed, "failed": failed},
        "metadata": batch.metadata,
    }


def add_batch_routes(app: web.Application, state: BatchState, answer: Any) -> None:
    """Serve the Files and Batches endpoints on ``app``; ``answer(body) -> (status, json)`` answers one request."""

    def advance(batch: StoredBatch) -> None:
        """Bring ``batch`` up to now on the server's clock (called under the lock)."""
        if batch.status in _TERMINAL:
            return
        now = time.time()
        n = len(batch.lines)
        if now < batch.created + state.validate_s:
            return
        delay = state.batch_delay_s
        elapsed = now - batch.created - state.validate_s
        done = n if delay <= 0 else min(n, math.floor(n * elapsed / delay + 1e-9))
        end = None
        if batch.cancelled_at is not None:
            done = min(done, math.floor(n * max(0.0, batch.cancelled_at - batch.created) / delay + 1e-9)
                       if delay > 0 else n)
            end = "cancelled"
        elif state.batch_expire_s is not None and now >= batch.created + state.batch_expire_s and done < n:
            done = min(done, math.floor(n * state.batch_expire_s / delay)) if delay > 0 else done
            end = "expired"
        elif done >= n:
            end = "completed"
        batch.status = "in_progress"
        for line in batch.lines[batch.done:done]:
            status, payload = answer(line["body"])
            line["_status"], line["_payload"] = status, payload
        batch.done = max(batch.done, done)
        if end is not None:
            finish(batch, end, now)

    def finish(batch: StoredBatch, status: str, now: float) -> None:
        out, errors = [], []
        for i, line in enumerate(batch.lines):
            record: dict[str, Any] = {"id": f"batch_req_{batch.id}_{i}", "custom_id": line["custom_id"]}
            if i < batch.done:
                code = line["_status"]
                record["response"] = {"status_code": code, "request_id": f"req_{i}", "body": line["_payload"]}
                record["error"] = None
                (out if code == 200 else errors).append(record)
            else:
                reason = "batch_expired" if status == "expired" else "batch_cancelled"
                text = ("This request could not be executed before the completion window expired."
                        if status == "expired" else "This request was cancelled.")
                record["response"] = None
                record["error"] = {"code": reason, "message": text}
                errors.append(record)
        for records, attr in ((out, "output_file_id"), (errors, "error_file_id")):
            if records:
                data = "".join(json.dumps(r) + "\n" for r in records).encode()
                file = StoredFile(state.new_id("file"), "batch_output", f"{batch.id}_{attr}.jsonl", data, int(now))
                state.files[file.id] = file
                setattr(batch, attr, file.id)
        batch.status, batch.ended_at = status, now

    async def create_file(request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        purpose = form.get("purpose")
        if upload is None or not hasattr(upload, "file"):
            return _error(400, "missing file")
        data = upload.file.read()
        with state.lock:
            stored = StoredFile(state.new_id("file"), str(purpose), upload.filename or "upload.jsonl", data,
                                int(time.time()))
            state.files[stored.id] = stored
        return web.json_response(stored.as_json())

    async def get_file(request: web.Request) -> web.Response:
        with state.lock:
            stored = state.files.get(request.match_info["file_id"])
        if stored is None:
            return _error(404, f"No such File object: {request.match_info['file_id']}")
        return web.json_response(stored.as_json())

    async def file_content(request: web.Request) -> web.Response:
        with state.lock:
            stored = state.files.get(request.match_info["file_id"])
        if stored is None:
            return _error(404, f"No such File object: {request.match_info['file_id']}")
        return web.Response(body=stored.data, content_type="application/octet-stream")

    async def create_batch(request: web.Request) -> web.Response:
        body = await request.json()
        with state.lock:
            stored = state.files.get(body.get("input_file_id", ""))
        if stored is None or stored.purpose != "batch":
            return _error(400, f"input_file_id {body.get('input_file_id')!r} is not a file uploaded for batch")
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return _error(400, "endpoint must be /v1/chat/completions and completion_window 24h")
        lines, seen = [], set()
        for number, raw in enumerate(stored.data.decode().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                return _error(400, f"line {number} of the input file is not JSON")
            if (line.get("method") != "POST" or line.get("url") != "/v1/chat/completions"
                    or not isinstance(line.get("body"), dict) or not isinstance(line.get("custom_id"), str)):
                return _error(400, f"line {number}: needs custom_id, method POST, url /v1/chat/completions, body")
            if line["custom_id"] in seen:
                return _error(400, f"line {number}: custom_id {line['custom_id']!r} is not unique in the file")
            seen.add(line["custom_id"])
            lines.append(line)
        with state.lock:
            batch = StoredBatch(state.new_id("batch"), stored.id, body["endpoint"], body["completion_window"],
                                body.get("metadata"), time.time(), lines)
            state.batches[batch.id] = batch
            return web.json_response(_batch_json(batch))

    def found_batch(request: web.Request) -> StoredBatch | web.Response:
        """The batch the URL names, brought up to date; a 404 response when there is none (hold state.lock)."""
        batch = state.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, f"No batch found with id '{request.match_info['batch_id']}'")
        advance(batch)
        return batch

    async def get_batch(request: web.Request) -> web.Response:
        with state.lock:
            batch = found_batch(request)
            return batch if isinstance(batch, web.Response) else web.json_response(_batch_json(batch))

    async def cancel_batch(request: web.Request) -> web.Response:
        with state.lock:
            batch = found_batch(request)
            if isinstance(batch, web.Response):
                return batch
            if batch.status in _TERMINAL:
                return _error(409, f"Cannot cancel a batch with status '{batch.status}'.")
            batch.cancelled_at = time.time()
            advance(batch)
            answer_json = _batch_json(batch)
        return web.json_response(answer_json)

    async def list_batches(request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", 20))
        after = request.query.get("after")
        with state.lock:
            ordered = sorted(state.batches.values(), key=lambda b: b.created, reverse=True)
            if after is not None:
                ids = [b.id for b in ordered]
                ordered = ordered[ids.index(after) + 1:] if after in ids else []
            page = ordered[:limit]
            for batch in page:
                advance(batch)
            data = [_batch_json(b) for b in page]
        return web.json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None, "has_more": len(ordered) > limit})

    async def control(request: web.Request) -> web.Response:
        if request.method == "POST":
            settings = await request.json()
            for name in ("batch_delay_s", "batch_expire_s", "validate_s"):
                if name in settings:
                    setattr(state, name, None if settings[name] is None else float(settings[name]))
        with state.lock:
            batches = [{"id": b.id, "status": b.status, "n": len(b.lines), "metadata": b.metadata}
                       for b in sorted(state.batches.values(), key=lambda b: b.created)]
        return web.json_response({"batch_delay_s": state.batch_delay_s, "batch_expire_s": state.batch_expire_s,
                                  "batches": batches})

    app.router.add_post("/v1/files", create_file)
    app.router.add_get("/v1/files/{file_id}", get_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
    app.router.add_route("*", "/_control/batches", control)
