"""tests/forkrun.py, which the README and command-line tests run the scripts through: a forked command
gives what a fresh `python ...` process gives (exit code, stdout, stderr, argv, folder, environment,
`__main__`, the path a script sees), and a command past its timeout is killed."""
import os
import subprocess
import sys

import pytest

import forkrun

SCRIPT = """import os, sys
import keras
print(sys.argv[1:], os.path.basename(os.getcwd()), os.environ.get("FORKRUN_PROBE"), __name__)
print(sys.path[0] == os.path.dirname(os.path.abspath(__file__)), "tests" in {os.path.basename(p) for p in sys.path})
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def both(argv, cwd, env):
    """(a fresh subprocess's result, the forked one's), as (exit code, stdout, stderr)."""
    fresh = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    forked = forkrun.run(argv, cwd=cwd, env=env, timeout=120)
    return [(r.returncode, r.stdout, r.stderr.strip().splitlines()[-1:]) for r in (fresh, forked)]


def test_a_forked_script_sees_what_a_fresh_process_sees(tmp_path):
    (tmp_path / "probe.py").write_text(SCRIPT)
    env = {**os.environ, "FORKRUN_PROBE": "here"}
    fresh, forked = both([sys.executable, "probe.py", "3", "--flag"], tmp_path, env)
    assert forked == fresh
    assert fresh[0] == 3 and fresh[1].splitlines() == [f"['3', '--flag'] {tmp_path.name} here __main__",
                                                       "True False"]
    assert fresh[2] == ["to stderr"]


def test_a_forked_module_and_an_exception(tmp_path):
    (tmp_path / "probe_module.py").write_text(SCRIPT.replace("__file__", "'./x'"))
    (tmp_path / "broken.py").write_text("raise ValueError('broken on purpose')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    fresh, forked = both([sys.executable, "-m", "probe_module", "0"], tmp_path, env)
    assert forked[:2] == fresh[:2] and fresh[0] == 0
    fresh, forked = both([sys.executable, "broken.py"], tmp_path, env)
    assert forked == fresh and fresh[0] == 1 and fresh[2] == ["ValueError: broken on purpose"]


def test_a_forked_command_past_its_timeout_is_killed(tmp_path):
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        forkrun.run([sys.executable, "slow.py"], cwd=tmp_path, timeout=1)
    assert forkrun.run([sys.executable, "-c", "print(1)"], cwd=tmp_path).stdout == "1\n"  # the server goes on
