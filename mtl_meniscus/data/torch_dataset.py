"""Torch side of the data: a Dataset of in-memory slices and a seeded epoch sampler.

Randomness is explicit: each sample's augmentation is drawn from numpy's generator seeded
with (run seed, epoch, position in the epoch), so an epoch is the same whether it runs in
one go, in worker processes, or after a resume.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mtl_meniscus.config import AugmentConfig
from mtl_meniscus.data.augment import augment_image, augment_with_labels, move_points, sample_affine
from mtl_meniscus.data.preprocess import make_input
from mtl_meniscus.data.roi import HornCentres
from mtl_meniscus.errors import DataError

NO_MASK = -1  # a batch's mask value on every pixel of a row without a mask: left out of the loss


class SliceDataset(Dataset):
    """Item (index, seed or None) -> (x (C, H, W) float32, targets (3,) float32 with NaN).

    With `masks` (a segmentation model's training data: uint8 (H, W) per row, None for a row
    without one) an item is (x, targets, mask (H, W) int64), the mask moved with its image by the
    augmentation and NO_MASK everywhere for a row without one. With `horns` (a ROI model's: each
    row's horn centres, data/roi.py HornCentres) the item ends with the row's horns (2, 3) float32,
    (x, y, found) of the anterior and posterior horn, the centres moved with the image. Without
    either, nothing about a mask or a horn is done.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        targets: np.ndarray,
        edge_filter: str,
        augment: AugmentConfig | None = None,
        masks: Sequence[np.ndarray | None] | None = None,
        horns: HornCentres | None = None,
    ):
        self.images = images
        self.targets = torch.from_numpy(np.asarray(targets, np.float32))
        self.edge_filter = edge_filter
        self.augment = augment
        self.masks = masks
        self.horns = horns

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int | None] | int) -> tuple[torch.Tensor, ...]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if self.masks is not None or self.horns is not None:
            return self._with_labels(index, seed)
        image = self.images[index]
        if self.augment is not None and seed is not None:
            image = augment_image(image, self.augment, np.random.default_rng(seed))
        return torch.from_numpy(make_input(image, self.edge_filter)), self.targets[index]

    def _with_labels(self, index: int, seed: int | None) -> tuple[torch.Tensor, ...]:
        """(x, targets[, mask (H, W) int64][, horns (2, 3) float32]): the image, its mask and its horn
        centres under one augmentation draw (the image as augment_image makes it from that seed);
        NO_MASK everywhere for a row without a mask."""
        image = self.images[index]
        mask = self.masks[index] if self.masks is not None else None
        horns = self.horns[index].copy() if self.horns is not None else None  # (2, 3): x, y, found
        if self.augment is not None and seed is not None:
            points = horns[:, :2] if horns is not None else None
            image, mask, moved = augment_with_labels(
                image, self.augment, np.random.default_rng(seed), mask=mask, points=points
            )
            if horns is not None:
                horns[:, :2] = moved
        item = [torch.from_numpy(make_input(image, self.edge_filter)), self.targets[index]]
        if self.masks is not None:
            no_mask = torch.full(np.shape(image), NO_MASK, dtype=torch.int64)
            item.append(no_mask if mask is None else torch.from_numpy(mask.astype(np.int64)))
        if self.horns is not None:
            item.append(torch.from_numpy(horns))
        return tuple(item)


class ExamDataset(SliceDataset):
    """Item (index, seed or None) -> (x (S, C, H, W) float32: every slice of the exam, targets (T,)).

    `images` holds whole exams (S, H, W). An augmentation seed moves every slice of the exam
    alike (one draw of rotation, shift and intensity, as a patient who moved would); the noise
    field is drawn per slice. With `horns` (an exam ROI model's: each slice's horn centres, (S, 2,
    3) per exam) the item ends with them, moved by that one transform."""

    def __getitem__(self, key: tuple[int, int | None] | int) -> tuple[torch.Tensor, ...]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        volume = self.images[index]  # (S, H, W)
        horns = self.horns[index].copy() if self.horns is not None else None  # (S, 2, 3)
        if self.augment is not None and seed is not None:
            # the same generator state for each slice: the same transform; its own noise draw
            volume = [
                augment_image(s, self.augment, np.random.default_rng(seed), np.random.default_rng([seed, k]))
                for k, s in enumerate(volume)
            ]
            if horns is not None:  # augment_image's first draws are the transform: the same again
                height, width = volume[0].shape
                params = sample_affine(self.augment, height, width, np.random.default_rng(seed))
                points = horns[..., :2].reshape(-1, 2)  # (S * 2, 2): every slice's two horns
                horns[..., :2] = move_points(points, params, height, width).reshape(-1, 2, 2)
        slices = [make_input(s, self.edge_filter) for s in volume]  # S x (C, H, W)
        item = (torch.from_numpy(np.stack(slices)), self.targets[index])
        return item if horns is None else (*item, torch.from_numpy(horns))


def collate_batch(
    samples: Sequence[tuple[torch.Tensor, ...]], channels_last: bool = False, horns: bool = False
) -> tuple[tuple[torch.Tensor, ...] | torch.Tensor, ...]:
    """((x,), targets (B, T)) for slices: x (B, C, H, W). For exams (samples (S_b, C, H, W)):
    ((x, lengths), targets) with x (N, C, H, W) every exam's slices one after another and lengths
    (B,) their counts, as ExamNet takes them. x is already in the memory format the model wants:
    one copy per batch instead of a stack plus a channels_last conversion.

    Samples with masks (SliceDataset's `masks`) give ((x,), targets, masks (B, H, W) int64). With
    `horns` (SliceDataset's `horns`: each sample ends with its horns) the inputs are (x, horns
    (B, 2, 3)), as a ROI model takes them; for exams (x, lengths, horns (N, 2, 3)), every slice's."""
    first = samples[0][0]
    exams = first.dim() == 4
    lengths = [len(sample[0]) for sample in samples] if exams else [1] * len(samples)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty((sum(lengths), *first.shape[-3:]), dtype=first.dtype, memory_format=memory_format)
    row = 0
    for sample, length in zip(samples, lengths):
        x[row : row + length].copy_(sample[0].reshape(length, *first.shape[-3:]))
        row += length
    inputs = (x, torch.tensor(lengths, dtype=torch.long)) if exams else (x,)
    targets = torch.stack([sample[1] for sample in samples])
    if horns:  # a ROI model's: the last element of each sample; an exam's (S_b, 2, 3) slice after slice
        inputs = (*inputs, (torch.cat if exams else torch.stack)([sample[-1] for sample in samples]))
        samples = [sample[:-1] for sample in samples]
    if len(samples[0]) == 3:  # with masks
        return inputs, targets, torch.stack([sample[2] for sample in samples])
    return inputs, targets


class EpochBatchSampler(Sampler):
    """`steps` batches of `batch_size` (index, augmentation seed) pairs for one epoch.

    Indices come from concatenated seeded permutations of `indices`, so an epoch longer than
    the training set still sees every image before any repeats. Call set_epoch() before iterating.
    """

    def __init__(
        self, indices: Sequence[int], steps: int, batch_size: int, seed: int, rank: int = 0, world: int = 1
    ):
        if len(indices) == 0:
            raise DataError("cannot sample batches from an empty training set")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.steps = steps
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world = rank, world  # under torchrun: this process's rows of each batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        needed = self.steps * self.batch_size
        rounds = -(-needed // len(self.indices))
        order = np.concatenate([rng.permutation(self.indices) for _ in range(rounds)])[:needed]
        sample_seeds = rng.integers(0, 2**63 - 1, size=needed)
        for step in range(self.steps):
            batch = slice(step * self.batch_size + self.rank, (step + 1) * self.batch_size, self.world)
            yield [(int(i), int(s)) for i, s in zip(order[batch], sample_seeds[batch])]


def training_batches(
    dataset: SliceDataset, sampler: EpochBatchSampler, num_workers: int, channels_last: bool, pin_memory: bool
) -> DataLoader:
    """One epoch of collated training batches, augmented in this process or in `num_workers` worker
    processes. (A thread preparing the next batch during the step was tried on 2 cores: 233 images/s
    against 264 without it, the bare loop 316; README, "Speed".)"""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        prefetch_factor=4 if num_workers else None,
        pin_memory=pin_memory,  # faster, asynchronous copies to the GPU
        collate_fn=partial(collate_batch, channels_last=channels_last, horns=dataset.horns is not None),
    )
