"""Processes for the tests that need one (a run killed, signalled or compared bitwise with one that
was; ranks of a multi-process run; the bench scripts, which start their measured workers fresh
themselves), started warm: forked from one server that imported torch and the project once
(tests/warm_server.py), so a run costs its own work instead of another 3 s of imports each time (4-6 s
for a torchrun launch of two ranks).

A warm process is a real process running `python SCRIPT ARGS` as the interpreter would run it: its
own pid, environment, working directory, stdout and stderr; SIGKILL and SIGTERM reach it, and its
returncode reads as subprocess's does (-9 when killed). What it cannot show is what happens at
import: tests of that (TORCH_LOGS, a missing package, the command line's own start) keep
subprocess.run, and tests of torchrun itself (a killed worker, SIGTERM to the agent) keep torchrun.
Ranks are launched as torchrun would launch its workers: RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each one's environment.

The server's environment is tests' ENV (one OpenMP thread, unbuffered output); a request whose
OMP_NUM_THREADS differs is refused, since OpenMP read it when the server imported torch."""
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from conftest import ROOT

# the environment of every process a test starts: one OpenMP thread each, output unbuffered
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
PRELOAD = ["torch", "fsdp_train", "frontier"]

_server = {}


def server_socket() -> str:
    """The server's socket, the server started on first use and stopped when pytest exits."""
    if "path" not in _server:
        folder = tempfile.mkdtemp(prefix="warm-")
        path = os.path.join(folder, "socket")
        process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "warm_server.py"), path, *PRELOAD],
                                   cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
        if process.stdout.readline().strip() != "ready":
            process.kill()
            raise RuntimeError(f"tests/warm_server.py did not start (exit {process.wait()})")
        atexit.register(stop_server, process, folder)
        _server.update(path=path, process=process)
    return _server["path"]


def stop_server(process, folder):
    process.kill()
    process.wait()
    Path(folder, "socket").unlink(missing_ok=True)
    os.rmdir(folder)


class WarmProcess:
    """What the tests use of subprocess.Popen: pid, stdout (and stderr unless merged into stdout), text
    mode; poll, wait, communicate, send_signal, kill; returncode."""

    def __init__(self, argv, env=None, merge_stderr=True, stdout_fd=None, stderr_fd=None):
        env = ENV if env is None else env
        if env.get("OMP_NUM_THREADS") != ENV["OMP_NUM_THREADS"]:
            raise ValueError("a warm process has the server's OMP_NUM_THREADS; use subprocess for another")
        self.args, self.returncode, self.stdout, self.stderr = list(argv), None, None, None
        if stdout_fd is None:  # pipes read by the caller
            out_read, stdout_fd = os.pipe()
            self.stdout = open(out_read, encoding="utf-8", errors="replace")
            if merge_stderr:
                stderr_fd = stdout_fd
            else:
                err_read, stderr_fd = os.pipe()
                self.stderr = open(err_read, encoding="utf-8", errors="replace")
        request = {"argv": self.args, "env": dict(env), "cwd": str(ROOT)}
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._connection.connect(server_socket())
        socket.send_fds(self._connection, [json.dumps(request).encode()], [stdout_fd, stderr_fd])
        if self.stdout is not None:  # the child holds the write ends now
            os.close(stdout_fd)
            if stderr_fd != stdout_fd:
                os.close(stderr_fd)
        self.pid = json.loads(self._connection.recv(1 << 16))["pid"]

    def poll(self):
        if self.returncode is None:
            self._read_returncode(blocking=False)
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None and not self._read_returncode(timeout=timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def _read_returncode(self, blocking=True, timeout=None) -> bool:
        """The server's word that the child ended, if it comes (now, when not blocking; within timeout)."""
        self._connection.settimeout(timeout if blocking else 0.0)
        try:
            message = self._connection.recv(1 << 16)
        except (BlockingIOError, TimeoutError):
            return False
        if not message:
            raise RuntimeError(f"tests/warm_server.py ended before pid {self.pid} did (its children die with it)")
        self.returncode = json.loads(message)["returncode"]
        self._connection.close()
        return True

    def communicate(self, timeout=None):
        """The rest of stdout (and stderr), then the exit status; past timeout, killed and TimeoutExpired."""
        outputs = {}
        readers = [threading.Thread(target=lambda name=name, f=f: outputs.__setitem__(name, f.read()), daemon=True)
                   for name, f in (("stdout", self.stdout), ("stderr", self.stderr)) if f is not None]
        for reader in readers:
            reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                self.kill()
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for f in (self.stdout, self.stderr):
            if f is not None:
                f.close()
        return outputs.get("stdout"), outputs.get("stderr")

    def send_signal(self, signum):
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # ended, not yet reported: as subprocess.Popen, nothing to do
                pass

    def kill(self):
        self.send_signal(signal.SIGKILL)


def popen(argv, env=None, merge_stderr=True) -> WarmProcess:
    """`python ARGV` started warm, its output in pipes: stderr merged into stdout unless asked not to."""
    return WarmProcess(argv, env, merge_stderr)


def run(argv, env=None, timeout=300) -> subprocess.CompletedProcess:
    """subprocess.run([python, *ARGV], capture_output=True, text=True, timeout=...), started warm."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = WarmProcess(argv, env, stdout_fd=out.fileno(), stderr_fd=err.fileno())
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(60)
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, process.returncode, out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(argv, nnodes=1, nproc_per_node=2, env=None) -> list[WarmProcess]:
    """The nnodes * nproc_per_node workers torchrun would start (on one machine), with the environment
    it gives them, each warm; stderr merged into stdout."""
    port, world = free_port(), nnodes * nproc_per_node
    return [popen(argv, dict(ENV if env is None else env, RANK=str(rank), WORLD_SIZE=str(world),
                             LOCAL_RANK=str(rank % nproc_per_node), LOCAL_WORLD_SIZE=str(nproc_per_node),
                             GROUP_RANK=str(rank // nproc_per_node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for rank in range(world)]


def wait_ranks(processes, timeout=300, grace=10):
    """Waits for every worker. Like torchrun, kills the others once one has failed, but only after
    `grace` seconds, so that a test sees whether they end by themselves (a rank left waiting in a
    collective would not). Returns (returncodes, the outputs joined in rank order)."""
    outputs = [None] * len(processes)
    readers = [threading.Thread(target=lambda i=i, p=p: outputs.__setitem__(i, p.stdout.read()), daemon=True)
               for i, p in enumerate(processes)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes):
        if any(p.returncode not in (None, 0) for p in processes):
            deadline = min(deadline, time.monotonic() + grace)
        if time.monotonic() > deadline:
            timed_out = all(p.returncode in (None, 0) for p in processes)
            for p in processes:
                p.kill()
            if timed_out:
                for p in processes:
                    p.wait(60)
                    p.stdout.close()
                raise subprocess.TimeoutExpired(processes[0].args, timeout)
        time.sleep(0.02)
    for reader, p in zip(readers, processes):
        reader.join(60)
        p.stdout.close()
    return [p.returncode for p in processes], "".join(outputs)
