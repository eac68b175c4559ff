"""Model names -> architecture arguments, eval preprocessing and published results."""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Dict, List, Optional

from ghostnetv2_jax.models.ghostnet import GhostNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
    """Eval preprocessing of the released weights (timm's cfg) and where the weights live."""
    input_size: tuple = (224, 224)
    crop_pct: float = 0.875
    interpolation: str = 'bicubic'
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    hf_hub_id: Optional[str] = None      # timm's safetensors, e.g. timm/ghostnetv2_100.in1k
    url: Optional[str] = None            # the authors' release file


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    width: float
    version: str                          # 'v1' | 'v2' | 'v3'
    pretrained: PretrainedCfg
    top1_paper: Optional[float] = None    # ImageNet top-1 reported in the papers
    top1_timm: Optional[float] = None     # timm's re-evaluation of the released weights

    def model_kwargs(self) -> Dict[str, Any]:
        kwargs = dict(width=self.width, attention='none' if self.version == 'v1' else 'dfc')
        if self.version == 'v3':   # V2's network in V3's re-parameterisable training form
            kwargs['num_conv_branches'] = V3_CONV_BRANCHES
        return kwargs


V3_CONV_BRANCHES = 3   # GhostNetV3's parallel conv+BN branches (timm's and the authors' num_conv_branches)

_AUTHORS_V3 = 'https://github.com/huawei-noah/Efficient-AI-Backbones/releases/download/GhostNetV3/'
_AUTHORS_V2 = 'https://github.com/huawei-noah/Efficient-AI-Backbones/releases/download/GhostNetV2/'
_AUTHORS_V1 = 'https://github.com/huawei-noah/CV-backbones/releases/download/ghostnet_pth/'

MODELS: Dict[str, ModelSpec] = {
    'ghostnet_050': ModelSpec(0.5, 'v1', PretrainedCfg(), top1_paper=66.2),
    'ghostnet_100': ModelSpec(1.0, 'v1', PretrainedCfg(hf_hub_id='timm/ghostnet_100.in1k',
                                                       url=_AUTHORS_V1 + 'ghostnet_1x.pth'),
                              top1_paper=73.9, top1_timm=73.96),
    'ghostnet_130': ModelSpec(1.3, 'v1', PretrainedCfg(), top1_paper=75.7),
    'ghostnetv2_100': ModelSpec(1.0, 'v2', PretrainedCfg(hf_hub_id='timm/ghostnetv2_100.in1k',
                                                         url=_AUTHORS_V2 + 'ck_ghostnetv2_10.pth.tar'),
                                top1_paper=75.3, top1_timm=75.19),
    'ghostnetv2_130': ModelSpec(1.3, 'v2', PretrainedCfg(hf_hub_id='timm/ghostnetv2_130.in1k',
                                                         url=_AUTHORS_V2 + 'ck_ghostnetv2_13.pth.tar'),
                                top1_paper=76.9, top1_timm=76.75),
    'ghostnetv2_160': ModelSpec(1.6, 'v2', PretrainedCfg(hf_hub_id='timm/ghostnetv2_160.in1k',
                                                         url=_AUTHORS_V2 + 'ck_ghostnetv2_16.pth.tar'),
                                top1_paper=77.8, top1_timm=77.84),
    # GhostNetV3 paper (arXiv 2404.11202): 1.0x 77.1, 1.3x 79.1. timm releases the 1.0x weights
    # (the authors' non-EMA ones) only; the other widths are untrained there.
    'ghostnetv3_050': ModelSpec(0.5, 'v3', PretrainedCfg()),
    'ghostnetv3_100': ModelSpec(1.0, 'v3', PretrainedCfg(hf_hub_id='timm/ghostnetv3_100.in1k',
                                                         url=_AUTHORS_V3 + 'ghostnetv3-1.0.pth.tar'),
                                top1_paper=77.1, top1_timm=76.93),
    'ghostnetv3_130': ModelSpec(1.3, 'v3', PretrainedCfg(), top1_paper=79.1),
    'ghostnetv3_160': ModelSpec(1.6, 'v3', PretrainedCfg()),
}


def list_models(pattern: str = '*') -> List[str]:
    """Registered model names matching a shell-style ``pattern``."""
    return sorted(n for n in MODELS if fnmatch.fnmatch(n, pattern))


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return MODELS[name]


def create_model(name: str, **overrides: Any) -> GhostNet:
    """Build a registered model; ``overrides`` replace any GhostNet field (num_classes, dtype,
    drop_rate, attention, attention_kwargs, attention_blocks, depthwise_impl, ...)."""
    fields = {f.name for f in dataclasses.fields(GhostNet)} - {'parent', 'name'}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"create_model({name!r}) got unknown overrides {unknown}; valid: {sorted(fields)}")
    return GhostNet(**{**get_spec(name).model_kwargs(), **overrides})
