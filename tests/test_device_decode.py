"""The device data path (--decode device) run with the CPU as its device: same crops, same pixels within one level
of the PIL path, fallbacks counted, bad files skipped and named with exact val counts."""
from __future__ import annotations

import json
import logging
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.core.config import Config
from pipeline.core.distributed import DistEnv
from pipeline.core.precision import setup_precision
from pipeline.data.datasets import ImageFiles, seeded_cpu_rng
from pipeline.data.device_decode import DeviceDecoder, DrawCrop, EncodedCollate, EncodedFiles, EncodedImage
from pipeline.data.loaders import build_train_loader, build_val_loader, device_batcher, skipped_images
from pipeline.eval.evaluate import validate
from pipeline.models.registry import build_model
from pipeline.prep.synthetic import make_image_folder
from train_helpers import (assert_same_weights, checkpoint_weights, read_rows, run_module, start_module, tiny_argv,
                           tiny_data, wait_for_line)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"), num_classes=3, train_per_class=8, val_per_class=4,
                             size=(72, 60), seed=0)


def small_config(data_dir, decode: str, *, workers: int = 0, batch_size: int = 4) -> Config:
    cfg = Config()
    cfg.data.data_dir, cfg.data.decode, cfg.data.workers = str(data_dir), decode, workers
    cfg.data.train_crop_size, cfg.data.val_resize_size, cfg.data.val_crop_size = 40, 48, 40
    cfg.train.batch_size = batch_size
    return cfg


def decoded_batches(cfg: Config, *, train: bool, epoch: int = 0,
                    batched: bool | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The uint8 images and labels the model's input is made from, whichever path decodes them."""
    env = DistEnv()
    precision = setup_precision(CPU, "none", False)
    if train:
        loader, sampler = build_train_loader(cfg, env, CPU, seed=3)
        sampler.set_epoch(epoch)
        to_device = device_batcher(cfg, precision, mix_classes=3)
    else:
        loader, to_device = build_val_loader(cfg, env, CPU), device_batcher(cfg, precision)
    if to_device.decoder is not None:
        to_device.decoder.batched = batched
    decode = to_device.decoder or (lambda images, targets, device: (images, targets))
    return [decode(images, targets, CPU) for images, targets in loader]


def assert_within_one_level(cpu: list, device: list) -> None:
    assert len(cpu) == len(device)
    for (a, labels_a), (b, labels_b) in zip(cpu, device):
        assert torch.equal(labels_a, labels_b) and a.shape == b.shape and b.dtype == torch.uint8
        difference = (a.int() - b.int()).abs()
        assert difference.max() <= 1 and difference.float().mean() < 0.25  # rounding only: another box differs by tens


@pytest.mark.parametrize("batched", [False, True])  # per image (the CPU's default) and as on accelerators
@pytest.mark.parametrize("train", [True, False])
def test_device_path_gives_the_cpu_paths_crops_and_pixels_within_one_level(image_dir, train, batched):
    cpu = decoded_batches(small_config(image_dir, "cpu"), train=train, epoch=2)
    device = decoded_batches(small_config(image_dir, "device", workers=2), train=train, epoch=2, batched=batched)
    assert_within_one_level(cpu, device)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")
@pytest.mark.parametrize("train", [True, False])
def test_nvjpeg_on_cuda_gives_the_cpu_paths_crops_and_pixels_within_a_few_levels(image_dir, train):
    cuda = torch.device("cuda", 0)
    cfg = small_config(image_dir, "device", workers=2)
    loader = build_train_loader(cfg, DistEnv(), CPU, seed=3)[0] if train else build_val_loader(cfg, DistEnv(), CPU)
    if train:
        loader.sampler.set_epoch(2)
    decoder = device_batcher(cfg, setup_precision(CPU, "none", False), mix_classes=3 if train else 0).decoder
    on_gpu = [decoder(images, targets, cuda) for images, targets in loader]
    assert all(images.device.type == "cuda" for images, _ in on_gpu)
    cpu = decoded_batches(small_config(image_dir, "cpu"), train=train, epoch=2)
    for (a, labels_a), (b, labels_b) in zip(cpu, on_gpu):
        assert torch.equal(labels_a, labels_b.cpu()) and a.shape == b.shape
        assert (a.float() - b.cpu().float()).abs().mean() < 2  # nvJPEG's IDCT and upsampling differ from libjpeg's


@pytest.mark.parametrize("size", [(72, 60), (60, 72), (500, 375), (16, 300)])
def test_crop_boxes_are_torchvisions_random_resized_crop_draws(size):
    crop = v2.RandomResizedCrop(224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    image = Image.new("RGB", size)
    for seed in range(50):
        with seeded_cpu_rng(seed):
            expected = crop.make_params([image])
        with seeded_cpu_rng(seed):
            sample = DrawCrop()(EncodedImage(b"", False, image, "x"))
        assert sample.box == (expected["top"], expected["left"], expected["height"], expected["width"])


def replace_with(path, kind: str) -> None:
    """Rewrite a JPEG of the folder as a file nvJPEG cannot take (or nobody can read), under the same name."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if kind == "cmyk":
        rgb.convert("CMYK").save(path, "JPEG", quality=90)
    elif kind == "gray":
        rgb.convert("L").save(path, "JPEG", quality=90)
    elif kind == "png":
        rgb.save(path, "PNG")
    elif kind == "truncated":  # no end-of-image marker: PIL in the worker raises
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bomb":  # a few hundred bytes whose header claims 9000 x 9000 pixels (243 MB decoded)
        data = bytearray(path.read_bytes())
        sof = data.find(b"\xff\xc0")
        data[sof + 5:sof + 9] = (9000).to_bytes(2, "big") * 2
        path.write_bytes(bytes(data))
    elif kind == "not_an_image":
        path.write_bytes(b"<html>an expired link</html>")
    elif kind == "no_scan":  # a valid header and end marker but no image data: both decoders fail on the device side
        data = path.read_bytes()
        path.write_bytes(data[: data.find(b"\xff\xda")] + b"\xff\xd9")


@pytest.fixture
def odd_dir(tmp_path):
    root = make_image_folder(tmp_path / "data", num_classes=2, train_per_class=6, val_per_class=5, size=(64, 52))
    val = sorted((root / "val").rglob("*.JPEG"))
    for path, kind in zip(val[::2], ["cmyk", "gray", "png", "truncated", "no_scan"]):
        replace_with(path, kind)
    return root, val[::2]


def test_files_nvjpeg_cannot_take_are_decoded_by_pil_and_counted_bad_ones_skipped_and_named(odd_dir, caplog):
    root, odd = odd_dir
    with caplog.at_level(logging.WARNING):
        cpu = decoded_batches(small_config(root, "cpu"), train=False)
        cfg = small_config(root, "device")
        loader, to_device = build_val_loader(cfg, DistEnv(), CPU), device_batcher(cfg, setup_precision(CPU, "none",
                                                                                                        False))
        device = [to_device.decoder(images, targets, CPU) for images, targets in loader]
    # CMYK, grayscale and PNG by PIL in the workers; the truncated file fails there, the scan-less one on the device
    assert loader.dataset.source.cpu_decoded == 3 and isinstance(loader.dataset.source, EncodedFiles)
    assert skipped_images(loader) == 1 and to_device.skipped == 1
    assert sum(len(t) for _, t in device) == 10 - 2
    assert str(odd[3]) in caplog.text and str(odd[4]) in caplog.text
    # the CPU path cannot read the scan-less file either: both see the same 8 images alike
    assert_within_one_level([(torch.cat([i for i, _ in cpu]), torch.cat([t for _, t in cpu]))],
                            [(torch.cat([i for i, _ in device]), torch.cat([t for _, t in device]))])


def test_validate_with_device_decode_counts_what_it_saw_and_what_it_skipped(odd_dir, caplog):
    root, _ = odd_dir
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=2).eval()
    results = {}
    for decode in ("cpu", "device"):
        cfg = small_config(root, decode)
        precision = setup_precision(CPU, "none", False)
        with caplog.at_level(logging.INFO):
            results[decode] = validate(model, build_val_loader(cfg, DistEnv(), CPU), precision,
                                       device_batcher(cfg, precision), expected_total=10)
    assert (results["device"].total, results["device"].skipped) == (8, 2)  # fails loudly unless total + skipped = 10
    assert "val: 3 image(s) of this process decoded by PIL so far" in caplog.text  # CMYK, grayscale, PNG
    assert results["device"] == results["cpu"] or abs(results["device"].loss_sum - results["cpu"].loss_sum) < 1e-2


def test_a_train_batch_with_an_unreadable_file_stays_full(tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", num_classes=2, train_per_class=4, val_per_class=1, size=(64, 52))
    bad = sorted((root / "train").rglob("*.JPEG"))[2]
    replace_with(bad, "no_scan")
    with caplog.at_level(logging.WARNING):
        batches = decoded_batches(small_config(root, "device"), train=True)
    assert [len(t) for _, t in batches] == [4, 4] and all(images.shape[0] == 4 for images, _ in batches)
    assert str(bad) in caplog.text


@pytest.mark.parametrize("batched", [False, True])
def test_an_image_that_takes_a_failed_ones_place_keeps_its_own_label(tmp_path, batched):
    root = make_image_folder(tmp_path / "data", num_classes=2, train_per_class=1, val_per_class=1, size=(64, 52))
    first, second = sorted((root / "train").rglob("*.JPEG"))  # labels 0 and 1
    replace_with(first, "no_scan")  # read by the worker, rejected on the device
    files = EncodedFiles(ImageFiles(np.array([str(first).encode(), str(second).encode()]), np.array([0, 1])))
    with seeded_cpu_rng(0):
        samples = [(DrawCrop()(files[i][0]), int(files.labels[i]), 0) for i in range(2)]
    batch, labels = EncodedCollate()(samples)
    decoder = DeviceDecoder(train=True, crop_size=32, resize_size=36, batched=batched)
    images, targets = decoder(batch, labels, CPU)
    assert decoder.skipped == 1 and torch.equal(images[0], images[1])  # the same pixels, with the same box and flip
    assert targets.tolist() == [1, 1]  # ...and the same label: the failed file's label 0 went with it


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_a_header_claiming_too_many_pixels_and_a_file_that_is_no_image_are_skipped_and_named(tmp_path, caplog,
                                                                                                decode):
    root = make_image_folder(tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=2, size=(64, 52))
    bomb, junk = sorted((root / "val").rglob("*.JPEG"))[:2]
    replace_with(bomb, "bomb")
    replace_with(junk, "not_an_image")
    with caplog.at_level(logging.WARNING):
        batches = decoded_batches(small_config(root, decode), train=False)
    assert sum(len(t) for _, t in batches) == 2  # the two good images of four
    assert f"{bomb}: TooManyPixelsError: its header claims 9000 x 9000 pixels" in caplog.text
    assert str(junk) in caplog.text and "BytesIO" not in caplog.text  # named by its path, not by a buffer


@pytest.mark.slow
def test_resume_mid_epoch_and_eval_with_device_decode_are_exact(tmp_path):
    """The uninterrupted run, the one stopped by SIGUSR1 mid-epoch and resumed, and the eval stage agree exactly."""
    data_dir = tiny_data(tmp_path / "data")
    runs = {}
    for name in ("whole", "resumed"):
        runs[name] = tmp_path / name
        argv = tiny_argv(data_dir, runs[name], "--epochs", "2", "--resume", "auto", "--decode", "device")
        if name == "resumed":
            proc = start_module("jobs.train", argv)
            wait_for_line(proc, "Epoch: [1] [3/8]")
            proc.send_signal(signal.SIGUSR1)
            assert proc.wait(timeout=60) == 0
            assert json.loads((runs[name] / "run_state.json").read_text())["state"] == "preempted"
        done = run_module("jobs.train", argv)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(checkpoint_weights(runs["whole"] / "checkpoints" / "latest.pt"),
                        checkpoint_weights(runs["resumed"] / "checkpoints" / "latest.pt"))
    rows = {name: read_rows(run_dir / "epochs.csv") for name, run_dir in runs.items()}
    compared = ("epoch", "steps", "train_loss", "train_acc1", "val_top1_correct", "val_top5_correct", "val_total")
    assert [{k: r[k] for k in compared} for r in rows["whole"]] == [{k: r[k] for k in compared} for r in rows["resumed"]]

    evaluated = run_module("jobs.eval", tiny_argv(data_dir, runs["resumed"], "--decode", "device"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    counts = json.loads((runs["resumed"] / "eval.json").read_text())
    best = max(rows["resumed"], key=lambda r: float(r["val_acc1"]))
    assert (counts["top1_correct"], counts["top5_correct"], counts["total"]) == \
        (int(best["val_top1_correct"]), int(best["val_top5_correct"]), int(best["val_total"]))
