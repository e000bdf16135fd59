"""Data sets held in memory, and deterministic per-rank batching.

:func:`load_data` builds a :class:`Datasets` (CPU tensors, a :class:`DataInfo` that tells the
model what it gets, an optional augmentation) from a ``DataConfig``; nothing is downloaded:

- ``digits``: scikit-learn's bundled 8x8 digits, ``[N, 1, 8, 8]``, standardised; a fixed,
  stratified split of 1500 training and 297 test images (independent of the seed);
  ``data.image_size = 32`` resizes them (bilinear) for the residual networks.
- ``cifar10``: the local "CIFAR-10 python version" (``cifar-10-batches-py``), normalised with
  the usual per-channel mean and std; random crop + flip augmentation.
- ``text``: a character-level language model on local text files; the test set is the end of
  the corpus.
- ``synthetic``: Gaussian classes around random means, generated from the seed.

:class:`ShardedLoader` cuts one rank's batches out of the tensors. Its order is a function of
(seed, epoch, rank) only, so a resumed run can start in the middle of an epoch and see exactly
the batches it would have seen.
"""

import glob
import logging
import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from dtrain.config import DataConfig
from dtrain.errors import UserError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DataInfo",
    "Datasets",
    "ShardedLoader",
    "load_data",
    "random_crop_flip",
]

logger = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
_DIGITS_TEST_SIZE = 297
_TEXT_SUFFIXES = (".txt", ".py")

Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass
class DataInfo:
    """What a model needs to know about its data."""

    kind: str
    """``image`` (classification) or ``lm`` (next-token prediction)."""
    in_shape: tuple[int, ...]
    """Shape of one input: ``(C, H, W)`` for images (any shape for ``synthetic``),
    ``(seq_len,)`` for language models."""
    num_classes: int
    """Classes (images) or vocabulary size (language models)."""
    vocab_size: int
    """Vocabulary size; 0 for images."""
    seq_len: int
    """Tokens per sequence; 0 for images."""
    train_size: int
    """Training samples (sequences for language models)."""
    test_size: int
    """Held-out samples (sequences for language models)."""
    metric: str
    """Headline evaluation metric: ``accuracy`` or ``perplexity``."""
    name: str = ""
    """The ``data.name`` this came from (for error messages)."""

    @classmethod
    def images(
        cls, shape: tuple[int, ...], *, classes: int, train_size: int, test_size: int
    ) -> "DataInfo":
        """An image classification set: inputs of ``shape``, ``classes`` labels, accuracy."""
        return cls("image", shape, classes, 0, 0, train_size, test_size, "accuracy")


@dataclass
class Datasets:
    """Training and held-out tensors (CPU) with their description."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    info: DataInfo
    augment: Augment | None = None
    """``augment(x, generator) -> x`` for a training batch, or None."""
    vocab: str = ""
    """``text``: the characters of token ids 0, 1, ... (decode with ``vocab[i]``)."""


def load_data(cfg: DataConfig, *, seed: int) -> Datasets:
    """Load the data set named by ``cfg.name`` into memory.

    Args:
        cfg: the ``[data]`` section.
        seed: seeds ``synthetic`` data; the other data sets do not depend on it.

    Returns:
        The tensors and their :class:`DataInfo`.

    Raises:
        UserError: the files are missing, incomplete or too short.
    """
    if cfg.name == "digits":
        data = _load_digits(cfg.image_size)
    elif cfg.name == "cifar10":
        data = _load_cifar10(cfg.path, augment=cfg.augment)
    elif cfg.name == "text":
        data = _load_text(cfg.path, seq_len=cfg.seq_len, test_fraction=cfg.test_fraction)
    elif cfg.name == "synthetic":
        data = _make_synthetic(
            shape=tuple(cfg.synthetic_shape),
            classes=cfg.synthetic_classes,
            size=cfg.synthetic_size,
            seed=seed,
        )
    else:  # DataConfig validates the name
        raise ValueError(f"unknown data set {cfg.name!r}")
    data.info.name = cfg.name
    if cfg.train_samples:
        if cfg.train_samples > data.info.train_size:
            raise UserError(
                f"data.train_samples = {cfg.train_samples} exceeds the {data.info.train_size} "
                f"training samples of {cfg.name}: lower it, or 0 for all"
            )
        data.x_train = data.x_train[: cfg.train_samples]
        data.y_train = data.y_train[: cfg.train_samples]
        data.info.train_size = cfg.train_samples
    logger.debug(
        "data %s: %d train / %d test, input %s, %d %s",
        cfg.name,
        data.info.train_size,
        data.info.test_size,
        data.info.in_shape,
        data.info.num_classes,
        "tokens" if data.info.kind == "lm" else "classes",
    )
    return data


# ------------------------------------------------------------------------------------ digits


def _load_digits(size: int = 0) -> Datasets:
    from sklearn.datasets import load_digits  # slow import: only when needed
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    # Fixed split (random_state=0), the same for every seed, so runs are comparable.
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=_DIGITS_TEST_SIZE, random_state=0, stratify=y
    )

    # Standardised with the training set's pixel mean and std: SGD leaves the initial plateau
    # within a few dozen steps instead of an epoch or two.
    mean, std = float(x_tr.mean()), float(x_tr.std())

    def images(a: np.ndarray) -> Tensor:
        x = torch.from_numpy(((a - mean) / std).astype(np.float32)).view(-1, 1, 8, 8)
        if size and size != 8:  # real images at the residual networks' input size
            x = torch.nn.functional.interpolate(
                x, size=(size, size), mode="bilinear", align_corners=False
            )
        return x

    side = size or 8
    info = DataInfo.images((1, side, side), classes=10, train_size=len(y_tr), test_size=len(y_te))
    return Datasets(
        images(x_tr),
        torch.from_numpy(y_tr).long(),
        images(x_te),
        torch.from_numpy(y_te).long(),
        info,
    )


# ----------------------------------------------------------------------------------- cifar10


def _cifar_dir(path: str) -> Path:
    """The ``cifar-10-batches-py`` directory at or inside ``path``, or UserError."""
    root = Path(path).expanduser()
    if (root / _CIFAR_DIR).is_dir():
        root = root / _CIFAR_DIR
    expected = (
        f"data.path {path}: expected a {_CIFAR_DIR} directory with data_batch_1..data_batch_5 "
        f"and test_batch (the 'CIFAR-10 python version')"
    )
    if not root.is_dir():
        raise UserError(f"{expected}; no such directory")
    missing = [name for name in _CIFAR_FILES if not (root / name).is_file()]
    if missing:
        raise UserError(f"{expected}; missing: {', '.join(missing)}")
    return root


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 [N, 3072], int64 [N])`` from one pickled batch, or UserError."""
    try:
        with open(file, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch.get(b"data", batch.get("data")), dtype=np.uint8)
        labels = np.asarray(batch.get(b"labels", batch.get("labels")), dtype=np.int64)
    except Exception as e:  # whatever a foreign or damaged pickle raises (ImportError, KeyError...)
        raise UserError(f"{file} is not a CIFAR-10 python batch ({e}): re-extract it") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise UserError(
            f"{file} is not a CIFAR-10 python batch: data {data.shape}, labels {labels.shape}, "
            f"expected [N, 3072] and [N]: re-extract it"
        )
    return data, labels


def _cifar_images(data: np.ndarray) -> Tensor:
    """uint8 rows (1024 red, 1024 green, 1024 blue, row-major) -> normalised ``[N, 3, 32, 32]``."""
    x = torch.from_numpy(data).view(-1, 3, 32, 32).float().div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def _load_cifar10(path: str, *, augment: bool) -> Datasets:
    root = _cifar_dir(path)
    train = [_read_cifar_batch(root / name) for name in _CIFAR_FILES[:5]]
    x_te, y_te = _read_cifar_batch(root / "test_batch")
    x_tr = np.concatenate([d for d, _ in train])
    y_tr = np.concatenate([lab for _, lab in train])
    info = DataInfo.images((3, 32, 32), classes=10, train_size=len(y_tr), test_size=len(y_te))
    return Datasets(
        _cifar_images(x_tr),
        torch.from_numpy(y_tr),
        _cifar_images(x_te),
        torch.from_numpy(y_te),
        info,
        augment=random_crop_flip if augment else None,
    )


def random_crop_flip(x: Tensor, generator: torch.Generator, *, padding: int = 4) -> Tensor:
    """Randomly crop and horizontally flip each image of a batch.

    Each image of ``x`` (``[B, C, H, W]``) is zero-padded by ``padding`` pixels on every side,
    cropped back to ``H x W`` at a uniformly random offset and mirrored with probability 1/2.
    The padding is zero in normalised units, i.e. the data set's mean colour.

    Args:
        x: a batch of images.
        generator: the only source of randomness (CPU generator).
        padding: pixels of zero padding (maximum shift).

    Returns:
        A new ``[B, C, H, W]`` tensor.
    """
    b, _, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices split by a slice put their dims first: [B, H, W, C].
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


# -------------------------------------------------------------------------------------- text


def _text_files(path: str) -> list[Path]:
    """The files ``path`` names: a file, a glob, or a directory's ``*.txt`` and ``*.py`` files
    at any depth, skipping hidden files and directories (``.git``, ``.venv``)."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [
            f
            for f in p.rglob("*")
            if f.suffix in _TEXT_SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
            and f.is_file()
        ]
        if not files:
            raise UserError(
                f"data.path {path}: the directory has no *.txt or *.py files: point data.path "
                f"at a text file, a directory of them or a glob"
            )
    else:
        files = [Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()]
        if not files:
            raise UserError(
                f"data.path {path}: no such file or directory, and no file matches it as a glob"
            )
    return sorted(files, key=lambda f: f.as_posix())


def _load_text(path: str, *, seq_len: int, test_fraction: float) -> Datasets:
    files = _text_files(path)
    try:
        text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    except OSError as e:
        raise UserError(f"data.path {path}: cannot read {e.filename}: {e.strerror}") from None
    n_test = int(len(text) * test_fraction)
    n_train = len(text) - n_test
    if min(n_train, n_test) < seq_len + 1:
        raise UserError(
            f"data.path {path}: {len(text)} characters are too short for one training and one "
            f"test sequence of data.seq_len + 1 = {seq_len + 1} characters with "
            f"data.test_fraction = {test_fraction}: use more text or a smaller data.seq_len"
        )
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    chars, inverse = np.unique(codes, return_inverse=True)  # sorted code points = sorted(set(text))
    ids = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
    x_tr, y_tr = _sequences(ids[:n_train], seq_len)
    x_te, y_te = _sequences(ids[n_train:], seq_len)
    vocab = "".join(map(chr, chars.tolist()))
    info = DataInfo(
        kind="lm",
        in_shape=(seq_len,),
        num_classes=len(vocab),
        vocab_size=len(vocab),
        seq_len=seq_len,
        train_size=len(x_tr),
        test_size=len(x_te),
        metric="perplexity",
    )
    logger.debug("text: %d files, %d characters, vocabulary %d", len(files), len(text), len(vocab))
    return Datasets(x_tr, y_tr, x_te, y_te, info, vocab=vocab)


def _sequences(ids: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping chunks of ``seq_len + 1`` tokens: inputs ``[:-1]``, targets ``[1:]``."""
    n = len(ids) // (seq_len + 1)
    chunks = ids[: n * (seq_len + 1)].view(n, seq_len + 1)
    return chunks[:, :-1].clone(), chunks[:, 1:].clone()


# --------------------------------------------------------------------------------- synthetic


def _make_synthetic(*, shape: tuple[int, ...], classes: int, size: int, seed: int) -> Datasets:
    """Class ``c`` is ``0.5 * mean_c + N(0, 1)`` noise, with ``mean_c ~ N(0, 1)`` per element.

    ``size`` training samples and ``max(1, size // 4)`` test samples, all drawn from a generator
    seeded with ``seed`` (the global RNG is untouched).
    """
    g = torch.Generator().manual_seed(seed)
    means = 0.5 * torch.randn(classes, *shape, generator=g)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, classes, (n,), generator=g)
        return means[y] + torch.randn(n, *shape, generator=g), y

    x_tr, y_tr = draw(size)
    x_te, y_te = draw(max(1, size // 4))
    info = DataInfo.images(tuple(shape), classes=classes, train_size=len(y_tr), test_size=len(y_te))
    return Datasets(x_tr, y_tr, x_te, y_te, info)


# ------------------------------------------------------------------------------------ loader


def _batch_seed(seed: int, epoch: int, rank: int, batch: int) -> int:
    """A well-mixed 63-bit seed for one (seed, epoch, rank, batch)."""
    words = [seed % 2**64, epoch, rank, batch]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1


class ShardedLoader:
    """One rank's batches of in-memory tensors, fully determined by the seed.

    Training (``shuffle=True, drop_last=True``): each epoch, ``DistributedSampler`` permutes
    the indices with ``seed + epoch`` and deals every ``world_size``-th one to this rank; the
    shards of all ranks are disjoint and the few left-over samples are dropped. Batch ``b`` of
    epoch ``e`` is augmented with a generator seeded from ``(seed, e, rank, b)``, so
    ``epoch_batches(e, start=s)`` yields exactly the tail of ``epoch_batches(e)``: a resumed run
    skips the batches already done and sees the same data as an uninterrupted one.

    Evaluation: with ``drop_last=False`` ``DistributedSampler`` *pads* every shard to the same
    length by repeating samples from the start, so summing over ranks counts some samples
    twice. :meth:`eval_batches` instead walks the exact shard ``x[rank::world_size]`` (sizes may
    differ by one between ranks); summing per-rank totals counts every sample exactly once.

    Args:
        x: inputs, first dimension = samples (CPU).
        y: targets, same first dimension.
        batch_size: samples per batch on this rank.
        rank: this rank, ``0 <= rank < world_size``.
        world_size: number of ranks sharing the data.
        seed: seeds the order of every epoch and the augmentation.
        shuffle: permute every epoch (off: index order).
        drop_last: drop the tail that does not divide over ranks and the last partial batch
            (off: shards are padded by repetition and the last batch may be short).
        augment: ``augment(xb, generator)`` applied to each batch of :meth:`epoch_batches`.

    Example::

        loader = ShardedLoader(x, y, batch_size=32, rank=rank, world_size=world, seed=0)
        for epoch in range(epochs):
            for xb, yb in loader.epoch_batches(epoch):
                ...
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        augment: Augment | None = None,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.drop_last = drop_last
        self.augment = augment
        # The sampler only takes len() of its "dataset" (typed Dataset): a range of indices does.
        self._sampler: DistributedSampler[int] = DistributedSampler(
            range(len(x)),  # type: ignore[arg-type]
            num_replicas=world_size,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        if len(self) == 0:
            raise UserError(
                f"{len(x)} samples over {world_size} ranks give no full batch of {batch_size} "
                f"per rank: lower data.batch_size or use more data"
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n = self._sampler.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def eval_size(self) -> int:
        """Samples in this rank's exact shard ``x[rank::world_size]`` (see :meth:`eval_batches`)."""
        return len(range(self.rank, len(self.x), self.world_size))

    def epoch_indices(self, epoch: int) -> Tensor:
        """Sample indices this rank visits in ``epoch``, in order (before batching)."""
        self._sampler.set_epoch(epoch)
        return torch.tensor(list(self._sampler), dtype=torch.long)

    def epoch_batches(
        self, epoch: int, start: int = 0, *, indices: bool = False
    ) -> Iterator[tuple[Tensor, ...]]:
        """Yield ``(xb, yb)`` for batches ``start, start + 1, ...`` of ``epoch``.

        Args:
            epoch: epoch number (selects the permutation).
            start: first batch to yield; earlier ones are skipped without being built.
            indices: yield ``(xb, yb, sel)`` with ``sel`` the rows of ``x`` in the batch.
        """
        idx = self.epoch_indices(epoch)
        for b in range(start, len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            xb, yb = self.x[sel], self.y[sel]
            if self.augment is not None:
                g = torch.Generator().manual_seed(_batch_seed(self.seed, epoch, self.rank, b))
                xb = self.augment(xb, g)
            yield (xb, yb, sel) if indices else (xb, yb)

    def eval_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield this rank's exact shard ``x[rank::world_size]`` in batches, unaugmented.

        Ranks may get different numbers of batches: sum counts locally and reduce once after
        the loop rather than per batch.
        """
        idx = torch.arange(self.rank, len(self.x), self.world_size)
        for i in range(0, len(idx), self.batch_size):
            sel = idx[i : i + self.batch_size]
            yield self.x[sel], self.y[sel]
