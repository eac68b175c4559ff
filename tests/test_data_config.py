"""The data config, defined once (``ghostnetv2_jax.data.config.DataConfig``): every field of it
takes a ``--config.data.FIELD=VALUE`` override, and loading a recipe imports no TensorFlow."""
import dataclasses
import os
import subprocess
import sys

import ml_collections
import pytest

from ghostnetv2_jax.data.config import DataConfig, default_config
from ghostnetv2_jax.cli.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, 'configs', 'default.py')

# a value other than the default for every field, as the command line spells it
OVERRIDES = {
    'dataset': ('folder:/y', 'folder:/y'),
    'data_dir': ('/x', '/x'),
    'train_split': ('train[:90%]', 'train[:90%]'),
    'eval_split': ('test', 'test'),
    'image_size': ('17', 17),
    'crop_pct': ('0.9', 0.9),
    'interpolation': ('bilinear', 'bilinear'),
    'mean': ('(0.1,0.2,0.3)', (0.1, 0.2, 0.3)),
    'std': ('(0.4,0.5,0.6)', (0.4, 0.5, 0.6)),
    'train_interpolation': ('bicubic', 'bicubic'),
    'scale': ('(0.3,0.9)', (0.3, 0.9)),
    'ratio': ('(0.5,2.0)', (0.5, 2.0)),
    'hflip': ('0', 0.0),
    'color_jitter': ('(0.4,0.4,0.4,0.1)', (0.4, 0.4, 0.4, 0.1)),
    'randaugment': ('', ''),     # the shell's --config.data.randaugment=''
    'reprob': ('0.5', 0.5),
    'remode': ('const', 'const'),
    'shuffle_buffer': ('128', 128),
    'image_key': ('img', 'img'),
    'label_key': ('y', 'y'),
    'num_threads': ('3', 3),
    'bad_images': ('error', 'error'),
}


def test_every_data_config_field_can_be_overridden_through_load_config():
    assert set(OVERRIDES) == {f.name for f in dataclasses.fields(DataConfig)}
    defaults = DataConfig()
    for name, (_, value) in OVERRIDES.items():
        assert getattr(defaults, name) != value, name
    config = load_config(RECIPE, [f'--config.data.{k}={v}' for k, (v, _) in OVERRIDES.items()])
    assert DataConfig.from_config(config.data) == DataConfig(**{k: v for k, (_, v) in OVERRIDES.items()})


@pytest.mark.parametrize('flag, value', [('0.3', 0.3), ('(0.2,0.2,0.2)', (0.2, 0.2, 0.2))])
def test_color_jitter_takes_a_float_or_a_tuple(flag, value):
    config = load_config(RECIPE, [f'--config.data.color_jitter={flag}'])
    assert DataConfig.from_config(config.data).color_jitter == value


def test_a_field_defaulting_to_none_is_typed_by_its_annotation():
    config = default_config()
    reference = config.get_ref('data_dir')
    assert isinstance(reference, ml_collections.FieldReference)
    assert reference.get() is None and reference.get_type() is str
    assert DataConfig.from_config(config) == DataConfig()
    data = load_config(RECIPE, ['--config.data.data_dir=/x', '--config.data.data_dir=None']).data
    assert data.data_dir is None


def test_loading_a_recipe_imports_no_tensorflow():
    code = ('import sys; from ghostnetv2_jax.cli.config import load_config; '
            f'load_config({RECIPE!r}); print(sorted(m for m in sys.modules '
            "if m == 'tensorflow' or m.startswith('tensorflow.')))")
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')]))}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == '[]'
