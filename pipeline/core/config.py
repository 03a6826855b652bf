"""Typed configuration: one dataclass per concern, TOML files and command-line flags.

Precedence, written once here and nowhere else: command line > config file > defaults.

Every field of every section is also a flag of the same name in kebab case (``lr`` is ``--lr``,
``data_dir`` is ``--data-dir``), so field names are unique across sections. A config file is a
small TOML override of the defaults, with one table per section::

    [model]
    model = "resnet50"
    [optim]
    lr = 0.1

Unknown sections, unknown keys and values of the wrong type are errors, never ignored.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import tomli_w

from pipeline.core import flags as tv_flags
from pipeline.core.atomic import atomic_write_text
from pipeline.core.errors import UserError
from pipeline.core.redact import redacted_download


class ConfigError(UserError, ValueError):
    """A config file or flag that cannot be used; the message says what to change."""


def opt(default: Any, help: str, metavar: str = "KEY=VALUE") -> Any:
    """A field with its default and the one-line help shown by ``--help`` (``metavar``: a list's item there)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "metavar": metavar})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    data_dir: str = opt("data", "prepared data dir: train/<wnid>/, val/<wnid>/ (ImageNet) or cifar-10-batches-py/")
    stage_data_to: str = opt("", "node-local folder (e.g. '$TMPDIR', in single quotes: each node expands its own) to "
                                 "which train and eval copy the data dir's archives or shards once per node, verified, "
                                 "and read them from; empty: read the data dir in place")
    dataset: Literal["imagenet", "cifar10"] = opt("imagenet", "which dataset the data dir holds")
    workers: int = opt(4, "worker processes: data loading per training process, or class extraction in prep")
    train_crop_size: int = opt(224, "RandomResizedCrop output size, pixels (CIFAR recipes use 32)")
    val_resize_size: int = opt(256, "eval resize of the shorter side, pixels")
    val_crop_size: int = opt(224, "eval center crop, pixels")
    auto_augment: Literal["none", "ta_wide", "randaugment", "autoaugment"] = opt("none",
                                                                                 "torchvision auto-augment policy")
    color_jitter: float = opt(0.0, "ColorJitter strength for brightness, contrast and saturation; 0 turns it off")
    random_erase: float = opt(0.0, "RandomErasing probability")
    mixup_alpha: float = opt(0.0, "MixUp alpha; 0 turns it off")
    cutmix_alpha: float = opt(0.0, "CutMix alpha; 0 turns it off")
    ra_reps: int = opt(1, "repeated augmentation: each drawn image appears this many times per epoch, on different "
                          "processes, each copy augmented anew (torchvision's --ra-sampler --ra-reps); 1 is off")
    prefetch_factor: int = opt(4, "batches each loader worker prepares ahead")
    decode: Literal["cpu", "device"] = opt("cpu", "where ImageNet JPEGs are decoded and augmented: in the loader "
                                                  "workers (PIL), or on the training device, batched (nvJPEG on CUDA)")
    layout: Literal["folders", "archives", "shards"] = opt("folders", "ImageNet data layout, written by prep and read "
                                                                      "by train and eval: extracted folders, the official "
                                                                      "archives read in place, or packed tar shards")


@dataclass
class PrepConfig:
    archive_dir: str = opt("archives", "folder holding the official ILSVRC2012 (or CIFAR-10) archives")
    skip_checksum: bool = opt(False, "do not check the official MD5s (for mirrors and subsets)")
    delete_archives: bool = opt(False, "delete each archive once its split is extracted and verified")
    shard_size_mb: int = opt(512, "--layout shards: bytes per shard, about (MB)")
    shard_max_side: int = opt(0, "--layout shards: re-encode images whose longer side exceeds this to that side "
                                 "(pixels, FFCV-style); 0 keeps the original bytes")
    shard_quality: int = opt(90, "--layout shards: JPEG quality of re-encoded images")
    shard_seed: int = opt(0, "--layout shards: seed of the order that mixes the classes in the shards")


@dataclass
class DownloadConfig:
    url: list[str] = opt([], "link of an archive to download into --archive-dir, repeatable; shown and saved "
                             "redacted (host and file name)", metavar="URL")
    url_file: str = opt("", "file of links, one per line (# comments): keeps personal links off the command line")
    header: list[str] = opt([], "request header sent with every link, repeatable, e.g. 'Authorization: Bearer "
                                "TOKEN'; saved without its value", metavar="'NAME: VALUE'")
    cookie_file: str = opt("", "cookies.txt (Netscape format, a browser's export) for sites that need a login")
    download_workers: int = opt(4, "files downloaded at once")
    download_ranges: int = opt(4, "connections per large file, each fetching a byte range, where the server takes "
                                   "Range requests (servers that cap each connection); 1: one stream per file")
    download_range_min_mb: int = opt(256, "files from this size (MiB) come in --download-ranges byte ranges")
    download_retries: int = opt(10, "retries of a file (or of each byte range) after a timeout, reset or 5xx "
                                    "(backoff 2, 4, ... 60 s); a retry that got bytes resets the count")
    download_timeout_s: int = opt(60, "seconds without data before a connection is dropped and retried")
    download_min_speed_bps: int = opt(1024, "a connection slower than this (bytes/s) over --download-speed-time-s "
                                            "is dropped and retried, as curl's --speed-limit; 0: no limit")
    download_speed_time_s: int = opt(60, "the window (s) of --download-min-speed-bps, and the most an answer's "
                                         "headers may take in all")


@dataclass
class ModelConfig:
    model: str = opt("resnet50", "registered model name, or package.module:factory for your own")
    pretrained: str = opt("", "weights to start from: a local file (state dict or checkpoint), or a torchvision "
                              "weights name (IMAGENET1K_V1) already in $TORCH_HOME; nothing is downloaded")
    sync_bn: bool = opt(False, "convert BatchNorm to SyncBatchNorm under DDP")
    channels_last: bool = opt(True, "NHWC memory format, faster with AMP on GPUs and CPUs (never on NPUs, whose "
                                    "runtime picks its own formats)")
    compile: bool = opt(False, "torch.compile the model")
    ema_decay: float = opt(0.0, "model EMA decay per update, used as given at any scale (e.g. 0.9999); 0 turns EMA "
                                "off; or give ema_decay_per_image instead")
    ema_decay_per_image: float = opt(0.0, "model EMA decay as torchvision's --model-ema-decay (0.99998 there): "
                                          "adjusted for scale to 1 - min(1, (1 - this) x world size x batch_size x "
                                          "accum_steps x ema_steps / epochs) per update, so a recipe means the same at "
                                          "any world size or batch; 0 is off; use this or ema_decay, not both")
    ema_steps: int = opt(1, "optimizer steps between EMA updates (torchvision's --model-ema-steps); during warm-up "
                            "the EMA follows the model")


@dataclass
class OptimConfig:
    optimizer: Literal["sgd", "rmsprop", "adamw", "lars", "lamb"] = opt(
        "sgd", "optimizer; lars and lamb (timm's, for large batches) leave biases and norm weights out of weight "
               "decay and of the trust ratio")
    accum_steps: int = opt(1, "gradient accumulation: batches per optimizer step, so the global batch is processes "
                              "x batch_size x this (an 8-GPU recipe on 2 GPUs: 4); 1 is off")
    lr: float = opt(0.1, "peak learning rate for the global batch")
    lr_base: float = opt(0.0, "the recipe's peak lr for lr_base_batch images per step: when set, lr is derived from "
                              "the run's global batch (processes x batch x accum_steps) by lr_base_scale; 0: lr as "
                              "given")
    lr_base_batch: int = opt(256, "the global batch (images per step) lr_base is given for")
    lr_base_scale: Literal["linear", "sqrt"] = opt("linear", "lr = lr_base x (global batch / lr_base_batch), or its "
                                                             "square root")
    momentum: float = opt(0.9, "momentum (SGD, RMSprop, LARS)")
    nesterov: bool = opt(False, "Nesterov momentum (SGD, LARS)")
    weight_decay: float = opt(1e-4, "weight decay")
    norm_weight_decay: bool = opt(True, "apply weight decay to norm and bias parameters too")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy loss")
    clip_grad_norm: float = opt(0.0, "clip the gradients' total L2 norm to this before each step; 0 is off")
    scheduler: Literal["step", "multistep", "cosine", "exponential", "linear", "poly"] = opt(
        "step", "learning-rate schedule after warm-up")
    lr_step_size: int = opt(30, "epochs between decays (step)")
    lr_milestones: list[int] = opt([], "epochs after warm-up at which multistep multiplies the lr by lr_gamma, "
                                       "repeatable: --lr-milestones 150 --lr-milestones 225", metavar="EPOCH")
    lr_gamma: float = opt(0.1, "decay factor: per lr_step_size epochs (step), per milestone (multistep) or per "
                               "epoch (exponential)")
    lr_power: float = opt(2.0, "poly: lr falls as (1 - progress) ** lr_power to min_lr (linear is power 1)")
    min_lr: float = opt(0.0, "floor of the cosine schedule, and the rate during cool-down")
    warmup_epochs: int = opt(0, "linear warm-up epochs")
    warmup_decay: float = opt(0.01, "warm-up starts at lr * warmup_decay")
    cooldown_epochs: int = opt(0, "epochs at min_lr after the schedule ends")


@dataclass
class TrainConfig:
    run_dir: str = opt("runs/default", "run dir: resolved config, checkpoints, per-epoch records, logs")
    epochs: int = opt(90, "training epochs")
    batch_size: int = opt(32, "images per process per step")
    device: Literal["auto", "cuda", "npu", "cpu"] = opt("auto", "device type: auto picks cuda, then npu, then cpu")
    amp: Literal["none", "bf16", "fp16", "fp16-o2", "bf16-o2"] = opt(
        "none", "mixed precision: bf16 autocast, fp16 with a GradScaler, or O2 (fp16-o2, bf16-o2): low-precision "
                "weights but norm layers, fp32 master weights, fp16 loss scaling")
    loss_scale: float = opt(0.0, "fp16 loss scale (--amp fp16, fp16-o2): 0 dynamic (from 2 ** 16, halved at an "
                                 "overflow, doubled after 2000 steps without), N a static scale (a step that "
                                 "overflows is still skipped)")
    resume: str = opt("", "checkpoint to resume from, or 'auto' for the newest valid one in the run dir")
    max_steps: int = opt(0, "performance mode: stop after this many steps and report steady-state FPS; 0 is off")
    seed: int = opt(0, "random seed of model init, sampling and augmentation")
    print_freq: int = opt(10, "steps between log lines")
    save_every: int = opt(1, "epochs between kept checkpoints (latest and best are always written)")
    tensorboard: bool = opt(True, "TensorBoard event files in <run dir>/tensorboard/ (rank 0): loss, lr, img/s, "
                                  "data wait at the log lines; accuracy, epoch time, memory per epoch")
    wandb: bool = opt(False, "also log to Weights & Biases (the wandb extra); WANDB_MODE=offline needs no "
                             "account")
    hang_timeout_s: int = opt(900, "seconds without a training step before every rank dumps its Python "
                                   "stacks to its log and names the silent ranks; 0 is off")
    threads: int = opt(0, "intra-op (OpenMP) threads per training or eval process; 0: its share of the node's CPUs "
                          "(affinity // processes per node) less its loader workers, at least 1")
    straggler_fraction: float = opt(0.1, "the report and the follow output name a rank whose input wait per step "
                                         "exceeds the median rank's by more than this share of the median step time")
    min_steady_steps: int = opt(20, "the report flags a throughput measured over fewer steady-state steps (after "
                                    "warm-up) than this, instead of printing it as a result")
    min_steady_s: float = opt(10.0, "the report flags a throughput measured over a steady-state window shorter than "
                                    "this, s")


@dataclass
class EvalConfig:
    checkpoint: str = opt("", "checkpoint to evaluate with --stage eval; empty: best.pt of the run dir")
    weights: Literal["model", "ema"] = opt("model", "which weights of the checkpoint to evaluate: the trained model, "
                                                    "or its EMA (a run trained with --ema-decay)")


@dataclass
class StageRequest:
    """What one stage's job asks for where it differs from the training job's ([launch.prep], --prep-cpus, ...);
    0 or empty: the stage's default (pipeline/core/stages.py), else [launch]'s and [slurm]'s value."""

    partition: str = opt("", "partition; empty: [slurm] partition")
    nodes: int = opt(0, "nodes (eval; the others run on one); 0: the stage's default")
    cpus: int = opt(0, "CPUs of its node task; 0: what the stage uses (eval: --cpus-per-task; else the stage's "
                       "default)")
    mem: str = opt("", "memory per node, e.g. 16G; empty: [launch] mem for eval, the scheduler's default otherwise")
    time: int = opt(0, "time limit, minutes or Slurm's formats; 0: the stage's default, else [launch] time")


REQUEST_STAGES = ("download", "prep", "eval", "report")  # train's request is [launch] and [slurm] themselves


def request_table(stage: str) -> Any:
    """The field of a stage's request table in [launch] (its flags: --<stage>-<key>)."""
    return field(default_factory=StageRequest, metadata={"help": f"the {stage} job's own request"})


@dataclass
class LaunchConfig:
    """How jobs run, in any scheduler's terms (a scheduler's own options: [slurm])."""

    executor: str = opt("auto", "scheduler backend by name (launcher/backends/): slurm, local (this machine), debug "
                                "(in this process); auto: slurm where sbatch exists, else local")
    nodes: int = opt(1, "nodes per job")
    gpus_per_node: int = opt(1, "processes (GPUs, NPUs or CPU workers) per node; alias --procs-per-node")
    cpus_per_task: int = opt(0, "CPUs per node task of train and eval; 0: processes per node x (--workers + 1) "
                                "(each process and its loader workers), at most a node's CPUs (prep: --prep-cpus)")
    mem: str = opt("", "memory per node of train and eval, e.g. 200G; empty lets Slurm decide (prep: --prep-mem)")
    time: int = opt(60, "time limit, minutes")
    job_name: str = opt("imagenet", "job name prefix")
    setup: list[str] = opt([], "shell lines every job runs before its processes start, repeatable: e.g. 'source "
                               "/usr/local/Ascend/ascend-toolkit/set_env.sh' (CANN) or 'module load cuda'")
    max_restarts: int = opt(2, "torchrun restarts of a crashed worker group before the job fails")
    signal_delay_s: int = opt(90, "seconds before the time limit at which the scheduler signals a checkpoint")
    max_requeues: int = opt(10, "times a job may be requeued after reaching its time limit (preemptions do not count)")
    preflight_timeout_s: int = opt(120, "bound of the all-reduce pre-flight before multi-process training, s; 0 is off")
    detach: bool = opt(False, "print job ids and return instead of waiting")
    array_parallelism: int = opt(0, "a --sweep on Slurm: at most this many of its points run at once (each job "
                                    "array's %%N); 0: no limit")
    dry_run: bool = opt(False, "print the sbatch scripts and torchrun commands, submit nothing")
    download: StageRequest = request_table("download")
    prep: StageRequest = request_table("prep")
    eval: StageRequest = request_table("eval")
    report: StageRequest = request_table("report")
    container: str = opt("", "Apptainer/Singularity image (.sif file or sandbox dir) every process of a job runs in; "
                             "empty: none")
    container_runtime: Literal["auto", "apptainer", "singularity"] = opt(
        "auto", "the container runtime; auto: apptainer, else singularity, whichever the job's node has on PATH")
    max_excluded_hosts: int = opt(2, "hosts a job may leave out of its requeue after its pre-flight names them "
                                     "bad; 0: the job fails instead")


@dataclass
class SlurmConfig:
    """Options only Slurm knows (launcher/backends/slurm.py); other schedulers ignore them."""

    partition: str = opt("", "Slurm partition")
    account: str = opt("", "Slurm account")
    qos: str = opt("", "Slurm QOS")
    constraint: str = opt("", "Slurm node constraint")
    exclusive: bool = opt(False, "whole nodes for the job")
    sbatch: list[str] = opt([], "other sbatch options as key=value, repeatable")
    cpu_bind: bool = opt(True, "srun binds each node's task to its allocated cores (--cpu-bind=cores); "
                               "--no-cpu-bind: --cpu-bind=none")
    npu_gres: str = opt("npu", "Slurm generic resource of the NPUs: --device npu asks for --gres=<this>:<processes "
                               "per node>")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)
LAUNCH_SECTIONS = ("launch", "slurm")  # how to run a job, not what a run trained with
# (section, key) of a key that moved -> its section now; files that name the old place still load, with a note
MOVED = {("launch", f.name): "slurm" for f in dataclasses.fields(SlurmConfig)}
# Other spellings of the same flag, torchvision's reference ones among them (pipeline/core/flags.py: its other flags).
FLAG_ALIASES = {"gpus_per_node": ["--procs-per-node"], "data_dir": ["--data-path"], "batch_size": ["-b"],
                "workers": ["-j"], "optimizer": ["--opt"], "weight_decay": ["--wd"], "scheduler": ["--lr-scheduler"],
                "warmup_epochs": ["--lr-warmup-epochs"], "warmup_decay": ["--lr-warmup-decay"], "min_lr": ["--lr-min"],
                "ema_steps": ["--model-ema-steps"], "ema_decay_per_image": ["--model-ema-decay"],
                "accum_steps": ["--grad-accum-steps"]}


def _field_owner() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """Map each field name to (section, field, resolved type); names are unique across sections."""
    owner = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in owner, f"field {f.name} is in two sections"
            owner[f.name] = (section, f, hints[f.name])
    return owner


FIELDS = _field_owner()
REQUEST_KEYS = typing.get_type_hints(StageRequest)
# --prep-cpus and its kind: flag name -> (stage, key); one flag per key of each stage's request table
STAGE_FLAGS = {f"{stage}_{key}": (stage, key) for stage in REQUEST_STAGES for key in REQUEST_KEYS}
assert not set(STAGE_FLAGS) & set(FIELDS), "a stage's request flag has the name of a field"


LIST_ITEMS = {str: "strings", int: "whole numbers"}  # what a list field holds, in words
CREDENTIAL_FIELDS = ("url", "header", "cookie_file")  # values that may hold a token: never echoed in errors


def _check_value(name: str, kind: Any, value: Any, where: str) -> Any:
    """Return value converted to the field's type, or raise ConfigError naming the key and the expected type (the
    value itself only where it cannot hold a credential)."""
    origin = typing.get_origin(kind)
    shown = f"a {type(value).__name__}" if name in CREDENTIAL_FIELDS else repr(value)
    if name in tv_flags.TYPES and isinstance(value, str):  # e.g. time = "1-12:00:00" in a file, as on the command line
        try:
            return tv_flags.TYPES[name](value)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{where}: {name}: {exc}") from None
    if dataclasses.is_dataclass(kind):  # a request table: [launch.prep]
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {name} must be a table ([launch.{name}]) of {sorted(REQUEST_KEYS)}, got "
                              f"{shown}")
        unknown = sorted(set(value) - set(REQUEST_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} in [launch.{name}]; known: {list(REQUEST_KEYS)}")
        return kind(**{key: _check_value(key, REQUEST_KEYS[key], item, f"{where}: [launch.{name}]")
                       for key, item in value.items()})
    if origin is Literal:
        if value not in typing.get_args(kind):
            raise ConfigError(f"{where}: {name} = {shown} is not one of {list(typing.get_args(kind))}")
        return value
    if origin is list:
        item = typing.get_args(kind)[0]
        if not isinstance(value, list) or not all(type(v) is item for v in value):
            raise ConfigError(f"{where}: {name} must be a list of {LIST_ITEMS[item]}, got {shown}")
        return list(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise ConfigError(f"{where}: {name} must be {kind.__name__}, got {type(value).__name__} {shown}")
    return value


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field; defaults are suppressed so only given flags override."""
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} config")
        for name, (sec, f, kind) in FIELDS.items():
            if sec != section:
                continue
            if dataclasses.is_dataclass(kind):
                _add_request_flags(group, name)
                continue
            flags = ["--" + name.replace("_", "-")] + FLAG_ALIASES.get(name, [])
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            help_text = f"{f.metadata['help']} (default: {default!r})"
            origin = typing.get_origin(kind)
            if kind is bool and name in tv_flags.BOOL_VALUE_REFUSED:
                group.add_argument(*flags, dest=name, action=tv_flags.BoolRefusingValue, default=argparse.SUPPRESS,
                                   why=tv_flags.BOOL_VALUE_REFUSED[name], help=help_text)
            elif kind is bool:
                group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            elif origin is Literal:
                bare = {"nargs": "?", "const": tv_flags.CONSTS[name]} if name in tv_flags.CONSTS else {}
                group.add_argument(*flags, dest=name, choices=typing.get_args(kind), default=argparse.SUPPRESS,
                                   type=tv_flags.choice_type(name, typing.get_args(kind)), help=help_text, **bare)
            elif origin is list:
                group.add_argument(*flags, dest=name, action="append", default=argparse.SUPPRESS,
                                   type=typing.get_args(kind)[0], metavar=f.metadata["metavar"], help=help_text)
            else:
                group.add_argument(*flags, dest=name, type=tv_flags.TYPES.get(name, kind), default=argparse.SUPPRESS,
                                   help=help_text)
    tv_flags.add_torchvision_flags(parser)
    parser.add_argument("--config", type=Path, default=None, help="TOML config file (see configs/)")


def _add_request_flags(group: Any, stage: str) -> None:
    """--<stage>-partition, --<stage>-cpus, ...: one flag per key of the stage's request table."""
    for key, f in ((f.name, f) for f in dataclasses.fields(StageRequest)):
        group.add_argument(f"--{stage}-{key}", dest=f"{stage}_{key}", default=argparse.SUPPRESS,
                           type=tv_flags.TYPES.get(key, REQUEST_KEYS[key]),
                           help=f"{stage} job: {f.metadata['help']} (default: {f.default!r})")


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config values given as flags (fields, and the stages' request keys)."""
    return {k: v for k, v in vars(args).items() if k in FIELDS or k in STAGE_FLAGS}


def read_toml(path: Path) -> dict[str, dict[str, Any]]:
    """Read a config file, with one clear line for a missing, unreadable or non-TOML file."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; see configs/ for the recipes") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; pass a TOML file (see configs/)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text (not UTF-8); pass a TOML file (see configs/)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return data


def build_config(file_values: dict[str, dict[str, Any]] | None = None,
                 cli_values: dict[str, Any] | None = None, where: str = "config", note_moved: bool = True) -> Config:
    """Defaults, then the file's tables, then the flags: the one place precedence is applied. A key in the table it
    moved from (``MOVED``) is read into its new one, with a note unless ``note_moved`` is off."""
    cfg = Config()
    for section, table in (file_values or {}).items():
        if not isinstance(table, dict) and section not in SECTIONS:  # ``lr = 0.1`` above every [section] line
            hint = f" ({section} belongs in [{FIELDS[section][0]}])" if section in FIELDS else ""
            raise ConfigError(f"{where}: unknown key {section!r} at the top level; keys belong in sections "
                              f"{', '.join(f'[{name}]' for name in SECTIONS)}{hint}")
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section [{section}]; known sections: {sorted(SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{section}] must be a table of key = value lines")
        for name, value in table.items():
            owner = MOVED.get((section, name), section)
            if owner != section and note_moved:  # a file written before the key moved still loads
                print(f"note: {where}: [{section}] {name} is read from [{owner}] now; move it there", file=sys.stderr)
            if name not in FIELDS or FIELDS[name][0] != owner:
                hint = f" (it belongs in [{FIELDS[name][0]}])" if name in FIELDS else ""
                raise ConfigError(f"{where}: unknown key {name!r} in [{section}]{hint}")
            setattr(getattr(cfg, owner), name, _check_value(name, FIELDS[name][2], value, where))
    for name, value in (cli_values or {}).items():
        if name in STAGE_FLAGS:
            stage, key = STAGE_FLAGS[name]
            setattr(getattr(cfg.launch, stage), key, _check_value(key, REQUEST_KEYS[key], value, "command line"))
            continue
        if name not in FIELDS:
            raise ConfigError(f"unknown option {name!r}")
        section = FIELDS[name][0]
        setattr(getattr(cfg, section), name, _check_value(name, FIELDS[name][2], value, "command line"))
    return cfg


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config for parsed arguments of a parser that went through add_config_arguments."""
    cli = flag_values(args)
    file_values = read_toml(args.config) if getattr(args, "config", None) else None
    return build_config(file_values, cli, where=str(args.config) if file_values is not None else "config")


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def dumps(cfg: Config) -> str:
    """TOML text of the whole resolved config, every field written out; a library writes it, so any legal value
    (quotes, backslashes, unicode) reads back equal; links and header values are written redacted."""
    tables = to_dict(cfg)  # a saved config never holds a link's token
    return tomli_w.dumps({**tables, "download": redacted_download(tables["download"])})


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (the run dir's config.toml), so every number traces back to it."""
    atomic_write_text(Path(path), dumps(cfg))


def load_config(path: str | Path) -> Config:
    """Read a config file (e.g. a run dir's resolved config.toml) over the defaults. A run dir written before a key
    moved holds it in the old table: read without a note (nobody edits a resolved config; a report of many runs
    would repeat it for each)."""
    return build_config(read_toml(Path(path)), where=str(path), note_moved=False)


def ema_update_decay(cfg: Config, world_size: int) -> float | None:
    """The model EMA's decay per update, None when off: model.ema_decay as given, or model.ema_decay_per_image
    adjusted as torchvision's reference does (pycls's rule), so the EMA spans the same share of training at any
    world size, batch or update period."""
    model = cfg.model
    if model.ema_decay_per_image <= 0:
        return model.ema_decay if model.ema_decay > 0 else None
    adjust = world_size * cfg.train.batch_size * cfg.optim.accum_steps * model.ema_steps / cfg.train.epochs
    return 1.0 - min(1.0, (1.0 - model.ema_decay_per_image) * adjust)
