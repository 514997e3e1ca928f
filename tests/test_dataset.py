"""The training batches: prepared one ahead in a thread, identical to the DataLoader's own."""

import threading

import numpy as np
import pytest
import torch

from mtl_meniscus.config import AugmentConfig
from mtl_meniscus.dataset import EpochBatchSampler, SliceDataset, prefetched, training_batches


def test_prefetched_keeps_order_and_raises_where_the_error_happened():
    assert list(prefetched(range(50))) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise ValueError("bad image 3")

    seen = []
    with pytest.raises(ValueError, match="bad image 3"):
        for item in prefetched(failing()):
            seen.append(item)
    assert seen == [1, 2]


def test_prefetched_stops_its_thread_when_the_consumer_stops_early():
    produced = []

    def endless():
        k = 0
        while True:
            produced.append(k)
            yield k
            k += 1

    before = threading.active_count()
    for item in prefetched(endless(), depth=2):
        if item == 3:
            break  # the generator is closed here: its thread must end, not fill the queue forever
    assert threading.active_count() == before
    assert len(produced) <= 3 + 1 + 2 + 1  # consumed, the one in hand, the queue, one blocked put


def test_threaded_batches_equal_the_dataloaders():
    rng = np.random.default_rng(0)
    images = [rng.random((32, 32), dtype=np.float32) for _ in range(10)]
    targets = np.tile([[1.0, 0.0, np.nan]], (10, 1)).astype(np.float32)
    dataset = SliceDataset(images, targets, "sobel", AugmentConfig(rotation_deg=10, translate_frac=0.1))
    sampler = EpochBatchSampler(range(10), steps=4, batch_size=3, seed=5)
    sampler.set_epoch(2)
    threaded = list(training_batches(dataset, sampler, 0, channels_last=True, pin_memory=False))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=lambda b: b)
    assert len(threaded) == 4
    for ((x,), y), samples in zip(threaded, loader):
        assert torch.equal(x, torch.stack([s[0] for s in samples]))
        assert torch.equal(y.nan_to_num(-1), torch.stack([s[1] for s in samples]).nan_to_num(-1))
        assert x.is_contiguous(memory_format=torch.channels_last)
