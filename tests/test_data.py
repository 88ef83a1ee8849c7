"""Data: loader round trips for both layouts, digests, splits, augmentation, and every bad input."""

from __future__ import annotations

import pickle
import shutil
import urllib.request

import numpy as np
import pytest
import torch

from harness.config import DATA_DIR_ENV, DataConfig
from harness.data import (
    LAYOUTS,
    MEAN,
    STD,
    DatasetError,
    augment,
    digest,
    load_dataset,
    make_normalize,
    make_splits,
    split_indices,
)


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.fixture
def cifar10_copy(cifar10_root, tmp_path):
    """A private copy of the generated CIFAR-10, for tests that damage or change files."""
    shutil.copytree(cifar10_root / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    return tmp_path


# ----------------------------------------------------------------------------
# Loading


def test_cifar10_round_trip(cifar10_data):
    ds = load_dataset(DataConfig(root=str(cifar10_data.root), download=False))
    assert ds.name == "cifar10"
    assert ds.train_images.dtype == np.uint8 and ds.train_images.shape == (600, 3, 32, 32)
    assert ds.test_images.shape == (200, 3, 32, 32)
    np.testing.assert_array_equal(ds.train_images, cifar10_data.train_images)
    np.testing.assert_array_equal(ds.train_labels, cifar10_data.train_labels)
    np.testing.assert_array_equal(ds.test_images, cifar10_data.test_images)
    np.testing.assert_array_equal(ds.test_labels, cifar10_data.test_labels)
    assert ds.train_labels.dtype == np.int64
    assert ds.classes == cifar10_data.classes
    assert ds.coarse_classes is None and ds.fine_to_coarse is None
    assert ds.digest == digest(
        cifar10_data.train_images, cifar10_data.train_labels, cifar10_data.test_images, cifar10_data.test_labels
    )


def test_rows_are_red_then_green_then_blue(cifar10_root):
    """A (3072,) row is 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane."""
    with open(cifar10_root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f)
    ds = load_dataset(DataConfig(root=str(cifar10_root), download=False))
    row = np.asarray(raw["data"][7])
    assert ds.test_images[7, 0, 0, 5] == row[5]  # red, row 0, column 5
    assert ds.test_images[7, 1, 2, 3] == row[1024 + 2 * 32 + 3]  # green, row 2, column 3
    assert ds.test_images[7, 2, 31, 31] == row[3071]  # blue, last pixel


@pytest.mark.parametrize("label", ["fine", "coarse"])
def test_cifar100_round_trip(cifar100_data, label):
    ds = load_dataset(DataConfig(dataset="cifar100", root=str(cifar100_data.root), download=False, label=label))
    assert ds.name == "cifar100"
    np.testing.assert_array_equal(ds.train_images, cifar100_data.train_images)
    np.testing.assert_array_equal(ds.test_images, cifar100_data.test_images)
    if label == "fine":
        np.testing.assert_array_equal(ds.train_labels, cifar100_data.train_labels)
        np.testing.assert_array_equal(ds.test_labels, cifar100_data.test_labels)
        assert ds.classes == cifar100_data.classes and len(ds.classes) == 100
    else:
        np.testing.assert_array_equal(ds.train_labels, cifar100_data.train_coarse)
        np.testing.assert_array_equal(ds.test_labels, cifar100_data.test_coarse)
        assert ds.classes == cifar100_data.coarse_classes and len(ds.classes) == 20
    assert ds.coarse_classes == cifar100_data.coarse_classes
    np.testing.assert_array_equal(ds.fine_to_coarse, cifar100_data.fine_to_coarse)


# ----------------------------------------------------------------------------
# Digest


def test_digest_is_stable_across_loads_and_copies(cifar10_root, cifar10_copy):
    a = load_dataset(DataConfig(root=str(cifar10_root), download=False)).digest
    b = load_dataset(DataConfig(root=str(cifar10_root), download=False)).digest
    c = load_dataset(DataConfig(root=str(cifar10_copy), download=False)).digest
    assert len(a) == 16 and a == b == c


def test_reencoded_copy_loads_with_the_same_digest(cifar10_root, cifar10_copy):
    """Files whose bytes (checksums) differ from the release but hold the same arrays."""
    path = cifar10_copy / "cifar-10-batches-py" / "data_batch_1"
    before = path.read_bytes()
    with open(path, "rb") as f:
        batch = pickle.load(f)
    batch["note"] = "re-encoded copy"  # another pickle protocol and an extra key
    path.write_bytes(pickle.dumps(batch, protocol=5))
    assert path.read_bytes() != before
    original = load_dataset(DataConfig(root=str(cifar10_root), download=False))
    copy = load_dataset(DataConfig(root=str(cifar10_copy), download=False))
    np.testing.assert_array_equal(copy.train_images, original.train_images)
    assert copy.digest == original.digest


def test_one_changed_pixel_changes_the_digest(cifar10_root, cifar10_copy):
    path = cifar10_copy / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:
        batch = pickle.load(f)
    batch["data"] = batch["data"].copy()
    batch["data"][123, 456] ^= 1
    path.write_bytes(pickle.dumps(batch))
    original = load_dataset(DataConfig(root=str(cifar10_root), download=False)).digest
    assert load_dataset(DataConfig(root=str(cifar10_copy), download=False)).digest != original


def test_digest_covers_labels_and_shapes():
    x = np.arange(24, dtype=np.uint8)
    y = np.array([0, 1, 2], dtype=np.int64)
    assert digest(x, y) == digest(x.copy(), y.copy())
    assert digest(x, y) != digest(x, np.array([0, 2, 1]))
    assert digest(x.reshape(2, 12), y) != digest(x.reshape(3, 8), y)


# ----------------------------------------------------------------------------
# Splits


def test_split_indices_are_seeded_and_partition_the_training_set():
    train, val = split_indices(1000, 0.2, seed=0)
    assert len(train) == 800 and len(val) == 200
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(1000))
    again = split_indices(1000, 0.2, seed=0)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(val, again[1])
    other = split_indices(1000, 0.2, seed=1)
    assert not np.array_equal(val, other[1])
    assert len(split_indices(1000, 0.1, seed=0)[1]) == 100


def test_make_splits_sizes_subsets_and_determinism(cifar10_root):
    cfg = DataConfig(root=str(cifar10_root), download=False)
    ds = load_dataset(cfg)
    full = make_splits(ds, cfg)
    assert len(full.train_y) == 480 and len(full.val_y) == 120 and len(full.test_y) == 200  # 80/20
    assert full.train_x.dtype == torch.uint8 and full.train_x.shape[1:] == (3, 32, 32)
    assert full.train_y.dtype == torch.int64 and full.classes == ds.classes
    again = make_splits(ds, cfg)
    assert torch.equal(full.train_x, again.train_x) and torch.equal(full.val_y, again.val_y)
    # no image is in both parts (generated images are all distinct)
    train_rows = {bytes(r) for r in full.train_x.reshape(480, -1).numpy()}
    assert not any(bytes(r) in train_rows for r in full.val_x.reshape(120, -1).numpy())

    other = make_splits(ds, DataConfig(root=str(cifar10_root), split_seed=1))
    assert not torch.equal(full.val_x, other.val_x)

    sub = make_splits(ds, DataConfig(root=str(cifar10_root), train_subset=100, val_subset=30, test_subset=50))
    assert (len(sub.train_y), len(sub.val_y), len(sub.test_y)) == (100, 30, 50)
    assert torch.equal(sub.train_x, full.train_x[:100])  # a subset is the start of the same split
    assert torch.equal(sub.val_x, full.val_x[:30]) and torch.equal(sub.test_x, full.test_x[:50])

    tenth = make_splits(ds, DataConfig(root=str(cifar10_root), val_fraction=0.1))
    assert (len(tenth.train_y), len(tenth.val_y)) == (540, 60)


# ----------------------------------------------------------------------------
# Augmentation


def _candidates(image: torch.Tensor, pad: int = 4) -> dict[bytes, tuple[int, int, bool]]:
    """Every crop of the zero-padded image, flipped or not, keyed by its bytes."""
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    out = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + 32, dx : dx + 32]
            for flip in (False, True):
                out.setdefault((crop.flip(-1) if flip else crop).numpy().tobytes(), (dy, dx, flip))
    return out


def test_augment_is_seeded_and_keeps_shape_and_dtype():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(x, x.clone())  # the input is left alone


def test_augment_draws_on_the_batch_device_in_one_layout_pass():
    from harness.host_reads import HostReads

    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    with HostReads() as reads:
        a = augment(x, torch.Generator(device=x.device).manual_seed(5))
    assert reads.total == 0  # no offsets or flips drawn on the host and copied over
    assert torch.equal(a, augment(x, torch.Generator(device=x.device).manual_seed(5)))
    assert a.is_contiguous(memory_format=torch.channels_last)  # the gather wrote the model's layout
    assert make_normalize("cpu", channels_last=True)(a).is_contiguous(memory_format=torch.channels_last)


def test_each_output_is_a_crop_of_the_padded_image_maybe_flipped():
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment(x, torch.Generator().manual_seed(0), pad=4)
    for i in range(len(x)):
        assert out[i].numpy().tobytes() in _candidates(x[i]), f"image {i} is no crop/flip of its input"


def test_flips_are_about_half_and_every_offset_occurs():
    # pixels encode their own coordinates (red = row + 1, green = column + 1), so each output
    # tells which offset and flip made it
    rows = torch.arange(1, 33, dtype=torch.uint8)[:, None].expand(32, 32)
    image = torch.stack([rows, rows.T.contiguous(), torch.full((32, 32), 200, dtype=torch.uint8)])
    n = 4000
    out = augment(image.expand(n, 3, 32, 32).contiguous(), torch.Generator().manual_seed(0))
    table = _candidates(image)
    assert len(table) == 2 * 81
    made = [table[o.numpy().tobytes()] for o in out]  # KeyError: not a crop/flip
    flipped = sum(f for _, _, f in made) / n
    assert 0.42 < flipped < 0.58
    assert {(dy, dx) for dy, dx, _ in made} == {(dy, dx) for dy in range(9) for dx in range(9)}
    # no padding: flips only
    plain = augment(image.expand(200, 3, 32, 32).contiguous(), torch.Generator().manual_seed(0), pad=0)
    assert all(torch.equal(p, image) or torch.equal(p, image.flip(-1)) for p in plain)


def test_normalize_uses_the_cifar_statistics():
    mean = torch.tensor([round(m * 255) for m in MEAN], dtype=torch.uint8)
    x = mean.view(1, 3, 1, 1).expand(2, 3, 32, 32)
    z = make_normalize("cpu")(x)
    assert z.dtype == torch.float32 and z.abs().max() < 0.01
    white = make_normalize("cpu", channels_last=True)(torch.full((1, 3, 32, 32), 255, dtype=torch.uint8))
    assert white.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(white[0, :, 0, 0].numpy(), [(1 - m) / s for m, s in zip(MEAN, STD)], rtol=1e-5)


# ----------------------------------------------------------------------------
# Missing, corrupt and truncated data


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_missing_data_without_download_names_every_way_out(tmp_path, dataset):
    with pytest.raises(DatasetError) as e:
        load_dataset(DataConfig(dataset=dataset, root=str(tmp_path / "empty"), download=False))
    msg = one_line_error(e)
    assert "--data-dir" in msg and DATA_DIR_ENV in msg and LAYOUTS[dataset]["url"] in msg
    assert LAYOUTS[dataset]["folder"] in msg
    assert not (tmp_path / "empty").exists()  # nothing was written


def test_missing_data_offline_download_fails_with_one_line(tmp_path, monkeypatch):
    """The download is attempted and fails: a dead proxy makes this machine offline whatever its network."""
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    try:
        with pytest.raises(DatasetError) as e:
            load_dataset(DataConfig(root=str(tmp_path / "root"), download=True))
    finally:  # urllib's default opener keeps the proxies it was built with: the next test builds its own
        urllib.request.install_opener(None)
    msg = one_line_error(e)
    assert "download failed" in msg
    assert "--data-dir" in msg and DATA_DIR_ENV in msg and LAYOUTS["cifar10"]["url"] in msg


def test_a_missing_batch_file_is_named(cifar10_copy):
    path = cifar10_copy / "cifar-10-batches-py" / "data_batch_4"
    path.unlink()
    with pytest.raises(DatasetError) as e:
        load_dataset(DataConfig(root=str(cifar10_copy), download=False))
    msg = one_line_error(e)
    assert msg.startswith("missing data file") and str(path) in msg


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_or_truncated_batch_file_is_named(cifar10_copy, damage):
    path = cifar10_copy / "cifar-10-batches-py" / "data_batch_3"
    data = path.read_bytes()
    path.write_bytes(
        {"garbage": b"\x00not a pickle at all" * 50, "truncated": data[: len(data) // 2], "empty": b""}[damage]
    )
    with pytest.raises(DatasetError) as e:
        load_dataset(DataConfig(root=str(cifar10_copy), download=False))
    msg = one_line_error(e)
    assert str(path) in msg and "corrupt or truncated" in msg


@pytest.mark.parametrize("change", ["no_data", "short_rows", "label_count", "not_a_dict"])
def test_batch_with_bad_fields_is_named(cifar10_copy, change):
    path = cifar10_copy / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:
        batch = pickle.load(f)
    if change == "no_data":
        del batch["data"]
    elif change == "short_rows":
        batch["data"] = batch["data"][:, :3000]
    elif change == "label_count":
        batch["labels"] = batch["labels"][:-1]
    else:
        batch = list(batch.items())
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(DatasetError) as e:
        load_dataset(DataConfig(root=str(cifar10_copy), download=False))
    msg = one_line_error(e)
    assert msg.startswith("corrupt data file") and str(path) in msg


def test_a_corrupt_meta_file_is_named(cifar10_copy):
    path = cifar10_copy / "cifar-10-batches-py" / "batches.meta"
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(DatasetError) as e:
        load_dataset(DataConfig(root=str(cifar10_copy), download=False))
    assert str(path) in one_line_error(e)
