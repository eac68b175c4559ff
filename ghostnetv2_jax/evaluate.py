"""Top-1 / top-5 of weights on a dataset, with the model's eval preprocessing.

``evaluate(weights, data)`` runs the trainer's own eval step over a split; ``data_config(weights)``
is the pipeline config a workdir trained with, or for a weights file the registered model's
eval preprocessing (timm's pretrained config: 224 px, crop 0.875, bicubic, ImageNet mean/std).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import ml_collections

from ghostnetv2_jax.weights import Weights


def data_config(weights: Weights, **overrides: Any) -> ml_collections.ConfigDict:
    """The pipeline config to evaluate ``weights`` with; ``overrides`` that are not None win
    (dataset, data_dir, eval_split, image_size, crop_pct, interpolation, ...)."""
    from ghostnetv2_jax.data.pipeline import default_config
    from ghostnetv2_jax.models.registry import get_spec
    data = default_config()
    if weights.config is not None:
        data.update(weights.config['data'])
    else:
        pre = get_spec(weights.model_name).pretrained
        data.update(dict(image_size=pre.input_size[0], crop_pct=pre.crop_pct, interpolation=pre.interpolation,
                         mean=tuple(pre.mean), std=tuple(pre.std)))
    data.update({k: v for k, v in overrides.items() if v is not None})
    return data


def first_images(data: ml_collections.ConfigDict, count: int, split: Optional[str] = None):
    """(images, labels): the first ``count`` images of ``data``'s eval split (or ``split``),
    preprocessed for evaluation, as NumPy arrays on this host."""
    import numpy as np
    from ghostnetv2_jax.data.pipeline import create_split
    batch = min(count, 250)
    s = create_split(data, split=split or data.eval_split, train=False, global_batch=batch, seed=0)
    images, labels, have = [], [], 0
    for b in s.iterator:
        keep = np.asarray(b['mask'], bool) if 'mask' in b else np.ones(len(b['labels']), bool)
        images.append(np.asarray(b['images'], np.float32)[keep])
        labels.append(np.asarray(b['labels'])[keep])
        have += int(keep.sum())
        if have >= count:
            break
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def evaluate(weights: Weights, data: Optional[ml_collections.ConfigDict] = None, batch_size: int = 250,
             dtype: str = 'float32') -> Dict[str, Any]:
    """Loss, top-1 and top-5 (%) and the count of images of ``data``'s eval split (default:
    ``data_config(weights)``), over every device; with what was evaluated how."""
    import jax
    from ghostnetv2_jax import runtime, xla_options
    from ghostnetv2_jax.data.pipeline import create_split
    from ghostnetv2_jax.train import sharding
    from ghostnetv2_jax.train.trainer import evaluate as evaluate_batches, make_eval_step

    data = data_config(weights) if data is None else data
    model = weights.model(dtype)
    mesh = sharding.create_mesh()
    sharding.check_batch(batch_size, 'the eval batch size')
    split = create_split(data, split=data.eval_split, train=False, global_batch=batch_size, seed=0,
                         host_index=jax.process_index(), host_count=jax.process_count())
    if split.num_classes != model.num_classes:
        raise ValueError(f'the weights have {model.num_classes} classes, {data.dataset} has {split.num_classes}')
    eval_step = xla_options.jit(make_eval_step(model, runtime.chunk_for(mesh)), train=False,
                                out_shardings=sharding.replicated(mesh))
    variables = jax.device_put(weights.variables, sharding.replicated(mesh))
    results = evaluate_batches(eval_step, variables, split.iterator, mesh)
    return {**results, 'model': weights.model_name, 'source': weights.source, 'step': weights.step,
            'dataset': data.dataset, 'split': data.eval_split, 'image_size': data.image_size,
            'crop_pct': data.crop_pct, 'interpolation': data.interpolation}
