"""Worker processes for ``tests.harness.pool.WorkerPool``.

Two ways to start a worker (same job loop, ``_serve``):

* fork server (default): ``python -m tests.harness.worker --zygote`` is started once per
  pytest session.  It sets ``OMP_NUM_THREADS=1``, installs the collective counters, imports
  torch (and pytest) -- nothing else, no megatron, no threads -- and then only forks
  workers on request.  A fresh worker thus costs a fork (~10 ms) instead of a torch import
  (~2.5 s on 2 cores), which matters for pool start-up and for the restart after every
  failed job.
* plain process (``PA_HARNESS_NO_FORK=1``): ``python -m tests.harness.worker`` per rank.

Either way the worker process sets ``torch.set_num_threads(1)``, has the counters installed
before anything can import megatron, joins a gloo default group (``file://`` rendezvous,
``timeout=PA_TEST_COLLECTIVE_TIMEOUT`` seconds, default 90) and then serves jobs.

Protocol with the pool (pickled frames over a socketpair ``Connection``):

  worker -> pool  ("ready", rank, pid)              after init_process_group
  worker -> pool  ("init_error", rank, traceback)   if start-up failed
  pool -> worker  ("run", job_id, fn_ref, payload)  payload = pickle of (args, kwargs)
  worker -> pool  ("ok", job_id, rank, result_pickle)
  worker -> pool  ("err", job_id, rank, exc_type, message, traceback)
  pool -> worker  ("exit",)

Zygote control protocol (``Connection`` frames plus SCM_RIGHTS fd passing, same socket):

  pool -> zygote  ("spawn", spawn_id, env, log_path)  then sendfds([worker socket fd])
  zygote -> pool  ("zygote_ready", pid) once; ("spawned", spawn_id, pid);
                  ("exited", pid, returncode) whenever a worker ends
  pool -> zygote  ("exit",)
"""
from __future__ import annotations

import os

# Before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import datetime  # noqa: E402
import faulthandler  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import pickle  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from multiprocessing.connection import Connection  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

DEFAULT_COLLECTIVE_TIMEOUT_S = 90.0


def _send(conn: Connection, msg: tuple) -> None:
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Connection) -> tuple:
    return pickle.loads(conn.recv_bytes())


def _prepare_process() -> None:
    """Per-process setup shared by the zygote and plain workers (no threads started)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    # torch 2.13 deprecates the spellings megatron uses; keep the worker logs readable.
    warnings.filterwarnings(
        "ignore",
        message=r".*(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base"
        r"|_reduce_scatter_base|all_gather_coalesced|all_reduce_coalesced).*",
        category=FutureWarning,
    )
    from tests.harness import counting

    counting.install()  # imports torch; must precede any megatron import

    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def _orphan_watchdog(parent_pid: int) -> None:
    """Exit hard if our parent goes away, even while stuck in a collective."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(3)


def _resolve(fn_ref: tuple) -> object:
    if fn_ref[0] == "pickle":
        return pickle.loads(fn_ref[1])
    _, module_name, qualname, module_file = fn_ref
    try:
        mod = importlib.import_module(module_name)
    except ImportError:
        mod = sys.modules.get(module_name)
        if mod is None:
            if not module_file:
                raise
            # A test module pytest imported under a name that is not importable here
            # (e.g. rootdir-relative basename): load it from its file under that name.
            spec = importlib.util.spec_from_file_location(module_name, module_file)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = mod
            spec.loader.exec_module(mod)
    obj = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _cleanup_after_job(dist, groups_before: set) -> None:
    """Leave no parallel state behind for the next job (best effort, no megatron import)."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None:
        try:
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
        except Exception:
            traceback.print_exc()
    try:
        world = dist.distributed_c10d._world
        default = dist.distributed_c10d.GroupMember.WORLD
        for pg in [pg for pg in list(world.pg_map) if pg not in groups_before and pg is not default]:
            dist.destroy_process_group(pg)
    except Exception:
        traceback.print_exc()


def _serve(conn: Connection) -> int:
    """Join the gloo group and run jobs until told to exit. Env: RANK, WORLD_SIZE, ..."""
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    init_file = os.environ["PA_HARNESS_INIT_FILE"]
    threading.Thread(target=_orphan_watchdog, args=(os.getppid(),), daemon=True).start()
    faulthandler.enable()
    if hasattr(signal, "SIGUSR1"):
        # The pool sends SIGUSR1 to a hung rank to get its Python stacks into the log.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        from tests.harness import counting

        counting.install()  # no-op when inherited from the zygote

        import torch.distributed as dist

        timeout_s = float(
            os.environ.get("PA_TEST_COLLECTIVE_TIMEOUT") or DEFAULT_COLLECTIVE_TIMEOUT_S
        )
        dist.init_process_group(
            backend="gloo",
            init_method="file://" + init_file,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except BaseException:
        _send(conn, ("init_error", rank, traceback.format_exc()))
        return 1
    _send(conn, ("ready", rank, os.getpid()))

    while True:
        try:
            msg = _recv(conn)
        except (EOFError, OSError):
            break
        if msg[0] == "exit":
            break
        if msg[0] != "run":
            continue
        _, job_id, fn_ref, payload = msg
        groups_before = set(dist.distributed_c10d._world.pg_map)
        counting.reset()
        try:
            fn = _resolve(fn_ref)
            args, kwargs = pickle.loads(payload)
            result = fn(*args, **kwargs)
            reply = ("ok", job_id, rank, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        except BaseException as exc:  # noqa: BLE001 - report everything, incl. pytest.skip
            tb = traceback.format_exc()
            t = type(exc)
            reply = ("err", job_id, rank, f"{t.__module__}.{t.__qualname__}", str(exc), tb)
        _cleanup_after_job(dist, groups_before)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            _send(conn, reply)
        except (EOFError, OSError):
            break
    try:
        dist.destroy_process_group()
    except Exception:
        pass
    return 0


def main() -> int:
    """Plain worker: ``python -m tests.harness.worker`` with PA_HARNESS_FD etc. set."""
    conn = Connection(int(os.environ["PA_HARNESS_FD"]))
    try:
        _prepare_process()
    except BaseException:
        _send(conn, ("init_error", int(os.environ.get("RANK", -1)), traceback.format_exc()))
        return 1
    return _serve(conn)


def _child(env: dict, log_path: str, fd: int, keep_closed: list) -> int:
    for c in keep_closed:
        try:
            c.close()
        except OSError:
            pass
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.environ.update(env)
    return _serve(Connection(fd))


def zygote_main() -> int:
    """Fork server: ``python -m tests.harness.worker --zygote`` with PA_HARNESS_FD set."""
    from multiprocessing.reduction import recvfds

    ctrl_fd = int(os.environ["PA_HARNESS_FD"])
    parent_pid = os.getppid()
    conn = Connection(ctrl_fd)
    sock = socket.socket(fileno=os.dup(ctrl_fd))
    _prepare_process()
    import pytest  # noqa: F401  - nearly every test module imports it; preload once

    for name in filter(None, os.environ.get("PA_HARNESS_PRELOAD", "").split(",")):
        importlib.import_module(name.strip())  # opt-in (e.g. megatron.core), off by default
    if threading.active_count() > 1:
        print(f"zygote: {threading.active_count()} threads before fork", flush=True)
    _send(conn, ("zygote_ready", os.getpid()))

    children: set[int] = set()
    try:
        while True:
            if conn.poll(0.2):
                try:
                    msg = _recv(conn)
                except (EOFError, OSError):
                    break
                if msg[0] == "exit":
                    break
                if msg[0] == "spawn":
                    _, spawn_id, env, log_path = msg
                    (fd,) = recvfds(sock, 1)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:  # worker
                        code = 1
                        try:
                            code = _child(env, log_path, fd, [conn, sock])
                        except BaseException:
                            traceback.print_exc()
                        finally:
                            try:
                                sys.stdout.flush()
                                sys.stderr.flush()
                            finally:
                                os._exit(code)
                    os.close(fd)
                    children.add(pid)
                    _send(conn, ("spawned", spawn_id, pid))
            while children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    children.clear()
                    break
                if pid == 0:
                    break
                children.discard(pid)
                _send(conn, ("exited", pid, os.waitstatus_to_exitcode(status)))
            if os.getppid() != parent_pid:
                break
    except (EOFError, OSError):
        pass
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    code = zygote_main() if "--zygote" in sys.argv[1:] else main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (gloo/megatron atexit handlers can block on dead peers).
    os._exit(code)
