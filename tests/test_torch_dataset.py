"""The PyTorch dataset (data/torch_dataset.py): one epoch of the sampler's batches, augmented and collated."""

import numpy as np
import torch

from mtl_meniscus.config import AugmentConfig
from mtl_meniscus.data.torch_dataset import EpochBatchSampler, SliceDataset, training_batches


def test_training_batches_are_the_samples_collated_channels_last():
    rng = np.random.default_rng(0)
    images = [rng.random((32, 32), dtype=np.float32) for _ in range(10)]
    targets = np.tile([[1.0, 0.0, np.nan]], (10, 1)).astype(np.float32)
    dataset = SliceDataset(images, targets, "sobel", AugmentConfig(rotation_deg=10, translate_frac=0.1))
    sampler = EpochBatchSampler(range(10), steps=4, batch_size=3, seed=5)
    sampler.set_epoch(2)
    batches = list(training_batches(dataset, sampler, 0, channels_last=True, pin_memory=False))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=lambda b: b)
    assert len(batches) == 4
    for ((x,), y), samples in zip(batches, loader):
        assert torch.equal(x, torch.stack([s[0] for s in samples]))
        assert torch.equal(y.nan_to_num(-1), torch.stack([s[1] for s in samples]).nan_to_num(-1))
        assert x.is_contiguous(memory_format=torch.channels_last)
