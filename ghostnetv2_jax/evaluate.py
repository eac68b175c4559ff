"""``python -m ghostnetv2_jax evaluate``: top-1 / top-5 of a checkpoint on a dataset.

  # a training workdir (its latest checkpoint; --step best|latest|N; --ema for the EMA weights)
  python -m ghostnetv2_jax evaluate --checkpoint WORKDIR [--ema] [--step best]
  # converted weights (convert.save_variables) or a PyTorch file (authors' .pth.tar, timm .pth)
  python -m ghostnetv2_jax evaluate --checkpoint ghostnetv2_100.safetensors \
      --dataset imagenet2012 --data_dir gs://BUCKET/tensorflow_datasets
  python -m ghostnetv2_jax evaluate --checkpoint ck_ghostnetv2_10.pth.tar --model ghostnetv2_100

Preprocessing is the model's eval preprocessing: for a workdir the data settings it trained with,
otherwise the registered model's (224 px, crop 0.875, bicubic, ImageNet mean/std); the
--image_size/--crop_pct/--interpolation flags override either.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from absl import app, flags, logging

FLAGS = flags.FLAGS
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'training workdir, .safetensors (from convert) '
                                  'or PyTorch checkpoint (.pth, .pth.tar, .pt, .bin)')
_MODEL = flags.DEFINE_string('model', None, 'registered model name (needed for PyTorch files)')
_EMA = flags.DEFINE_bool('ema', False, 'evaluate the EMA weights (workdir or PyTorch training file)')
_STEP = flags.DEFINE_string('step', 'latest', "workdir checkpoint: 'latest', 'best' or a step number")
_DATASET = flags.DEFINE_string('dataset', None, "'digits', 'folder:/path' or a tfds name; default: the "
                               "workdir's dataset, else imagenet2012")
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'tfds data_dir (local or gs://)')
_SPLIT = flags.DEFINE_string('split', None, "split to evaluate; default: the workdir's eval split, else "
                             "'validation'")
_BATCH = flags.DEFINE_integer('batch_size', 250, 'global eval batch (a multiple of the device count)')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', None, 'override the eval input size')
_CROP_PCT = flags.DEFINE_float('crop_pct', None, 'override the eval crop fraction')
_INTERPOLATION = flags.DEFINE_enum('interpolation', None, ['bilinear', 'bicubic', 'nearest'],
                                   'override the eval resize method')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'compute dtype')
_JSON = flags.DEFINE_string('json', None, 'also write the results to this JSON file')


def _workdir_variables(workdir: str, step_flag: str, ema: bool) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(variables, saved config as a dict) from a training workdir's checkpoint."""
    import jax
    from ghostnetv2_jax.train import checkpoint as ckpt_lib
    from ghostnetv2_jax.train import optim
    from ghostnetv2_jax.train.state import create_state, init_variables
    from ghostnetv2_jax.train.trainer import build_model, restore_state
    import ml_collections

    checkpoints = ckpt_lib.Checkpoints(workdir, read_only=True)
    steps = sorted(checkpoints.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f'{workdir} holds no checkpoints (expected {checkpoints.directory}/<step>)')
    if step_flag == 'best':
        best = checkpoints.best_step()
        steps = [best] + [s for s in steps if s != best] if best is not None else steps
    elif step_flag != 'latest':
        if int(step_flag) not in steps:
            raise ValueError(f'{workdir} has no checkpoint at step {step_flag}; it has {sorted(steps)}')
        steps = [int(step_flag)]

    def restore(step: int, meta: Dict[str, Any]):
        config = ml_collections.ConfigDict(meta['config'])
        model = build_model(config, meta['num_classes'])
        # The optimizer only gives the state its structure here; the schedule is never called.
        abstract = lambda tx: jax.eval_shape(lambda r: create_state(init_variables(model, r, config.data.image_size),
                                                                    tx, r, config.ema_decay > 0), jax.random.PRNGKey(0))
        # (a checkpoint from before the flattened optimizer is read in its per-leaf form)
        return restore_state(checkpoints, step, abstract(optim.create_optimizer(config, lambda count: 0.0)),
                             lambda: abstract(optim.create_optimizer(config, lambda count: 0.0, flat=False)))

    # latest / best: a damaged step falls back to the newest that restores (left in place: read only)
    step, meta, state = ckpt_lib.restore_newest(checkpoints, restore, steps=steps, set_aside=False,
                                                log=lambda line: print(f'warning: {line}', file=sys.stderr))
    if ema and meta['config']['ema_decay'] <= 0:
        raise ValueError(f'{workdir} was trained without an EMA (ema_decay=0); drop --ema')
    checkpoints.close()
    logging.info('restored %s step %d', workdir, step)
    return jax.device_get(state.variables(ema)), meta['config']


def _file_variables(path: str, model_name: Optional[str], ema: bool) -> Tuple[Dict[str, Any], str, dict]:
    """(variables, model name, architecture overrides) from a converted or PyTorch file."""
    from ghostnetv2_jax import convert
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        try:
            with safe_open(path, framework='numpy') as f:
                ours = (f.metadata() or {}).get('format') == 'ghostnetv2_jax.variables/1'
        except Exception as e:   # safetensors raises its own error type for a bad header
            raise convert.ConversionError(f'cannot read {path} as safetensors: {e}') from None
        if ours:
            if ema:
                raise ValueError(f'{path} holds one set of weights; drop --ema')
            variables, meta = convert.load_variables(path)
            if model_name and model_name != meta['model']:
                raise ValueError(f"{path} holds {meta['model']} weights, not {model_name}")
            return variables, meta['model'], meta['overrides']
    if not model_name:
        raise ValueError(f'--model is required to read the PyTorch checkpoint {path}')
    sd = convert.load_state_dict(path, use_ema=ema)
    classes = sd['classifier.weight'].shape[0] if 'classifier.weight' in sd else 0
    return convert.torch_to_flax(sd, model_name, num_classes=classes), model_name, {'num_classes': classes}


def _data_config(base: Optional[Dict[str, Any]], model_name: str):
    """The pipeline's config: the workdir's data settings, or the model's eval preprocessing."""
    from ghostnetv2_jax.data.pipeline import default_config
    from ghostnetv2_jax.models.registry import get_spec
    data = default_config()
    if base is not None:
        data.update(base)
    else:
        pre = get_spec(model_name).pretrained
        data.update(dict(image_size=pre.input_size[0], crop_pct=pre.crop_pct, interpolation=pre.interpolation,
                         mean=tuple(pre.mean), std=tuple(pre.std)))
    for key, flag in (('dataset', _DATASET), ('data_dir', _DATA_DIR), ('eval_split', _SPLIT),
                      ('image_size', _IMAGE_SIZE), ('crop_pct', _CROP_PCT), ('interpolation', _INTERPOLATION)):
        if flag.value is not None:
            data[key] = flag.value
    return data


def _is_workdir(path: str) -> bool:
    return os.path.isdir(path) or ('://' in path and not path.endswith(_FILE_SUFFIXES))


_FILE_SUFFIXES = ('.safetensors', '.pth', '.pth.tar', '.pt', '.bin', '.tar')


def load_model(checkpoint: str, model_name: Optional[str] = None, ema: bool = False, step: str = 'latest',
               dtype: str = 'float32'):
    """(model name, model, variables, the workdir's saved config or None) for a workdir or a
    weights file. A weights file is read without TensorFlow (the training extras), so that
    inference on converted weights needs the core install only."""
    import jax.numpy as jnp
    import ml_collections
    from ghostnetv2_jax.models.registry import create_model
    from ghostnetv2_jax.train.state import local_copy

    if _is_workdir(checkpoint):
        from ghostnetv2_jax.train.trainer import build_model
        variables, saved = _workdir_variables(checkpoint, step, ema)
        config = ml_collections.ConfigDict(saved)
        config.dtype = dtype
        model = build_model(config, variables['params']['classifier']['bias'].shape[0])
        return config.model, model, variables, saved
    if '://' not in checkpoint and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f'no such checkpoint: {checkpoint}')
    variables, model_name, overrides = _file_variables(local_copy(checkpoint), model_name, ema)
    model = create_model(model_name, dtype=jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32,
                         **_tuple(overrides))
    return model_name, model, variables, None


def load(checkpoint: str, model_name: Optional[str] = None, ema: bool = False):
    """(model name, model, variables, data config) for a workdir or a weights file, as the
    --step, --dtype and data flags say."""
    model_name, model, variables, saved = load_model(checkpoint, model_name, ema, _STEP.value, _DTYPE.value)
    return model_name, model, variables, _data_config(None if saved is None else saved['data'], model_name)


def run(checkpoint: str, model_name: Optional[str] = None, ema: bool = False) -> Dict[str, Any]:
    """Evaluate; returns top1, top5 (%), loss, count and what was evaluated how."""
    import jax
    from ghostnetv2_jax import runtime, xla_options
    from ghostnetv2_jax.data.pipeline import create_split
    from ghostnetv2_jax.train import sharding
    from ghostnetv2_jax.train.trainer import evaluate, make_eval_step

    model_name, model, variables, data = load(checkpoint, model_name, ema)
    mesh = sharding.create_mesh()
    sharding.check_batch(_BATCH.value, '--batch_size')
    split = create_split(data, split=data.eval_split, train=False, global_batch=_BATCH.value, seed=0,
                         host_index=jax.process_index(), host_count=jax.process_count())
    if split.num_classes != model.num_classes:
        raise ValueError(f'the checkpoint has {model.num_classes} classes, {data.dataset} has '
                         f'{split.num_classes}')
    eval_step = xla_options.jit(make_eval_step(model, runtime.chunk_for(mesh)), train=False,
                                out_shardings=sharding.replicated(mesh))
    variables = jax.device_put(variables, sharding.replicated(mesh))
    results = evaluate(eval_step, variables, split.iterator, mesh)
    return {**results, 'model': model_name, 'checkpoint': checkpoint, 'ema': ema, 'dataset': data.dataset,
            'split': data.eval_split, 'image_size': data.image_size, 'crop_pct': data.crop_pct,
            'interpolation': data.interpolation}


def _tuple(v):
    """JSON lists -> tuples (architecture tables)."""
    if isinstance(v, list):
        return tuple(_tuple(x) for x in v)
    if isinstance(v, dict):
        return {k: _tuple(x) for k, x in v.items()}
    return v


def _precheck(checkpoint: str, model_name: Optional[str]) -> Optional[str]:
    """What is wrong with the arguments, found without reading anything heavy; None if nothing."""
    if '://' in checkpoint or os.path.isdir(checkpoint):
        return None
    if not os.path.isfile(checkpoint):
        return f'no such checkpoint: {checkpoint}'
    if not checkpoint.endswith('.safetensors') and not model_name:
        return f'--model is required to read the PyTorch checkpoint {checkpoint}'
    return None


def _main(argv: List[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    if not _CHECKPOINT.value:
        raise app.UsageError('--checkpoint is required')
    if not FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)
    problem = _precheck(_CHECKPOINT.value, _MODEL.value)
    if problem:   # before the slow imports
        print(f'error: {problem}', file=sys.stderr)
        return 1
    from ghostnetv2_jax.convert import ConversionError
    try:
        r = run(_CHECKPOINT.value, _MODEL.value, _EMA.value)
    except (ValueError, TypeError, FileNotFoundError, ConversionError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f"{r['checkpoint']}{' (EMA)' if r['ema'] else ''} on {r['dataset']}:{r['split']} ({r['count']} images, "
          f"{r['image_size']}px crop {r['crop_pct']} {r['interpolation']}): top-1 {r['top1']:.2f}% "
          f"top-5 {r['top5']:.2f}% loss {r['loss']:.4f}")
    if _JSON.value:
        from etils import epath
        epath.Path(_JSON.value).write_text(json.dumps(r, indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point used by ``python -m ghostnetv2_jax evaluate``; ``argv[0]`` is a program name."""
    app.run(_main, argv=list(sys.argv if argv is None else argv))
    return 0


if __name__ == '__main__':
    main()
