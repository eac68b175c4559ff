"""Portability: the default model's inference and the trainer's train step, traced on this CPU
host, export for GPU and TPU with no CPU custom call (each layer's CPU form is chosen per
lowering platform), and for CPU with the native kernels in them."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

from ghostnetv2_jax import create_model, runtime
from ghostnetv2_jax.train import optim, trainer
from ghostnetv2_jax.train.state import create_state, init_variables

RECIPE = pathlib.Path(__file__).resolve().parent.parent / 'configs' / 'imagenet_ghostnetv2_100.py'


def _recipe():
    spec = importlib.util.spec_from_file_location('recipe', RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.batch_size = 4
    return config


def _train_step_and_args():
    config = _recipe()
    model = trainer.build_model(config, num_classes=1000)
    schedule = optim.create_learning_rate_schedule(config, steps_per_epoch=100, num_epochs=config.num_epochs)
    tx = optim.create_optimizer(config, schedule)
    state = jax.eval_shape(lambda: create_state(init_variables(model, jax.random.PRNGKey(0), 64), tx,
                                                jax.random.PRNGKey(1), config.ema_decay > 0))
    batch = {'images': jax.ShapeDtypeStruct((4, 64, 64, 3), jnp.float32),
             'labels': jax.ShapeDtypeStruct((4,), jnp.int32)}
    return jax.jit(trainer.make_train_step(model, tx, schedule, config)), (state, batch)


def _predict_and_args():
    model = create_model('ghostnetv2_100')
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    return jax.jit(runtime.predict_fn(model)), (variables, images)


@pytest.mark.parametrize('program', ['predict_fn', 'train_step'])
def test_default_model_exports_for_gpu_and_tpu_without_cpu_custom_calls(program):
    fn, args = _predict_and_args() if program == 'predict_fn' else _train_step_and_args()
    for platform in ('cuda', 'tpu'):
        text = jax.export.export(fn, platforms=[platform])(*args).mlir_module()
        assert 'gnv2_' not in text, platform
        assert 'stablehlo.convolution' in text, platform     # the depthwise convs are XLA's there
    # lowered for this CPU, the same program runs the native kernels
    assert 'gnv2_' in fn.lower(*args).as_text()


def test_with_the_native_kernels_disabled_a_cpu_program_serializes():
    """The README's portable CPU export: with GHOSTNETV2_NATIVE=0 the CPU forms are XLA ops, so
    the exported program serializes and runs from its bytes."""
    import json
    import os
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent('''
        import json, jax, jax.numpy as jnp, numpy as np
        from ghostnetv2_jax import create_model, runtime
        model = create_model('ghostnetv2_100', cfgs=(((3, 16, 16, 0, 1),), ((3, 48, 24, 0, 2),)), num_classes=10)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
        v = jax.jit(model.init, compiler_options={'xla_backend_optimization_level': 0})(jax.random.PRNGKey(0), x)
        exported = jax.export.export(jax.jit(runtime.predict_fn(model)), platforms=['cpu'])(v, x)
        restored = jax.export.deserialize(exported.serialize())
        err = float(jnp.abs(restored.call(v, x) - jax.jit(model.apply)(v, x)).max())
        print(json.dumps({'custom': 'gnv2_' in exported.mlir_module(), 'err': err}))
    ''')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'GHOSTNETV2_NATIVE': '0'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out['custom'] and out['err'] <= 1e-5, out
