"""Data: multi-resolution batches, the seeded batch stream, DDP sharding, IDX and image folders."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import rsq
from rsq.config import TrainConfig
from rsq.data import build_data, fashion_mnist, folder_policy
from rsq.data.policy import IMAGENET_MEAN, FolderPolicy
from rsq.data.folder import FolderEvalData, open_split
from rsq.data.memory import TensorTrainData
from rsq.data.multires import multi_resolution
from rsq.errors import RsqError
from rsq.train import AllResolutions

MEAN, STD = (0.5,), (0.25,)


def _downsample(x, r):
    """The reference: bilinear, antialiased, on the whole batch tensor."""
    return F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)


def _normalize(images_uint8, mean=MEAN, std=STD):
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images_uint8.float() / 255.0 - m) / s


# ----------------------------------------------------------------------------- multi-resolution
def test_multi_resolution_is_the_antialiased_downsample_of_the_same_batch():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    out = multi_resolution(x, [28, 20, 12])
    assert set(out) == {28, 20, 12}
    assert torch.equal(out[28], x)
    for r in (20, 12):
        assert out[r].shape == (4, 1, r, r)
        torch.testing.assert_close(out[r], _downsample(x, r), rtol=0, atol=0)


def test_downsample_is_antialiased():
    # A one-pixel checkerboard averages to 0.5 under an antialiased (area-like) filter; plain
    # bilinear sampling at 28 -> 12 would pick up the pattern instead.
    board = (torch.arange(28)[:, None] + torch.arange(28)[None, :]) % 2
    x = board.float()[None, None]
    small = multi_resolution(x, [28, 12])[12][0, 0, 1:-1, 1:-1]
    assert (small - 0.5).abs().max() < 0.1
    aliased = F.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)[0, 0, 1:-1, 1:-1]
    assert (aliased - 0.5).abs().max() > 0.1  # the check above can tell the difference


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.seen = []

    def forward(self, x):
        self.seen.append((x.detach().clone(), rsq.mode_state(self).current.resolution))
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1))


@pytest.mark.parametrize("channels_last", [False, True])
def test_all_resolutions_runs_the_same_batch_downsampled(channels_last):
    torch.manual_seed(0)
    model = rsq.convert(_Recorder(), [28, 20, 12]).eval()
    runner = AllResolutions(model, [28, 20, 12], channels_last=channels_last)
    x = torch.randn(5, 1, 28, 28)
    logits = runner(x)
    assert [r for _, r in model.seen] == [28, 20, 12]
    torch.testing.assert_close(model.seen[0][0], x, rtol=0, atol=0)
    for (seen, r), z in zip(model.seen, logits):
        expected_input = x if r == 28 else _downsample(x, r)
        torch.testing.assert_close(seen, expected_input, rtol=0, atol=0)
        model.seen.clear()
        with rsq.using_mode(model, r):
            torch.testing.assert_close(z, model(expected_input), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- training batches
def _random_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)


def _crop_flip_candidates(image, pad):
    """Every crop (after zero padding, in normalised space) and flip of one normalised image."""
    padded = F.pad(image, (pad, pad, pad, pad))
    h, w = image.shape[-2:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[..., dy:dy + h, dx:dx + w]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop.flip(-1)


def test_training_batches_are_one_crop_and_flip_per_image():
    n, batch = 40, 8
    images = _random_images(n)
    labels = torch.arange(n)  # labels identify the image
    data = TensorTrainData(images, labels, batch, 28, MEAN, STD, seed=3, pad=2)
    assert len(data) == n // batch
    normalised = _normalize(images)
    seen, draws = [], set()
    for x, y in data.batches(0):
        assert x.shape == (batch, 1, 28, 28) and x.dtype == torch.float32
        for b in range(batch):
            matches = [draw for draw, cand in _crop_flip_candidates(normalised[y[b]], 2) if torch.equal(cand, x[b])]
            assert len(matches) == 1, f"sample {b} is not one crop+flip of image {int(y[b])}"
            draws.add(matches[0])
        seen += y.tolist()
    assert sorted(seen) == list(range(n)), "an epoch visits every image once"
    assert len(draws) > 10 and {d[2] for d in draws} == {False, True}, "draws differ per image"


def test_largest_resolution_is_a_downsample_of_the_native_crop():
    images, labels = _random_images(16), torch.arange(16)
    native = TensorTrainData(images, labels, 8, 28, MEAN, STD, seed=1)
    small = TensorTrainData(images, labels, 8, 20, MEAN, STD, seed=1)
    for (x28, y28), (x20, y20) in zip(native.batches(2), small.batches(2)):
        assert torch.equal(y28, y20)
        torch.testing.assert_close(x20, _downsample(x28, 20), rtol=0, atol=0)


def _stream(data, epoch, start=0):
    return [(x.clone(), y.clone()) for x, y in data.batches(epoch, start)]


def test_batch_stream_is_seeded_and_repeatable():
    images, labels = _random_images(48), torch.arange(48)
    make = lambda seed: TensorTrainData(images, labels, 8, 28, MEAN, STD, seed=seed)  # noqa: E731
    a, b = _stream(make(5), 0), _stream(make(5), 0)
    assert len(a) == 6
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    order = lambda stream: torch.cat([y for _, y in stream]).tolist()  # noqa: E731
    assert order(_stream(make(5), 1)) != order(a), "another epoch, another order"
    assert sorted(order(_stream(make(5), 1))) == sorted(order(a))
    assert order(_stream(make(6), 0)) != order(a), "another seed, another order"
    # a resumed epoch sees exactly the batches the uninterrupted one saw
    tail = _stream(make(5), 0, start=2)
    assert len(tail) == 4
    for (xa, ya), (xb, yb) in zip(a[2:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_ddp_shards_concatenate_to_the_single_process_batch():
    images, labels = _random_images(50), torch.arange(50)
    single = TensorTrainData(images, labels, 16, 28, MEAN, STD, seed=2, world_size=1)
    ranks = [TensorTrainData(images, labels, 8, 28, MEAN, STD, seed=2, rank=r, world_size=2) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 3
    for epoch in (0, 1):
        for (x, y), (x0, y0), (x1, y1) in zip(single.batches(epoch), ranks[0].batches(epoch), ranks[1].batches(epoch)):
            assert torch.equal(torch.cat([x0, x1]), x)
            assert torch.equal(torch.cat([y0, y1]), y)
            assert not set(y0.tolist()) & set(y1.tolist())


def test_batch_larger_than_data_is_an_error():
    with pytest.raises(RsqError):
        TensorTrainData(_random_images(10), torch.arange(10), 16, 28, MEAN, STD)


# ----------------------------------------------------------------------------- IDX files
def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_gz(path: Path, payload: bytes):
    with gzip.open(path, "wb") as f:
        f.write(payload)


def _fake_dataset(folder: Path, n_train=24, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        image_file, label_file = fashion_mnist.FILES[split]
        _write_gz(folder / image_file, _idx(images))
        _write_gz(folder / label_file, _idx(labels))
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def fake_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("RSQ_DATA_DIR", raising=False)
    folder = tmp_path / "fmnist"
    folder.mkdir()
    arrays = _fake_dataset(folder)
    return folder, arrays


def test_fabricated_idx_files_load_exactly(fake_dir):
    folder, arrays = fake_dir
    for split in ("train", "test"):
        x, y = fashion_mnist.load(split, str(folder))
        images, labels = arrays[split]
        assert x.dtype == torch.uint8 and x.shape == (len(images), 1, 28, 28)
        assert torch.equal(x[:, 0], torch.from_numpy(images))
        assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


def test_build_data_uses_the_given_folder(fake_dir):
    folder, arrays = fake_dir
    config = TrainConfig(data_dir=str(folder), resolutions=[28, 14], batch_size=4, workers=0)
    bundle = build_data(config)
    assert (bundle.num_classes, bundle.in_chans) == (10, 1)
    assert len(bundle.train) == 24 // 4
    labels = torch.cat([y for _, y in bundle.train.batches(0)])
    assert sorted(labels.tolist()) == sorted(arrays["train"][1].tolist())
    test_images = torch.from_numpy(arrays["test"][0])[:, None]
    xs = [xs for xs, _ in bundle.test.batches()]
    x28 = torch.cat([b[28] for b in xs])
    x14 = torch.cat([b[14] for b in xs])
    expected = _normalize(test_images, fashion_mnist.MEAN, fashion_mnist.STD)
    torch.testing.assert_close(x28, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(x14, _downsample(expected, 14), rtol=1e-5, atol=1e-5)
    ys = torch.cat([y for _, y in bundle.test.batches()])
    assert torch.equal(ys, torch.from_numpy(arrays["test"][1].astype(np.int64)))


def _corrupt(folder: Path, kind: str) -> str:
    """Damage one file of a good fake data set; returns the damaged file's name."""
    image_file, label_file = fashion_mnist.FILES["train"]
    images_path, labels_path = folder / image_file, folder / label_file
    rng = np.random.default_rng(1)
    if kind == "gz_truncated":
        data = images_path.read_bytes()
        images_path.write_bytes(data[: len(data) // 2])
        return image_file
    if kind == "not_gzip":
        images_path.write_bytes(b"this is not gzip data at all" * 10)
        return image_file
    if kind == "wrong_magic":
        payload = bytearray(gzip.decompress(images_path.read_bytes()))
        payload[2] = 0x0D  # float instead of unsigned byte
        _write_gz(images_path, bytes(payload))
        return image_file
    if kind == "wrong_dims":  # a labels file where images are expected
        _write_gz(images_path, _idx(rng.integers(0, 10, (24,))))
        return image_file
    if kind == "body_truncated":
        payload = gzip.decompress(images_path.read_bytes())
        _write_gz(images_path, payload[:-100])
        return image_file
    if kind == "header_truncated":
        _write_gz(images_path, bytes([0, 0, 0x08, 3]) + (24).to_bytes(4, "big"))
        return image_file
    if kind == "label_out_of_range":
        labels = rng.integers(0, 10, (24,))
        labels[7] = 10
        _write_gz(labels_path, _idx(labels))
        return label_file
    if kind == "count_mismatch":
        _write_gz(labels_path, _idx(rng.integers(0, 10, (23,))))
        return ""
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["gz_truncated", "not_gzip", "wrong_magic", "wrong_dims", "body_truncated",
                                  "header_truncated", "label_out_of_range", "count_mismatch"])
def test_damaged_idx_files_raise_rsq_error(fake_dir, kind):
    folder, _ = fake_dir
    name = _corrupt(folder, kind)
    with pytest.raises(RsqError) as info:
        fashion_mnist.load("train", str(folder))
    assert name in str(info.value)
    assert "\n" not in str(info.value)
    # the other split is untouched and still loads
    fashion_mnist.load("test", str(folder))
    # and the training entry point reports it the same way
    with pytest.raises(RsqError):
        build_data(TrainConfig(data_dir=str(folder), batch_size=4, resolutions=[28]))


def test_missing_or_incomplete_data_folder_is_an_error(tmp_path, monkeypatch):
    """An explicit folder must be used or refused, never silently swapped for another copy
    (the real data set is installed on this machine, so a fallback would hide the mistake)."""
    monkeypatch.delenv("RSQ_DATA_DIR", raising=False)
    missing = tmp_path / "nope"
    with pytest.raises(RsqError, match="nope"):
        fashion_mnist.load("train", str(missing))
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    _fake_dataset(incomplete)
    (incomplete / fashion_mnist.FILES["test"][1]).unlink()
    with pytest.raises(RsqError, match="incomplete"):
        fashion_mnist.load("train", str(incomplete))
    with pytest.raises(RsqError):
        build_data(TrainConfig(data_dir=str(missing), batch_size=4))


# ----------------------------------------------------------------------------- image folders
def _png(path: Path, size=(48, 32), seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _folder_dataset(root: Path, classes=("cat", "dog"), per_class=3, splits=("train", "val")):
    seed = 0
    for split in splits:
        for c in classes:
            for i in range(per_class):
                _png(root / split / c / f"{i}.png", seed=seed)
                seed += 1
    return root


def test_image_folder_needs_two_classes(tmp_path):
    root = _folder_dataset(tmp_path / "one", classes=("only",))
    with pytest.raises(RsqError, match="class"):
        open_split(str(root), "train")
    with pytest.raises(RsqError, match="does not exist"):
        open_split(str(tmp_path / "missing"), "train")
    with pytest.raises(RsqError, match="val"):
        open_split(str(_folder_dataset(tmp_path / "no_val", splits=("train",))), "val")


def _policy(mean, std, augment="imagenet"):
    return FolderPolicy(augment, len(mean), tuple(mean), tuple(std), 2, 0.08, True, (48, 32), "imagenet")


def test_corrupt_image_is_a_clear_error_naming_the_file(tmp_path):
    root = _folder_dataset(tmp_path / "data")
    bad = root / "val" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    data = FolderEvalData(open_split(str(root), "val"), 8, [16], _policy(MEAN * 3, STD * 3), workers=0)
    with pytest.raises(RsqError) as info:
        list(data.batches())
    assert "broken.jpg" in str(info.value)


def test_folder_test_transform_resizes_then_centre_crops(tmp_path):
    """Test images: short side resized to int(s / 0.875), then the centre s x s crop."""
    root = _folder_dataset(tmp_path / "data", per_class=1)
    dataset = open_split(str(root), "val")
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    data = FolderEvalData(dataset, 2, [28, 14], _policy(mean, std), workers=0)
    (xs, y), = list(data.batches())
    assert y.tolist() == [0, 1]
    # 48x32 image: s=14 -> short side 16 (24x16), crop at (left 5, top 1); s=28 -> 32 (48x32), crop (10, 2)
    for r, size, (left, top) in ((14, (24, 16), (5, 1)), (28, (48, 32), (10, 2))):
        assert xs[r].shape == (2, 3, r, r)
        for i, (path, _) in enumerate(dataset.samples):
            img = Image.open(path).convert("RGB")
            if img.size != size:
                img = img.resize(size, Image.BILINEAR)
            crop = np.asarray(img, dtype=np.float32)[top:top + r, left:left + r] / 255.0
            expected = (torch.from_numpy(crop).permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) \
                / torch.tensor(std)[:, None, None]
            torch.testing.assert_close(xs[r][i], expected, rtol=0, atol=1e-5)


def _gray_pngs(root: Path, per_class: int, seed: int) -> Path:
    """ROOT/{train,val}/{a,b}/*.png: random 28x28 grayscale images."""
    generator = torch.Generator().manual_seed(seed)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (28, 28), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels, mode="L").save(root / split / label / f"{i}.png")
    return root


def test_small_grayscale_folders_get_small_image_handling(tmp_path, capsys):
    """28x28 gray PNGs: one channel, pad-and-crop, whole-image test resize, statistics estimated."""
    root = _gray_pngs(tmp_path / "gray", per_class=4, seed=0)
    config = TrainConfig(data="imagefolder", data_dir=str(root), resolutions=[28, 14], batch_size=4, workers=0)
    resolved = folder_policy(config)
    assert (resolved.augment, resolved.in_chans, resolved.normalize) == ("small", 1, "estimate")
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255.0)
                          for p, _ in open_split(str(root), "train").samples])
    assert resolved.mean[0] == pytest.approx(pixels.mean().item(), abs=1e-5)
    assert resolved.std[0] == pytest.approx(pixels.std().item(), rel=1e-3)
    bundle = build_data(config)
    assert "small-image augmentation: pad 2 + crop" in capsys.readouterr().out
    assert bundle.in_chans == 1
    x, _ = next(iter(bundle.train.batches(0)))
    assert x.shape == (4, 1, 28, 28)
    xs, _ = next(iter(bundle.test.batches()))
    first = Image.open(open_split(str(root), "val").samples[0][0])
    expected = (torch.from_numpy(np.asarray(first, dtype=np.float32) / 255.0) - resolved.mean[0]) / resolved.std[0]
    torch.testing.assert_close(xs[28][0, 0], expected, rtol=0, atol=1e-5)  # whole image, no crop
    # every choice can be given instead
    forced = folder_policy(config.replace(augment="imagenet", in_chans=3, normalize="imagenet", flip=False))
    assert (forced.augment, forced.in_chans, forced.mean, forced.flip) == ("imagenet", 3, IMAGENET_MEAN, False)


def test_build_data_for_image_folders(tmp_path):
    root = _folder_dataset(tmp_path / "data", per_class=4)
    config = TrainConfig(data="imagefolder", data_dir=str(root), resolutions=[24, 16], batch_size=4, workers=0)
    bundle = build_data(config)
    assert (bundle.num_classes, bundle.in_chans) == (2, 3)
    batches = list(bundle.train.batches(0))
    assert len(batches) == 2
    for x, y in batches:
        assert x.shape == (4, 3, 24, 24)
    for xs, y in bundle.test.batches():
        assert set(xs) == {24, 16} and xs[16].shape[1:] == (3, 16, 16)
    # train and val must name the same classes
    (root / "val" / "bird").mkdir()
    _png(root / "val" / "bird" / "0.png")
    with pytest.raises(RsqError, match="class"):
        build_data(config)


def test_small_image_folders_augment_batches_with_the_in_memory_code(tmp_path):
    """Pad, crop and flip of small folder images are the in-memory path's, draws included, so the two
    paths differ only in their images; a resumed epoch sees the same later batches."""
    from rsq.data.memory import crop_flip, draw_crop_flip, seeded_generator

    root = _gray_pngs(tmp_path / "gray", per_class=6, seed=1)
    config = TrainConfig(data="imagefolder", data_dir=str(root), resolutions=[28, 14], batch_size=4, workers=0,
                         seed=3)
    resolved = folder_policy(config)
    samples = open_split(str(root), "train").samples
    normed = torch.stack([(torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255.0)[None]
                           - resolved.mean[0]) / resolved.std[0] for p, _ in samples])
    data = build_data(config).train
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(3 * 1009 + 1))
    batches = list(data.batches(1))
    assert len(batches) == 3
    for step, (x, y) in enumerate(batches):
        dy, dx, flip = draw_crop_flip(4, 2, seeded_generator(3, 1, step, 7))
        assert flip.any() and (dy != 2).any()  # the draws do move and flip some images
        idx = order[step * 4:(step + 1) * 4]
        torch.testing.assert_close(x, crop_flip(normed[idx], 2, dy, dx, flip), rtol=0, atol=1e-6)
        assert y.tolist() == [samples[i][1] for i in idx.tolist()]
    resumed = list(data.batches(1, start_step=2))
    torch.testing.assert_close(resumed[0][0], batches[2][0], rtol=0, atol=0)
