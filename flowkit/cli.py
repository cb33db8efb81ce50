"""The command line every script shares: the flags of a training run and the flags that shape a model
(recorded in the weights file, read back from it), their checks, the start of a run, and a script's
main with its exit codes.
"""
import argparse
import math
import os
import sys
import tempfile
import warnings

import keras

from flowkit.data import image_data
from flowkit.devices import (add_scale_out_args, choose_precision, choose_xla, compiles_with_xla, make_strategy,
                             set_mixed_precision)
from flowkit.files import UserError, check_readable, read_config, renamed_weights
from flowkit.run import RunSettings, check_run, run_folder, run_record
from flowkit.score import SAMPLES


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line `error: ...` on stderr with exit code 2, like UserError."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def check_writable(folder, flag):
    """UserError unless files can be created in `folder` (created later when missing): tried with a
    temporary file, removed at once, in the folder or else its nearest existing parent, so a bad
    --out or --weights is reported before any training, and nothing is left behind."""
    path = os.path.abspath(folder or ".")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag}: cannot write in {folder}: {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=probe)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise UserError(f"{flag}: cannot write in {folder} ({e.strerror or type(e).__name__})") from None


# --- the command line every script shares ---------------------------------------------------------

def positive(kind):
    """argparse type: a number of `kind` (int or float) > 0."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def non_negative(text):
    """argparse type: a float ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return value


def shape_arg(parser, flag, default, absent=None, **kwargs):
    """A flag that shapes the model. Its value is recorded inside the weights file, so after training
    it is optional: `parse` takes it from the record, and an explicit value that contradicts the
    record is an error. Without a record it falls back to `default`; a record written before the flag
    existed means `absent` (when given: the shape those files have)."""
    action = parser.add_argument(flag, default=None, **kwargs)
    action.help = f"{action.help or ''} (default: {default}; read from --weights' record when not given)"
    if not hasattr(parser, "shape_defaults"):
        parser.shape_defaults, parser.shape_absent = {}, {}
    parser.shape_defaults[action.dest] = default
    if absent is not None:
        parser.shape_absent[action.dest] = absent


def add_run_args(parser, *, weights, epochs, batch_size, lr, seed=None, bf16_default=False, amx_xla=False):
    """The flags of a training run, the same in every script: --epochs --batch-size --lr --weights
    --resume --max-collapses --seed --out --sample-only --score --minutes --xla --plot, and the scale-out flags. `bf16_default`: the
    model computes in mixed bfloat16 unless told otherwise, on a CPU with bfloat16 instructions
    (`choose_precision`; tools/bench.py measured where it pays and costs no likelihood). `amx_xla`: on a CPU
    with AMX it keeps float32 and compiles the step with XLA instead (`choose_xla`)."""
    p = parser
    p.set_defaults(bf16_default=bf16_default, amx_xla=amx_xla)
    p.add_argument("--epochs", type=positive(int), default=epochs, help="training epochs (the total with --resume)")
    p.add_argument("--batch-size", type=positive(int), default=batch_size, help="images per batch (global)")
    p.add_argument("--lr", type=positive(float), default=lr, help="learning rate")
    p.add_argument("--weights", default=weights,
                   help="the best weights are kept here, with the architecture record; read back by "
                        "every mode that does not train. Must end in .weights.h5")
    p.add_argument("--sample-only", action="store_true", help="no training: load --weights, write the sample grid")
    p.add_argument("--score", type=positive(int), nargs="?", const=SAMPLES, default=None, metavar="N",
                   help=f"no training: draw N samples (default {SAMPLES:,}) from --weights at the default temperature "
                        f"(and guidance), write them to OUT/NAME_scored.npz, print their sample score: FID against "
                        f"the held-out digits (with real digits' FID beside it), precision, recall, IS (flowkit.score)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run of --weights from its last completed epoch (backups in "
                        "NAME.run/ beside NAME.weights.h5); --epochs is the total")
    p.add_argument("--max-collapses", type=positive(int), default=5, metavar="N",
                   help="stop (exit code 3) after N non-finite losses, each answered by reloading "
                        "the best weights at a low learning rate")
    p.add_argument("--seed", type=int, default=seed, help="random seed (numpy, TensorFlow, Keras)")
    p.add_argument("--out", default="samples", help="folder for the pictures")
    p.add_argument("--minutes", type=positive(float), default=None, metavar="M",
                   help="a wall-clock budget: stop at the first epoch end at or past M minutes of training "
                        "(the epoch log's `minutes`, continued across --resume); --epochs still caps it")
    p.add_argument("--xla", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the training step with XLA (jit_compile=True) or not. Default: off, except a "
                        "float32 TarFlow on a CPU with AMX (flowkit.devices.choose_xla; docs/running.md); on a GPU "
                        "Keras compiles with it anyway")
    p.add_argument("--plot", action="store_true",
                   help="after training, plot the epoch log NAME.csv (test bits/dim against minutes) to NAME.png; "
                        "several runs together: python -m tools.curves A.csv B.csv")
    add_scale_out_args(p)


def _say(dest, value):
    return f"--{dest.replace('_', '-')} {value}"


FOLDER_RECORD = ("data", "split_seed", "held_out")  # what the record keeps of a training folder (records_folder)


def recorded_folder(record, source):
    """The image folder a record names, when it is still there; else one line naming the --data to give."""
    folder = record["data"]
    if not os.path.isdir(folder):
        raise UserError(f"{source} was trained on the images in {folder}, which is not there any more: "
                        f"give --data {folder} once it is back, or --data with another folder of such images")
    return folder


def parse(parser, argv=None, *, model, uses_weights=(), images=None, reads_data=(), records_folder=False):
    """Parses and checks the shared flags, then resolves the model's shape into `args.config`
    ({dest: value} of every shape flag, plus what the record holds besides): an explicit flag, else
    the record in --weights (modes that load weights: --sample-only and the `uses_weights` dests)
    or in the run folder (--resume), else the flag's default. An explicit flag that contradicts the
    record is a one-line error naming each difference. Sets args.model, args.loads_weights.
    `images` = (MNIST's side, a folder's default side): an image script's --data and --img-size
    (flowkit.data.image_data); the data's channels go into the record, and a run that reads data (it
    trains, or one of the `reads_data` dests is set) must match a loaded model's. With `records_folder`
    a run on an image folder records it (FOLDER_RECORD: its absolute path and the split's seed; the
    script adds the held-out count), and a run that reads data without --data reads that folder."""
    args = parser.parse_args(argv)
    flags = vars(args)  # by dest
    args.model = model
    args.shape_flags = list(getattr(parser, "shape_defaults", {}))
    modes = ["sample_only", "score", *uses_weights]
    args.loads_weights = any(flags[m] for m in modes)
    named = ", ".join("--" + m.replace("_", "-") for m in modes)
    if not args.weights.endswith(".weights.h5"):
        parser.error(f"--weights {args.weights}: the file name must end in .weights.h5 (Keras 3)")
    if os.path.isdir(args.weights):
        parser.error(f"--weights {args.weights}: is a folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out}: exists and is not a folder")
    if args.resume and args.loads_weights:
        parser.error(f"--resume continues training; it does not go with {named}")
    if args.xla and args.distribute != "none":  # docs/running.md: XLA's variables on one device
        parser.error(f"--xla does not go with --distribute {args.distribute}")
    if args.loads_weights and not os.path.isfile(args.weights):
        parser.error(f"--weights {args.weights}: no such file (train first; {named} use trained weights)")
    if args.loads_weights:
        check_readable(args.weights, "--weights")
        record, source, hint = read_config(args.weights), f"--weights {args.weights}", \
            "leave the flags out (they are read from the file) or pass the same values"
    elif args.resume:
        record, source, hint = run_record(args.weights), f"--resume: the run in {run_folder(args.weights)}/", \
            "pass the same flags"
    else:
        record = None
    if record is not None and record.get("model", model) != model:
        raise UserError(f"{source} holds a {record['model']} model, not a {model} one")
    given = {d: flags[d] for d in args.shape_flags}
    if record is not None:  # a record from before a flag existed holds that flag's `absent` shape
        record = {**{d: v for d, v in getattr(parser, "shape_absent", {}).items() if d in given}, **record}
        diff = [f"{_say(d, record[d])} (this run: {_say(d, v)})" for d, v in given.items()
                if v is not None and d in record and record[d] != v]
        if diff:
            raise UserError(f"{source} was trained with {', '.join(diff)}; {hint}")
    args.config = {k: v for k, v in (record or {}).items() if k != "model"}
    for d, v in given.items():
        if v is None:
            v = args.config.get(d, parser.shape_defaults[d])
        setattr(args, d, v)
        args.config[d] = v
    if images is not None:
        reads = not args.loads_weights or any(flags[d] for d in reads_data)
        if records_folder and args.data is None and reads and (record or {}).get("data"):
            args.data = recorded_folder(record, source)
        args.img_size, channels = image_data(args.data, args.img_size, reads, *images)
        args.config["img_size"] = args.img_size
        if not args.loads_weights:
            args.config["channels"] = channels
            if records_folder and channels == 3:
                args.config.update(data=os.path.abspath(args.data), split_seed=args.seed)
        elif args.config.setdefault("channels", channels) != channels and reads:
            raise UserError(f"--weights {args.weights} holds a model of {args.config['channels']} channel(s); "
                            f"--data {args.data or 'MNIST'} has {channels}: give the kind of images it was trained on "
                            f"with --data ({'a folder of images' if args.config['channels'] == 3 else 'an mnist.npz file'})")
    if args.score and (args.config.get("channels", 1) != 1 or (args.data and os.path.isdir(args.data))):
        raise UserError(f"--score: the sample score's classifier reads MNIST digits, and --weights {args.weights} "
                        f"holds a model of {args.config.get('channels', 1)}-channel images"
                        + (f" from {args.config['data']}" if args.config.get("data") else ""))
    return args


def start(args):
    """The start of every run: the strategy (before any other TensorFlow work), the precision
    policy (with the script's bf16_default and amx_xla, which add_run_args keeps in the parser's
    defaults) and XLA, the seed, and a writable --out. Returns the strategy."""
    strategy = make_strategy(args.distribute, args.devices)
    # the bfloat16 default is for training; sampling and the experiments keep float32 unless asked
    bf16_default = args.bf16_default and not args.loads_weights
    amx_xla = args.amx_xla and not args.loads_weights and compiles_with_xla()
    args.mixed_precision, args.precision_why = choose_precision(args.mixed_precision, bf16_default, amx_xla=amx_xla)
    args.xla, xla_why = choose_xla(args.xla, amx_xla, args.mixed_precision, args.distribute)
    args.precision_why += f"; {xla_why}" if xla_why else ""
    set_mixed_precision(args.mixed_precision)
    if args.seed is not None:
        keras.utils.set_random_seed(args.seed)
    check_writable(args.out, f"--out {args.out}")
    return strategy


def run_settings(args):
    """The flags of a training run, as `parse` and `start` filled them, for flowkit.run.Run."""
    return RunSettings(weights=args.weights, record={"model": args.model, **args.config}, epochs=args.epochs,
                       resume=args.resume, max_collapses=args.max_collapses, minutes=args.minutes, plot=args.plot,
                       xla=args.xla, precision_why=args.precision_why)


def check_training(args):
    """Before the data are read and anything is written: what this run may do with what is on
    disk (an earlier run is never overwritten; --resume needs one with the same architecture,
    derived entries of args.config included) and whether --weights' folder is writable."""
    check_run(args.weights, args.resume, args.epochs)
    if args.resume:
        record = run_record(args.weights) or {}
        diff = [f"{k} {record[k]} (this run: {k} {v})" for k, v in args.config.items()
                if k not in args.shape_flags and k in record and record[k] != v]
        if diff:
            raise UserError(f"--resume: the run in {run_folder(args.weights)}/ was trained with "
                            f"{', '.join(diff)}; pass the same data")
        if args.distribute == "multiworker":
            raise UserError("--resume with --distribute multiworker is not supported: only the chief keeps "
                            "backups, the other workers would start again from epoch 0")
    check_writable(os.path.dirname(args.weights), f"--weights {args.weights}")


def check_batch_size(args, n):
    """Once the data are read: a training batch larger than the `n` training images would fill itself
    with copies (the streams repeat). Modes that load weights do not train: no check."""
    if not args.loads_weights and args.batch_size > n:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {n} training images")


def load_weights(model, args, rename=None):
    """--weights into `model`, built from args.config, for the modes that load a trained model (a run
    reloads its own best weights in flowkit.run); a file that does not fit is one line. `rename`
    maps a variable's path in a file an earlier version wrote to its path now (files.renamed_weights)."""
    try:
        with warnings.catch_warnings(), renamed_weights(args.weights, rename) as path:
            warnings.simplefilter("ignore")  # Keras warns per object before raising; we say it in one line
            model.load_weights(path)
        return
    except Exception as e:  # noqa: BLE001 - any failure is reported as one line below
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    if read_config(args.weights) is None:
        flags = ", ".join("--" + d.replace("_", "-") for d in args.shape_flags)
        raise UserError(f"--weights {args.weights}: cannot load it into this {args.model} model ({why}); the "
                        f"file holds no architecture record (an older run, or not {args.model}'s): give the "
                        f"flags it was trained with ({flags})")
    raise UserError(f"--weights {args.weights}: cannot load it into this {args.model} model ({why})")


def describe(config):
    """An architecture record as the flags that give it: `--width 64, --blocks 4, ...`; channels
    (from the data, not a flag) at the end; what it keeps of a training folder (FOLDER_RECORD) left out."""
    flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in config.items()
                      if k != "channels" and k not in FOLDER_RECORD)
    return flags + (f", {config['channels']} channel(s)" if "channels" in config else "")


def run_script(parse_args, train, experiments, argv=None):
    """A script's main: parse, `start`, then experiments(args) when the flags load weights, else
    train(args, strategy); returns the exit code (see script_main)."""
    def body():
        args = parse_args(argv)
        strategy = start(args)
        return experiments(args) if args.loads_weights else train(args, strategy)
    return script_main(body)


def script_main(body):
    """Runs a script's body() and returns its exit code: argparse's exit (--help, a rejected flag),
    UserError as one line `error: ...` and code 2, Ctrl-C outside fit (loading, building) or a second
    one as code 130 — every write is atomic, so nothing is torn."""
    try:
        return body()
    except SystemExit as e:
        return e.code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
