"""TarFlow (tarflow.py and its layers Patchify, Flip, TarBlock): the properties the paper states, on
tiny shapes: log-det against the brute-force Jacobian, exact inverse (cached and not), causality,
the alternating token order, the denoising score, save/load, training, the script's last line and
its bad-input errors."""
import os
import sys

import keras
import numpy as np
import pytest

import forkrun
from helpers import jacobian_log_det, mnist_npz, perturb

import flow_layers as fl
import tarflow
from flowkit import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(img_size=28, channels=1, patch=7, width=8, blocks=2, layers=1, heads=2)  # 16 tokens of 49


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def np_(x):
    return keras.ops.convert_to_numpy(x)


def block(classes=0, tokens=4, dims=3, seed=0):
    """A built, perturbed TarBlock (its zero-initialised output layer made non-zero) and an input."""
    layer = fl.TarBlock(tarflow.CausalTransformer(width=8, layers=2, heads=2, classes=classes))
    x = np.random.RandomState(seed).standard_normal((2, tokens, dims)).astype(keras.config.floatx())
    y = np.array([1, 2], np.int32)
    layer([x, y] if classes else x)
    perturb(layer, 0.3, seed)
    return layer, x, y


@pytest.mark.parametrize("classes", [0, 3])
def test_block_logdet_equals_the_brute_force_jacobian(classes, float64):
    layer, x, y = block(classes)
    brute_force = jacobian_log_det(lambda x: layer([x, y] if classes else x), x)
    layer([x, y] if classes else x)
    reported = -float(np_(layer.losses[-1]))  # batch mean of log|det|
    assert np.allclose(np.mean(brute_force), reported, atol=1e-8)
    assert abs(reported) > 0.1  # the check is not 0 = 0


def test_block_starts_as_the_identity():
    layer = fl.TarBlock(tarflow.CausalTransformer(width=8, layers=1, heads=2))
    x = np.random.standard_normal((2, 5, 3)).astype("float32")
    assert np.array_equal(np_(layer(x)), x) and float(np_(layer.losses[-1])) == 0


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("classes", [0, 3])
def test_block_inverse_shares_variables_and_inverts(cache, classes):
    layer, x, y = block(classes, tokens=6)
    inverse = layer.inverse()
    z = layer([x, y] if classes else x)
    assert np.max(np.abs(np_(inverse([z, y] if classes else z, use_cache=cache)) - x)) < 1e-5
    assert inverse.inverse() is layer and not inverse.trainable_weights  # reads the forward variables


def test_causality_in_the_blocks_order():
    layer, x, _ = block(tokens=6)
    z = np_(layer(x))
    for t in range(6):
        x2 = x.copy()
        x2[:, t] += 1.0
        z2 = np_(layer(x2))
        assert np.array_equal(z2[:, :t], z[:, :t]), t  # nothing before t moves
        assert np.all(np.abs(z2[:, t] - z[:, t]) > 1e-3), t  # z_t does
        if t < 5:
            assert np.max(np.abs(z2[:, t + 1:] - z[:, t + 1:])) > 1e-4  # and later tokens see x_t


def test_guidance_mixes_conditional_and_unconditional_parameters():
    layer, x, y = block(classes=3, tokens=4)
    z = layer([x, y])
    none = np.full_like(y, 3)
    inverse = layer.inverse()  # the call's options reach `reverse` through Keras' __call__
    x_cond = np_(inverse([z, y]))  # guidance 0 by default
    x_none = np_(inverse([z, none], guidance=0.0))
    x_guided = np_(inverse([z, y], guidance=1.5))
    assert np.allclose(x_cond, x, atol=1e-5)
    assert np.max(np.abs(x_guided - x_cond)) > 1e-3 and np.max(np.abs(x_none - x_cond)) > 1e-3
    assert np.array_equal(np_(inverse([z, y])), x_cond)  # nothing of the guided call stayed behind
    # the same mixture without the cache
    assert np.allclose(np_(layer.reverse([z, y], guidance=1.5, use_cache=False)), x_guided, atol=1e-5)
    # token 1 is (1 + w)·cond − w·uncond of affine maps of the same z_1
    a_c, mu_c = (np_(p)[:, 1] for p in layer.params(x_cond, y))
    a_u, mu_u = (np_(p)[:, 1] for p in layer.params(x_cond, none))
    a, mu = 2.5 * a_c - 1.5 * a_u, 2.5 * mu_c - 1.5 * mu_u
    assert np.allclose(x_guided[:, 1], np_(z)[:, 1] * np.exp(a) + mu, atol=1e-5)


def test_patchify_layout_and_flip():
    img = np.arange(2 * 4 * 6 * 3, dtype="float32").reshape(2, 4, 6, 3)
    p = fl.Patchify(2)
    tokens = np_(p(img))
    assert tokens.shape == (2, 6, 12)
    assert np.array_equal(tokens[1, 4], img[1, 2:4, 2:4].reshape(-1))  # row 1, column 1 of the 2×3 patches
    assert np.array_equal(np_(p.inverse()(tokens)), img) and not p.losses
    f = fl.Flip()
    assert np.array_equal(np_(f(tokens)), tokens[:, ::-1]) and np.array_equal(np_(f.inverse()(f(tokens))), tokens)


def test_block_order_alternates_identity_reversed():
    encoder, decoder, flow = tarflow.build_tarflow(**{**TINY, "blocks": 3})
    steps = flow.steps
    kinds = [type(l).__name__ for l in steps]
    assert kinds == ["Patchify", "TarBlock", "Flip", "TarBlock", "Flip", "TarBlock", "Reshape"]
    perturb(encoder, 0.1)
    x = np.random.uniform(-1, 1, (2, 28, 28, 1)).astype("float32")
    h = steps[0](x)
    seen = []
    for layer in steps[1:-1]:
        if isinstance(layer, fl.TarBlock):
            seen.append(np_(h))
        h = layer(h)
    tokens = np_(steps[0](x))
    assert np.array_equal(seen[0], tokens)  # block 0 sees image order
    b0 = np_(steps[1](seen[0]))
    assert np.array_equal(seen[1], b0[:, ::-1])  # block 1 the reverse of block 0's output
    assert np.array_equal(seen[2], np_(steps[3](seen[1]))[:, ::-1])  # block 2 image order again
    assert np.allclose(np_(encoder(x)), np_(h).reshape(2, -1), atol=1e-6)


@pytest.mark.parametrize("conditional", [False, True])
def test_model_round_trip(conditional):
    """decoder(encoder(x)) = x, and the flow's inverse called with `use_cache` (which the Flow hands to its
    TarBlocks alone: Patchify, Flip and Reshape take no options) the same either way."""
    encoder, decoder, flow = tarflow.build_tarflow(**TINY, conditional=conditional)
    perturb(encoder, 0.05)
    x = np.random.uniform(-1, 1, (3, 28, 28, 1)).astype("float32")
    y = np.array([0, 4, 9], np.int32)
    z = np_(encoder([x, y] if conditional else x))
    assert np.max(np.abs(np_(decoder([z, y] if conditional else z)) - x)) <= 1e-4
    for cache in (True, False):
        x_rec = np_(flow.inverse()([z, y] if conditional else z, use_cache=cache))
        assert np.max(np.abs(x_rec - x)) <= 1e-4
    assert np.max(np.abs(z - x.reshape(3, -1))) > 1e-2  # perturbed: not the identity


def test_score_equals_finite_differences(float64):
    encoder, _, flow = tarflow.build_tarflow(**{**TINY, "patch": 14, "blocks": 2})
    perturb(encoder, 0.05)
    x = np.random.RandomState(1).uniform(-1, 1, (1, 28, 28, 1))
    g = tarflow.score(flow, x)
    h = 1e-5
    for idx in [(0, 0, 0, 0), (0, 13, 20, 0), (0, 27, 27, 0), (0, 14, 3, 0)]:
        e = np.zeros_like(x)
        e[idx] = h
        fd = (np_(tarflow.log_density(flow, x + e))[0] - np_(tarflow.log_density(flow, x - e))[0]) / (2 * h)
        assert np.isclose(g[idx], fd, rtol=1e-5, atol=1e-7), (idx, g[idx], fd)
    assert np.max(np.abs(g)) > 1e-2


@pytest.mark.parametrize("conditional", [False, True])
def test_compiled_sampling_is_the_layers_own(conditional):
    """sample() decodes through one XLA program and denoises through one traced graph: the same images
    as the flow's inverse called eagerly with the same guidance and the gradient taken op by op."""
    encoder, _, flow = tarflow.build_tarflow(**TINY, conditional=conditional)
    perturb(encoder, 0.05)
    z = np.random.RandomState(3).standard_normal((4, 28 * 28)).astype("float32")
    y = np.array([0, 3, 7, 9], np.int32) if conditional else None
    w = 1.0 if conditional else 0.0
    inputs = [z, y] if conditional else z
    x = tarflow.decode(flow, z, y, guidance=w)
    assert np.allclose(x, np_(flow.inverse()(inputs, guidance=w)), atol=1e-5)
    eager = np_(backend.grad_of_sum(lambda x, y: tarflow.log_density(flow, x, y),
                                    keras.ops.convert_to_tensor(x), y))  # op by op, not compiled
    assert np.allclose(tarflow.score(flow, x, y), eager, rtol=1e-4, atol=1e-5) and np.max(np.abs(eager)) > 1e-3
    noisy, clean = tarflow.sample(flow, z, y, guidance=w, denoise_sigma=0.1, batch=3)  # two batches
    assert np.allclose(noisy, x, atol=1e-5) and np.allclose(clean, x + 0.01 * eager, rtol=1e-4, atol=1e-5)


def test_guidance_is_an_argument_of_each_sampling_call():
    """Guided, then unguided: each call decodes at its own weight (one compiled graph per weight, none
    steered by what an earlier call set); unguided equals the decoder model's own call."""
    encoder, decoder, flow = tarflow.build_tarflow(**TINY, conditional=True)
    perturb(encoder, 0.05)
    z = np.random.RandomState(4).standard_normal((3, 28 * 28)).astype("float32")
    y = np.array([1, 5, 8], np.int32)
    plain = tarflow.sample(flow, z, y)[1]
    guided = tarflow.sample(flow, z, y, guidance=2.0)[1]
    assert np.max(np.abs(guided - plain)) > 1e-3
    assert np.array_equal(tarflow.sample(flow, z, y, guidance=0.0)[1], plain)
    assert np.allclose(plain, np_(decoder([z, y], training=False)), atol=1e-5)


def test_validation_batches_are_eval_batch_sized(tmp_path):
    args = tiny_args(tmp_path)
    k = np.zeros((600, 28, 28, 1), np.uint8)
    sizes = [len(y) for _, y in tarflow.dataset(k, np.zeros(600, np.int32), args, False)]
    assert sizes == [250, 250, 100] and args.batch_size < 250  # not the training batch
    assert {len(y) for _, y in tarflow.dataset(k, np.zeros(600, np.int32), args, True)} == {args.batch_size}


@pytest.mark.parametrize("conditional", [False, True])
def test_log_density_per_image_from_numpy(conditional):
    """Numpy images (and labels): one log p(x) per image, the same alone as in a batch; the batch
    mean is minus the encoder's training loss (the prior term plus the flow's add_loss)."""
    encoder, _, flow = tarflow.build_tarflow(**TINY, conditional=conditional)
    perturb(encoder, 0.05)
    x = np.random.RandomState(2).uniform(-1, 1, (3, 28, 28, 1)).astype("float32")
    y = np.array([0, 4, 9], np.int32) if conditional else None
    logp = np_(tarflow.log_density(flow, x, y))
    assert logp.shape == (3,) and np.ptp(logp) > 1e-2  # per image, not a batch mean
    alone = [np_(tarflow.log_density(flow, x[i:i + 1], None if y is None else y[i:i + 1]))[0] for i in range(3)]
    assert np.allclose(logp, alone, rtol=1e-5)
    z = encoder(x if y is None else [x, y], training=False)
    nll = np.mean(np_(tarflow.prior_nll(None, z))) + sum(float(np_(loss)) for loss in encoder.losses)
    assert np.isclose(-np.mean(logp), nll, rtol=1e-5)


def tiny_args(tmp_path, *more):
    return tarflow.parse_args(["--patch", "7", "--width", "8", "--blocks", "2", "--layers", "1", "--heads", "2",
                               "--weights", str(tmp_path / "t.weights.h5"), "--out", str(tmp_path), *more])


@pytest.mark.parametrize("flags", [[], ["--conditional", "--guidance", "1"]])
def test_save_load_gives_identical_samples(tmp_path, flags):
    args = tiny_args(tmp_path, *flags)
    encoder, _, flow = tarflow.build_tarflow(**args.config)
    perturb(encoder, 0.05)
    encoder.save_weights(args.weights)
    z, labels = tarflow.grid_inputs(args.std, args.dims, args.seed, args.conditional, n=3)
    before = tarflow.sample(flow, z, labels, **tarflow.steering(args))
    keras.utils.set_random_seed(5)
    encoder2, _, flow2 = tarflow.build_tarflow(**args.config)
    encoder2.load_weights(args.weights)
    after = tarflow.sample(flow2, *tarflow.grid_inputs(args.std, args.dims, args.seed, args.conditional, n=3),
                           **tarflow.steering(args))
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert np.max(np.abs(before[1] - before[0])) > 1e-4  # denoising did something


def old_layout(flow):
    """{path: variable} of a TarFlow flow's blocks as files written before TarBlock took its Transformer
    as a network held them: each block's variables by kind, one list per kind (qkv/dense_1 is layer 1's
    qkv Dense), the position embedding among the block's own variables."""
    paths = {}
    for b, block in enumerate(step for step in flow.steps if isinstance(step, fl.TarBlock)):
        net, at = block.network, "layers/flow/steps/tar_block" + (f"_{b}" if b else "")
        paths[f"{at}/vars/0"] = net.position
        for name in ("proj_in", "out_norm", "proj_out"):
            paths.update({f"{at}/{name}/vars/{j}": w for j, w in enumerate(getattr(net, name).weights)})
        for i, (att, mlp) in enumerate(zip(net.attentions, net.mlps)):
            for kind, layer in (("attention_norms/layer_normalization", att.norm), ("qkv/dense", att.qkv),
                                ("attention_out/dense", att.out), ("mlp_norms/layer_normalization", mlp.norm),
                                ("mlp_in/dense", mlp.dense_in), ("mlp_out/dense", mlp.dense_out)):
                paths.update({f"{at}/{kind}{f'_{i}' if i else ''}/vars/{j}": w for j, w in enumerate(layer.weights)})
    return paths


def test_weights_of_the_old_layout_load(tmp_path, capsys):
    """A file written before the Transformer became TarBlock's network loads: its variables are moved to
    their present paths (flowkit.files.old_tarblock_path) in a temporary copy; the model is the same."""
    import h5py
    from flowkit import cli
    from flowkit.files import UserError, old_tarblock_path

    assert old_tarblock_path("layers/conditional_flow/steps/tar_block_2/qkv/dense_1/vars/0") == \
        "layers/conditional_flow/steps/tar_block_2/network/attentions/attention_1/qkv/vars/0"
    assert old_tarblock_path("layers/flow/steps/tar_block/vars/1") == "layers/flow/steps/tar_block/network/vars/1"
    args = tiny_args(tmp_path, "--layers", "2")
    encoder, _, flow = tarflow.build_tarflow(**args.config)
    perturb(encoder, 0.05)
    old = old_layout(flow)
    assert len(old) == len(encoder.weights)  # every variable has its old path
    with h5py.File(args.weights, "w") as f:
        for path, w in old.items():
            f.create_dataset(path, data=np_(w))
    x = np.random.RandomState(3).uniform(-1, 1, (2, 28, 28, 1)).astype("float32")
    fresh, _, _ = tarflow.build_tarflow(**args.config)
    with pytest.raises(UserError):  # as it is, the file does not fit
        cli.load_weights(fresh, args)
    cli.load_weights(fresh, args, rename=old_tarblock_path)
    assert np.array_equal(np_(fresh(x)), np_(encoder(x)))
    with h5py.File(args.weights, "r") as f:  # the file is left as it was
        kinds = ["vars", "proj_in", "out_norm", "proj_out", "attention_norms", "qkv", "attention_out", "mlp_norms",
                 "mlp_in", "mlp_out"]
        assert sorted(f["layers/flow/steps/tar_block_1"]) == sorted(kinds)


def test_short_training_lowers_the_loss(tmp_path, digits):
    args = tiny_args(tmp_path, "--batch-size", "32")
    encoder, _, _ = tarflow.build_tarflow(**args.config)
    tarflow.compile_tarflow(encoder, 2e-3)
    k, y = digits[:320, ..., None], np.zeros(320, np.int32)
    data = tarflow.dataset(k, y, args, shuffle=False)
    before = encoder.evaluate(data, verbose=0)
    encoder.fit(tarflow.dataset(k, y, args, shuffle=True), epochs=3, shuffle=False, verbose=0)
    after = encoder.evaluate(data, verbose=0)
    assert after < before - 50, (before, after)


def test_tiny_run_prints_its_last_line(tmp_path, digits):
    data = mnist_npz(tmp_path / "m.npz", digits, 128, 64)
    out = forkrun.run([sys.executable, os.path.join(ROOT, "tarflow.py"), "--data", data, "--epochs", "1",
                          "--patch", "7", "--width", "8", "--blocks", "1", "--layers", "1", "--heads", "2",
                          "--noise", "uniform", "--batch-size", "32", "--weights", str(tmp_path / "t.weights.h5"),
                          "--out", str(tmp_path / "pics")], timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("test bits/dim: ") and 0 < float(last.split()[-1]) < 20, last
    assert "sample score: confident " in out.stdout and "(real held-out digits: confident " in out.stdout
    assert os.path.isfile(tmp_path / "pics" / "tarflow_samples.png")
    assert os.path.isfile(tmp_path / "pics" / "tarflow_epoch_001.png")


@pytest.mark.parametrize("flags, words", [
    (["--patch", "5"], "--patch 5 does not divide the image size 28"),
    (["--width", "30", "--heads", "4"], "--heads 4 does not divide --width 30"),
    (["--guidance", "2"], "--guidance needs a --conditional"),
    (["--noise", "laplace"], "--noise"),
    (["--sigma", "-1"], "--sigma"),
    (["--data", "no/such.npz"], "no such folder or file"),
    (["--sample-only"], "no such file"),
    (["--conditional", "--data", "FOLDER"], "--conditional needs class labels"),
])
def test_bad_inputs_one_line_exit_2(tmp_path, capsys, flags, words):
    folder = tmp_path / "imgs"
    folder.mkdir()
    flags = [str(folder) if f == "FOLDER" else f for f in flags]
    out = tmp_path / "out"
    code = tarflow.main([*flags, "--epochs", "1", "--weights", str(tmp_path / "w.weights.h5"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not out.exists() and not (tmp_path / "w.weights.h5").exists()
