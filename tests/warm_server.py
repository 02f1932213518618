"""The server behind tests/warm.py. Run as `python tests/warm_server.py SOCKET MODULE...`: imports
torch and the given modules once, then forks one child per request. The child runs a script as
`python SCRIPT ARGS` would (as __main__, with the request's argv, environment, working directory and
stdout/stderr file descriptors; a SystemExit's code, or 1 and the traceback for an exception; atexit
handlers and non-daemon threads finished before it exits); the server reports the child's pid, then
its exit status as subprocess.Popen.returncode would read it.

Forking is safe here because the server holds one thread and never ran a torch operation: no OpenMP
pool, no process group, no CUDA context exists to be copied half-made. It exits when its parent
(pytest) is gone, and its children are killed when it ends."""
import ctypes
import importlib
import json
import os
import runpy
import select
import signal
import socket
import sys
import threading
import traceback

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def main(socket_path, preload):
    for name in preload:
        importlib.import_module(name)
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:  # a fork would copy a process whose other threads are gone mid-work
        sys.exit(f"warm_server: {len(threads)} threads after importing {preload}; forking is unsafe")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(socket_path)
    server.listen(64)
    parent = os.getppid()
    print("ready", flush=True)
    children = {}  # pid -> the connection that asked for it, told its exit status when it ends
    while os.getppid() == parent:
        readable, _, _ = select.select([server], [], [], 0.02)
        if readable:
            connection, _ = server.accept()
            message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 2)
            if not message or len(fds) != 2:  # a client gone before its request was sent
                for fd in fds:
                    os.close(fd)
                connection.close()
                continue
            pid = os.fork()
            if pid == 0:
                server.close()
                for held in [connection, *children.values()]:  # no other client's socket stays open in a child
                    held.close()
                run_child(json.loads(message), fds)  # never returns
            for fd in fds:
                os.close(fd)
            tell(connection, {"pid": pid})
            children[pid] = connection
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = children.pop(pid)
            tell(connection, {"returncode": os.waitstatus_to_exitcode(status)})
            connection.close()


def tell(connection, message):
    """To a client that may have gone (a test that failed before waiting): then nobody is told."""
    try:
        connection.send(json.dumps(message).encode())
    except OSError:
        pass


def run_child(request, fds):
    """In the forked child: become `python ARGV` in the request's directory and environment. It is
    killed when the server ends (PR_SET_PDEATHSIG), so no run outlives the pytest worker."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in set(fds):
        os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exit_:
        code = exit_code(exit_.code)
    except BaseException:  # noqa: BLE001 -- what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    try:  # the interpreter's own shutdown: wait for non-daemon threads, run atexit handlers
        threading._shutdown()
        import atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def exit_code(code):
    """sys.exit(code) as the interpreter turns it into a status: None 0, an int itself, else printed, 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main(sys.argv[1], sys.argv[2:])
