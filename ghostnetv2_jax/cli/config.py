"""A training config from a recipe file and ``--config.FIELD=VALUE`` command-line overrides.

A recipe (``configs/*.py``) defines ``get_config()`` returning an ml_collections ``ConfigDict``;
overrides are parsed by ml_collections' ``config_flags`` (typed by the field they set, the config
locked, so an unknown field is an error naming it), on a flag registry of their own: no process
flags are read. ``load_config`` is what the ``train`` command and the sweep runner call; the
library takes the resulting ConfigDict.
"""
from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import os
import pathlib
from typing import List, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

PREFIX = '--config.'


class ConfigError(ValueError):
    """A recipe that does not load, or an override that does not fit it."""


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of ``path`` with ``overrides`` (``--config.a.b=value`` strings) applied."""
    overrides = list(overrides)
    for item in overrides:
        if not item.startswith(PREFIX) or len(item.split('=')[0]) == len(PREFIX):
            raise ConfigError(f'expected --config.FIELD=VALUE, got {item!r}')
    config = load_recipe(path)
    for item in overrides:
        _check_field(config, item.split('=')[0])
    # 'None' (a field's documented default) is set here: config_flags would parse it by the
    # field's type ((None,) for a tuple, an error for a float).
    unset = [item.split('=')[0] for item in overrides if item.split('=', 1)[1:] == ['None']]
    _apply(config, [item for item in overrides if item.split('=')[0] not in unset])
    for flag in unset:
        *parents, name = flag[len(PREFIX):].split('.')
        node = config
        for p in parents:
            node = node[p]
        node[name] = None
    return config


def load_recipe(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a recipe file, locked (a field it lacks cannot be set)."""
    if not os.path.isfile(path):
        raise ConfigError(f'config file {path}: No such file or directory')
    name = f'ghostnetv2_recipe_{pathlib.Path(path).stem}'
    spec = importlib.util.spec_from_loader(name, importlib.machinery.SourceFileLoader(name, path))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config()
    except Exception as error:   # noqa: BLE001  a recipe that does not load, whatever it raises
        raise ConfigError(f'config file {path} does not load: {type(error).__name__}: '
                          + ' '.join(str(error).split())) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f'config file {path}: get_config() returned {type(config).__name__}, not a ConfigDict')
    config.lock()
    return config


def _apply(config: ml_collections.ConfigDict, overrides: List[str]) -> None:
    """``--config.a.b=value`` overrides parsed by config_flags, typed by the fields they set."""
    if not overrides:
        return
    argv = ['train', *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_dict('config', config, flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except (flags.Error, ValueError, TypeError, AttributeError, KeyError) as error:
        raise ConfigError(' '.join(str(error).split())) from None


def _check_field(config: ml_collections.ConfigDict, flag: str) -> None:
    """``ConfigError`` naming ``flag`` (``--config.a.b``) when the config has no such field."""
    node = config
    for name in flag[len(PREFIX):].split('.'):
        fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            raise ConfigError(f'unknown config field {flag}' + (f' (did you mean {close[0]}?)' if close else ''))
        node = node[name]
