"""The project's commands run as a fresh `python SCRIPT ...` process runs them, without paying the import
of TensorFlow and Keras (about 6 CPU-seconds) for each: a server process, started clean (multiprocessing's
`python tests/forkrun.py FD`), imports the scripts once and never runs a TensorFlow op; each command is a child forked from it,
in its own folder, environment, argv and standard streams. The child starts from the freshly imported
modules, as a new interpreter would, so what a test sees (exit code, stdout, stderr, files) is what the
command gives on its own.

    with ForkRunner() as runner:
        proc = runner.run([sys.executable, "glow.py", "--data", "x"], cwd=tmp, env=env, timeout=300)
        proc.returncode, proc.stdout, proc.stderr   # as subprocess.run(..., capture_output=True, text=True)

A command whose KERAS_BACKEND differs from the server's, or that is not `python SCRIPT.py` / `python -m
MODULE`, runs as a plain subprocess. One command at a time per runner: make one per thread."""
import atexit
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from multiprocessing.connection import Connection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_PATH = []  # the server's sys.path as a fresh interpreter has it, before the script's folder
PRELOAD = ("flowkit", "keras", "flow_layers", "nice", "glow", "fvae", "iresnet", "tarflow", "flowkit.score")


def _child(argv, cwd, env, out, err):
    """In the forked child: become `python *argv` in cwd with env; never returns."""
    code = 1
    try:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[:] = [cwd, *extra, *BASE_PATH]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(argv[0])
            sys.argv = [script, *argv[1:]]
            sys.path[:] = [os.path.dirname(script), *extra, *BASE_PATH]
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve(conn, root, preload):
    """The server: imports `preload`, then for each request forks a child, sends its pid, then its exit code."""
    import importlib

    BASE_PATH[:] = sys.path[1:]  # a fresh interpreter's path, without this file's folder
    sys.path[:] = [root, *BASE_PATH]
    for name in preload:
        importlib.import_module(name)
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the test process is gone
            return
        if request is None:
            return
        pid = os.fork()
        if pid == 0:
            conn.close()
            _child(*request)
        conn.send(pid)
        _, status = os.waitpid(pid, 0)
        conn.send(os.waitstatus_to_exitcode(status))


class ForkRunner:
    """A server of forked commands (see the module's docstring). `backend`: the KERAS_BACKEND it imports with."""

    def __init__(self, backend=None):
        self.backend = backend or os.environ.get("KERAS_BACKEND", "tensorflow")
        self.lock, self.process, self.conn = threading.Lock(), None, None

    def _start(self):
        mine, theirs = socket.socketpair()
        env = {**os.environ, "KERAS_BACKEND": self.backend}
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()], env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(mine.detach())
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError("the fork server did not start")

    def run(self, argv, cwd, env=None, timeout=600):
        """Like subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)."""
        env = dict(os.environ if env is None else env)
        forkable = (argv[0] == sys.executable and len(argv) >= 2 and
                    (argv[1].endswith(".py") or (argv[1] == "-m" and len(argv) >= 3)))
        if not forkable or env.get("KERAS_BACKEND", "tensorflow") != self.backend:
            return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        with self.lock, tempfile.TemporaryDirectory() as folder:
            if self.process is None or self.process.poll() is not None:
                self._start()
            out, err = os.path.join(folder, "out"), os.path.join(folder, "err")
            script = argv[1:] if argv[1] == "-m" else [os.path.join(cwd, argv[1]), *argv[2:]]
            self.conn.send((script, str(cwd), env, out, err))
            pid = self.conn.recv()
            if not self.conn.poll(timeout):
                os.kill(pid, 9)
                self.conn.recv()
                raise subprocess.TimeoutExpired(argv, timeout)
            code = self.conn.recv()
            with open(out, errors="replace") as o, open(err, errors="replace") as e:
                return subprocess.CompletedProcess(argv, code, o.read(), e.read())

    def close(self):
        if self.process is not None and self.process.poll() is None:
            self.conn.send(None)
            self.process.wait(30)
        self.process = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_shared = {}


def run(argv, cwd, env=None, timeout=600):
    """ForkRunner.run on this process's shared runner (one command at a time; closed at exit)."""
    if "runner" not in _shared:
        _shared["runner"] = ForkRunner()
        atexit.register(_shared["runner"].close)
    return _shared["runner"].run(argv, cwd, env, timeout)


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])), ROOT, PRELOAD)
