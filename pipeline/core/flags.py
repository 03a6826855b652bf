"""The flags people type: torchvision's reference-script spellings and Slurm's time formats.

A torchvision command line works here with only the script name changed: its spellings are aliases of our flags
(config.FLAG_ALIASES: ``-b`` is ``--batch-size``), its value names are translated (``--lr-scheduler steplr`` is
``step``), its on/off switches turn a feature on with torchvision's default (``--model-ema``), and a flag that means
something else here, or has no counterpart, stops the parse with our equivalent spelled out instead of silently
differing. These are tables; config.add_config_arguments builds the flags from them.
"""
from __future__ import annotations

import argparse
import re
from typing import Any, Callable, Sequence

TORCHVISION_EMA_DECAY = 0.99998  # torchvision's --model-ema-decay default (see config.ema_update_decay)

# torchvision's value names of a choice -> ours.
VALUE_NAMES = {"scheduler": {"steplr": "step", "cosineannealinglr": "cosine", "exponentiallr": "exponential"},
               "auto_augment": {"ra": "randaugment", "imagenet": "autoaugment"}}
# torchvision values with no counterpart of that name: what to write instead ("*": any value not among ours).
REFUSED_VALUES = {
    "optimizer": {"sgd_nesterov": "here that is --opt sgd --nesterov"},
    "auto_augment": {"cifar10": "here the AutoAugment policy follows the dataset: --auto-augment autoaugment "
                                "--dataset cifar10",
                     "svhn": "there is no SVHN policy here; choose ta_wide, randaugment or autoaugment",
                     "augmix": "AugMix is not available here; choose ta_wide, randaugment or autoaugment"},
    "weights": {"*": "here --weights picks the checkpoint's model or ema weights for eval; torchvision's --weights "
                     "NAME is --pretrained NAME (e.g. IMAGENET1K_V2, read from $TORCH_HOME, never downloaded)"},
}
# A value-less torchvision switch: it sets field = value unless the field's own flag is given too.
SWITCHES = {"--model-ema": ("ema_decay_per_image", TORCHVISION_EMA_DECAY,
                            "torchvision's switch: model EMA with its default --model-ema-decay "
                            f"{TORCHVISION_EMA_DECAY}, adjusted for scale"),
            "--ra-sampler": ("ra_reps", 3, "torchvision's switch: repeated augmentation with its default --ra-reps 3")}
CONSTS = {"amp": "fp16"}  # torchvision's bare --amp: float16 autocast with a GradScaler
BOOL_VALUE_REFUSED = {"norm_weight_decay": "here --norm-weight-decay is a switch: --no-norm-weight-decay puts norm "
                                           "and bias parameters at weight decay 0 (torchvision: --norm-weight-decay "
                                           "0.0 --bias-weight-decay 0.0); other values are not supported"}
_NO_DECAY_SPLIT = ("the decay of norm and bias parameters is --norm-weight-decay / --no-norm-weight-decay (the "
                   "weight decay, or 0); other values are not supported")
# torchvision flags without a counterpart here: (values accepted as a no-op (None: given bare), what to do instead).
REFUSED_FLAGS: dict[str, tuple[set[Any], str]] = {
    "--lr-warmup-method": ({"linear"}, "warm-up here is linear, from lr x --lr-warmup-decay to lr; 'constant' is "
                                       "not available"),
    "--bias-weight-decay": (set(), _NO_DECAY_SPLIT),
    "--transformer-embedding-decay": (set(), _NO_DECAY_SPLIT),
    "--ra-magnitude": ({"9"}, "RandAugment here uses torchvision's default magnitude 9"),
    "--augmix-severity": ({"3"}, "AugMix is not available here"),
    "--interpolation": ({"bilinear"}, "resizing here is bilinear"),
    "--use-v2": ({None}, "transforms here are always torchvision.transforms.v2"),
    "--backend": ({"pil"}, "decoding here is --decode cpu (PIL in the loader workers) or --decode device"),
    "--cache-dataset": (set(), "there is no dataset cache here: loaders read the image folder directly"),
    "--use-deterministic-algorithms": (set(), "not available here; --seed fixes init, sampling and augmentation"),
    "--output-dir": (set(), "use --run-dir DIR: it holds the checkpoints, the resolved config and the records"),
    "--start-epoch": (set(), "the epoch comes from the checkpoint: --resume PATH, or --resume auto"),
    "--world-size": (set(), "the process count is --nodes x --gpus-per-node (launch.py) or torchrun's "
                            "--nproc-per-node"),
    "--dist-url": (set(), "the rendezvous is torchrun's (MASTER_ADDR, MASTER_PORT), set by launch.py"),
}


def slurm_minutes(text: str) -> int:
    """A Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes, seconds rounded up as
    Slurm does."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"time limit {text!r}: write minutes (90) or Slurm's MM:SS, HH:MM:SS, "
                                         "D-HH, D-HH:MM or D-HH:MM:SS")
    days, *parts = match.groups()
    numbers = [int(p) for p in parts if p is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        hours += 24 * int(days)
    else:  # MM, MM:SS, HH:MM:SS
        hours, minutes, seconds = ([0] + numbers + [0] if len(numbers) < 3 else numbers)[:3]
    return hours * 60 + minutes + (seconds + 59) // 60


TYPES: dict[str, Callable[[str], Any]] = {"time": slurm_minutes}


def choice_type(name: str, choices: Sequence[str]) -> Callable[[str], str]:
    """The argparse type of a choice flag: torchvision's value names translated, its values we lack refused."""
    names, refused = VALUE_NAMES.get(name, {}), REFUSED_VALUES.get(name, {})

    def convert(text: str) -> str:
        key = text.lower()
        if key in refused or (text not in choices and key not in names and "*" in refused):
            raise argparse.ArgumentTypeError(f"{text!r} (torchvision's) is not a value here: "
                                             f"{refused.get(key, refused.get('*'))}")
        return names.get(key, key if key in choices else text)
    convert.__name__ = name  # argparse names the type in its messages
    return convert


class Switch(argparse.Action):
    """A torchvision on/off switch: sets its field to torchvision's default unless that field's flag is given."""

    def __init__(self, option_strings, dest, const=None, **kwargs):
        super().__init__(option_strings, dest, nargs=0, const=const, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if not hasattr(namespace, self.dest):  # field flags default to SUPPRESS: absent until given
            setattr(namespace, self.dest, self.const)


class Refused(argparse.Action):
    """A torchvision flag without a counterpart: a no-op for the values that mean what happens here anyway, else an
    error naming what to write instead."""

    def __init__(self, option_strings, dest, accepted=frozenset(), why="", **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                         **kwargs)
        self.accepted, self.why = accepted, why

    def __call__(self, parser, namespace, values, option_string=None):
        if values not in self.accepted:
            given = f"{option_string} {values}" if values is not None else option_string
            parser.error(f"{given} (torchvision's reference flag) has no counterpart here: {self.why}")


class BoolRefusingValue(argparse.BooleanOptionalAction):
    """Our on/off flag where torchvision's flag of the same name takes a number: a number is refused, with why."""

    def __init__(self, option_strings, dest, why="", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.nargs, self.why = "?", why

    def __call__(self, parser, namespace, values, option_string=None):
        if values is not None:
            parser.error(f"{option_string} {values}: {self.why}")
        super().__call__(parser, namespace, None, option_string)


def add_torchvision_flags(parser: argparse.ArgumentParser) -> None:
    """torchvision's switches and its refused flags (hidden from --help; the README's table lists them)."""
    for flag, (dest, value, help_text) in SWITCHES.items():
        parser.add_argument(flag, dest=dest, action=Switch, const=value, default=argparse.SUPPRESS, help=help_text)
    for flag, (accepted, why) in REFUSED_FLAGS.items():
        parser.add_argument(flag, dest="torchvision_" + flag[2:].replace("-", "_"), action=Refused,
                            accepted=accepted, why=why)
