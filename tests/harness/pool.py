"""A pool of gloo/CPU worker processes for multi-rank tests.

``WorkerPool(world_size)`` starts ``world_size`` worker processes once; each has
``OMP_NUM_THREADS=1`` / ``torch.set_num_threads(1)``, has the collective counters
(``tests.harness.counting``) installed before anything can import megatron, and joins a
gloo default process group (``file://`` rendezvous, collective timeout 90 s or
``PA_TEST_COLLECTIVE_TIMEOUT`` / ``collective_timeout_s``).  The pytest process itself
never joins the group.  Workers are forked from a per-session fork server
(``python -m tests.harness.worker --zygote``: torch, pytest and the counters loaded, no
megatron, no threads), so starting or restarting a pool costs a fork instead of a torch
import; ``PA_HARNESS_NO_FORK=1`` starts plain ``python -m tests.harness.worker``
processes instead.  Opt-in: ``PA_HARNESS_PRELOAD=megatron.core,...`` makes the fork server
import those modules (after installing the counters) so every worker inherits them
instead of importing megatron itself (~6 s of CPU per worker on this box).

``pool.run(fn, *args, timeout=300, **kwargs)`` runs ``fn(*args, **kwargs)`` on every rank
and returns the return values in rank order.  ``fn`` must be importable by qualified
name (a module-level function in a test module or package); arguments and return values
travel by pickle (tensors are fine).  Inside ``fn`` use ``torch.distributed`` as usual:
``dist.get_rank()`` / ``dist.get_world_size()`` and the default group are ready.

If any rank raises, dies, or does not finish (within ``timeout``, or within
``failure_grace_s`` after another rank failed -- typically blocked in a collective),
``run`` raises ``JobFailed`` whose message holds every failed rank's traceback and, for
hung/dead ranks, their Python stacks at kill time (faulthandler) and output tail.  After
any failure the workers are killed and restarted in the background, so the next job
starts clean.  If every rank calls ``pytest.skip(...)``, the test is skipped.

After each job, the worker destroys megatron's parallel state (if megatron was imported)
and every process group the job created; the default group stays.  Counters
(``tests.harness.counting``) are reset at the start of each job.

Example (``tests/distributed/test_example.py``)::

    import torch
    import torch.distributed as dist
    from tests.harness import counting

    def _sum_ranks(scale):
        t = torch.tensor([float(dist.get_rank() + 1)])
        with counting.counted() as c:
            dist.all_reduce(t)
        return t.item() * scale, dict(c.calls)

    def test_sum_ranks(pool2):                  # fixtures pool2 / pool4: tests/conftest.py
        out = pool2.run(_sum_ranks, 10.0)       # [(30.0, {...}), (30.0, {...})]
        assert [v for v, _ in out] == [30.0, 30.0]
        assert out[0][1] == {"all_reduce": 1}

Outside pytest: ``with WorkerPool(2) as pool: pool.run(fn)``.  ``run`` cannot forward a
keyword argument named ``timeout`` to ``fn`` (wrap ``fn`` in ``functools.partial``).

"""
from __future__ import annotations

import atexit
import inspect
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["WorkerPool", "JobFailed", "PoolStartError", "RankFailure", "get_shared_pool",
           "shutdown_shared_pools"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LOG_TAIL_LINES = 60
_FORWARD_MAX_BYTES = 64 * 1024


class PoolStartError(RuntimeError):
    """The workers could not be started (import error, rendezvous failure, ...)."""


@dataclass
class RankFailure:
    rank: int
    kind: str  # "error" | "hung" | "timeout" | "died"
    exc_type: str = ""
    message: str = ""
    traceback: str = ""
    output_tail: str = ""

    def render(self) -> str:
        if self.kind == "error":
            head = f"===== rank {self.rank}: raised {self.exc_type}: {self.message} ====="
            return f"{head}\n{self.traceback.rstrip()}"
        head = f"===== rank {self.rank}: {self.kind.upper()} ({self.message}) ====="
        tail = self.output_tail.rstrip() or "(no output)"
        return f"{head}\n--- last output of rank {self.rank} (incl. stacks at kill time) ---\n{tail}"


class JobFailed(RuntimeError):
    """A pool job failed on at least one rank; ``failures`` maps rank -> RankFailure."""

    def __init__(self, message: str, failures: dict[int, RankFailure]):
        super().__init__(message)
        self.failures = failures

    @property
    def ranks(self) -> list[int]:
        return sorted(self.failures)


@dataclass
class _Worker:
    rank: int
    proc: Any  # subprocess.Popen or _ForkedProc
    conn: multiprocessing.connection.Connection
    log_path: str
    ready: bool = False
    log_offset: int = 0


def _is_skip(exc_type: str) -> bool:
    return exc_type.rsplit(".", 1)[-1] == "Skipped"  # pytest.skip (module "builtins")


def _read_from(path: str, offset: int, max_bytes: int | None = None) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            start = offset if max_bytes is None else max(offset, end - max_bytes)
            f.seek(start)
            data = f.read(end - start)
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    if max_bytes is not None and start > offset:
        text = "[... output truncated ...]\n" + text
    return text


def _tail(text: str, n: int = _LOG_TAIL_LINES) -> str:
    lines = text.splitlines()
    if len(lines) > n:
        lines = [f"[... {len(lines) - n} earlier lines ...]"] + lines[-n:]
    return "\n".join(lines)


def _fn_ref(fn: Callable | str) -> tuple:
    if isinstance(fn, str):
        module, _, qualname = fn.partition(":")
        if not qualname:
            module, _, qualname = fn.rpartition(".")
        return ("ref", module, qualname, None)
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if (inspect.isfunction(fn) or inspect.isbuiltin(fn)) and module and qualname:
        if "<locals>" in qualname or "<lambda>" in qualname:
            raise TypeError(
                f"WorkerPool.run needs a module-level function, got {qualname!r} from "
                f"{module}; define it at module level in the test module"
            )
        mod = sys.modules.get(module)
        path = getattr(mod, "__file__", None)
        if module == "__main__":
            module = "__pa_main__"
        return ("ref", module, qualname, path)
    try:  # functools.partial, callable instances of importable classes, ...
        return ("pickle", pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception as exc:
        raise TypeError(f"WorkerPool.run: cannot send {fn!r} to the workers: {exc}") from exc


def _fn_name(fn: Callable | str) -> str:
    if isinstance(fn, str):
        return fn
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


class WorkerPool:
    """``world_size`` persistent gloo worker processes; see the module docstring.

    Args:
        world_size: number of ranks.
        collective_timeout_s: gloo timeout of the default group (a collective stuck longer
            raises in the worker).  Default: ``$PA_TEST_COLLECTIVE_TIMEOUT`` or 90.
        failure_grace_s: once one rank has failed, how long the others get to report
            before they are declared hung and killed.
        startup_timeout_s: how long to wait for all workers to import torch and join the
            group.
        env: extra environment variables for the workers (with the fork server they are
            set after the fork, i.e. after torch was imported).
        use_fork_server: fork workers from the session's zygote process (torch already
            imported, counters installed) instead of starting ``python -m
            tests.harness.worker`` per rank.  Default: on, unless ``PA_HARNESS_NO_FORK=1``.
    """

    def __init__(
        self,
        world_size: int,
        *,
        collective_timeout_s: float | None = None,
        failure_grace_s: float = 5.0,
        startup_timeout_s: float = 180.0,
        env: dict[str, str] | None = None,
        use_fork_server: bool | None = None,
    ):
        if world_size < 1:
            raise ValueError("world_size must be >= 1")
        self.world_size = int(world_size)
        self.collective_timeout_s = collective_timeout_s
        self.failure_grace_s = float(failure_grace_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.extra_env = dict(env or {})
        if use_fork_server is None:
            use_fork_server = os.environ.get("PA_HARNESS_NO_FORK", "") in ("", "0")
        self.use_fork_server = bool(use_fork_server) and hasattr(os, "fork")
        self.generation = 0  # incremented by every (re)start
        self.restarts = 0  # restarts after the first start
        self._workers: list[_Worker] = []
        self._job_id = 0
        self._lock = threading.RLock()
        self._closed = False
        self._tmpdir = tempfile.mkdtemp(prefix=f"pa_pool{world_size}_")
        atexit.register(self.shutdown)
        self._spawn()

    # ------------------------------------------------------------------ lifecycle
    def __repr__(self) -> str:
        return f"WorkerPool(world_size={self.world_size}, generation={self.generation})"

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def _worker_env(self, rank: int, init_file: str, fd: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
            CUDA_VISIBLE_DEVICES="",
            TOKENIZERS_PARALLELISM="false",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE=str(self.world_size),
            PA_HARNESS_FD=str(fd),
            PA_HARNESS_INIT_FILE=init_file,
            PA_HARNESS_PARENT_PID=str(os.getpid()),
        )
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.pop("PA_HARNESS_PRELOAD", None)
        if self.collective_timeout_s is not None:
            env["PA_TEST_COLLECTIVE_TIMEOUT"] = str(self.collective_timeout_s)
        pp = env.get("PYTHONPATH")
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + pp if pp else "")
        env.update(self.extra_env)
        return env

    def _spawn(self) -> None:
        """Start a fresh generation of workers (non-blocking)."""
        self.generation += 1
        gen = self.generation
        init_file = os.path.join(self._tmpdir, f"rendezvous.{gen}")
        zygote = None if self.use_fork_server is False else _get_zygote()
        workers = []
        for rank in range(self.world_size):
            parent_conn, child_conn = multiprocessing.Pipe(duplex=True)
            fd = child_conn.fileno()
            log_path = os.path.join(self._tmpdir, f"gen{gen}.rank{rank}.log")
            env = self._worker_env(rank, init_file, fd)
            with open(log_path, "wb") as log:
                if zygote is not None:
                    proc = zygote.spawn(env, log_path, fd)
                else:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "tests.harness.worker"],
                        cwd=REPO_ROOT,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        pass_fds=(fd,),
                    )
            child_conn.close()
            workers.append(_Worker(rank, proc, parent_conn, log_path))
        self._workers = workers

    def _kill_all(self) -> None:
        for w in self._workers:
            if w.proc.poll() is None:
                try:
                    w.proc.kill()
                except OSError:
                    pass
        for w in self._workers:
            try:
                w.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            w.conn.close()
        self._workers = []

    def restart(self) -> None:
        """Kill the workers and start a fresh generation (non-blocking)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("WorkerPool is shut down")
            self._kill_all()
            self.restarts += 1
            self._spawn()

    def shutdown(self) -> None:
        """Stop the workers (politely, then by force) and remove the temp dir."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in self._workers:
                try:
                    w.conn.send_bytes(pickle.dumps(("exit",)))
                except OSError:
                    pass
            deadline = time.monotonic() + 5.0
            for w in self._workers:
                try:
                    w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            self._kill_all()
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        try:
            atexit.unregister(self.shutdown)
        except Exception:
            pass

    def _wait_ready(self) -> None:
        pending = {w.rank: w for w in self._workers if not w.ready}
        if not pending:
            return
        deadline = time.monotonic() + self.startup_timeout_s
        problems: dict[int, str] = {}
        while pending and not problems:
            conns = [w.conn for w in pending.values()]
            for conn in multiprocessing.connection.wait(conns, timeout=0.2):
                w = next(w for w in pending.values() if w.conn is conn)
                try:
                    msg = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    problems[w.rank] = self._died(w).message + " during startup"
                    continue
                if msg[0] == "ready":
                    w.ready = True
                    del pending[w.rank]
                else:
                    problems[w.rank] = "startup failed:\n" + msg[2]
            for w in list(pending.values()):
                if w.rank not in problems and w.proc.poll() is not None and not w.conn.poll():
                    problems[w.rank] = f"exited with code {w.proc.returncode} during startup"
            if pending and time.monotonic() > deadline:
                for r in pending:
                    problems.setdefault(r, f"not ready after {self.startup_timeout_s:.0f}s")
        if problems:
            logs = {w.rank: _tail(_read_from(w.log_path, 0)) for w in self._workers}
            self._kill_all()
            self._spawn()  # try again on the next run()
            parts = [f"WorkerPool(world_size={self.world_size}) failed to start:"]
            for r in sorted(problems):
                parts.append(f"===== rank {r}: {problems[r]} =====\n{logs.get(r, '')}")
            raise PoolStartError("\n".join(parts))
        for w in self._workers:
            w.log_offset = os.path.getsize(w.log_path)

    # ------------------------------------------------------------------ jobs
    def run(self, fn: Callable | str, *args: Any, timeout: float = 300.0, **kwargs: Any) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order.

        ``fn``: module-level function (or ``"module:qualname"`` string, or a picklable
        callable such as ``functools.partial``).  ``timeout``: seconds for the whole job
        (not passed to ``fn``).  Raises ``JobFailed`` if any rank fails.
        """
        ref = _fn_ref(fn)
        payload = pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        name = _fn_name(fn)
        with self._lock:
            if self._closed:
                raise RuntimeError("WorkerPool is shut down")
            if not self._workers:
                self._spawn()
            self._wait_ready()
            self._job_id += 1
            job_id = self._job_id
            workers = self._workers
            for w in workers:
                w.log_offset = os.path.getsize(w.log_path)
            msg = pickle.dumps(("run", job_id, ref, payload), protocol=pickle.HIGHEST_PROTOCOL)
            for w in workers:
                try:
                    w.conn.send_bytes(msg)
                except OSError:
                    pass  # noticed below as a dead worker
            try:
                return self._collect(workers, job_id, name, timeout)
            except (JobFailed, PoolStartError):
                raise
            except BaseException as exc:  # KeyboardInterrupt, ...: workers are mid-job
                if not getattr(exc, "_pa_job_finished", False):  # (not our pytest.skip)
                    self.restart()
                raise

    def _collect(self, workers: list[_Worker], job_id: int, name: str, timeout: float) -> list:
        start = time.monotonic()
        deadline = start + timeout
        results: dict[int, Any] = {}
        failures: dict[int, RankFailure] = {}
        first_failure_at: float | None = None
        pending = {w.rank: w for w in workers}
        while pending:
            now = time.monotonic()
            if first_failure_at is not None and now >= first_failure_at + self.failure_grace_s:
                break
            if now >= deadline:
                break
            conns = [w.conn for w in pending.values()]
            for conn in multiprocessing.connection.wait(conns, timeout=0.1):
                w = next(w for w in pending.values() if w.conn is conn)
                try:
                    msg = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    failures[w.rank] = self._died(w)
                    del pending[w.rank]
                    continue
                except Exception as exc:  # result unpicklable in this process
                    failures[w.rank] = RankFailure(
                        w.rank, "error", type(exc).__name__,
                        f"could not unpickle the result in the pytest process: {exc}")
                    del pending[w.rank]
                    continue
                if msg[1] != job_id:
                    continue  # stale reply (should not happen)
                del pending[w.rank]
                if msg[0] == "ok":
                    try:
                        results[w.rank] = pickle.loads(msg[3])
                    except Exception as exc:
                        failures[w.rank] = RankFailure(
                            w.rank, "error", type(exc).__name__,
                            f"could not unpickle the result in the pytest process: {exc}")
                else:
                    _, _, rank, exc_type, message, tb = msg
                    exc_type = exc_type.removeprefix("builtins.")
                    failures[rank] = RankFailure(rank, "error", exc_type, message, tb)
            for w in list(pending.values()):
                if w.proc.poll() is not None and not w.conn.poll():
                    failures[w.rank] = self._died(w)
                    del pending[w.rank]
            if failures and first_failure_at is None:
                first_failure_at = time.monotonic()

        elapsed = time.monotonic() - start
        if pending:
            if failures:
                failed = ", ".join(str(r) for r in sorted(failures))
                why = (f"no result {self.failure_grace_s:g}s after rank(s) {failed} failed; "
                       "probably blocked in a collective; killed")
                kind = "hung"
            else:
                why = f"job exceeded timeout={timeout:g}s; killed"
                kind = "timeout"
            self._dump_stacks(list(pending.values()))
            for r in pending:
                failures[r] = RankFailure(r, kind, message=why)

        # Forward the workers' output of this job (pytest shows it for failing tests).
        for w in workers:
            text = _read_from(w.log_path, w.log_offset, _FORWARD_MAX_BYTES)
            if text.strip():
                sys.stdout.write("".join(f"[rank {w.rank}] {line}\n" for line in text.splitlines()))
            if w.rank in failures and failures[w.rank].kind != "error":
                failures[w.rank].output_tail = _tail(text)
            try:
                w.log_offset = os.path.getsize(w.log_path)
            except OSError:
                pass
        sys.stdout.flush()

        if not failures:
            return [results[r] for r in range(self.world_size)]

        all_skipped = (len(failures) == self.world_size
                       and all(f.kind == "error" and _is_skip(f.exc_type) for f in failures.values()))
        if not all_skipped:
            self.restart()  # a failed job leaves the group unusable: start clean
        if all(f.kind == "error" and _is_skip(f.exc_type) for f in failures.values()):
            import pytest

            try:
                pytest.skip(failures[min(failures)].message or "skipped on all ranks")
            except BaseException as exc:
                exc._pa_job_finished = True
                raise

        summary = "; ".join(
            f"rank {r} " + (f"raised {f.exc_type.rsplit('.', 1)[-1]}" if f.kind == "error"
                            else f.kind)
            for r, f in sorted(failures.items())
        )
        header = (f"{name} failed on rank(s) {sorted(failures)} of world_size={self.world_size} "
                  f"after {elapsed:.1f}s: {summary}")
        # Identical tracebacks (the usual case when every rank hits the same bug) are
        # printed once, under the list of ranks that raised them.
        blocks: dict[str, list[int]] = {}
        for r, f in sorted(failures.items()):
            key = f"{f.exc_type}\0{f.message}\0{f.traceback}" if f.kind == "error" else f"\0{r}"
            blocks.setdefault(key, []).append(r)
        parts = []
        for ranks in blocks.values():
            text = failures[ranks[0]].render()
            if len(ranks) > 1:
                who = "ranks " + ", ".join(map(str, ranks))
                text = text.replace(f"===== rank {ranks[0]}:", f"===== {who} (same traceback):", 1)
            parts.append(text)
        body = "\n".join(parts)
        raise JobFailed(f"{header}\n{body}", failures)

    @staticmethod
    def _died(w: _Worker) -> RankFailure:
        try:
            code = w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return RankFailure(w.rank, "died", message="worker closed its connection")
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        return RankFailure(w.rank, "died", message=f"worker died ({how})")

    def _dump_stacks(self, workers: list[_Worker]) -> None:
        """Ask hung workers for their Python stacks (faulthandler on SIGUSR1)."""
        if not hasattr(signal, "SIGUSR1"):
            return
        sent = False
        for w in workers:
            if w.proc.poll() is None:
                try:
                    w.proc.send_signal(signal.SIGUSR1)
                    sent = True
                except OSError:
                    pass
        if sent:
            time.sleep(0.5)


# ---------------------------------------------------------------------- fork server
class _ForkedProc:
    """Popen-like handle of a worker forked by the zygote (its parent is the zygote)."""

    def __init__(self, zygote: "_Zygote", pid: int):
        self._zygote = zygote
        self.pid = pid

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        return self._zygote.returncode(self.pid)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.poll()
            if code is not None:
                return code
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout)
            self._zygote.drain(0.05)


class _Zygote:
    """The session's fork server: ``python -m tests.harness.worker --zygote``."""

    def __init__(self) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix="pa_zygote_")
        self.log_path = os.path.join(self._tmpdir, "zygote.log")
        self._conn, child = multiprocessing.Pipe(duplex=True)
        self._sock = socket.socket(fileno=os.dup(self._conn.fileno()))
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   CUDA_VISIBLE_DEVICES="", PA_HARNESS_FD=str(child.fileno()))
        pp = env.get("PYTHONPATH")
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + pp if pp else "")
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.harness.worker", "--zygote"],
                cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, pass_fds=(child.fileno(),),
            )
        child.close()
        self._lock = threading.RLock()
        self._exits: dict[int, int] = {}
        self._spawned: dict[int, int] = {}
        self._live: set[int] = set()
        self._next_id = 0
        self.ready = False
        self.dead = False

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "zygote_ready":
            self.ready = True
        elif msg[0] == "spawned":
            self._spawned[msg[1]] = msg[2]
            self._live.add(msg[2])
        elif msg[0] == "exited":
            self._exits[msg[1]] = msg[2]
            self._live.discard(msg[1])

    def drain(self, timeout: float = 0.0) -> None:
        """Read whatever the zygote has sent (waiting up to ``timeout`` for the first)."""
        with self._lock:
            if self.dead:
                return
            try:
                while self._conn.poll(timeout):
                    self._handle(pickle.loads(self._conn.recv_bytes()))
                    timeout = 0.0
            except (EOFError, OSError):
                self.dead = True
                # Its workers notice (orphan watchdog) and exit within ~1 s.
                deadline = time.monotonic() + 3.0
                for pid in list(self._live):
                    while time.monotonic() < deadline and _pid_alive(pid):
                        time.sleep(0.05)
                    self._exits.setdefault(pid, -signal.SIGKILL)
                self._live.clear()

    def returncode(self, pid: int) -> int | None:
        self.drain(0.0)
        if pid in self._exits:
            return self._exits[pid]
        if self.dead:
            return -signal.SIGKILL
        return None

    def spawn(self, env: dict, log_path: str, fd: int, timeout: float = 120.0) -> _ForkedProc:
        from multiprocessing.reduction import sendfds

        with self._lock:
            self._next_id += 1
            sid = self._next_id
            try:
                self._conn.send_bytes(pickle.dumps(("spawn", sid, env, log_path)))
                sendfds(self._sock, [fd])
            except OSError:
                self.dead = True
            deadline = time.monotonic() + timeout
            while sid not in self._spawned:
                self.drain(0.1)
                if self.dead or time.monotonic() > deadline:
                    self.dead = True
                    raise PoolStartError(
                        "the harness fork server (python -m tests.harness.worker --zygote) "
                        "is not working; its log:\n" + _tail(_read_from(self.log_path, 0)))
            return _ForkedProc(self, self._spawned.pop(sid))

    def shutdown(self) -> None:
        with self._lock:
            try:
                self._conn.send_bytes(pickle.dumps(("exit",)))
            except OSError:
                pass
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self.dead = True
            self._conn.close()
            self._sock.close()
            shutil.rmtree(self._tmpdir, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_zygote: _Zygote | None = None
_zygote_lock = threading.Lock()


def _get_zygote() -> _Zygote:
    global _zygote
    with _zygote_lock:
        if _zygote is None or _zygote.dead:
            if _zygote is not None:
                _zygote.shutdown()
            _zygote = _Zygote()
            atexit.unregister(_shutdown_zygote)
            atexit.register(_shutdown_zygote)
        return _zygote


def _shutdown_zygote() -> None:
    global _zygote
    with _zygote_lock:
        z, _zygote = _zygote, None
    if z is not None:
        z.shutdown()


# ---------------------------------------------------------------------- shared pools
_shared: dict[int, WorkerPool] = {}
_shared_lock = threading.Lock()


def get_shared_pool(world_size: int) -> WorkerPool:
    """The process-wide pool of that size (started on first use)."""
    with _shared_lock:
        pool = _shared.get(world_size)
        if pool is None or pool._closed:
            pool = _shared[world_size] = WorkerPool(world_size)
        return pool


def shutdown_shared_pools() -> None:
    with _shared_lock:
        pools = list(_shared.values())
        _shared.clear()
    for pool in pools:
        pool.shutdown()
    _shutdown_zygote()
