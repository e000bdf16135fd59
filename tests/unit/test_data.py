"""dtrain.data: the data sets (no downloads: fake CIFAR files, the stdlib as text) and batching."""

import itertools
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dtrain.config import DataConfig
from dtrain.data import CIFAR10_MEAN, CIFAR10_STD, ShardedLoader, load_data, random_crop_flip
from dtrain.errors import UserError

JSON_DIR = os.path.dirname(json.__file__)

# ------------------------------------------------------------------------------------ digits


def test_digits_fixed_stratified_split():
    a = load_data(DataConfig(name="digits"), seed=0)
    b = load_data(DataConfig(name="digits"), seed=7)
    assert a.x_train.shape == (1500, 1, 8, 8) and a.x_test.shape == (297, 1, 8, 8)
    assert (a.info.train_size, a.info.test_size, a.info.in_shape) == (1500, 297, (1, 8, 8))
    assert a.info.kind == "image" and a.info.metric == "accuracy" and a.info.num_classes == 10
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    # standardised with the training set's pixel mean and std
    assert abs(a.x_train.mean().item()) < 1e-4 and abs(a.x_train.std().item() - 1) < 1e-3
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    assert a.augment is None
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 28 and counts.max() <= 31  # stratified: ~29.7 per class


def test_train_samples_is_a_fixed_prefix_of_the_training_set():
    full = load_data(DataConfig(name="digits"), seed=0)
    a = load_data(DataConfig(name="digits", train_samples=300), seed=0)
    b = load_data(DataConfig(name="digits", train_samples=300), seed=5)
    assert a.info.train_size == 300 and len(a.x_train) == len(a.y_train) == 300
    assert torch.equal(a.x_train, full.x_train[:300]) and torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.x_test, full.x_test)  # the held-out set is whole
    assert torch.bincount(a.y_train, minlength=10).min() >= 20  # every class is there
    with pytest.raises(UserError, match="exceeds the 1500 training samples"):
        load_data(DataConfig(name="digits", train_samples=1501), seed=0)
    with pytest.raises(UserError, match="train_samples"):
        DataConfig(train_samples=-1)


# ----------------------------------------------------------------------------------- cifar10


def write_fake_cifar(root: Path, per_batch: int = 3, test: int = 2) -> Path:
    """A ``cifar-10-batches-py`` directory in the real format with a few images per batch."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data}, f)
    return d


def read_raw(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def test_cifar_loads_fake_batches_normalised(tmp_path):
    d = write_fake_cifar(tmp_path)
    data = load_data(DataConfig(name="cifar10", path=str(d)), seed=0)
    assert data.x_train.shape == (15, 3, 32, 32) and data.x_test.shape == (2, 3, 32, 32)
    assert data.info.in_shape == (3, 32, 32) and data.info.num_classes == 10
    assert (data.info.train_size, data.info.test_size) == (15, 2)
    raw = read_raw(d / "data_batch_2")
    assert data.y_train[3:6].tolist() == raw[b"labels"]
    # Pixel (channel 1, row 2, column 3) of batch 2's first image: rows are R, G, B planes.
    pixel = raw[b"data"][0, 1024 + 2 * 32 + 3] / 255.0
    expected = (pixel - CIFAR10_MEAN[1]) / CIFAR10_STD[1]
    assert data.x_train[3, 1, 2, 3].item() == pytest.approx(expected, abs=1e-5)
    raw_test = read_raw(d / "test_batch")
    assert data.y_test.tolist() == raw_test[b"labels"]
    assert data.augment is random_crop_flip
    plain = load_data(DataConfig(name="cifar10", path=str(d), augment=False), seed=0)
    assert plain.augment is None


def test_cifar_accepts_the_parent_directory(tmp_path):
    d = write_fake_cifar(tmp_path)
    a = load_data(DataConfig(name="cifar10", path=str(tmp_path)), seed=0)
    b = load_data(DataConfig(name="cifar10", path=str(d)), seed=0)
    assert torch.equal(a.x_train, b.x_train)


def test_cifar_missing_file_or_directory_is_a_user_error(tmp_path):
    d = write_fake_cifar(tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(UserError, match=r"cifar-10-batches-py.*missing: data_batch_3$"):
        load_data(DataConfig(name="cifar10", path=str(d)), seed=0)
    with pytest.raises(UserError, match="no such directory"):
        load_data(DataConfig(name="cifar10", path=str(tmp_path / "nope")), seed=0)
    (d / "test_batch").write_bytes(b"not a pickle")
    (d / "data_batch_3").write_bytes((d / "data_batch_1").read_bytes())
    with pytest.raises(UserError, match="test_batch is not a CIFAR-10 python batch"):
        load_data(DataConfig(name="cifar10", path=str(d)), seed=0)


def test_random_crop_flip_is_a_shift_or_mirror_of_each_image():
    x = torch.randn(32, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    out = random_crop_flip(x, torch.Generator().manual_seed(1))
    again = random_crop_flip(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and torch.equal(out, again)
    padded = F.pad(x, (4, 4, 4, 4))
    kinds = set()
    for i in range(len(x)):
        matches = [
            (dy, dx, flip)
            for dy, dx, flip in itertools.product(range(9), range(9), (False, True))
            if torch.equal(
                out[i],
                padded[i, :, dy : dy + 10, dx : dx + 10].flip(2)
                if flip
                else padded[i, :, dy : dy + 10, dx : dx + 10],
            )
        ]
        assert len(matches) == 1, i
        kinds.add(matches[0])
    assert len(kinds) > 16  # offsets and flips vary across the batch
    assert any(flip for _, _, flip in kinds) and any(not flip for _, _, flip in kinds)


# -------------------------------------------------------------------------------------- text


def stdlib_corpus() -> str:
    files = sorted(Path(JSON_DIR).rglob("*.py"), key=lambda f: f.as_posix())
    return "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def decode(vocab: str, ids: torch.Tensor) -> str:
    return "".join(vocab[i] for i in ids.tolist())


def test_text_from_stdlib_sources():
    cfg = DataConfig(name="text", path=JSON_DIR, seq_len=32, test_fraction=0.1)
    data = load_data(cfg, seed=0)
    text = stdlib_corpus()
    assert data.vocab == "".join(sorted(set(text)))
    info = data.info
    assert (info.kind, info.metric, info.in_shape, info.seq_len) == ("lm", "perplexity", (32,), 32)
    assert info.vocab_size == info.num_classes == len(data.vocab)
    n_test = int(len(text) * 0.1)
    n_train = len(text) - n_test
    assert info.train_size == n_train // 33 and info.test_size == n_test // 33
    assert data.x_train.shape == (info.train_size, 32) and data.x_train.dtype == torch.int64
    assert torch.equal(data.x_train[:, 1:], data.y_train[:, :-1])  # targets shifted by one
    # Non-overlapping chunks of 33 characters: training from the start, test from the tail.
    assert decode(data.vocab, data.x_train[1]) == text[33 : 33 + 32]
    assert decode(data.vocab, data.y_train[1]) == text[34 : 34 + 32]
    assert decode(data.vocab, data.x_test[0]) == text[n_train : n_train + 32]
    assert decode(data.vocab, data.y_test[-1])[-1] == text[n_train + 33 * info.test_size - 1]


def test_text_file_glob_and_directory_agree(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("hello world, " * 20)
    (tmp_path / "sub" / "b.py").write_text("print('x')\n" * 20)
    (tmp_path / "c.md").write_text("ignored" * 100)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "d.py").write_text("ignored" * 100)
    d = load_data(DataConfig(name="text", path=str(tmp_path), seq_len=8), seed=0)
    g = load_data(DataConfig(name="text", path=str(tmp_path / "**" / "*.[tp]*"), seq_len=8), seed=0)
    assert torch.equal(d.x_train, g.x_train) and d.vocab == g.vocab
    assert "m" not in d.vocab  # neither c.md nor the hidden .venv/d.py is read
    f = load_data(DataConfig(name="text", path=str(tmp_path / "a.txt"), seq_len=8), seed=0)
    assert f.vocab == "".join(sorted(set("hello world, ")))


def test_text_errors(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        load_data(DataConfig(name="text", path=str(tmp_path / "missing.txt")), seed=0)
    with pytest.raises(UserError, match=r"no \*.txt or \*.py files"):
        load_data(DataConfig(name="text", path=str(tmp_path)), seed=0)
    (tmp_path / "short.txt").write_text("x" * 100)
    with pytest.raises(UserError, match=r"too short.*data\.seq_len"):
        load_data(DataConfig(name="text", path=str(tmp_path), seq_len=64), seed=0)


def test_unreadable_text_file_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("x" * 10_000)

    def denied(self, *args, **kwargs):  # as root, chmod cannot make a file unreadable
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(UserError, match=r"cannot read .*a\.txt: Permission denied"):
        load_data(DataConfig(name="text", path=str(tmp_path)), seed=0)


# --------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_seed_and_learnable():
    cfg = DataConfig(name="synthetic", synthetic_shape=(3, 8, 8), synthetic_size=400)
    state = torch.get_rng_state()
    a, b, c = (load_data(cfg, seed=s) for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert a.x_train.shape == (400, 3, 8, 8) and a.x_test.shape == (100, 3, 8, 8)
    assert (a.info.train_size, a.info.test_size, a.info.num_classes) == (400, 100, 10)
    # Logistic regression learns it: the loss falls and test accuracy beats chance by far.
    w = torch.zeros(192, 10, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.05)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(a.x_train.flatten(1) @ w, a.y_train)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
    assert ((a.x_test.flatten(1) @ w).argmax(1) == a.y_test).float().mean() > 0.5


# ------------------------------------------------------------------------------------ loader


def loader(n=100, **kw):
    x = torch.arange(n)  # the data are their own indices
    kw = {"batch_size": 8, "rank": 0, "world_size": 2, "seed": 0} | kw
    return ShardedLoader(x, x.clone(), **kw)


def seen(ldr, epoch, **kw):
    return torch.cat([xb for xb, _ in ldr.epoch_batches(epoch, **kw)])


def test_two_ranks_are_disjoint_and_cover_an_epoch():
    r0, r1 = loader(96, rank=0), loader(96, rank=1)
    assert len(r0) == len(r1) == 6  # 48 samples each
    a, b = seen(r0, 0), seen(r1, 0)
    assert set(a.tolist()).isdisjoint(b.tolist())
    assert sorted(a.tolist() + b.tolist()) == list(range(96))
    assert not torch.equal(a, torch.arange(0, 96, 2))  # shuffled


def test_drop_last_drops_the_tail_of_an_epoch():
    ldrs = [loader(101, rank=r, batch_size=10) for r in (0, 1)]
    assert [len(ldr) for ldr in ldrs] == [5, 5]  # 100 of 101 dealt out, 50 per rank
    all_seen = torch.cat([seen(ldr, 3) for ldr in ldrs])
    assert len(all_seen) == 100 and len(set(all_seen.tolist())) == 100


def test_epochs_differ_and_repeat_for_the_same_seed():
    ldr = loader()
    assert not torch.equal(seen(ldr, 0), seen(ldr, 1))
    assert torch.equal(seen(ldr, 1), seen(loader(), 1))
    assert not torch.equal(seen(ldr, 1), seen(loader(seed=1), 1))


def test_start_yields_the_tail_of_the_epoch():
    ldr = loader()
    full = list(ldr.epoch_batches(2))
    for start in (0, 1, 4, len(ldr)):
        tail = list(ldr.epoch_batches(2, start=start))
        assert len(tail) == len(full) - start
        assert all(torch.equal(a[0], b[0]) for a, b in zip(tail, full[start:], strict=True))


def test_augmentation_is_deterministic_and_independent_of_start():
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64)
    kw = {"batch_size": 8, "world_size": 2, "seed": 5, "augment": random_crop_flip}
    ldr = ShardedLoader(x, y, rank=1, **kw)
    full = list(ldr.epoch_batches(1))
    again = list(ShardedLoader(x, y, rank=1, **kw).epoch_batches(1))
    tail = list(ldr.epoch_batches(1, start=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again, strict=True))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[2:], tail, strict=True))
    xb, yb = full[0]
    assert not torch.equal(xb, x[yb])  # augmented
    plain = ShardedLoader(x, y, rank=1, **{**kw, "augment": None})  # same order, same labels
    assert all(torch.equal(p[1], a[1]) for p, a in zip(plain.epoch_batches(1), full, strict=True))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_eval_batches_count_every_test_sample_once(world):
    n = 297
    ldrs = [
        loader(n, rank=r, world_size=world, batch_size=50, shuffle=False, drop_last=False)
        for r in range(world)
    ]
    exact = torch.cat([yb for ldr in ldrs for _, yb in ldr.eval_batches()])
    assert sorted(exact.tolist()) == list(range(n))
    assert sum(ldr.eval_size for ldr in ldrs) == n
    # DistributedSampler pads instead (why eval_batches exists).
    padded = torch.cat([seen(ldr, 0) for ldr in ldrs])
    assert len(padded) == world * -(-n // world) and set(padded.tolist()) == set(range(n))


def test_loader_errors():
    with pytest.raises(UserError, match=r"lower data\.batch_size"):
        loader(10, batch_size=8, world_size=2)
    with pytest.raises(ValueError, match="samples"):
        ShardedLoader(torch.zeros(3), torch.zeros(4), batch_size=1, rank=0, world_size=1, seed=0)


def test_digits_resize_to_32_for_the_residual_networks():
    from dtrain.config import DataConfig
    from dtrain.data import load_data

    small = load_data(DataConfig(name="digits"), seed=0)
    big = load_data(DataConfig(name="digits", image_size=32), seed=0)
    assert big.x_train.shape == (1500, 1, 32, 32) and big.info.in_shape == (1, 32, 32)
    assert torch.equal(big.y_test, small.y_test)
    # the same images: averaging 4x4 blocks of the resized ones gives back (about) the 8x8
    back = torch.nn.functional.avg_pool2d(big.x_test, 4)
    assert torch.corrcoef(torch.stack([back.flatten(), small.x_test.flatten()]))[0, 1] > 0.95
