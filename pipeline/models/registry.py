"""Models by name: a registry of builders, every torchvision classifier, ``timm:NAME``, user factories
``package.module:factory``, local pretrained weights. All come out of ``build_model`` as a plain nn.Module, so
checkpoints, EMA, AMP and eval treat them alike.

    model = build_model("resnet50", num_classes=1000)
    model = build_model("regnet_y_400mf", num_classes=1000)             # any torchvision.models.list_models() name
    model = build_model("timm:resnet10t", num_classes=1000)             # any timm model, when timm is installed
    model = build_model("mypkg.nets:tiny_net", num_classes=10)          # calls tiny_net(num_classes=10)
    model = build_model("resnet50", num_classes=1000, pretrained="r50.pth")
    model = build_model("resnet50", num_classes=1000, pretrained="IMAGENET1K_V2")  # from the TORCH_HOME cache

Nothing is ever downloaded. ``pretrained`` is either a local file (a state dict, or a checkpoint dict
holding one under ``model``) or, for a torchvision model, a weights name (``IMAGENET1K_V1``, ``DEFAULT``)
whose file must already be in torch's hub cache ($TORCH_HOME/hub/checkpoints); timm models are built with
``pretrained=False`` and take a local file only. When the file's
classifier has another number of classes than asked for, the classifier keeps its fresh initialisation
(fine-tuning) and a warning says so; any other missing, unexpected or misshapen weight is an error.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torchvision.models

from pipeline.core.errors import UserError
from pipeline.models import architectures
from pipeline.core.checkpoint_file import read_verified

log = logging.getLogger(__name__)

ModelFactory = Callable[..., nn.Module]  # called as factory(num_classes=N)
_REGISTRY: dict[str, ModelFactory] = {}

# The recipes' torchvision builders, registered under their own names; every other torchvision classifier is found
# by name too (torchvision_models()). Always weights=None (random init).
TORCHVISION_MODELS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "densenet121", "densenet169",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added to state-dict keys by DDP and torch.compile
# Built without auxiliary classifiers: in training their extra outputs would break a plain cross-entropy loss.
# (init_weights=True is torchvision's behaviour anyway; saying it silences its FutureWarning.)
TORCHVISION_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                      "inception_v3": {"aux_logits": False, "init_weights": True}}
TIMM_PREFIX = "timm:"


class UnknownModelError(UserError, ValueError):
    """A model name that is neither registered nor an importable ``package.module:factory``."""


class PretrainedWeightsError(UserError, ValueError):
    """Weights that cannot be found or do not fit the model."""


def register_model(fn: ModelFactory, name: str | None = None) -> ModelFactory:
    """Register ``fn`` under its function name (or ``name``); usable as a decorator. Warns on a duplicate."""
    key = name or fn.__name__
    if key in _REGISTRY:
        warnings.warn(f"model {key!r} is registered twice; the later builder {fn!r} replaces the earlier one",
                      stacklevel=2)
    _REGISTRY[key] = fn
    return fn


def list_models() -> list[str]:
    """The registered names (the recipes' models and any added with register_model)."""
    return sorted(_REGISTRY)


def torchvision_models() -> list[str]:
    """Every classification model torchvision ships (not its detection, segmentation, video or quantized ones)."""
    return torchvision.models.list_models(module=torchvision.models)


def available_models() -> list[str]:
    """Every plain name build_model takes: registered and torchvision (timm's go as timm:NAME)."""
    return sorted(set(_REGISTRY) | set(torchvision_models()))


def _torchvision_factory(name: str) -> ModelFactory:
    def build(*, num_classes: int) -> nn.Module:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                            **TORCHVISION_KWARGS.get(name, {}))
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"torchvision.models.{name}, randomly initialised."
    return build


for _name in TORCHVISION_MODELS:
    register_model(_torchvision_factory(_name))
for _fn in (architectures.resnet50_v1, architectures.resnet50_v1b, architectures.densenet100):
    register_model(_fn)


def _import_factory(spec: str) -> ModelFactory:
    """The callable named by ``package.module:factory``, with errors that say which part is wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UnknownModelError(f"model {spec!r}: a user model is written package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownModelError(f"model {spec!r}: cannot import module {module_name!r} ({exc}); make it importable "
                                "(pip install -e your package, or add its folder to PYTHONPATH)") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise UnknownModelError(f"model {spec!r}: module {module_name!r} ({module.__file__}) has no callable "
                                f"{attr!r}; its public callables are {public}")
    return factory


def _timm_factory(name: str) -> ModelFactory:
    """``timm:ARCH`` as timm.create_model(ARCH, pretrained=False): timm is optional and never downloads here."""
    arch = name[len(TIMM_PREFIX):]
    try:
        import timm
    except ImportError:
        raise UnknownModelError(f"model {name!r} needs timm, which is not installed: pip install timm "
                                "(or pip install -e '.[timm]')") from None
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        raise UnknownModelError(f"timm has no model {arch!r}{f' (close: {close})' if close else ''}; "
                                f"timm.list_models('*PATTERN*') searches its {len(timm.list_models())} models")

    def build(*, num_classes: int) -> nn.Module:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    return build


def _factory(name: str) -> ModelFactory:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in torchvision_models():
        return _torchvision_factory(name)
    if name.startswith(TIMM_PREFIX):
        return _timm_factory(name)
    if ":" in name:
        return _import_factory(name)
    close = difflib.get_close_matches(name, available_models(), n=3)
    timm_note = ("timm:NAME for any timm model (timm is installed)" if importlib.util.find_spec("timm")
                 else "timm:NAME once timm is installed (pip install timm)")
    raise UnknownModelError(f"unknown model {name!r}{f' (did you mean {close})' if close else ''}; known models: "
                            f"{', '.join(available_models())}; {timm_note}; or give your own as "
                            "package.module:factory")


def build_model(name: str, *, num_classes: int, pretrained: str = "") -> nn.Module:
    """A freshly built model for ``num_classes`` classes, with ``pretrained`` weights loaded when given."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    model = _factory(name)(num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise UnknownModelError(f"model {name!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    if pretrained:
        load_pretrained(model, resolve_weights_file(name, pretrained))
    return model


def resolve_weights_file(name: str, pretrained: str) -> Path:
    """A local weights file, or a torchvision weights name looked up in the hub cache; never downloads."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if name in torchvision_models() and os.sep not in pretrained and not path.suffix:
        weights_enum = torchvision.models.get_model_weights(name)
        try:
            url = weights_enum[pretrained].url
        except KeyError:
            raise PretrainedWeightsError(f"{pretrained!r} is neither a file nor a weights name of {name}; "
                                         f"names: {[w.name for w in weights_enum] + ['DEFAULT']}") from None
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if cached.is_file():
            return cached
        raise PretrainedWeightsError(f"weights {name}.{pretrained} are not in the cache: {cached} does not exist "
                                     f"and nothing is downloaded here; fetch {url} on a machine with internet "
                                     "and copy it there (or pass the file with --pretrained PATH)")
    raise PretrainedWeightsError(f"pretrained weights file {pretrained} does not exist "
                                 f"(absolute path: {path.absolute()})")


def _classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's last Linear layer, the classifier that depends on num_classes."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return set()
    return {f"{linears[-1]}.{p}" for p, _ in model.get_submodule(linears[-1]).named_parameters()}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model weights in ``path``: a plain state dict or a checkpoint's ``model`` entry, wrapper prefixes removed.
    One of our checkpoints is verified against its checksum (CheckpointError when it does not match)."""
    obj = read_verified(path)
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path} holds no state dict (expected name -> tensor, or a dict with 'model')")
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_pretrained(model: nn.Module, path: Path) -> None:
    """Load ``path`` into ``model``; a classifier for another class count is left freshly initialised, and the
    weights of auxiliary heads the model was built without (googlenet's aux1, inception_v3's AuxLogits) are left out."""
    state = read_state_dict(path)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or getattr(model, k.split(".")[0], 0) is not None}
    head = _classifier_keys(model)
    misshapen = {k for k, v in state.items() if k in own and own[k].shape != v.shape}
    head_skipped = misshapen & head
    problems = {
        "missing": sorted(set(own) - set(state)),
        "unexpected": sorted(set(state) - set(own)),
        "wrong shape": sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in misshapen - head),
    }
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        detail = "; ".join(f"{kind}: {keys[:5]}{' ...' if len(keys) > 5 else ''}" for kind, keys in problems.items())
        raise PretrainedWeightsError(f"weights {path} do not fit the model ({detail}); were they saved from "
                                     "another architecture?")
    model.load_state_dict({k: v for k, v in state.items() if k not in head_skipped}, strict=False)
    if head_skipped:
        log.warning("pretrained %s: classifier %s has another class count; it stays randomly initialised "
                    "for fine-tuning", path, sorted(head_skipped))
    log.info("loaded pretrained weights from %s", path)
