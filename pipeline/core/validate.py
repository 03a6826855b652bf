"""The one validation of a resolved config: run by launch.py before anything is submitted, and by the job again.

A typo must never cost a queue wait, so every value a login node can judge is checked here, naming the
field and its flag. What needs the device or data not prepared yet (bf16 on this GPU, a batch larger than a
data dir still to come) stays in the training code. ``validate(cfg, stages)`` checks what those stages read:
a prep job does not import your model.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.core.config import REQUEST_KEYS, REQUEST_STAGES, Config, ConfigError
from pipeline.core.dataset_kinds import dataset_kind
from pipeline.core.redact import redact_header, redact_url
from pipeline.core.stages import BATCH, LINKS, MODEL, OPTIM, PRETRAINED, STAGES, TRACKERS, checks_of
from pipeline.prep.links import check_links, load_cookies, parse_headers, read_links

LINE_BREAKING = {"Cc", "Zl", "Zp"}  # control characters and line/paragraph separators: they break TOML and shells

# field: (lowest allowed, why); every int and float field not named here may be any finite number
AT_LEAST = {
    "workers": (0, "0 loads in the training process"), "prefetch_factor": (1, "batches ahead per worker"),
    "train_crop_size": (1, "pixels"), "val_resize_size": (1, "pixels"), "val_crop_size": (1, "pixels"),
    "ra_reps": (1, "1 is off"), "ema_steps": (1, "optimizer steps"), "epochs": (1, "epochs"),
    "batch_size": (1, "images per process"), "max_steps": (0, "0 is off"), "print_freq": (1, "steps"),
    "save_every": (1, "epochs"), "lr_step_size": (1, "epochs"), "warmup_epochs": (0, "epochs"),
    "cooldown_epochs": (0, "epochs"), "nodes": (1, "nodes"), "gpus_per_node": (1, "processes per node"),
    "cpus_per_task": (0, "0 picks a default"), "time": (1, "minutes"), "max_restarts": (0, "restarts"),
    "signal_delay_s": (0, "seconds"), "max_requeues": (0, "requeues"), "preflight_timeout_s": (0, "0 is off"),
    "array_parallelism": (0, "0 is no limit"), "max_excluded_hosts": (0, "0 fails instead"),
    "momentum": (0.0, ""), "weight_decay": (0.0, ""), "clip_grad_norm": (0.0, "0 is off"), "min_lr": (0.0, ""),
    "color_jitter": (0.0, "0 is off"), "mixup_alpha": (0.0, "0 is off"), "cutmix_alpha": (0.0, "0 is off"),
    "download_workers": (1, "files at once"), "download_ranges": (1, "1 is one stream"),
    "download_range_min_mb": (1, "MiB"), "download_retries": (0, "retries"),
    "download_timeout_s": (1, "seconds"), "download_min_speed_bps": (0, "0 is no limit"),
    "download_speed_time_s": (1, "seconds"), "lr_base": (0.0, "0 is off"), "lr_base_batch": (1, "images per step"),
    "shard_size_mb": (1, "MB"), "shard_max_side": (0, "0 keeps the original bytes"),
    "shard_quality": (1, "JPEG quality"),
    "accum_steps": (1, "batches per optimizer step; 1 is off"), "loss_scale": (0.0, "0 is dynamic"),
    "threads": (0, "0 picks a default"), "straggler_fraction": (0.0, "a share of the median step time"),
    "min_steady_steps": (0, "steps"), "min_steady_s": (0.0, "seconds"),
}
# field: (highest allowed, why)
AT_MOST = {"train_crop_size": (2048, "pixels"), "val_resize_size": (2048, "pixels"), "val_crop_size": (2048, "pixels"),
           "download_ranges": (64, "connections per file; servers refuse or throttle more"),
           "shard_quality": (100, "JPEG quality")}
SLURM_MEMORY = re.compile(r"[0-9]+[KMGT]?", re.IGNORECASE)  # sbatch --mem: a number of MiB, or with a unit suffix
WEIGHTS_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; its legacy pickle (protocol 2 and later)
FOLDERS = {"train": ("run_dir", "--run-dir"), "data": ("data_dir", "--data-dir"),
           "prep": ("archive_dir", "--archive-dir")}  # section: (field, flag) of a folder a stage writes or reads
NAME_MAX = 255  # bytes in one file name (ext4, XFS, Lustre, GPFS)
SHOWN_REDACTED = {"url": redact_url, "header": redact_header}  # may hold a token: never echoed in full
UNIT_INTERVAL = {"random_erase": "a probability", "warmup_decay": "a fraction of lr",
                 "ema_decay": "a decay per update", "ema_decay_per_image": "a decay before the adjustment for scale"}
BELOW_ONE = {"label_smoothing": "1 would make every target uniform"}
VARIABLE = r"\$(?:[A-Za-z_]\w*|\{[A-Za-z_]\w*\})"  # $NAME or ${NAME}: expanded by each node, never a shell
STAGE_DEST = re.compile(rf"(?:/|{VARIABLE})(?:[^$`]|{VARIABLE})*")


def validate(cfg: Config, stages: Iterable[str] | None = None) -> None:
    """Raise ConfigError with one line saying what to change at the first value the ``stages`` (default: those of
    --stage all) cannot run with; each stage's row in pipeline.core.stages names the groups of checks it needs."""
    chosen = set(stages if stages is not None else (n for n, s in STAGES.items() if s.in_all(cfg)))
    checks = checks_of(chosen)
    for section, name, value in _fields(cfg):
        _check_field(section, name, value)
    _check_relations(cfg, checks)
    check_stage_requests(cfg, chosen)
    check_folders(cfg)
    check_container(cfg)
    if TRACKERS in checks:
        check_trackers_installed(cfg)
    if PRETRAINED in checks:
        check_weights_file(cfg.model.pretrained)
    if MODEL in checks:
        check_model(cfg, pretrained=PRETRAINED in checks)
    if BATCH in checks:
        check_batch_fits(cfg)
    if LINKS in checks:
        check_download(cfg)


def check_text(where: str, text: str, shown: str | None = None) -> None:
    """Refuse control characters (newline, tab, NUL, escape) and line separators in a string value (named in the
    error as ``shown`` where the text itself may not be, e.g. a link with a token)."""
    bad = sorted({c for c in text if unicodedata.category(c) in LINE_BREAKING})
    if bad:
        raise ConfigError(f"{where} = {shown or repr(text)} holds control character(s) "
                          f"{', '.join(map(repr, bad))}; "
                          "strings may not contain newlines or other control characters")


def _fields(cfg: Config) -> Iterable[tuple[str, str, Any]]:
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            yield section.name, f.name, getattr(values, f.name)


def _check_field(section: str, name: str, value: Any) -> None:
    where = f"{section}.{name} (--{name.replace('_', '-')})"
    if isinstance(value, str):
        check_text(where, value)
    elif isinstance(value, list):
        for item in (v for v in value if isinstance(v, str)):
            check_text(where, item, SHOWN_REDACTED[name](item) if name in SHOWN_REDACTED else None)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} = {value}: must be a finite number")
    if name in AT_LEAST and value < AT_LEAST[name][0]:
        low, unit = AT_LEAST[name]
        raise ConfigError(f"{where} = {value}: must be at least {low}{f' ({unit})' if unit else ''}")
    if name in AT_MOST and value > AT_MOST[name][0]:
        high, unit = AT_MOST[name]
        raise ConfigError(f"{where} = {value}: must be at most {high} ({unit})")
    if name == "mem" and value and not SLURM_MEMORY.fullmatch(value):
        raise ConfigError(f"{where} = {value!r}: write Slurm's format, a number of MiB (4096) or one with a unit "
                          "K, M, G or T (200G); empty lets Slurm decide")
    if name in UNIT_INTERVAL and not 0 <= value <= 1:
        raise ConfigError(f"{where} = {value}: must lie in [0, 1] ({UNIT_INTERVAL[name]})")
    if name in BELOW_ONE and not 0 <= value < 1:
        raise ConfigError(f"{where} = {value}: must lie in [0, 1) ({BELOW_ONE[name]})")
    if name == "stage_data_to" and value and not STAGE_DEST.fullmatch(value):
        raise ConfigError(f"{where} = {value!r}: pass an absolute path, or one that starts with a variable every node "
                          "sets, e.g. '$TMPDIR/imagenet' in single quotes (each node expands its own); '$' may only "
                          "begin $NAME or ${NAME}")


def _check_relations(cfg: Config, checks: set[str]) -> None:
    """Checks between fields: schedule vs epochs, signal vs time limit, decode vs dataset, ..."""
    optim, launch = cfg.optim, cfg.launch
    if launch.signal_delay_s >= launch.time * 60:
        raise ConfigError(f"launch.signal_delay_s = {launch.signal_delay_s} s is not shorter than the time limit "
                          f"launch.time = {launch.time} min = {launch.time * 60} s; lower --signal-delay-s or "
                          "raise --time")
    if cfg.model.ema_decay > 0 and cfg.model.ema_decay_per_image > 0:
        raise ConfigError(f"model.ema_decay = {cfg.model.ema_decay} (per update, as given) and ema_decay_per_image = "
                          f"{cfg.model.ema_decay_per_image} (torchvision's --model-ema-decay, adjusted for scale) are "
                          "both set: keep one (--ema-decay 0 or --model-ema-decay 0 turns the other off)")
    if cfg.data.val_crop_size > cfg.data.val_resize_size:
        raise ConfigError(f"data.val_crop_size = {cfg.data.val_crop_size} is larger than val_resize_size = "
                          f"{cfg.data.val_resize_size}: the eval crop is cut from the resized image; raise "
                          "--val-resize-size or lower --val-crop-size")
    if cfg.train.loss_scale > 0 and not cfg.train.amp.startswith("fp16"):
        raise ConfigError(f"train.loss_scale = {cfg.train.loss_scale} scales fp16 losses, but train.amp = "
                          f"{cfg.train.amp!r}; use --amp fp16 or fp16-o2, or drop --loss-scale")
    if cfg.data.decode == "device" and not dataset_kind(cfg.data.dataset).jpeg_files:
        raise ConfigError(f"data.decode = 'device' decodes JPEGs; dataset {cfg.data.dataset!r} has none: "
                          "use --decode cpu")
    if cfg.data.layout == "archives" and cfg.prep.delete_archives:
        raise ConfigError("prep.delete_archives with data.layout = 'archives' would delete the data itself: the "
                          "archives layout reads the archives in place; drop --delete-archives")
    if cfg.data.stage_data_to and cfg.data.layout == "folders":
        raise ConfigError(f"data.stage_data_to = {cfg.data.stage_data_to!r} copies a packed data dir; the 'folders' "
                          "layout is a million small files: prep with --layout archives or --layout shards first, "
                          "or drop --stage-data-to")
    if cfg.data.layout != "folders" and cfg.data.dataset != "imagenet":
        raise ConfigError(f"data.layout = {cfg.data.layout!r} packs ImageNet's JPEGs; dataset {cfg.data.dataset!r} is "
                          "read from its own batches: use --layout folders")
    if OPTIM not in checks:
        return
    if optim.lr <= 0:
        raise ConfigError(f"optim.lr = {optim.lr}: must be positive")
    if optim.optimizer in ("lars", "lamb") and importlib.util.find_spec("timm") is None:
        raise ConfigError(f"optim.optimizer = {optim.optimizer!r} is timm's, and timm is not installed here: pip "
                          "install timm (a dependency of this package), or use --optimizer sgd")
    if optim.optimizer in ("sgd", "lars") and optim.nesterov and optim.momentum <= 0:
        raise ConfigError("optim.nesterov needs momentum > 0; set --momentum (e.g. 0.9) or --no-nesterov")
    if optim.scheduler == "exponential" and optim.lr_gamma <= 0:
        raise ConfigError(f"optim.lr_gamma = {optim.lr_gamma}: the exponential schedule needs it positive")
    main_epochs = cfg.train.epochs - optim.warmup_epochs - optim.cooldown_epochs
    if optim.scheduler == "multistep" and not (optim.lr_milestones and optim.lr_milestones == sorted(
            set(optim.lr_milestones)) and 0 < optim.lr_milestones[0] and optim.lr_milestones[-1] < main_epochs):
        raise ConfigError(f"optim.lr_milestones = {optim.lr_milestones}: the multistep schedule needs epochs after "
                          f"warm-up, increasing, within its {main_epochs} epochs (e.g. --lr-milestones 150 "
                          "--lr-milestones 225)")
    if optim.warmup_epochs + optim.cooldown_epochs >= cfg.train.epochs:
        raise ConfigError(f"optim.warmup_epochs ({optim.warmup_epochs}) + cooldown_epochs "
                          f"({optim.cooldown_epochs}) leave no epoch of the main schedule in "
                          f"train.epochs = {cfg.train.epochs}; lower them or raise --epochs")
    if cfg.model.sync_bn and cfg.train.device == "cpu" and launch.nodes * launch.gpus_per_node > 1:
        raise ConfigError("model.sync_bn needs accelerators (torch's SyncBatchNorm has no CPU kernel); "
                          "on CPU use --no-sync-bn")


def check_stage_requests(cfg: Config, stages: set[str]) -> None:
    """[launch.<stage>] values: 0 or empty takes the default; nodes only for torchrun stages; the time limit of each
    of ``stages`` longer than the warning signal's delay."""
    for stage in REQUEST_STAGES:
        request = getattr(cfg.launch, stage)
        for key in REQUEST_KEYS:
            value, where = getattr(request, key), f"launch.{stage}.{key} (--{stage}-{key})"
            if isinstance(value, str):
                check_text(where, value)
            elif value < 0:
                raise ConfigError(f"{where} = {value}: must be at least 0 (0 takes the stage's default)")
        if request.mem and not SLURM_MEMORY.fullmatch(request.mem):
            raise ConfigError(f"launch.{stage}.mem (--{stage}-mem) = {request.mem!r}: write Slurm's format, a number "
                              "of MiB (4096) or one with a unit K, M, G or T (16G); empty takes [launch] mem")
        if request.nodes > 1 and not STAGES[stage].torchrun:
            raise ConfigError(f"launch.{stage}.nodes (--{stage}-nodes) = {request.nodes}: the {stage} job runs one "
                              "process on one node; leave it 0")
        minutes = request.time or STAGES[stage].time_min  # else [launch] time, checked with the relations
        if stage in stages and minutes and minutes * 60 <= cfg.launch.signal_delay_s:
            raise ConfigError(f"launch.{stage}.time (--{stage}-time) = {minutes} min is not longer than "
                              f"launch.signal_delay_s = {cfg.launch.signal_delay_s} s; raise it")


BOUND = {"data": ("stage_data_to", "--stage-data-to"), "eval": ("checkpoint", "--checkpoint"),
         "model": ("pretrained", "--pretrained"), "train": ("resume", "--resume")}  # paths --container binds too


def check_container(cfg: Config) -> None:
    """--container: folders its --bind list can name (it splits the list at commas and colons); the image itself is
    checked on the login node (launcher/container.py), a job inside it may not see it."""
    if not cfg.launch.container:
        return
    for section, (name, flag) in [*FOLDERS.items(), *BOUND.items()]:
        check_bind_path(f"{section}.{name} ({flag})", str(getattr(getattr(cfg, section), name)))


def check_bind_path(where: str, path: str) -> None:
    if "," in path or ":" in path:
        raise ConfigError(f"{where} {path} holds a ',' or ':', which the container's --bind list cannot carry; "
                          "rename the folder or pass a link to it without them")


def check_folders(cfg: Config) -> None:
    """The run, data and archive dirs are folders where they exist (a file there fails a job after its wait)."""
    for section, (name, flag) in FOLDERS.items():
        path = Path(getattr(getattr(cfg, section), name))
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{section}.{name} ({flag}) {path} is a file, not a folder; pass a folder (it is made "
                              "where it does not exist)")


def check_run_dirs(run_dirs: Sequence[str]) -> None:
    """The --run-dir values of one command: printable, folders where they exist, each given once."""
    seen: dict[Path, str] = {}
    for run_dir in run_dirs:
        check_text("--run-dir", run_dir)
        path = Path(run_dir)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--run-dir {run_dir} is a file, not a folder; pass a run dir")
        if path.resolve() in seen:
            raise ConfigError(f"--run-dir {run_dir} is given twice (also as {seen[path.resolve()]}); give each run "
                              "dir once")
        seen[path.resolve()] = run_dir


def check_trackers_installed(cfg: Config) -> None:
    """--wandb (and --tensorboard) need their package where the job runs: found without importing it."""
    for package in ("tensorboard", "wandb"):
        if getattr(cfg.train, package) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.{package} (--{package}) needs the {package} package, which is not installed: "
                              f"pip install {package}, or pass --no-{package}")


def check_weights_file(pretrained: str) -> None:
    """A --pretrained path that exists is a file torch.save wrote (by its first bytes); names are the model's."""
    path = Path(pretrained).expanduser()
    if not pretrained or not path.exists():
        return  # a torchvision weights name, or missing: check_model says which
    if not path.is_file():
        raise ConfigError(f"model.pretrained (--pretrained) {pretrained} is a folder, not a weights file")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head.startswith(WEIGHTS_MAGIC):
        raise ConfigError(f"model.pretrained (--pretrained) {pretrained} is not a PyTorch weights file (torch.save "
                          "writes a zip archive or a pickle; this starts otherwise); pass a state dict or checkpoint")


def check_model(cfg: Config, pretrained: bool = False) -> None:
    """The model name builds a torch.nn.Module (on the meta device: no memory, no weights), and the pretrained
    weights are found; a ``package.module:factory`` that is not a model factory is refused here, not in the job."""
    import torch

    from pipeline.models import registry as models

    name = cfg.model.model
    try:
        with torch.device("meta"):
            models.build_model(name, num_classes=dataset_kind(cfg.data.dataset).classes)
    except models.UnknownModelError as exc:
        raise ConfigError(str(exc)) from None
    except Exception:  # the factory itself failed; on the CPU it may work, and then it is a model
        _build_on_cpu(name, dataset_kind(cfg.data.dataset).classes)
    if pretrained and cfg.model.pretrained:
        try:
            models.resolve_weights_file(name, cfg.model.pretrained)
        except models.PretrainedWeightsError as exc:
            raise ConfigError(str(exc)) from None


def _build_on_cpu(name: str, num_classes: int) -> None:
    """Some factories cannot run on the meta device (they read tensor values); build those for real."""
    from pipeline.models import registry as models

    try:
        models.build_model(name, num_classes=num_classes)
    except models.UnknownModelError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:
        raise ConfigError(f"model {name!r} is not a model factory: calling it as factory(num_classes={num_classes}) "
                          f"failed with {type(exc).__name__}: {exc}; a model is a registered name or "
                          "package.module:factory returning a torch.nn.Module") from None


def check_batch_fits(cfg: Config) -> None:
    """Each process's share of the train images holds a batch, when a prepared data dir's report counts them (the
    world size as launched: nodes x processes per node; under a bare torchrun the loader checks it again)."""
    from pipeline.core.records import read_json
    from pipeline.prep.datadir import REPORT_FILE

    try:
        report = read_json(Path(cfg.data.data_dir) / REPORT_FILE, ConfigError, "")
        images = int(report["splits"]["train"]["images"]) if report else 0
    except (ConfigError, KeyError, TypeError, ValueError):
        return  # a damaged report is the data dir's problem, said by the job that reads it
    world = cfg.launch.nodes * cfg.launch.gpus_per_node
    if images and cfg.train.batch_size > images // world:
        raise ConfigError(f"train.batch_size (--batch-size) = {cfg.train.batch_size} per process is larger than the "
                          f"{images // world} training images each of the {world} processes gets ({images} in "
                          f"{cfg.data.data_dir}); lower --batch-size or use fewer processes")
    window = cfg.train.batch_size * cfg.optim.accum_steps  # images per process per optimizer step
    if images and window > images // world:
        raise ConfigError(f"optim.accum_steps (--accum-steps) = {cfg.optim.accum_steps} batches of "
                          f"{cfg.train.batch_size} make a step of {window} images per process, more than the "
                          f"{images // world} each of the {world} processes gets; lower --accum-steps")


def check_download(cfg: Config) -> None:
    """The links (--url, then --url-file) are http(s) links to distinct plain file names; the headers parse and the
    cookie file reads."""
    dl = cfg.download
    found = read_links(dl.url, dl.url_file)
    if not found:
        raise ConfigError("the download stage has no links: pass --url URL (repeatable) or --url-file FILE")
    for url in found:
        check_text(f"a link of download.url_file (--url-file) {dl.url_file}", url, redact_url(url))
    check_links(found)
    parse_headers(dl.header)
    load_cookies(dl.cookie_file)

