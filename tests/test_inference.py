"""Batched prediction (engine/inference.py): test-time augmentation averages the original and n
seeded copies of each image, whatever the batch size."""

import math

import numpy as np
import torch

from mtl_meniscus.config import AugmentConfig, TTAConfig
from mtl_meniscus.engine.inference import predict_probs
from mtl_meniscus.engine.runtime import resolve_runtime

FP32 = resolve_runtime("fp32")


class _MeanModel(torch.nn.Module):
    """Logit = mean of channel 0 over the left half: sensitive to shifts, easy to reason about."""

    def forward(self, x):
        value = x[:, 0, :, : x.shape[3] // 2].mean(dim=(1, 2))
        return {"fissure": value, "orientation": -value, "position": 2 * value}


def test_tta_averages_the_original_and_n_copies_deterministically():
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(32, 32)).astype(np.float32) + np.linspace(0, 5, 32) for _ in range(3)]
    model = _MeanModel()
    plain = predict_probs(model, images, "none", FP32)
    tta = TTAConfig(copies=4, augment=AugmentConfig(rotation_deg=10, translate_frac=0.1))
    a = predict_probs(model, images, "none", FP32, batch_size=2, tta=tta, seed=1)
    b = predict_probs(model, images, "none", FP32, batch_size=5, tta=tta, seed=1)
    c = predict_probs(model, images, "none", FP32, tta=tta, seed=2)
    np.testing.assert_allclose(a["fissure"], b["fissure"], rtol=1e-6)  # batch size does not matter
    assert not np.allclose(a["fissure"], c["fissure"])  # the seed does
    assert not np.allclose(a["fissure"], plain["fissure"])
    # by hand: the mean over the original and the 4 copies, each copy seeded (seed, image, copy)
    from mtl_meniscus.data.augment import augment_image
    from mtl_meniscus.data.preprocess import make_input

    def prob(image):
        return torch.sigmoid(model(torch.from_numpy(make_input(image, "none"))[None])["fissure"]).item()

    for i, image in enumerate(images):
        copies = [
            augment_image(
                image,
                tta.augment,
                np.random.default_rng(np.random.SeedSequence([1, i, k]).generate_state(1)[0]),
            )
            for k in range(4)
        ]
        expected = np.mean([prob(image)] + [prob(copy) for copy in copies])
        assert math.isclose(a["fissure"][i], expected, rel_tol=1e-5)
