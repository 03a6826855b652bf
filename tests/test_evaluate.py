"""evaluate(cfg) and validate(): exact counts, checked against a plain ImageFolder pass, and loud failures."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch.optim.swa_utils import AveragedModel
from torchvision.transforms import v2

from jobs.eval import main as eval_main
from pipeline.core.distributed import DistEnv
from pipeline.core.precision import setup_precision
from pipeline.core.records import EVAL_KEYS, SCHEMA_VERSION
from pipeline.data.loaders import build_val_loader, device_batcher
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from pipeline.eval.evaluate import EvalCountError, evaluate, validate
from pipeline.models.registry import build_model
from pipeline.core.checkpoint_file import CheckpointError, save_checkpoint
from train_helpers import tiny_config, tiny_data

CPU = torch.device("cpu")
LINE = re.compile(r"top1_correct=(\d+) top5_correct=(\d+) total=(\d+) Acc@1 (\d+\.\d{3}) Acc@5 (\d+\.\d{3})")
CLASSES = 10  # so that top-5 is not trivially everything


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"), num_classes=CLASSES, train_per_class=2, val_per_class=3)


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(1)
    return build_model("resnet18", num_classes=CLASSES).eval()


def reference_counts(model: torch.nn.Module, data_dir: Path, cfg) -> tuple[int, int, int]:
    """Top-1/top-5 correct and total by a plain torchvision ImageFolder pass, one image at a time."""
    as_float = v2.Compose([eval_transform(cfg.data), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])  # torchvision's per-sample normalization
    folder = torchvision.datasets.ImageFolder(str(data_dir / "val"), transform=as_float)
    top1 = top5 = 0
    with torch.no_grad():
        for image, label in folder:
            ranked = model(image.unsqueeze(0))[0].argsort(descending=True).tolist()
            top1 += ranked[0] == label
            top5 += label in ranked[:5]
    return top1, top5, len(folder)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_evaluate_a_plain_state_dict_counts_exactly_and_writes_eval_json(data_dir, random_model, tmp_path,
                                                                         capsys, prefix):
    weights = tmp_path / "weights.pth"
    torch.save({prefix + k: v for k, v in random_model.state_dict().items()}, weights)
    run_dir = tmp_path / "run"
    cfg = tiny_config(data_dir, run_dir, "--checkpoint", str(weights), "--batch-size", "4")
    record = evaluate(cfg)

    top1, top5, total = reference_counts(random_model, data_dir, cfg)
    assert (record["top1_correct"], record["top5_correct"], record["total"]) == (top1, top5, total) == \
        (record["top1_correct"], record["top5_correct"], CLASSES * 3)
    assert json.loads((run_dir / "eval.json").read_text()) == {**record, "schema": SCHEMA_VERSION}
    assert sorted(record) == sorted(EVAL_KEYS) and record["world_size"] == 1
    line = LINE.search(capsys.readouterr().err)
    assert line and line.groups() == (str(top1), str(top5), str(total), f"{100 * top1 / total:.3f}",
                                      f"{100 * top5 / total:.3f}")


def test_evaluate_takes_the_model_name_from_our_checkpoint(data_dir, random_model, tmp_path):
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    save_checkpoint({"model": random_model.state_dict(), "model_name": "resnet18", "num_classes": CLASSES,
                     "epoch": 3, "step_in_epoch": 0, "global_step": 30}, path)
    cfg = tiny_config(data_dir, tmp_path / "run", "--model", "resnet50")  # default checkpoint: best.pt
    record = evaluate(cfg)
    assert record["checkpoint"] == str(path)
    assert (record["top1_correct"], record["top5_correct"], record["total"]) == \
        reference_counts(random_model, data_dir, cfg)


def test_weights_ema_evaluates_the_checkpoints_averaged_model_not_the_trained_one(data_dir, random_model, tmp_path):
    torch.manual_seed(2)
    other = build_model("resnet18", num_classes=CLASSES).eval()
    ema = AveragedModel(other)  # what training saves under "ema": keys "module.*" and "n_averaged"
    path = tmp_path / "ours.pt"
    save_checkpoint({"model": random_model.state_dict(), "ema": ema.state_dict(), "model_name": "resnet18",
                     "num_classes": CLASSES, "epoch": 1, "step_in_epoch": 0, "global_step": 1}, path)
    cfg = tiny_config(data_dir, tmp_path / "run", "--checkpoint", str(path), "--weights", "ema")
    record = evaluate(cfg)
    assert record["weights"] == "ema"
    assert (record["top1_correct"], record["top5_correct"], record["total"]) == reference_counts(other, data_dir, cfg)
    assert reference_counts(other, data_dir, cfg) != reference_counts(random_model, data_dir, cfg)

    save_checkpoint({"model": random_model.state_dict(), "ema": None, "model_name": "resnet18",
                     "num_classes": CLASSES, "epoch": 1, "step_in_epoch": 0, "global_step": 1}, path)
    with pytest.raises(CheckpointError, match="holds no EMA weights: its run trained without --ema-decay"):
        evaluate(cfg)
    plain = tmp_path / "weights.pth"
    torch.save(random_model.state_dict(), plain)
    with pytest.raises(CheckpointError, match="holds no EMA weights; evaluate it with --weights model"):
        evaluate(tiny_config(data_dir, tmp_path / "run", "--checkpoint", str(plain), "--weights", "ema"))


def test_an_unreadable_val_image_is_left_out_and_the_rest_still_counts(data_dir, random_model, tmp_path):
    damaged = tiny_data(tmp_path / "damaged", num_classes=CLASSES, train_per_class=2, val_per_class=3)
    victim = sorted((damaged / "val").rglob("*.JPEG"))[4]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    weights = tmp_path / "weights.pth"
    torch.save(random_model.state_dict(), weights)
    record = evaluate(tiny_config(damaged, tmp_path / "run", "--checkpoint", str(weights)))
    assert record["total"] == CLASSES * 3 - 1


def test_validate_fails_loudly_when_the_ranks_miss_images(data_dir, random_model):
    cfg = tiny_config(data_dir, Path("unused"))
    half = build_val_loader(cfg, DistEnv(rank=0, world_size=2), CPU)  # rank 0's shard, but no rank 1
    with pytest.raises(EvalCountError, match=r"counted 15 images \(\+0 unreadable\) but the val set has 30"):
        precision = setup_precision(CPU, "none", False)
        validate(random_model, half, precision, device_batcher(cfg, precision), expected_total=CLASSES * 3)


def test_weights_of_another_architecture_or_class_count_are_clear_errors(data_dir, random_model, tmp_path):
    weights = tmp_path / "weights.pth"
    torch.save(random_model.state_dict(), weights)
    with pytest.raises(CheckpointError, match="do not fit model resnet34"):
        evaluate(tiny_config(data_dir, tmp_path / "run", "--checkpoint", str(weights), "--model", "resnet34"))
    ours = tmp_path / "ours.pt"
    save_checkpoint({"model": random_model.state_dict(), "model_name": "resnet18", "num_classes": 7,
                     "epoch": 1, "step_in_epoch": 0, "global_step": 1}, ours)
    with pytest.raises(CheckpointError, match="has 7 classes but the val set has 10"):
        evaluate(tiny_config(data_dir, tmp_path / "run", "--checkpoint", str(ours)))


def test_eval_cli_without_a_checkpoint_exits_2_and_says_what_to_do(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--data-dir", str(data_dir), "--run-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "best.pt does not exist; train first, or pass --checkpoint FILE" in err and "Traceback" not in err
