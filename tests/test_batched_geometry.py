"""The batched crop/resize/flip of the device path against torchvision's per-image resize, and the batched
RandomErasing: same pixels within one level, whatever the mix of image sizes, chunks or boxes."""
from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from pipeline.data import batched_geometry
from pipeline.data.batched_geometry import eval_plans, resample, train_plans
from pipeline.data.device_decode import DeviceDecoder

SIZES = [(60, 72), (375, 500), (500, 375), (16, 300), (224, 224), (41, 33)]


def photos(seed: int = 0) -> list[torch.Tensor]:
    """Smooth uint8 images of the SIZES: what a photo looks like to a resize (noise would be a worst case)."""
    generator = torch.Generator().manual_seed(seed)
    return [F.gaussian_blur(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator), [7, 7])
            for h, w in SIZES]


def assert_within_one_level(expected: list[torch.Tensor], got: torch.Tensor) -> None:
    for a, b in zip(expected, got):
        difference = (a.int() - b.int()).abs()
        assert difference.max() <= 1 and difference.float().mean() < 0.3


def test_train_crops_resized_and_flipped_as_a_batch_match_torchvision_image_by_image():
    images = photos()
    boxes = torch.tensor([[3, 4, 40, 50], [10, 20, 300, 200], [0, 0, 500, 375], [2, 10, 10, 250], [5, 5, 100, 100],
                          [0, 0, 41, 33]])
    flips = torch.tensor([False, True, False, True, True, False])
    expected = []
    for image, (top, left, height, width), flip in zip(images, boxes.tolist(), flips.tolist()):
        crop = F.resized_crop(image, top, left, height, width, [56, 56], antialias=True)
        expected.append(crop.flip(-1) if flip else crop)
    assert_within_one_level(expected, resample(images, *train_plans(boxes, flips, 56), 56))


def test_eval_resize_and_center_crop_as_a_batch_match_torchvision_image_by_image():
    images = photos(1)
    sizes = torch.tensor(SIZES)
    expected = [F.center_crop(F.resize(image, [64], antialias=True), [56, 56]) for image in images]
    assert_within_one_level(expected, resample(images, *eval_plans(sizes, 64, 56), 56))


def test_chunks_bounding_memory_give_the_same_batch(monkeypatch):
    images = photos(2)
    plans = eval_plans(torch.tensor(SIZES), 64, 56)
    whole = resample(images, *plans, 56)
    monkeypatch.setattr(batched_geometry, "PADDED_ELEMENTS_PER_CHUNK", 3 * 500 * 500)  # the largest image alone
    assert torch.equal(resample(images, *plans, 56), whole)


@pytest.mark.parametrize("p, erased", [(1.0, True), (0.0, False)])
def test_random_erasing_fills_each_images_own_box_with_the_erase_colour(p, erased):
    images = torch.full((8, 3, 32, 32), 7, dtype=torch.uint8)
    decoder = DeviceDecoder(train=True, crop_size=32, resize_size=36, erase_p=p, erase_value=(124, 116, 104))
    out = decoder._extras(images.clone(), seeds=list(range(8)))
    filled = (out == torch.tensor([124, 116, 104], dtype=torch.uint8).view(1, 3, 1, 1)).all(dim=1)  # (8, 32, 32)
    untouched = (out == 7).all(dim=1)
    assert torch.equal(filled | untouched, torch.ones_like(filled))  # every pixel is either erased or as it was
    areas = filled.flatten(1).sum(dim=1)
    if not erased:
        assert areas.sum() == 0
        return
    assert (areas >= 0.02 * 32 * 32).all() and (areas <= 0.33 * 32 * 32).all()  # RandomErasing's scale
    assert len({tuple(mask.nonzero()[0].tolist()) for mask in filled}) > 1  # each sample draws its own box
    again = decoder._extras(images.clone(), seeds=list(range(8)))
    assert torch.equal(out, again)  # seeded per sample: the same boxes on a resume


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_batched_geometry_on_cuda_matches_the_cpus_within_one_level():
    images = photos(3)
    boxes = torch.tensor([[3, 4, 40, 50], [10, 20, 300, 200], [0, 0, 500, 375], [2, 10, 10, 250], [5, 5, 100, 100],
                          [0, 0, 41, 33]])
    flips = torch.tensor([False, True, False, True, True, False])
    on_cpu = resample(images, *train_plans(boxes, flips, 56), 56)
    cuda = torch.device("cuda", 0)
    on_cuda = resample([image.to(cuda) for image in images], *train_plans(boxes.to(cuda), flips.to(cuda), 56), 56)
    assert_within_one_level(list(on_cpu), on_cuda.cpu())
