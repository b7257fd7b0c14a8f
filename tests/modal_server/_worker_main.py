"""Worker ("container") process for the local Modal test server.

This file is executed as a script (``python _worker_main.py``) by ``workers.py``; it is not imported by the
server.  One worker process serves one function, like a Modal container.  Protocol (all frames are a 4-byte
big-endian length followed by a pickle):

parent -> worker, on the private copy of the original stdin:
  first frame: dict with the function spec (see ``_load_function``) and the environment to use;
               a worker may wait as a blank "spare" (modal already imported) until it arrives
  then: ("run", [(key, args_bytes, data_format), ...])       -- inputs executed one after another
        ("run_batch", [(key, args_bytes, data_format), ...]) -- one call of a @modal.batched-style function

worker -> parent, on a private copy of the original stdout:
  ("ready",) or ("init_error", err)         once, after the function was loaded
  ("res", key, "ok", (data, data_format))   one frame per finished input, written unbuffered
  ("res", key, "err", err)                  as soon as that input finished, so the parent knows
                                            which input was running when the process died

User code's stdout is redirected to stderr (the parent reads it as container logs) and stdin is
/dev/null, so prints and input() cannot corrupt the protocol.  BaseExceptions that are not Exceptions
(SystemExit, KeyboardInterrupt) propagate and end the process, which the parent reports as a crashed
container, as Modal does.
"""

import os
import pickle
import struct
import sys
import traceback

_HEADER = struct.Struct(">I")


def _setup_fds():
    # Keep private copies of the pipes; give user code /dev/null as stdin and stderr as stdout.
    proto_in = os.dup(0)
    proto_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    return os.fdopen(proto_in, "rb", buffering=1 << 16), proto_out


def _write_frame(fd, obj):
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    buf = memoryview(_HEADER.pack(len(data)) + data)
    while buf:
        n = os.write(fd, buf)
        buf = buf[n:]


def _read_frame(f):
    header = f.read(4)
    if len(header) < 4:
        return None
    (n,) = _HEADER.unpack(header)
    data = f.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


def _strip_worker_frames(exc):
    # Start the traceback at the first frame of user code, as Modal's container does.
    tb = exc.__traceback__
    this_file = os.path.abspath(__file__)
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) == this_file:
        tb = tb.tb_next
    if tb is not None:
        exc.__traceback__ = tb


def _error_payload(exc, task_id, data_format):
    from modal._serialization import pickle_exception, pickle_traceback
    from modal_proto import api_pb2

    _strip_worker_frames(exc)

    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    payload = {
        "repr": repr(exc)[: 1 << 20],
        "traceback": tb_text,
        "data": b"",
        "serialized_tb": b"",
        "tb_line_cache": b"",
        "data_format": data_format,
    }
    if data_format in (api_pb2.DATA_FORMAT_PICKLE, api_pb2.DATA_FORMAT_UNSPECIFIED):
        payload["data_format"] = api_pb2.DATA_FORMAT_PICKLE
        payload["data"] = pickle_exception(exc)
        payload["serialized_tb"], payload["tb_line_cache"] = pickle_traceback(exc, task_id)
    return payload


def _resolve_attr(obj, qualname):
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _unwrap_modal_function(obj):
    # An @app.function-decorated global is a modal.Function; run its raw Python function.
    try:
        import modal

        if isinstance(obj, modal.Function):
            from modal._utils.async_utils import synchronizer

            raw = synchronizer._translate_in(obj)._raw_f
            if raw is None:
                raise TypeError(f"{obj!r} has no underlying Python function (is it a class service function?)")
            return raw
    except ImportError:
        pass
    return obj


class _NotInTheImage:
    """Import hook: what a real container lacks (modal_magic itself, the user's local modules).

    A Modal container has only its image: code that isn't installed there must arrive pickled by
    value. Refusing these imports here makes a client that ships by reference fail as it would on
    Modal, instead of quietly importing the kernel's copy from the same disk.
    """

    blocked = ("modal_magic",)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (it is not installed in the container image)",
                                      name=name)
        return None


def _installed_paths(paths):
    """The kernel's sys.path entries that a container's image would have too: installed packages."""
    keep = []
    for p in paths:
        if p and ("site-packages" in p or "dist-packages" in p or p.startswith(sys.base_prefix)):
            keep.append(p)
    return keep


def _package_roots(packages):
    """Where the image's mounted local packages come from (``Image.add_local_python_source``)."""
    import importlib.util

    roots = []
    for name in packages:
        found = importlib.util.find_spec(name)
        if found is not None and found.submodule_search_locations:
            roots.append(os.path.dirname(list(found.submodule_search_locations)[0]))
    return roots


def _load_function(spec):
    paths = spec.get("sys_path") or []
    if spec["kind"] == "serialized":  # a client's function: only what pickling sent, plus the image
        in_image = spec.get("image_packages") or []
        blocker = _NotInTheImage()
        blocker.blocked = tuple(b for b in blocker.blocked if b not in in_image)
        sys.meta_path.insert(0, blocker)
        paths = _installed_paths(paths) + _package_roots(in_image)
    # (a function deployed through the test server stands for an app whose code is in its image)
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    if spec.get("cwd"):
        try:
            os.chdir(spec["cwd"])
        except OSError:
            pass
    kind = spec["kind"]
    if kind == "serialized":
        from modal._serialization import deserialize

        fn = deserialize(spec["payload"], None)
    elif kind == "pickled":
        fn = pickle.loads(spec["payload"])
    elif kind == "module":
        import importlib

        module_name = spec["module"]
        if spec.get("module_dir") and spec["module_dir"] not in sys.path:
            sys.path.insert(0, spec["module_dir"])
        module = importlib.import_module(module_name)
        fn = _resolve_attr(module, spec["qualname"])
    else:
        raise RuntimeError(f"unknown function kind {kind!r}")
    return _unwrap_modal_function(fn)


class _Runner:
    def __init__(self, fn, task_id):
        import inspect

        self.fn = fn
        self.task_id = task_id
        self.inspect = inspect
        self._loop = None

    def _call(self, args, kwargs):
        result = self.fn(*args, **kwargs)
        if self.inspect.iscoroutine(result):
            if self._loop is None:
                import asyncio

                self._loop = asyncio.new_event_loop()
            result = self._loop.run_until_complete(result)
        elif self.inspect.isgenerator(result) or self.inspect.isasyncgen(result):
            raise TypeError("generator functions are not supported by the local Modal test server")
        return result

    @staticmethod
    def _output_format(data_format):
        from modal_proto import api_pb2

        if data_format in (api_pb2.DATA_FORMAT_PICKLE, api_pb2.DATA_FORMAT_CBOR):
            return data_format
        return api_pb2.DATA_FORMAT_PICKLE

    def run(self, items, out_fd):
        from modal._serialization import deserialize_data_format, serialize_data_format

        for key, args_bytes, data_format in items:
            try:
                if args_bytes:
                    args, kwargs = deserialize_data_format(args_bytes, data_format, None)
                else:
                    args, kwargs = (), {}
                value = self._call(args, kwargs)
                fmt = self._output_format(data_format)
                frame = ("res", key, "ok", (serialize_data_format(value, fmt), fmt))
            except Exception as exc:
                frame = ("res", key, "err", _error_payload(exc, self.task_id, data_format))
            _write_frame(out_fd, frame)

    def run_batch(self, items, out_fd):
        from modal._serialization import deserialize_data_format, serialize_data_format

        keys = [key for key, _, _ in items]
        formats = [self._output_format(fmt) for _, _, fmt in items]
        try:
            param_names = list(self.inspect.signature(self.fn).parameters)
            per_input = []
            for _, args_bytes, data_format in items:
                args, kwargs = deserialize_data_format(args_bytes, data_format, None) if args_bytes else ((), {})
                if len(args) + len(kwargs) != len(param_names):
                    raise TypeError(
                        f"batched function {getattr(self.fn, '__name__', self.fn)} takes {len(param_names)} "
                        f"arguments, but one invocation in the batch has {len(args) + len(kwargs)}"
                    )
                merged = dict(zip(param_names, args))
                for k, v in kwargs.items():
                    if k not in param_names or k in merged:
                        raise TypeError(f"bad keyword argument {k!r} in one invocation of the batch")
                    merged[k] = v
                per_input.append(merged)
            batched_kwargs = {name: [m[name] for m in per_input] for name in param_names}
            values = self._call((), batched_kwargs)
            values = list(values)
            if len(values) != len(items):
                raise ValueError(
                    f"batched function returned {len(values)} outputs for a batch of {len(items)} inputs"
                )
        except Exception as exc:
            for key, (_, _, data_format) in zip(keys, items):
                _write_frame(out_fd, ("res", key, "err", _error_payload(exc, self.task_id, data_format)))
            return
        for key, value, fmt, (_, _, data_format) in zip(keys, values, formats, items):
            try:
                frame = ("res", key, "ok", (serialize_data_format(value, fmt), fmt))
            except Exception as exc:
                frame = ("res", key, "err", _error_payload(exc, self.task_id, data_format))
            _write_frame(out_fd, frame)


def main():
    # Don't let this script's directory (tests/modal_server) shadow user modules.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    proto_in, out_fd = _setup_fds()
    # Warm up while waiting to be assigned a function (this is what makes spare workers worth having).
    import modal._serialization  # noqa: F401
    import modal_proto.api_pb2  # noqa: F401

    spec = _read_frame(proto_in)
    if spec is None:
        return
    task_id = spec.get("task_id", "ta-local")
    if spec.get("env") is not None:
        os.environ.clear()
        os.environ.update(spec["env"])
    try:
        fn = _load_function(spec)
    except Exception as exc:
        from modal_proto import api_pb2

        _write_frame(out_fd, ("init_error", _error_payload(exc, task_id, api_pb2.DATA_FORMAT_PICKLE)))
        return
    runner = _Runner(fn, task_id)
    _write_frame(out_fd, ("ready",))
    while True:
        msg = _read_frame(proto_in)
        if msg is None:
            return
        op, items = msg
        if op == "run":
            runner.run(items, out_fd)
        elif op == "run_batch":
            runner.run_batch(items, out_fd)
        elif op == "exit":
            return


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (atexit hooks of user libraries, modal's synchronizer thread).
    os._exit(0)
