"""Knowledge distillation: the loss against the authors' train.py formula, the train step's loss
made of the CE and teacher terms, and a distilled training run on the tiny config whose loss falls."""
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from ghostnetv2_jax.convert import ConversionError
from ghostnetv2_jax.xla_options import run_once
from ghostnetv2_jax.weights import save_variables
from ghostnetv2_jax.train import steps
from ghostnetv2_jax.train.state import create_state
from test_trainer import (TINY, _Toy, assert_ok, compile_cache, load_tiny, read_jsonl,  # noqa: F401
                          train_command, train_env)


def _logits(seed, n=6, classes=5, scale=3.0):
    return np.random.default_rng(seed).normal(size=(n, classes)).astype(np.float32) * scale


def test_soft_ce_at_temperature_1_is_the_authors_kd_loss():
    student, teacher = _logits(0), _logits(1)
    # the authors' GhostNetV3 train.py: -bmm(softmax(z_t), log_softmax(z_s)), averaged
    s, t = torch.from_numpy(student), torch.from_numpy(teacher)
    want = -torch.bmm(F.softmax(t, dim=1).unsqueeze(1), F.log_softmax(s, dim=1).unsqueeze(2)).mean()
    got = steps.distillation_loss(jnp.asarray(student), jnp.asarray(teacher)).mean()
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_kl_is_soft_ce_less_the_teacher_entropy_and_temperature_scales_by_t_squared():
    student, teacher = jnp.asarray(_logits(2)), jnp.asarray(_logits(3))
    for t in (1.0, 4.0):
        p = jax.nn.softmax(teacher / t)
        entropy = -jnp.sum(p * jnp.log(p), -1)
        np.testing.assert_allclose(steps.distillation_loss(student, teacher, t, 'kl'),
                                   steps.distillation_loss(student, teacher, t) - entropy * t * t,
                                   rtol=1e-5, atol=1e-5)
        want = torch.nn.KLDivLoss(reduction='none')(F.log_softmax(torch.tensor(np.asarray(student)) / t, 1),
                                                    F.softmax(torch.tensor(np.asarray(teacher)) / t, 1))
        np.testing.assert_allclose(steps.distillation_loss(student, teacher, t, 'kl'),
                                   want.sum(1).numpy() * t * t, rtol=1e-5, atol=1e-5)
    assert float(steps.distillation_loss(student, student, 2.0, 'kl').max()) < 1e-5   # 0 at a match
    with pytest.raises(ValueError, match='distillation loss must be one of'):
        steps.distillation_loss(student, teacher, 1.0, 'mse')


def _toy_step(teacher, kd_weight):
    config = load_tiny()
    config.ema_decay, config.distill.kd_weight, config.distill.ce_weight = 0.0, kd_weight, 1.0
    model = _Toy()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))
    tx = optax.sgd(0.1)
    state = create_state(variables, tx, jax.random.PRNGKey(1), use_ema=False)
    return state, jax.jit(steps.make_train_step(model, tx, optax.constant_schedule(0.1), config, teacher))


def test_the_step_loss_is_ce_plus_the_weighted_teacher_term():
    rng = np.random.default_rng(0)
    batch = {'images': jnp.asarray(rng.normal(size=(8, 4, 4, 3)), jnp.float32),
             'labels': jnp.asarray(rng.integers(0, 3, size=8), jnp.int32)}
    teacher = _Toy()
    teacher_variables = teacher.init(jax.random.PRNGKey(7), jnp.zeros((1, 4, 4, 3)))
    state, step = _toy_step(teacher, kd_weight=0.5)
    _, metrics = step(state, batch, teacher_variables)
    assert float(metrics['loss']) == pytest.approx(float(metrics['loss_ce']) + 0.5 * float(metrics['loss_kd']), rel=1e-6)
    teacher_logits = teacher.apply(teacher_variables, batch['images'])
    student_logits = _Toy().apply(state.variables(False), batch['images'])
    assert float(metrics['loss_kd']) == pytest.approx(
        float(steps.distillation_loss(student_logits, teacher_logits).mean()), rel=1e-5)

    # with the teacher weighing 0 the update is the plain step's
    state0, step0 = _toy_step(teacher, kd_weight=0.0)
    plain_state, plain_step = _toy_step(None, kd_weight=0.0)
    a, _ = step0(state0, batch, teacher_variables)
    b, _ = plain_step(plain_state, batch)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def test_distilled_training_on_the_tiny_config_lowers_its_loss(tmp_path, compile_cache):
    from ghostnetv2_jax.models.registry import create_model
    from ghostnetv2_jax.train.state import init_variables
    from ghostnetv2_jax.train.trainer import architecture_overrides
    config = load_tiny()
    overrides = architecture_overrides(config)
    teacher = create_model(config.model, num_classes=10, **overrides)
    teacher_file = tmp_path / 'teacher.safetensors'
    # initialised as the trainer initialises a model (one program at LLVM -O0), not op by op
    variables = jax.device_get(run_once(lambda r: init_variables(teacher, r, 16), jax.random.PRNGKey(3)))
    # a confident teacher (peaked outputs), so following it is something the student must learn
    variables['params']['classifier']['kernel'] = variables['params']['classifier']['kernel'] * 30
    save_variables(str(teacher_file), variables, config.model, overrides)
    recipe = tmp_path / 'distilled.py'
    recipe.write_text(f'''import importlib.util
spec = importlib.util.spec_from_file_location('tiny', {TINY!r})
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)


def get_config():
    config = tiny.get_config()
    config.distill.teacher = config.model
    config.distill.teacher_checkpoint = {str(teacher_file)!r}
    config.distill.teacher_overrides = {{'cfgs': tiny.TINY_CFGS, 'attention_blocks': (0,)}}
    config.num_train_steps = 12
    config.learning_rate = 0.02
    return config
''')
    command = train_command(tmp_path, tmp_path / 'run')
    command[2] = f'--config={recipe}'
    result = subprocess.run(command, env=train_env(compile_cache), capture_output=True, text=True,
                            timeout=600, cwd=str(tmp_path))
    assert_ok(result)
    assert f'distilling from {config.model} ({teacher_file}): soft_ce at temperature 1.0' in result.stdout
    reports = [r for r in read_jsonl(tmp_path / 'run' / 'metrics.jsonl') if 'train/loss_kd' in r]
    first, last = reports[0], reports[-1]
    assert last['step'] == 12 and first['step'] == 1
    for r in reports:   # the reported loss is made of both terms
        assert r['train/loss'] == pytest.approx(r['train/loss_ce'] + r['train/loss_kd'], rel=1e-5)
    assert last['train/loss'] < first['train/loss'] and last['train/loss_kd'] < first['train/loss_kd']


def test_a_teacher_with_other_classes_is_one_clear_error(tmp_path):
    from ghostnetv2_jax.models.registry import create_model
    from ghostnetv2_jax.train.state import init_variables
    from ghostnetv2_jax.train.trainer import architecture_overrides, load_teacher
    config = load_tiny()
    overrides = architecture_overrides(config)
    path = tmp_path / 'teacher.safetensors'
    model = create_model(config.model, num_classes=7, **overrides)
    variables = jax.device_get(run_once(lambda r: init_variables(model, r, 16), jax.random.PRNGKey(0)))
    save_variables(str(path), variables, config.model, overrides)
    config.distill.teacher, config.distill.teacher_checkpoint = config.model, str(path)
    config.distill.teacher_overrides = overrides
    with pytest.raises(ConversionError, match=r'^distill.teacher_checkpoint .* does not fit ghostnetv2_100: classifier params/classifier/\w+ \(7,\) vs \(10,\)'):
        load_teacher(config, 10, 16, jax.sharding.make_single_device_sharding(jax.devices()[0]))


def test_the_v3_recipe_distils_and_asks_for_its_teacher_weights_in_one_line(tmp_path):
    import importlib.util
    import pathlib
    from ghostnetv2_jax.train.trainer import validate_config
    path = pathlib.Path(TINY).with_name('imagenet_ghostnetv3_100.py')
    spec = importlib.util.spec_from_file_location('v3_recipe', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert (config.model, config.num_epochs, config.optimizer, config.schedule) == ('ghostnetv3_100', 600, 'sgd', 'cosine')
    assert config.distill.teacher == 'ghostnetv2_160' and config.distill.loss == 'soft_ce'
    with pytest.raises(ValueError, match=r"^config.distill.teacher 'ghostnetv2_160' needs its weights: set "
                                         r"--config.distill.teacher_checkpoint"):
        validate_config(config)
    config.distill.teacher_checkpoint = str(tmp_path / 'ghostnetv2_160.safetensors')
    validate_config(config)
