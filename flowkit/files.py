"""Files on disk: the one-line UserError, atomic writes, weights files with their architecture record,
PNG pictures. TensorFlow is not used here (h5py and imageio only); importing flowkit starts it anyway."""
import contextlib
import json
import os
import re
import shutil
import tempfile


class UserError(Exception):
    """A mistake in the user's input: the scripts print it as one line and exit with code 2."""


def atomic_write(path, write):
    """write(tmp_path) into the target's folder, then rename over `path`: a kill at any instant
    leaves either the old file or the new one, never a torn file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    # keep the file's full suffix (.weights.h5, .png): Keras and imageio choose the format by it
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + base, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


CONFIG_ATTR = "flow_config"  # the architecture record: a JSON attribute of the .weights.h5 root


def save_weights_atomic(model, path, config=None, optimizer=True):
    """model.save_weights(path), atomically; `config` (a dict: the model and the flags that shape it)
    goes into the file as its architecture record, so the file says what it holds. Keras writes the
    optimizer's state too (Adam's moments: twice the weights); optimizer=False leaves it out."""
    def write(tmp):
        import h5py

        model.save_weights(tmp)
        if not optimizer:
            full = tmp + ".full.weights.h5"
            os.replace(tmp, full)
            try:
                with h5py.File(full, "r") as src, h5py.File(tmp, "w") as dst:
                    for name in src:
                        if name != "optimizer":
                            src.copy(src[name], dst, name)
                    dst.attrs.update(src.attrs)
            finally:
                os.remove(full)
        if config is not None:
            with h5py.File(tmp, "a") as f:
                f.attrs[CONFIG_ATTR] = json.dumps(config)
    atomic_write(path, write)


def check_readable(path, flag):
    """UserError unless `path` opens as an HDF5 file. A truncated download or another kind of file is
    called unreadable at once: Keras' own failure would read like a model that does not fit."""
    import h5py

    try:
        with h5py.File(path, "r"):
            pass
    except OSError as e:
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{flag} {path}: unreadable: not an HDF5 weights file, or a truncated one ({why})") from None


def read_config(path):
    """The architecture record saved in a weights file, or None (no record, or not an HDF5 file)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            text = f.attrs.get(CONFIG_ATTR)
        return json.loads(text) if text is not None else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def renamed_weights(path, rename=None):
    """`path` itself, or, when rename(name) moves some variable of that .weights.h5 file (the layout of
    an earlier version), a temporary copy with those variables at their new names: the architecture
    record kept, the optimizer's state left out (its order followed the old layout)."""
    import h5py

    names = []
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    except OSError:  # not there, or not HDF5: the loader says so
        pass
    moves = {old: new for old, new in ((n, rename(n)) for n in names) if new != old} if rename else {}
    if not moves:
        yield path
        return
    with tempfile.TemporaryDirectory() as folder:
        copy = os.path.join(folder, os.path.basename(path))
        shutil.copyfile(path, copy)
        with h5py.File(copy, "a") as f:
            for old, new in moves.items():
                f.create_dataset(new, data=f[old][()])
                del f[old]
            if "optimizer" in f:
                del f["optimizer"]
        yield copy


# TarFlow's blocks before TarBlock took its Transformer as a network: {list attribute: (its layer now, leaf)}
_OLD_TARBLOCK = {"attention_norms": ("attentions/attention", "norm"), "qkv": ("attentions/attention", "qkv"),
                 "attention_out": ("attentions/attention", "out"), "mlp_norms": ("mlps/mlp", "norm"),
                 "mlp_in": ("mlps/mlp", "dense_in"), "mlp_out": ("mlps/mlp", "dense_out")}


def old_tarblock_path(path):
    """A variable's path in a .weights.h5 file written before TarBlock took its Transformer as a network
    (lists such as `tar_block/qkv/dense_1/vars/0`), as it is now (`tar_block/network/attentions/
    attention_1/qkv/vars/0`); any other path unchanged. A `rename` for `renamed_weights`."""
    found = re.fullmatch(r"(.*/tar_block(?:_\d+)?)/(\w+)/(.*)", path)
    if not found or found[2] == "network":
        return path
    block, attr, rest = found.groups()
    if attr in _OLD_TARBLOCK:
        item = re.fullmatch(r"[a-z_]+?(_\d+)?/(vars/.*)", rest)
        where, leaf = _OLD_TARBLOCK[attr]
        return f"{block}/network/{where}{item[1] or ''}/{leaf}/{item[2]}"
    return f"{block}/network/{attr}/{rest}"  # its own variables (vars/) and proj_in, out_norm, proj_out


def save_png(path, image):
    """A uint8 picture (h, w) or (h, w, 3) as a PNG, atomically."""
    import imageio.v2 as imageio

    atomic_write(path, lambda tmp: imageio.imwrite(tmp, image, format="png"))


def write_png(path, image, about=None):
    """save_png, then the line that says where the picture went: `wrote PATH[ (about)]`."""
    save_png(path, image)
    print(f"wrote {path}" + (f" ({about})" if about else ""), flush=True)
    return path
