"""A local, test-only server that speaks Modal's gRPC protocol (for the real ``modal==1.6.4`` client).

Start it with ``running_modal_server()`` (a context manager) or the ``modal_server`` pytest fixture
in ``fixture.py``.  It runs a ``grpclib`` server implementing ``modal_proto.api_grpc.ModalClientBase``
plus a tiny HTTP blob store (aiohttp) on 127.0.0.1, both on one asyncio loop in a background thread,
and executes function inputs in worker subprocesses (see ``workers.py``).

Only the RPCs the client uses for apps, functions, images, mounts, secrets, volumes, blobs, map/remote/
spawn and function lookups are implemented; every other RPC answers UNIMPLEMENTED and is recorded in
``server.unimplemented_calls``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import os
import shlex
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import grpclib
import grpclib.server
from google.protobuf import empty_pb2
from grpclib import GRPCError, Status

from modal_proto import api_grpc, api_pb2

from .workers import Attempt, FunctionRuntime, SparePool, WorkerSpec

MAX_OBJECT_SIZE_BYTES = 2 * 1024 * 1024  # same limit as the client: bigger payloads travel as blobs
MAX_OUTPUTS_RESPONSE_BYTES = 16 * 1024 * 1024
MAX_CRASHES_PER_INPUT = 3
IMAGE_BUILDER_VERSION = "2025.06"
MAX_INPUTS_OUTSTANDING = 1000
LONG_POLL_CAP_SECS = 55.0
# container lifecycle as workers.FunctionRuntime names it -> the task state Modal streams in AppGetLogs
_TASK_STATES = {
    "assigned": api_pb2.TASK_STATE_WORKER_ASSIGNED,
    "loading": api_pb2.TASK_STATE_LOADING_IMAGE,
    "idle": api_pb2.TASK_STATE_IDLE,  # Modal reports a running container as IDLE (it no longer sends ACTIVE)
    "completed": api_pb2.TASK_STATE_COMPLETED,
}

GR = api_pb2.GenericResult
# High-volume RPCs (or ones carrying payloads) whose request protos are counted but not kept.
_UNRECORDED_REQUESTS = frozenset(
    {"FunctionPutInputs", "FunctionGetOutputs", "FunctionMap", "FunctionRetryInputs", "AppHeartbeat",
     "BlobCreate", "BlobGet", "MountPutFile"}
)
_SYNC_TYPES = (api_pb2.FUNCTION_CALL_INVOCATION_TYPE_SYNC, api_pb2.FUNCTION_CALL_INVOCATION_TYPE_SYNC_LEGACY)
_CREATE_TYPES = (
    api_pb2.OBJECT_CREATION_TYPE_CREATE_IF_MISSING,
    api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS,
    api_pb2.OBJECT_CREATION_TYPE_CREATE_OVERWRITE_IF_EXISTS,
)
_ANON_TYPES = (api_pb2.OBJECT_CREATION_TYPE_ANONYMOUS_OWNED_BY_APP, api_pb2.OBJECT_CREATION_TYPE_EPHEMERAL)


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_JWT_HEADER = _b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())


def _make_jwt(payload: dict) -> str:
    return f"{_JWT_HEADER}.{_b64url(json.dumps(payload, separators=(',', ':')).encode())}.local"


def _decode_jwt(token: str) -> dict:
    try:
        payload_b64 = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4)))
    except Exception:
        raise GRPCError(Status.INVALID_ARGUMENT, f"malformed jwt {token[:40]!r}")


def _parse_env_command(cmd: str) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        tokens = shlex.split(cmd[len("ENV ") :])
    except ValueError:
        return out
    if len(tokens) == 2 and "=" not in tokens[0]:  # legacy "ENV key value"
        return {tokens[0]: tokens[1]}
    for tok in tokens:
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = v
    return out


_PIP_OPTS_WITH_ARG = {"-r", "-c", "-i", "-f", "--index-url", "--extra-index-url", "--find-links", "--requirement"}


def _packages_after_install(cmd: str, marker: str) -> list[str]:
    if marker not in cmd:
        return []
    try:
        tokens = shlex.split(cmd)
    except ValueError:
        tokens = cmd.split()
    out = []
    for i, tok in enumerate(tokens):
        if tok == "install" and i > 0 and (marker.split()[0] in tokens[i - 1] or tokens[i - 1] in ("pip", "apt-get")):
            skip = False
            for t in tokens[i + 1 :]:
                if t in ("&&", ";", "||", "|"):
                    break
                if skip:
                    skip = False
                    continue
                if t in _PIP_OPTS_WITH_ARG:
                    skip = True
                    continue
                if t.startswith("-"):
                    continue
                out.append(t)
    return out


def _retry_policy_dict(policy: api_pb2.FunctionRetryPolicy | None) -> dict | None:
    if policy is None:
        return None
    return {
        "retries": policy.retries,
        "backoff_coefficient": policy.backoff_coefficient,
        "initial_delay_ms": policy.initial_delay_ms,
        "max_delay_ms": policy.max_delay_ms,
    }


def _schedule_dict(schedule: api_pb2.Schedule) -> dict:
    if schedule.HasField("cron"):
        return {"cron": schedule.cron.cron_string, "timezone": schedule.cron.timezone}
    p = schedule.period
    return {"period": {k: getattr(p, k) for k in ("years", "months", "weeks", "days", "hours", "minutes", "seconds")
                       if getattr(p, k)}}


def _pickled_internal_failure(msg: str) -> bytes:
    from modal._serialization import serialize
    from modal.exception import InternalFailure

    return serialize(InternalFailure(msg))


def _opt(msg, name):
    return getattr(msg, name) if msg.HasField(name) else None


# ----------------------------------------------------------------------------------------------
# server-side state
# ----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _App:
    id: str
    description: str = ""
    name: str = ""
    state: int = api_pb2.APP_STATE_EPHEMERAL
    stopped: bool = False
    function_ids: list = field(default_factory=list)
    tags: dict = field(default_factory=dict)  # tag -> function id (after publish)
    logs: list = field(default_factory=list)  # (function_id, task_id, line)
    log_event: asyncio.Event = field(default_factory=asyncio.Event)
    client_gone: bool = False  # a detached app whose client disconnected: it stops when its calls are done

    def notify_logs(self):
        ev, self.log_event = self.log_event, asyncio.Event()
        ev.set()


@dataclass(eq=False)
class _Fn:
    id: str
    app_id: str
    name: str
    definition: api_pb2.Function | None = None
    function_data: api_pb2.FunctionData | None = None
    handle_metadata: api_pb2.FunctionHandleMetadata | None = None
    record: dict | None = None
    spec: WorkerSpec | None = None
    spec_error: str | None = None
    runtime: FunctionRuntime | None = None
    retry_policy: api_pb2.FunctionRetryPolicy | None = None
    timeout_secs: float = 300.0
    pool_size: int = 2
    batch_max_size: int = 0
    batch_wait_ms: int = 0
    deployed: bool = False


@dataclass(eq=False)
class _Input:
    id: str
    idx: int
    call: "_Call"
    args: bytes
    data_format: int
    jwt: str = ""
    retry_count: int = 0
    server_retries: int = 0
    internal_failures: int = 0
    finished: bool = False
    attempt: Attempt | None = None
    blob_error: str | None = None


class _Call:
    def __init__(self, call_id: str, fn: _Fn, invocation_type: int, call_type: int, return_exceptions: bool):
        self.id = call_id
        self.fn = fn
        self.invocation_type = invocation_type
        self.call_type = call_type
        self.return_exceptions = return_exceptions
        self.jwt = _make_jwt({"fc": call_id})
        self.inputs: dict[str, _Input] = {}
        self.entries: list[api_pb2.FunctionGetOutputsItem] = []  # every output, in production order
        self.latest: dict[int, api_pb2.FunctionGetOutputsItem] = {}  # idx -> newest output
        self.num_finished = 0
        self.closed = False
        self.cleared = False
        self.expired = False  # its outputs are gone (expire_outputs): a poll answers at once, empty
        self._changed = asyncio.Event()

    def notify(self):
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    @property
    def num_unfinished(self) -> int:
        return len(self.inputs) - self.num_finished


# ----------------------------------------------------------------------------------------------
# gRPC servicer
# ----------------------------------------------------------------------------------------------
def _unary(fn):
    name = fn.__name__

    async def handler(self: "_Servicer", stream: grpclib.server.Stream) -> None:
        request = await stream.recv_message()
        self.server._record_rpc(name, request)
        try:
            response = await fn(self, request)
        except (GRPCError, asyncio.CancelledError):
            raise
        except Exception as exc:
            tb = traceback.format_exc()
            self.server.internal_errors.append(f"{name}: {tb}")
            print(f"[modal test server] error in {name}:\n{tb}", file=sys.stderr)
            raise GRPCError(Status.INTERNAL, f"test server error in {name}: {exc!r}")
        await stream.send_message(response)

    handler.__name__ = name
    return handler


def _make_unimplemented(name: str):
    async def handler(self: "_Servicer", stream: grpclib.server.Stream) -> None:
        self.server.unimplemented_calls.append(name)
        raise GRPCError(Status.UNIMPLEMENTED, f"{name} is not implemented by the local Modal test server")

    handler.__name__ = name
    return handler


class _Servicer(api_grpc.ModalClientBase):
    def __init__(self, server: "ModalTestServer"):
        self.server = server

    # ---- client / environment ----------------------------------------------------------------
    @_unary
    async def ClientHello(self, req):
        return api_pb2.ClientHelloResponse(image_builder_version=IMAGE_BUILDER_VERSION)

    @_unary
    async def EnvironmentGetOrCreate(self, req):
        return api_pb2.EnvironmentGetOrCreateResponse(
            environment_id="en-local",
            metadata=api_pb2.EnvironmentMetadata(
                name=req.deployment_name or "main",
                settings=api_pb2.EnvironmentSettings(image_builder_version=IMAGE_BUILDER_VERSION, webhook_suffix=""),
            ),
        )

    # ---- apps ---------------------------------------------------------------------------------
    @_unary
    async def AppCreate(self, req):
        app = self.server._new_app(description=req.description, state=req.app_state)
        return api_pb2.AppCreateResponse(
            app_id=app.id,
            app_page_url=f"http://127.0.0.1/apps/{app.id}",
            app_logs_url=f"http://127.0.0.1/apps/{app.id}/logs",
        )

    @_unary
    async def AppGetOrCreate(self, req):
        s = self.server
        app = s._deployed_apps.get(req.app_name)
        if app is None:
            if req.object_creation_type not in _CREATE_TYPES:
                raise GRPCError(Status.NOT_FOUND, f"App '{req.app_name}' not found")
            app = s._new_app(description=req.app_name, state=api_pb2.APP_STATE_DEPLOYED)
            app.name = req.app_name
            s._deployed_apps[req.app_name] = app
        return api_pb2.AppGetOrCreateResponse(app_id=app.id)

    @_unary
    async def AppGetByDeploymentName(self, req):
        app = self.server._deployed_apps.get(req.name)
        return api_pb2.AppGetByDeploymentNameResponse(app_id=app.id if app else "")

    @_unary
    async def AppGetLayout(self, req):
        app = self.server._apps.get(req.app_id)
        layout = api_pb2.AppLayout()
        if app is not None:
            for tag, fid in app.tags.items():
                layout.function_ids[tag] = fid
        return api_pb2.AppGetLayoutResponse(app_layout=layout)

    @_unary
    async def AppHeartbeat(self, req):
        self.server.heartbeats += 1
        return empty_pb2.Empty()

    @_unary
    async def AppPublish(self, req):
        s = self.server
        app = s._apps.get(req.app_id)
        if app is None:
            raise GRPCError(Status.NOT_FOUND, f"App {req.app_id} not found")
        app.tags.update(dict(req.function_ids))
        s.apps_published.append(
            {"app_id": app.id, "name": req.name, "function_ids": dict(req.function_ids), "app_state": req.app_state}
        )
        deployed_at = 0.0
        if req.name:
            app.name = req.name
            app.state = api_pb2.APP_STATE_DEPLOYED
            for fid in app.tags.values():
                if fid in s._functions:
                    s._functions[fid].deployed = True
            s._deployed_apps[req.name] = app
            deployed_at = time.time()
        return api_pb2.AppPublishResponse(url=f"http://127.0.0.1/apps/{app.id}", deployed_at=deployed_at)

    @_unary
    async def AppClientDisconnect(self, req):
        s = self.server
        app = s._apps.get(req.app_id)
        if app is not None and app.stopped:  # stopped first (AppStop): nothing left to disconnect
            return empty_pb2.Empty()
        if app is not None and app.state == api_pb2.APP_STATE_DETACHED:
            # Like Modal: a detached app outlives its client, and stops once no call is left running.
            s.apps_disconnected.append({"app_id": app.id, "reason": req.reason, "exception": req.exception})
            app.client_gone = True
            await s._stop_detached_if_done(app)
            return empty_pb2.Empty()
        await s._stop_app(req.app_id, reason=req.reason, exception=req.exception)
        return empty_pb2.Empty()

    @_unary
    async def AppStop(self, req):
        s = self.server
        app = s._apps.get(req.app_id)
        if app is not None and app.state == api_pb2.APP_STATE_DEPLOYED:  # `modal app stop` / App.stop()
            s._deployed_apps = {name: a for name, a in s._deployed_apps.items() if a is not app}
            app.state = api_pb2.APP_STATE_STOPPED
            s.apps_stopped.append(app.name)
        await s._stop_app(req.app_id, reason=None, exception="")
        return empty_pb2.Empty()

    async def AppGetLogs(self, stream: grpclib.server.Stream) -> None:
        req = await stream.recv_message()
        s = self.server
        s._record_rpc("AppGetLogs", req)
        app = s._apps.get(req.app_id)
        if app is None:
            await stream.send_message(api_pb2.TaskLogsBatch(app_done=True))
            return
        cursor = int(req.last_entry_id) if req.last_entry_id.isdigit() else 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(req.timeout or 0.0, LONG_POLL_CAP_SECS)
        while True:
            if cursor < len(app.logs):
                new = app.logs[cursor:]
                cursor = len(app.logs)
                for (fid, task_id), group in itertools.groupby(new, key=lambda e: (e[0], e[1])):
                    items = [
                        # a container's state change (an int) travels as Modal sends it: a log item with task_state
                        api_pb2.TaskLogs(task_state=line, timestamp=time.time()) if isinstance(line, int) else
                        api_pb2.TaskLogs(
                            data=line, file_descriptor=api_pb2.FILE_DESCRIPTOR_STDOUT, timestamp=time.time()
                        )
                        for _, _, line in group
                    ]
                    await stream.send_message(
                        api_pb2.TaskLogsBatch(task_id=task_id, function_id=fid, entry_id=str(cursor), items=items)
                    )
            if app.stopped or s._closing:
                await stream.send_message(api_pb2.TaskLogsBatch(app_done=True, entry_id=str(cursor)))
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(app.log_event.wait(), remaining)
            except asyncio.TimeoutError:
                return

    # ---- images / mounts ----------------------------------------------------------------------
    @_unary
    async def ImageGetOrCreate(self, req):
        s = self.server
        image_id = s._new_id("im")
        img = req.image
        s._images[image_id] = {
            "image_id": image_id,
            "dockerfile_commands": list(img.dockerfile_commands),
            "base_image_ids": [b.image_id for b in img.base_images],
            "secret_ids": list(img.secret_ids),
            "context_files": [f.filename for f in img.context_files],
            "builder_version": req.builder_version,
            "has_build_function": img.HasField("build_function") and bool(img.build_function.definition),
            "gpu": img.gpu_config.gpu_type or None,
        }
        return api_pb2.ImageGetOrCreateResponse(
            image_id=image_id, result=api_pb2.GenericResult(status=GR.GENERIC_STATUS_SUCCESS), metadata=s._image_meta(req)
        )

    async def ImageJoinStreaming(self, stream: grpclib.server.Stream) -> None:
        req = await stream.recv_message()
        self.server._record_rpc("ImageJoinStreaming", req)
        await stream.send_message(
            api_pb2.ImageJoinStreamingResponse(
                result=api_pb2.GenericResult(status=GR.GENERIC_STATUS_SUCCESS),
                eof=True,
                entry_id="1",
                metadata=self.server._image_meta(None),
            )
        )

    @_unary
    async def ImageFromId(self, req):
        if req.image_id not in self.server._images:
            raise GRPCError(Status.NOT_FOUND, f"Image {req.image_id} not found")
        return api_pb2.ImageFromIdResponse(image_id=req.image_id, metadata=self.server._image_meta(None))

    @_unary
    async def MountGetOrCreate(self, req):
        s = self.server
        mount_id = s._new_id("mo")
        s._mounts[mount_id] = {
            "mount_id": mount_id,
            "name": req.deployment_name,
            "files": [f.filename for f in req.files],
        }
        return api_pb2.MountGetOrCreateResponse(
            mount_id=mount_id, handle_metadata=api_pb2.MountHandleMetadata(content_checksum_sha256_hex="0" * 64)
        )

    @_unary
    async def MountBatchedCheckExistence(self, req):
        return api_pb2.MountBatchedCheckExistenceResponse(missing_sha256_hex_hashes=[])

    @_unary
    async def MountPutFile(self, req):
        return api_pb2.MountPutFileResponse(exists=True)

    # ---- secrets / volumes --------------------------------------------------------------------
    @_unary
    async def SecretGetOrCreate(self, req):
        s = self.server
        env = dict(req.env_dict)
        if req.object_creation_type in _ANON_TYPES or not req.deployment_name:
            secret_id = s._new_id("st")
            s._secrets_by_id[secret_id] = {"id": secret_id, "name": None, "env": env}
            return api_pb2.SecretGetOrCreateResponse(
                secret_id=secret_id, metadata=api_pb2.SecretMetadata(keys=sorted(env))
            )
        name = req.deployment_name
        s.secret_lookups.append(name)
        existing = s._secrets_by_name.get(name)
        if req.object_creation_type in _CREATE_TYPES:
            if existing is not None and req.object_creation_type == api_pb2.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS:
                raise GRPCError(Status.ALREADY_EXISTS, f"Secret '{name}' already exists")
            if existing is None or req.object_creation_type == api_pb2.OBJECT_CREATION_TYPE_CREATE_OVERWRITE_IF_EXISTS:
                existing = s._add_secret(name, env)
        if existing is None:
            raise GRPCError(Status.NOT_FOUND, f"Secret '{name}' not found in environment 'main'")
        missing = [k for k in req.required_keys if k not in existing["env"]]
        if missing:
            raise GRPCError(Status.NOT_FOUND, f"Secret '{name}' is missing required key(s): {', '.join(missing)}")
        return api_pb2.SecretGetOrCreateResponse(
            secret_id=existing["id"],
            metadata=api_pb2.SecretMetadata(name=name, keys=sorted(existing["env"]), environment_name="main"),
        )

    @_unary
    async def SecretGetInfo(self, req):
        sec = self.server._secrets_by_id.get(req.secret_id)
        if sec is None:
            raise GRPCError(Status.NOT_FOUND, f"Secret {req.secret_id} not found")
        return api_pb2.SecretGetInfoResponse(
            metadata=api_pb2.SecretMetadata(name=sec["name"] or "", keys=sorted(sec["env"]))
        )

    @_unary
    async def VolumeGetOrCreate(self, req):
        s = self.server
        version = req.version or api_pb2.VOLUME_FS_VERSION_V2
        if req.object_creation_type in _ANON_TYPES or not req.deployment_name:
            vol = s._add_volume(None, version)
        else:
            vol = s._volumes_by_name.get(req.deployment_name)
            if vol is None:
                if req.object_creation_type not in _CREATE_TYPES:
                    raise GRPCError(Status.NOT_FOUND, f"Volume '{req.deployment_name}' not found in environment 'main'")
                vol = s._add_volume(req.deployment_name, version)
        return api_pb2.VolumeGetOrCreateResponse(
            volume_id=vol["id"],
            version=vol["version"],
            metadata=api_pb2.VolumeMetadata(name=vol["name"] or "", version=vol["version"]),
        )

    @_unary
    async def VolumeHeartbeat(self, req):
        return empty_pb2.Empty()

    # ---- blobs --------------------------------------------------------------------------------
    @_unary
    async def BlobCreate(self, req):
        s = self.server
        blob_id = s._new_id("bl")
        url = f"{s.blob_url}/upload/{blob_id}"
        return api_pb2.BlobCreateResponse(
            blob_id=blob_id, blob_ids=[blob_id], upload_urls=api_pb2.UploadUrlList(items=[url])
        )

    @_unary
    async def BlobGet(self, req):
        s = self.server
        if req.blob_id not in s._blobs:
            raise GRPCError(Status.NOT_FOUND, f"Blob {req.blob_id} not found")
        return api_pb2.BlobGetResponse(download_url=f"{s.blob_url}/download/{req.blob_id}")

    # ---- functions ----------------------------------------------------------------------------
    @_unary
    async def FunctionPrecreate(self, req):
        s = self.server
        fid = req.existing_function_id or s._new_id("fu")
        fn = s._functions.get(fid)
        if fn is None:
            fn = _Fn(id=fid, app_id=req.app_id, name=req.function_name)
            s._functions[fid] = fn
        meta = api_pb2.FunctionHandleMetadata(
            function_name=req.function_name,
            function_type=req.function_type,
            app_id=req.app_id,
            function_schema=req.function_schema,
            supported_input_formats=list(req.supported_input_formats),
            supported_output_formats=list(req.supported_output_formats),
        )
        return api_pb2.FunctionPrecreateResponse(function_id=fid, handle_metadata=meta)

    @_unary
    async def FunctionCreate(self, req):
        return self.server._create_function(req)

    @_unary
    async def FunctionGet(self, req):
        s = self.server
        fn = s._lookup_deployed(req.app_name, req.object_tag)
        if fn is None:
            raise GRPCError(
                Status.NOT_FOUND, f"Could not find function '{req.object_tag}' in deployed app '{req.app_name}'"
            )
        return api_pb2.FunctionGetResponse(
            function_id=fn.id, handle_metadata=fn.handle_metadata, function=s._function_data(fn)
        )

    @_unary
    async def FunctionGetById(self, req):
        fn = self.server._functions.get(req.function_id)
        if fn is None or fn.handle_metadata is None:
            raise GRPCError(Status.NOT_FOUND, f"Function {req.function_id} not found")
        return api_pb2.FunctionGetByIdResponse(
            function_id=fn.id, handle_metadata=fn.handle_metadata, function=self.server._function_data(fn)
        )

    @_unary
    async def FunctionMap(self, req):
        return self.server._function_map(req)

    @_unary
    async def FunctionPutInputs(self, req):
        return self.server._put_inputs(req)

    @_unary
    async def FunctionRetryInputs(self, req):
        return self.server._retry_inputs(req)

    @_unary
    async def FunctionFinishInputs(self, req):
        return empty_pb2.Empty()

    @_unary
    async def FunctionGetOutputs(self, req):
        return await self.server._get_outputs(req)

    @_unary
    async def FunctionCallCancel(self, req):
        self.server._cancel_call(req.function_call_id)
        return empty_pb2.Empty()


def _build_servicer_class():
    # Every RPC this server does not implement answers UNIMPLEMENTED (and is recorded).
    missing = {name: _make_unimplemented(name) for name in _Servicer.__abstractmethods__}
    cls = type("ModalTestServicer", (_Servicer,), missing)
    return cls


_ServicerImpl = _build_servicer_class()


# ----------------------------------------------------------------------------------------------
# the server handle
# ----------------------------------------------------------------------------------------------
class ModalTestServer:
    """Handle of a running local Modal server.

    Set-up (call from the test thread):
      add_secret(name, env) -> id    a named secret that ``modal.Secret.from_name(name)`` finds; unknown
                                     names answer NOT_FOUND (``modal.exception.NotFoundError``) like Modal
      add_volume(name) -> id         a named volume for ``modal.Volume.from_name(name)`` (create_if_missing works too)
      deploy(app, fn_name, callable, takes_batches=False, ...) -> id
                                     a "deployed" function for ``modal.Function.from_name(app, fn_name)``
      reset()                        forget everything and kill all worker processes (the fixture does it per test)
      max_crashes_per_input          crashes of one input before it fails for good (default 3)

    Records (snapshots; safe to read from the test thread):
      functions_created    list[dict], one decoded FunctionCreate each (keys in ``_describe_function``:
                           function_name/short_name, serialized, gpu, gpu_count, gpus, gpu_fallbacks, cpu,
                           memory, timeout_secs, retries, retry_policy, max_containers, secret_names,
                           secret_ids, secret_env, env, volumes, volume_mounts, image_layers,
                           image_commands, pip_packages, apt_packages, image_env, batch_max_size, ...,
                           and ``definition``: the raw api_pb2.Function)
      last_function / function(name)   the latest record overall / for a function name
      deployed_functions   {(app_name, function_name): dict} registered by deploy() or client deploys
      function_calls       list[dict], one per FunctionMap (map / unary, invocation type, return_exceptions)
      inputs_received      int, inputs received (FunctionPutInputs items + inputs pipelined in FunctionMap)
      retries_received     int, FunctionRetryInputs items (client-driven retries)
      outputs_sent         int, outputs produced (retried inputs produce several)
      workers_started      int, worker processes ("containers") bound to functions, replacements included
      task_states          list[dict], each container's lifecycle as streamed to the client in AppGetLogs
                           (``TaskLogs.task_state``: WORKER_ASSIGNED, LOADING_IMAGE, IDLE, COMPLETED);
                           container_lifetimes(function_name) gives (start, stop) per container
      container_start_delay_s   settable: seconds each new container waits before its first input (a cold
                           start); containers idle past their function's scaledown_window stop
      expire_outputs()     expire the outputs of every finished call (get() then raises OutputExpiredError)
      executions           int, attempts handed to containers (retries included); executions_by_function:
                           the same by function name. A detached app (app.run(detach=True)) outlives its
                           client's disconnect and stops once none of its calls is left running; the
                           outputs of finished calls stay retrievable (FunctionCall.from_id(id).get())
      secrets              {name: env} of named secrets;  secret_lookups: every name looked up
      volumes              {name: volume_id};  images: {image_id: layer dict}
      blob_uploads / blob_downloads    HTTP PUTs / GETs on the blob endpoint
      logs                 list[str], lines the functions printed;  log_records: the same with function/task
      apps, apps_published, apps_disconnected    app lifecycle records
      rpc_counts           Counter of RPC name -> calls;  requests(name): the request protos of that RPC
      unimplemented_calls  RPCs the client called that this server does not implement
      internal_errors      tracebacks of bugs in this server (the fixture warns about them)
      live_worker_pids()   pids of running worker processes bound to functions
    """

    def __init__(
        self,
        *,
        default_pool_size: int = 2,
        max_pool_size: int = 4,
        spare_workers: int = 2,
        echo_logs: bool | None = None,
    ):
        # Containers per function: min(max_containers, max_pool_size), or default_pool_size without
        # max_containers.  `spare_workers` blank worker processes are kept started ahead of time.
        self.default_pool_size = default_pool_size
        self.spare_workers = spare_workers
        # A crashed container gives its input an INTERNAL_FAILURE output (the client then retries it at
        # once); the crash number `max_crashes_per_input` of one input fails it for good (InternalFailure).
        self.max_crashes_per_input = MAX_CRASHES_PER_INPUT
        self.max_pool_size = max_pool_size
        if echo_logs is None:
            echo_logs = os.environ.get("MODAL_TEST_SERVER_ECHO_LOGS", "") not in ("", "0")
        self.echo_logs = echo_logs
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.blob_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._grpc_server: grpclib.server.Server | None = None
        self._http_runner = None
        self._spares: SparePool | None = None
        self._closing = False
        self._id_counter = itertools.count(1)
        self._init_state()

    # ---- state ---------------------------------------------------------------------------------
    def _init_state(self) -> None:
        self._apps: dict[str, _App] = {}
        self._deployed_apps: dict[str, _App] = {}
        self.apps_stopped: list[str] = []  # names of deployed apps stopped with AppStop
        self._functions: dict[str, _Fn] = {}
        self._calls: dict[str, _Call] = {}
        self._images: dict[str, dict] = {}
        self._mounts: dict[str, dict] = {}
        self._secrets_by_id: dict[str, dict] = {}
        self._secrets_by_name: dict[str, dict] = {}
        self._volumes_by_id: dict[str, dict] = {}
        self._volumes_by_name: dict[str, dict] = {}
        self._blobs: dict[str, bytes] = {}
        self._input_counter = itertools.count(1)
        self._attempt_counter = itertools.count(1)
        self._functions_created: list[dict] = []
        self._function_calls: list[dict] = []
        self._log_lines: list[str] = []
        self.log_records: list[dict] = []
        self.inputs_received = 0
        self.retries_received = 0
        self.outputs_sent = 0
        self.workers_started = 0
        # each container's lifecycle: {"function_name", "task_id", "state", "time" (monotonic)}; states
        # "assigned", "loading" (cold start), "idle" (up), "completed" (stopped), as streamed to the client
        self.task_states: list[dict] = []
        self.heartbeats = 0
        self.secret_lookups: list[str] = []
        self.apps_published: list[dict] = []
        self.apps_disconnected: list[dict] = []
        self.rpc_counts: collections.Counter = collections.Counter()
        self.rpc_requests: list[tuple[str, Any]] = []
        self.unimplemented_calls: list[str] = []
        self.internal_errors: list[str] = []
        self.blob_uploads = 0
        self.blob_downloads = 0
        # seconds each new container waits before it runs anything (a simulated cold start)
        self.container_start_delay_s = 0.0
        # attempts handed to containers (every run of an input, retries included), in all and by function
        self.executions = 0
        self.executions_by_function: collections.Counter = collections.Counter()

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-local{next(self._id_counter):06d}"

    def _record_rpc(self, name: str, request) -> None:
        self.rpc_counts[name] += 1
        if name not in _UNRECORDED_REQUESTS:
            self.rpc_requests.append((name, request))

    def _new_app(self, description: str, state: int) -> _App:
        app = _App(id=self._new_id("ap"), description=description, state=state)
        self._apps[app.id] = app
        return app

    def _add_secret(self, name: str, env: dict) -> dict:
        secret = {"id": self._new_id("st"), "name": name, "env": {str(k): str(v) for k, v in env.items()}}
        self._secrets_by_id[secret["id"]] = secret
        self._secrets_by_name[name] = secret
        return secret

    def _add_volume(self, name: str | None, version: int = api_pb2.VOLUME_FS_VERSION_V2) -> dict:
        vol = {"id": self._new_id("vo"), "name": name, "version": version}
        self._volumes_by_id[vol["id"]] = vol
        if name:
            self._volumes_by_name[name] = vol
        return vol

    def _image_meta(self, req) -> api_pb2.ImageMetadata:
        v = sys.version_info
        return api_pb2.ImageMetadata(
            python_version_info=f"Python {v.major}.{v.minor}.{v.micro}",
            image_builder_version=(req.builder_version if req is not None and req.builder_version else IMAGE_BUILDER_VERSION),
        )

    def _image_chain(self, image_id: str) -> list[dict]:
        out: list[dict] = []
        seen: set[str] = set()

        def visit(iid: str):
            if iid in seen or iid not in self._images:
                return
            seen.add(iid)
            img = self._images[iid]
            for base in img["base_image_ids"]:
                visit(base)
            out.append(img)

        visit(image_id)
        return out

    # ---- functions -------------------------------------------------------------------------------
    def _create_function(self, req: api_pb2.FunctionCreateRequest) -> api_pb2.FunctionCreateResponse:
        if req.HasField("function_data"):
            function_data = api_pb2.FunctionData()
            function_data.CopyFrom(req.function_data)
            definition = function_data.ranked_functions[0].function
        else:
            definition = api_pb2.Function()
            definition.CopyFrom(req.function)
            function_data = None
        fid = req.existing_function_id or self._new_id("fu")
        fn = self._functions.get(fid)
        if fn is None:
            fn = _Fn(id=fid, app_id=req.app_id, name=definition.function_name)
            self._functions[fid] = fn
        if fn.runtime is not None:  # a redeploy: new code runs on new containers, as on Modal
            old_runtime, fn.runtime = fn.runtime, None
            asyncio.get_running_loop().create_task(old_runtime.close())
        fn.app_id = req.app_id
        fn.name = definition.function_name
        fn.definition = definition
        fn.function_data = function_data
        fn.retry_policy = definition.retry_policy if definition.HasField("retry_policy") else None
        fn.timeout_secs = float(definition.timeout_secs or 300)
        fn.batch_max_size = definition.batch_max_size
        fn.batch_wait_ms = int(definition.batch_linger_ms)
        record = self._describe_function(fn, definition, function_data)
        max_containers = record["max_containers"]
        fn.pool_size = min(max_containers, self.max_pool_size) if max_containers else self.default_pool_size
        fn.spec, fn.spec_error = self._worker_spec_for(definition, record["env"])
        fn.handle_metadata = api_pb2.FunctionHandleMetadata(
            function_name=definition.function_name,
            function_type=definition.function_type,
            web_url="",
            is_method=definition.is_method,
            definition_id=self._new_id("de"),
            function_schema=definition.function_schema,
            supported_input_formats=list(definition.supported_input_formats),
            supported_output_formats=list(definition.supported_output_formats),
            app_id=req.app_id,
        )
        fn.record = record
        app = self._apps.get(req.app_id)
        if app is not None and fid not in app.function_ids:
            app.function_ids.append(fid)
        self._functions_created.append(record)
        return api_pb2.FunctionCreateResponse(
            function_id=fid,
            function=definition,
            handle_metadata=fn.handle_metadata,
            function_data=self._function_data(fn),
        )

    def _function_data(self, fn: _Fn) -> api_pb2.FunctionData:
        if fn.function_data is not None:
            return fn.function_data
        d = fn.definition
        data = api_pb2.FunctionData(
            module_name=d.module_name,
            function_name=d.function_name,
            function_type=d.function_type,
            timeout_secs=d.timeout_secs,
            concurrency_limit=d.concurrency_limit,
            is_method=d.is_method,
            function_schema=d.function_schema,
            autoscaler_settings=d.autoscaler_settings,
            supported_input_formats=list(d.supported_input_formats),
            supported_output_formats=list(d.supported_output_formats),
            implementation_name=d.implementation_name,
        )
        data.ranked_functions.append(api_pb2.FunctionData.RankedFunction(rank=0, function=d))
        return data

    def _describe_function(self, fn: _Fn, d: api_pb2.Function, function_data) -> dict:
        ranked = [r.function for r in function_data.ranked_functions] if function_data is not None else [d]
        res = d.resources
        gpus = [
            {"type": r.resources.gpu_config.gpu_type, "count": r.resources.gpu_config.count}
            for r in ranked
            if r.resources.gpu_config.count > 0
        ]
        autoscaler = d.autoscaler_settings
        max_containers = _opt(autoscaler, "max_containers") or (d.concurrency_limit or None)
        secrets = []
        secret_env: dict[str, str] = {}
        for sid in d.secret_ids:
            sec = self._secrets_by_id.get(sid, {"id": sid, "name": None, "env": {}})
            secrets.append({"id": sid, "name": sec["name"], "keys": sorted(sec["env"])})
            secret_env.update(sec["env"])
        layers = self._image_chain(d.image_id)
        commands = [c for layer in layers for c in layer["dockerfile_commands"]]
        image_env: dict[str, str] = {}
        for c in commands:
            if c.startswith("ENV "):
                image_env.update(_parse_env_command(c))
        # Layers after the base image (the ones built with "FROM base") are what the user added.
        user_commands = [c for layer in layers if layer["dockerfile_commands"][:1] == ["FROM base"]
                         for c in layer["dockerfile_commands"]]

        def installed(cmds, marker):
            return [p for c in cmds if c.startswith("RUN") for p in _packages_after_install(c, marker)]

        volume_mounts = []
        for vm in d.volume_mounts:
            vol = self._volumes_by_id.get(vm.volume_id, {})
            volume_mounts.append(
                {
                    "mount_path": vm.mount_path,
                    "volume_id": vm.volume_id,
                    "volume_name": vol.get("name"),
                    "read_only": vm.read_only,
                }
            )
        retry = _retry_policy_dict(d.retry_policy) if d.HasField("retry_policy") else None
        env = {**image_env, **secret_env}
        return {
            "function_id": fn.id,
            "app_id": fn.app_id,
            "function_name": d.function_name,
            "short_name": d.function_name.rsplit(".", 1)[-1],
            "module_name": d.module_name,
            "implementation_name": d.implementation_name,
            "serialized": d.definition_type == api_pb2.Function.DEFINITION_TYPE_SERIALIZED,
            "is_generator": d.function_type == api_pb2.Function.FUNCTION_TYPE_GENERATOR,
            "gpu": gpus[0]["type"] if gpus else None,
            "gpu_count": gpus[0]["count"] if gpus else 0,
            "gpus": gpus,  # ranked: the first one, then the fallbacks
            "gpu_fallbacks": [g["type"] for g in gpus[1:]],
            "cpu": (res.milli_cpu / 1000) if res.milli_cpu else None,
            "cpu_limit": (res.milli_cpu_max / 1000) if res.milli_cpu_max else None,
            "memory": res.memory_mb or None,
            "memory_limit": res.memory_mb_max or None,
            "ephemeral_disk": res.ephemeral_disk_mb or None,
            "timeout_secs": d.timeout_secs,
            "startup_timeout_secs": d.startup_timeout_secs,
            "retries": retry["retries"] if retry else None,
            "retry_policy": retry,
            "max_containers": max_containers,
            "concurrency_limit": d.concurrency_limit or None,
            "min_containers": _opt(autoscaler, "min_containers"),
            "buffer_containers": _opt(autoscaler, "buffer_containers"),
            "scaledown_window": _opt(autoscaler, "scaledown_window"),
            "max_concurrent_inputs": d.max_concurrent_inputs or None,
            "target_concurrent_inputs": d.target_concurrent_inputs or None,
            "batch_max_size": d.batch_max_size or None,
            "batch_wait_ms": d.batch_linger_ms or None,
            "secret_ids": list(d.secret_ids),
            "secret_names": [s["name"] for s in secrets if s["name"]],
            "secrets": secrets,
            "secret_env": secret_env,
            "volume_mounts": volume_mounts,
            "volumes": {vm["mount_path"]: vm["volume_name"] for vm in volume_mounts},
            "image_id": d.image_id,
            "image_layers": [dict(layer) for layer in layers],
            "image_commands": commands,
            "pip_packages": installed(user_commands, "pip install"),  # added by the user's layers
            "apt_packages": installed(user_commands, "apt-get install"),
            "all_pip_packages": installed(commands, "pip install"),  # including the base image's
            "all_apt_packages": installed(commands, "apt-get install"),
            "image_env": image_env,
            "env": env,
            "mount_ids": list(d.mount_ids),
            "image_python_packages": self._mounted_packages(d),
            "schedule": _schedule_dict(d.schedule) if d.HasField("schedule") else None,
            "cloud": d.cloud_provider_str or None,
            "regions": list(d.scheduler_placement.regions) if d.HasField("scheduler_placement") else [],
            "nonpreemptible": d.scheduler_placement.nonpreemptible if d.HasField("scheduler_placement") else False,
            "block_network": d.block_network,
            "single_use_containers": d.single_use_containers,
            "experimental_options": dict(d.experimental_options),
            "webhook": d.webhook_config.type != api_pb2.WEBHOOK_TYPE_UNSPECIFIED,
            "definition": d,  # the api_pb2.Function proto, for anything not decoded above
        }

    def _worker_spec_for(self, d: api_pb2.Function, env: dict) -> tuple[WorkerSpec | None, str | None]:
        common = {"env": dict(env), "sys_path": list(sys.path), "cwd": os.getcwd()}
        if d.is_class or d.class_serialized or d.is_method:
            return None, "modal.Cls / class methods are not supported by the local Modal test server"
        if d.definition_type == api_pb2.Function.DEFINITION_TYPE_SERIALIZED:
            if not d.function_serialized:
                return None, "serialized function has no payload"
            return WorkerSpec(kind="serialized", payload=bytes(d.function_serialized),
                              image_packages=self._mounted_packages(d), **common), None
        module_name = d.module_name
        module_dir = ""
        mod = sys.modules.get(module_name)
        main = sys.modules.get("__main__")
        if mod is not None and "." not in module_name and getattr(mod, "__file__", None):
            module_dir = os.path.dirname(os.path.abspath(mod.__file__))
        elif mod is None and main is not None and getattr(main, "__file__", None):
            if os.path.splitext(os.path.basename(main.__file__))[0] == module_name:
                module_dir = os.path.dirname(os.path.abspath(main.__file__))
        return (
            WorkerSpec(
                kind="module", module=module_name, qualname=d.implementation_name, module_dir=module_dir, **common
            ),
            None,
        )

    def _mounted_packages(self, d: api_pb2.Function) -> list[str]:
        """Top-level Python packages the image's mounts carry (``Image.add_local_python_source``)."""
        found = []
        for mount_id in d.mount_ids:
            for name in self._mounts.get(mount_id, {}).get("files", []):
                parts = name.strip("/").split("/")
                if parts[-1] == "__init__.py" and len(parts) >= 2 and parts[-2] not in found:
                    if len(parts) == 3 and parts[0] == "root":  # /root/PACKAGE/__init__.py
                        found.append(parts[-2])
        return found

    def _lookup_deployed(self, app_name: str, tag: str) -> _Fn | None:
        app = self._deployed_apps.get(app_name)
        if app is None:
            return None
        fid = app.tags.get(tag)
        fn = self._functions.get(fid) if fid else None
        if fn is None or fn.handle_metadata is None:
            return None
        return fn

    def _runtime_for(self, fn: _Fn) -> FunctionRuntime:
        if fn.runtime is None:
            fn.runtime = FunctionRuntime(
                name=fn.name,
                spec=fn.spec,
                pool_size=fn.pool_size,
                timeout_secs=fn.timeout_secs,
                batch_max_size=fn.batch_max_size,
                batch_wait_ms=fn.batch_wait_ms,
                on_outcome=self._on_outcome,
                on_log=lambda task_id, line, fn=fn: self._on_log(fn, task_id, line),
                on_worker_started=self._on_worker_started,
                on_task_state=lambda task_id, state, fn=fn: self._on_task_state(fn, task_id, state),
                spares=self._spares,
                start_delay_s=self.container_start_delay_s,
                idle_timeout_s=float(fn.record.get("scaledown_window") or 0) if fn.record else 0.0,
            )
        return fn.runtime

    def _on_worker_started(self, task_id: str) -> None:
        self.workers_started += 1

    def _on_task_state(self, fn: _Fn, task_id: str, state: str) -> None:
        self.task_states.append({"function_name": fn.name, "task_id": task_id, "state": state,
                                 "time": time.monotonic()})
        app = self._apps.get(fn.app_id)
        if app is not None:  # the client's log stream reports it as Modal does (TaskLogs.task_state)
            app.logs.append((fn.id, task_id, _TASK_STATES[state]))
            app.notify_logs()

    def container_lifetimes(self, function_name: str | None = None) -> list[tuple[float, float | None]]:
        """(start, stop) in ``time.monotonic()`` seconds of each container, stop ``None`` while it runs.

        A container starts when a worker is assigned to it (its cold start counts, as Modal bills it)
        and stops when it is reported completed (crash, timeout, scale-down after ``scaledown_window``,
        or its app stopping).
        """
        spans: dict[str, list] = {}
        for record in list(self.task_states):
            if function_name is not None and record["function_name"] != function_name:
                continue
            if record["state"] == "completed":
                if record["task_id"] in spans:  # (a container of an earlier test, stopped after reset(): not listed)
                    spans[record["task_id"]][1] = record["time"]
            else:
                spans.setdefault(record["task_id"], [record["time"], None])
        return [tuple(span) for span in spans.values()]

    def _on_log(self, fn: _Fn, task_id: str, line: str) -> None:
        line_stripped = line.rstrip("\n")
        self._log_lines.append(line_stripped)
        self.log_records.append({"function_id": fn.id, "function_name": fn.name, "task_id": task_id, "line": line_stripped})
        app = self._apps.get(fn.app_id)
        if app is not None:
            app.logs.append((fn.id, task_id, line if line.endswith("\n") else line + "\n"))
            app.notify_logs()
        if self.echo_logs:
            print(f"[{fn.name} {task_id}] {line_stripped}", file=sys.__stderr__, flush=True)

    # ---- function calls ------------------------------------------------------------------------
    def _function_map(self, req: api_pb2.FunctionMapRequest) -> api_pb2.FunctionMapResponse:
        fn = self._functions.get(req.function_id)
        if fn is None or fn.definition is None:
            raise GRPCError(Status.NOT_FOUND, f"Function {req.function_id} not found")
        call = _Call(
            self._new_id("fc"),
            fn,
            invocation_type=req.function_call_invocation_type,
            call_type=req.function_call_type,
            return_exceptions=req.return_exceptions,
        )
        self._calls[call.id] = call
        self._function_calls.append(
            {
                "function_call_id": call.id,
                "function_id": fn.id,
                "function_name": fn.name,
                "call_type": "map" if req.function_call_type == api_pb2.FUNCTION_CALL_TYPE_MAP else "unary",
                "invocation_type": req.function_call_invocation_type,
                "return_exceptions": req.return_exceptions,
            }
        )
        resp = api_pb2.FunctionMapResponse(
            function_call_id=call.id,
            function_call_jwt=call.jwt,
            sync_client_retries_enabled=True,
            max_inputs_outstanding=MAX_INPUTS_OUTSTANDING,
        )
        if fn.retry_policy is not None:
            resp.retry_policy.CopyFrom(fn.retry_policy)
        if req.pipelined_inputs:
            resp.pipelined_inputs.extend(self._accept_inputs(call, req.pipelined_inputs))
        return resp

    def _put_inputs(self, req: api_pb2.FunctionPutInputsRequest) -> api_pb2.FunctionPutInputsResponse:
        call = self._calls.get(req.function_call_id)
        if call is None or call.closed:
            raise GRPCError(Status.NOT_FOUND, f"Function call {req.function_call_id} not found or terminated")
        return api_pb2.FunctionPutInputsResponse(inputs=self._accept_inputs(call, req.inputs))

    def _accept_inputs(self, call: _Call, items) -> list[api_pb2.FunctionPutInputsResponseItem]:
        out = []
        attempts = []
        for item in items:
            inp_proto = item.input
            input_id = f"in-local{next(self._input_counter):08d}"
            inp = _Input(id=input_id, idx=item.idx, call=call, args=b"", data_format=inp_proto.data_format)
            if inp_proto.args_blob_id:
                data = self._blobs.get(inp_proto.args_blob_id)
                if data is None:
                    inp.blob_error = f"input blob {inp_proto.args_blob_id} was never uploaded"
                else:
                    inp.args = data
            else:
                inp.args = inp_proto.args
            inp.jwt = _make_jwt({"fc": call.id, "in": input_id, "idx": item.idx, "r": 0})
            call.inputs[input_id] = inp
            out.append(api_pb2.FunctionPutInputsResponseItem(idx=item.idx, input_id=input_id, input_jwt=inp.jwt))
            attempts.append(self._new_attempt(inp))
        self.inputs_received += len(out)
        self._submit(call, attempts)
        return out

    def _new_attempt(self, inp: _Input) -> Attempt:
        if inp.attempt is not None:
            inp.attempt.cancelled = True
        inp.attempt = Attempt(key=next(self._attempt_counter), args=inp.args, data_format=inp.data_format, owner=inp)
        return inp.attempt

    def _submit(self, call: _Call, attempts: list[Attempt]) -> None:
        fn = call.fn
        if not attempts:
            return
        ready = []
        for a in attempts:
            inp: _Input = a.owner
            if inp.blob_error:
                self._emit(inp, GR(status=GR.GENERIC_STATUS_FAILURE, exception=inp.blob_error), api_pb2.DATA_FORMAT_PICKLE)
            elif fn.spec is None:
                msg = fn.spec_error or "function cannot be executed by the local Modal test server"
                self._emit(inp, GR(status=GR.GENERIC_STATUS_FAILURE, exception=msg), api_pb2.DATA_FORMAT_PICKLE)
            else:
                ready.append(a)
        if ready:
            self.executions += len(ready)
            self.executions_by_function[fn.name] += len(ready)
            self._runtime_for(fn).submit(ready)

    def _retry_inputs(self, req: api_pb2.FunctionRetryInputsRequest) -> api_pb2.FunctionRetryInputsResponse:
        call_id = _decode_jwt(req.function_call_jwt).get("fc")
        call = self._calls.get(call_id)
        if call is None:
            raise GRPCError(Status.NOT_FOUND, f"Function call {call_id} not found")
        jwts = []
        attempts = []
        for item in req.inputs:
            claims = _decode_jwt(item.input_jwt)
            inp = call.inputs.get(claims.get("in"))
            if inp is None:
                raise GRPCError(Status.NOT_FOUND, f"Input {claims.get('in')} not found")
            self.retries_received += 1
            if inp.finished:
                inp.finished = False
                call.num_finished -= 1
            call.latest.pop(inp.idx, None)
            inp.retry_count = item.retry_count
            inp.jwt = _make_jwt({"fc": call.id, "in": inp.id, "idx": inp.idx, "r": item.retry_count})
            jwts.append(inp.jwt)
            attempts.append(self._new_attempt(inp))
        self._submit(call, attempts)
        return api_pb2.FunctionRetryInputsResponse(input_jwts=jwts)

    def _on_outcome(self, attempt: Attempt, kind: str, payload: Any) -> None:
        inp: _Input = attempt.owner
        call = inp.call
        if call.closed or attempt is not inp.attempt or attempt.cancelled:
            return
        inp.attempt = None
        data_format = api_pb2.DATA_FORMAT_PICKLE
        fn = call.fn
        if kind == "ok":
            data, data_format = payload
            result = GR(status=GR.GENERIC_STATUS_SUCCESS)
            self._set_data(result, data)
        elif kind in ("err", "init_error"):
            data_format = payload.get("data_format") or api_pb2.DATA_FORMAT_PICKLE
            result = GR(
                status=GR.GENERIC_STATUS_FAILURE if kind == "err" else GR.GENERIC_STATUS_INIT_FAILURE,
                exception=payload.get("repr", ""),
                traceback=payload.get("traceback", ""),
                serialized_tb=payload.get("serialized_tb", b""),
                tb_line_cache=payload.get("tb_line_cache", b""),
            )
            if kind == "init_error":
                result.status = GR.GENERIC_STATUS_FAILURE
            if payload.get("data"):
                self._set_data(result, payload["data"])
        elif kind == "crash":
            inp.internal_failures += 1
            msg = (
                f"Container for function '{fn.name}' crashed while running input {inp.id} "
                f"(worker process ended with {payload['description']})."
            )
            if inp.internal_failures >= self.max_crashes_per_input:
                # The client retries INTERNAL_FAILURE outputs of a map without limit, so a crash loop must
                # end with a terminal status: FAILURE carrying an InternalFailure exception.
                msg += f" Giving up after {inp.internal_failures} crashes of this input."
                result = GR(status=GR.GENERIC_STATUS_FAILURE, exception=msg)
                self._set_data(result, _pickled_internal_failure(msg))
            else:
                result = GR(status=GR.GENERIC_STATUS_INTERNAL_FAILURE, exception=msg)
        elif kind == "timeout":
            result = GR(
                status=GR.GENERIC_STATUS_TIMEOUT,
                exception=f"Task's current input {inp.id} hit its timeout of {fn.timeout_secs:g}s",
            )
        elif kind == "terminated":
            result = GR(status=GR.GENERIC_STATUS_TERMINATED, exception="Function call was terminated")
        else:
            raise RuntimeError(f"unknown outcome {kind!r}")

        # Server-side retries only for spawn-style calls: for sync calls the client retries itself
        # (FunctionMapResponse.sync_client_retries_enabled) through FunctionRetryInputs.
        if (
            result.status not in (GR.GENERIC_STATUS_SUCCESS, GR.GENERIC_STATUS_TERMINATED)
            and call.invocation_type not in _SYNC_TYPES
            and fn.retry_policy is not None
            and inp.server_retries < fn.retry_policy.retries
        ):
            inp.server_retries += 1
            p = fn.retry_policy
            delay_ms = p.initial_delay_ms * (p.backoff_coefficient or 1.0) ** (inp.server_retries - 1)
            delay_ms = min(max(delay_ms, 1000), p.max_delay_ms or 60_000)
            attempt2 = self._new_attempt(inp)
            self._loop.call_later(delay_ms / 1000, lambda: self._submit(call, [attempt2]))
            return
        self._emit(inp, result, data_format)

    def _set_data(self, result: api_pb2.GenericResult, data: bytes) -> None:
        if len(data) > MAX_OBJECT_SIZE_BYTES:
            blob_id = self._new_id("bl")
            self._blobs[blob_id] = data
            result.data_blob_id = blob_id
        else:
            result.data = data

    def _emit(self, inp: _Input, result: api_pb2.GenericResult, data_format: int) -> None:
        call = inp.call
        now = time.time()
        item = api_pb2.FunctionGetOutputsItem(
            result=result,
            idx=inp.idx,
            input_id=inp.id,
            data_format=data_format,
            retry_count=inp.retry_count,
            input_started_at=now,
            output_created_at=now,
        )
        call.entries.append(item)
        call.latest[inp.idx] = item
        if not inp.finished:
            inp.finished = True
            call.num_finished += 1
        self.outputs_sent += 1
        call.notify()
        app = self._apps.get(call.fn.app_id)
        if app is not None and app.client_gone and not app.stopped:
            asyncio.get_running_loop().create_task(self._stop_detached_if_done(app))

    async def _get_outputs(self, req: api_pb2.FunctionGetOutputsRequest) -> api_pb2.FunctionGetOutputsResponse:
        call = self._calls.get(req.function_call_id)
        if call is None:
            raise GRPCError(Status.NOT_FOUND, f"Function call {req.function_call_id} not found")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, min(req.timeout, LONG_POLL_CAP_SECS))
        indexed = req.HasField("start_idx")
        if not indexed and req.clear_on_success and req.timeout == 0:
            # End of a map: the client acknowledges it has every output it wants.
            call.cleared = True
            call.entries = []
            call.latest = {}
            return api_pb2.FunctionGetOutputsResponse(last_entry_id="0-0", num_unfinished_inputs=call.num_unfinished)
        if indexed:
            start, end = req.start_idx, req.end_idx if req.HasField("end_idx") else req.start_idx
        else:
            try:
                cursor = int(req.last_entry_id.split("-")[0]) if req.last_entry_id else 0
            except ValueError:
                cursor = 0
            if req.last_entry_id in ("", "0-0"):
                cursor = 0
        while True:
            if indexed:
                outputs = [call.latest[i] for i in range(start, end + 1) if i in call.latest]
            else:
                outputs = []
                size = 0
                for item in call.entries[cursor:]:
                    outputs.append(item)
                    size += len(item.result.data) + 256
                    if size > MAX_OUTPUTS_RESPONSE_BYTES or (req.max_values and len(outputs) >= req.max_values):
                        break
            if not outputs and (call.closed or self._closing):
                # Don't let a client that is still polling spin or hang: its app (or the server) is gone.
                raise GRPCError(Status.NOT_FOUND, f"Function call {call.id} was terminated (its app stopped)")
            remaining = deadline - loop.time()
            if outputs or remaining <= 0 or call.expired:
                break
            try:
                await asyncio.wait_for(call._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        resp = api_pb2.FunctionGetOutputsResponse(num_unfinished_inputs=call.num_unfinished)
        resp.outputs.extend(outputs)
        resp.idxs.extend(o.idx for o in outputs)
        if indexed:
            resp.last_entry_id = "0-0"
            if req.clear_on_success:
                for o in outputs:
                    if o.result.status == GR.GENERIC_STATUS_SUCCESS:
                        call.latest.pop(o.idx, None)
        else:
            resp.last_entry_id = f"{cursor + len(outputs)}-0"
        return resp

    def _cancel_call(self, call_id: str) -> None:
        call = self._calls.get(call_id)
        if call is None:
            return
        for inp in call.inputs.values():
            if not inp.finished:
                if inp.attempt is not None:
                    inp.attempt.cancelled = True
                    inp.attempt = None
                self._emit(inp, GR(status=GR.GENERIC_STATUS_TERMINATED), api_pb2.DATA_FORMAT_PICKLE)
        call.closed = True
        call.notify()

    async def _stop_detached_if_done(self, app: _App) -> None:
        running = [c for c in self._calls.values() if c.fn.app_id == app.id and not c.closed and c.num_unfinished]
        if not running and not app.stopped:
            await self._stop_app(app.id, reason=None, exception="", record=False)

    async def _stop_app(self, app_id: str, reason, exception: str, record: bool = True) -> None:
        app = self._apps.get(app_id)
        if app is None:
            return
        if record:
            self.apps_disconnected.append({"app_id": app_id, "reason": reason, "exception": exception})
        if app.state == api_pb2.APP_STATE_DEPLOYED:
            return
        app.stopped = True
        app.notify_logs()
        fns = [self._functions[fid] for fid in app.function_ids if fid in self._functions]
        for call in self._calls.values():
            if call.fn in fns:
                call.closed = True
                call.notify()
        await asyncio.gather(*(fn.runtime.close() for fn in fns if fn.runtime is not None))
        for fn in fns:
            fn.runtime = None

    # ---- blob HTTP endpoint ----------------------------------------------------------------------
    async def _start_http(self) -> None:
        from aiohttp import web

        async def upload(request: web.Request):
            blob_id = request.match_info["blob_id"]
            data = await request.read()
            self._blobs[blob_id] = data
            self.blob_uploads += 1
            return web.Response(status=200, headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

        async def download(request: web.Request):
            blob_id = request.match_info["blob_id"]
            data = self._blobs.get(blob_id)
            if data is None:
                return web.Response(status=404, text=f"no blob {blob_id}")
            self.blob_downloads += 1
            return web.Response(status=200, body=data, content_type="application/octet-stream")

        app = web.Application(client_max_size=1 << 31)
        app.router.add_put("/upload/{blob_id}", upload)
        app.router.add_get("/download/{blob_id}", download)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, 0)
        await site.start()
        self._http_runner = runner
        self.blob_port = site._server.sockets[0].getsockname()[1]

    # ---- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def blob_url(self) -> str:
        return f"http://{self.host}:{self.blob_port}"

    def start(self) -> "ModalTestServer":
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="modal-test-server", daemon=True)
        self._thread.start()
        try:
            self._call(self._async_start(), timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def _run_loop(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _async_start(self) -> None:
        self._closing = False
        self._grpc_server = grpclib.server.Server([_ServicerImpl(self)])
        await self._grpc_server.start(self.host, 0)
        self.port = self._grpc_server._server.sockets[0].getsockname()[1]
        await self._start_http()
        self._spares = SparePool(self.spare_workers)
        self._spares.fill()

    def _call(self, coro, timeout: float = 60):
        if self._loop is None or not self._thread or not self._thread.is_alive():
            coro.close()
            raise RuntimeError("the local Modal test server is not running")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    async def _kill_everything(self) -> None:
        for call in self._calls.values():
            call.closed = True
            call.notify()
        for app in self._apps.values():
            app.stopped = True
            app.notify_logs()
        runtimes = [fn.runtime for fn in self._functions.values() if fn.runtime is not None]
        await asyncio.gather(*(rt.close() for rt in runtimes), return_exceptions=True)
        for fn in self._functions.values():
            fn.runtime = None

    async def _async_reset(self) -> None:
        await self._kill_everything()
        counter = self._id_counter
        self._init_state()
        self._id_counter = counter  # ids stay unique across resets

    async def _async_stop(self) -> None:
        self._closing = True
        await self._kill_everything()
        if self._grpc_server is not None:
            self._grpc_server.close()
            try:
                await asyncio.wait_for(self._grpc_server.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass
        if self._spares is not None:
            await self._spares.close()
        if self._http_runner is not None:
            await self._http_runner.cleanup()

    def stop(self) -> None:
        if self._thread is None:
            return
        try:
            if self._thread.is_alive():
                self._call(self._async_stop(), timeout=30)
        finally:
            if self._loop is not None and self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._thread = None

    def reset(self) -> None:
        """Forget everything (apps, functions, secrets, records) and kill all worker processes."""
        self._call(self._async_reset(), timeout=30)

    def expire_outputs(self) -> list[str]:
        """Expire the outputs of every finished call, as Modal does once a result's retention ran out.

        ``FunctionCall.from_id(id).get()`` on such a call then raises ``modal.exception.OutputExpiredError``
        (no output, no input left unfinished). Returns the ids of the calls expired.
        """

        async def _expire() -> list[str]:
            expired = []
            for call in self._calls.values():
                if call.inputs and call.num_unfinished == 0 and (call.entries or call.latest):
                    call.entries, call.latest = [], {}
                    call.expired = True
                    expired.append(call.id)
            return expired

        return self._call(_expire())

    # ---- public API for tests ----------------------------------------------------------------------
    def add_secret(self, name: str, env: dict[str, str]) -> str:
        """Create a named secret that ``modal.Secret.from_name(name)`` finds; returns its id."""

        async def _add():
            return self._add_secret(name, env)["id"]

        return self._call(_add())

    def add_volume(self, name: str) -> str:
        """Create a named volume that ``modal.Volume.from_name(name)`` finds; returns its id."""

        async def _add():
            return self._add_volume(name)["id"]

        return self._call(_add())

    def deploy(
        self,
        app_name: str,
        function_name: str,
        fn: Callable,
        *,
        takes_batches: bool = False,
        batch_max_size: int = 32,
        batch_wait_ms: int = 20,
        max_containers: int | None = None,
        timeout: int = 300,
        retries: int | None = None,
        env: dict[str, str] | None = None,
    ) -> str:
        """Register ``fn`` as function ``function_name`` of deployed app ``app_name``.

        ``modal.Function.from_name(app_name, function_name)`` then finds it, and ``.remote()``/``.map()``
        run ``fn`` in worker processes.  ``fn`` is cloudpickled now (module-level functions by reference,
        so their module must be importable from ``sys.path``).  With ``takes_batches=True`` it behaves like
        a ``@modal.batched(max_batch_size=batch_max_size, wait_ms=batch_wait_ms)`` function: each call still
        passes one item, and ``fn`` receives lists (one list per parameter) and must return a list.
        Returns the function id.
        """
        import cloudpickle

        payload = cloudpickle.dumps(fn)

        async def _deploy():
            app = self._deployed_apps.get(app_name)
            if app is None:
                app = self._new_app(description=app_name, state=api_pb2.APP_STATE_DEPLOYED)
                app.name = app_name
                self._deployed_apps[app_name] = app
            fid = self._new_id("fu")
            definition = api_pb2.Function(
                module_name=getattr(fn, "__module__", "") or "",
                function_name=function_name,
                implementation_name=getattr(fn, "__qualname__", function_name),
                function_type=api_pb2.Function.FUNCTION_TYPE_FUNCTION,
                definition_type=api_pb2.Function.DEFINITION_TYPE_SERIALIZED,
                timeout_secs=timeout,
                app_name=app_name,
                batch_max_size=batch_max_size if takes_batches else 0,
                batch_linger_ms=batch_wait_ms if takes_batches else 0,
                supported_input_formats=[api_pb2.DATA_FORMAT_PICKLE, api_pb2.DATA_FORMAT_CBOR],
                supported_output_formats=[api_pb2.DATA_FORMAT_PICKLE, api_pb2.DATA_FORMAT_CBOR],
            )
            if max_containers:
                definition.autoscaler_settings.max_containers = max_containers
                definition.concurrency_limit = max_containers
            if retries is not None:
                definition.retry_policy.CopyFrom(
                    api_pb2.FunctionRetryPolicy(
                        retries=retries, backoff_coefficient=1.0, initial_delay_ms=1000, max_delay_ms=60_000
                    )
                )
            fn_rec = _Fn(id=fid, app_id=app.id, name=function_name, definition=definition, deployed=True)
            fn_rec.retry_policy = definition.retry_policy if retries is not None else None
            fn_rec.timeout_secs = float(timeout)
            fn_rec.batch_max_size = definition.batch_max_size
            fn_rec.batch_wait_ms = definition.batch_linger_ms
            fn_rec.pool_size = min(max_containers, self.max_pool_size) if max_containers else self.default_pool_size
            fn_rec.spec = WorkerSpec(
                kind="pickled", payload=payload, env=dict(env or {}), sys_path=list(sys.path), cwd=os.getcwd()
            )
            fn_rec.handle_metadata = api_pb2.FunctionHandleMetadata(
                function_name=function_name,
                function_type=api_pb2.Function.FUNCTION_TYPE_FUNCTION,
                definition_id=self._new_id("de"),
                app_id=app.id,
                supported_input_formats=list(definition.supported_input_formats),
                supported_output_formats=list(definition.supported_output_formats),
            )
            fn_rec.record = {
                "function_id": fid,
                "app_name": app_name,
                "function_name": function_name,
                "takes_batches": takes_batches,
                "batch_max_size": definition.batch_max_size or None,
                "max_containers": max_containers,
                "timeout_secs": timeout,
                "retries": retries,
            }
            self._functions[fid] = fn_rec
            app.function_ids.append(fid)
            app.tags[function_name] = fid
            return fid

        return self._call(_deploy())

    # snapshots ---------------------------------------------------------------------------------------
    @property
    def functions_created(self) -> list[dict]:
        return list(self._functions_created)

    @property
    def last_function(self) -> dict:
        if not self._functions_created:
            raise LookupError("no FunctionCreate received yet")
        return self._functions_created[-1]

    def function(self, name: str) -> dict:
        """The latest FunctionCreate record for the function called ``name``.

        ``name`` may be the full name Modal uses (the qualname, e.g. ``test_x.<locals>.f``) or its last part.
        """
        for rec in reversed(self._functions_created):
            if name in (rec["function_name"], rec["short_name"]):
                return rec
        raise LookupError(f"no FunctionCreate for {name!r}; got {[r['function_name'] for r in self._functions_created]}")

    @property
    def deployed_functions(self) -> dict[tuple[str, str], dict]:
        out = {}
        for app_name, app in list(self._deployed_apps.items()):
            for tag, fid in list(app.tags.items()):
                fn = self._functions.get(fid)
                if fn is not None and fn.record is not None:
                    out[(app_name, tag)] = fn.record
        return out

    @property
    def function_calls(self) -> list[dict]:
        return list(self._function_calls)

    @property
    def secrets(self) -> dict[str, dict[str, str]]:
        return {name: dict(s["env"]) for name, s in list(self._secrets_by_name.items())}

    @property
    def volumes(self) -> dict[str, str]:
        return {name: v["id"] for name, v in list(self._volumes_by_name.items())}

    @property
    def images(self) -> dict[str, dict]:
        return dict(self._images)

    @property
    def logs(self) -> list[str]:
        return list(self._log_lines)

    @property
    def apps(self) -> list[dict]:
        return [
            {"app_id": a.id, "description": a.description, "name": a.name, "state": a.state, "stopped": a.stopped}
            for a in list(self._apps.values())
        ]

    def requests(self, rpc_name: str) -> list:
        """The request protos received for ``rpc_name`` (not kept for the RPCs in ``_UNRECORDED_REQUESTS``)."""
        return [req for name, req in list(self.rpc_requests) if name == rpc_name]

    def live_worker_pids(self) -> list[int]:
        async def _pids():
            return [pid for fn in self._functions.values() if fn.runtime for pid in fn.runtime.live_worker_pids]

        return self._call(_pids())


# ----------------------------------------------------------------------------------------------
# environment + client-singleton handling
# ----------------------------------------------------------------------------------------------
def client_env(server: ModalTestServer, config_dir: str) -> dict[str, str]:
    no_proxy = ",".join(
        x for x in [os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "", "127.0.0.1", "localhost"] if x
    )
    return {
        "MODAL_SERVER_URL": server.url,
        "MODAL_TOKEN_ID": "ak-localtest",
        "MODAL_TOKEN_SECRET": "as-localtest",
        "MODAL_CONFIG_PATH": os.path.join(config_dir, "missing.toml"),
        "MODAL_ENVIRONMENT": "main",
        "MODAL_DISABLE_API_PROXY": "1",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


def drop_cached_modal_client() -> None:
    """Forget (and close) the ``modal.Client.from_env()`` singleton, so the next call reads the env again."""
    try:
        from modal._utils.async_utils import synchronizer
        from modal.client import _Client
    except ImportError:
        return
    client = _Client._client_from_env
    _Client._client_from_env = None
    if client is not None:
        try:
            synchronizer._translate_out(client).close()
        except Exception:
            pass


@contextlib.contextmanager
def running_modal_server(
    *,
    default_pool_size: int = 2,
    max_pool_size: int = 4,
    spare_workers: int = 2,
    echo_logs: bool | None = None,
    set_env: bool = True,
) -> Iterator[ModalTestServer]:
    """Start a local Modal server, point the ``modal`` client at it (env vars), yield its handle.

    Usable outside pytest, e.g. in benchmarks::

        with running_modal_server() as server:
            with app.run():
                list(f.map(range(1000)))
    """
    import tempfile

    server = ModalTestServer(
        default_pool_size=default_pool_size, max_pool_size=max_pool_size, spare_workers=spare_workers, echo_logs=echo_logs
    )
    server.start()
    saved: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory(prefix="modal-test-server-") as tmp:
        try:
            if set_env:
                env = client_env(server, tmp)
                saved = {k: os.environ.get(k) for k in env}
                os.environ.update(env)
                drop_cached_modal_client()
            yield server
        finally:
            try:
                if set_env:
                    drop_cached_modal_client()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                server.stop()
