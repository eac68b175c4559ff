"""Published weights by name: timm's ``model.safetensors`` on the Hugging Face Hub, found through
``huggingface_hub``'s cache (``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and
``HF_ENDPOINT`` honoured, as every library on that cache honours them).

A published name is a registered model with a hub id (``models/registry.py``,
``PretrainedCfg.hf_hub_id``): ``'ghostnetv2_100'``, or with its tag, ``'ghostnetv2_100.in1k'``.
As a weights *source* (``weights.load``, ``config.init_from``, ``config.distill.teacher_checkpoint``,
the commands' ``--pretrained NAME``) it is written ``'pretrained:NAME'``: a prefix no file path or
workdir is mistaken for.

Only the download lives here; ``weights`` (the one owner of weights) converts the file. No torch
is needed: the file is read with ``safetensors.numpy``. ``huggingface_hub`` is imported only when
a file is fetched.
"""
from __future__ import annotations

from typing import List, Tuple

from ghostnetv2_jax.models.registry import MODELS

PREFIX = 'pretrained:'         # a weights source naming published weights: 'pretrained:ghostnetv2_100'
FILENAME = 'model.safetensors'  # timm's file in each hub repository


class MissingDependency(ImportError, RuntimeError):
    """An optional package is not installed (a RuntimeError too, so the commands print it as one line)."""


class NotCached(FileNotFoundError):
    """The published file is not in the cache and the Hub cannot be reached."""


def published() -> List[str]:
    """Every published weights tag, ``MODEL.TAG`` (``'ghostnetv2_100.in1k'``), sorted."""
    return sorted(spec.pretrained.hf_hub_id.split('/', 1)[-1] for spec in MODELS.values()
                  if spec.pretrained.hf_hub_id)


def _published_line() -> str:
    return f"published weights: {', '.join(published())} (the tag after the dot may be left out)"


def is_pretrained(source) -> bool:
    """``source`` names published weights (``'pretrained:NAME'``)."""
    return isinstance(source, str) and source.startswith(PREFIX)


def strip(name: str) -> str:
    """``'pretrained:NAME'`` or ``'NAME'`` -> ``'NAME'``."""
    return name[len(PREFIX):] if is_pretrained(name) else name


def resolve(name: str) -> Tuple[str, str]:
    """``(model_name, hf_hub_id)`` of a published name (``'ghostnetv2_100'``, ``'ghostnetv2_100.in1k'``
    or either with the ``'pretrained:'`` prefix). A ValueError names the published weights when the
    model is unknown, has no published weights, or has none under that tag."""
    name = strip(str(name)).strip()
    model_name, _, tag = name.partition('.')
    if model_name not in MODELS:
        raise ValueError(f'{name!r} is not a registered model; {_published_line()}')
    hub_id = MODELS[model_name].pretrained.hf_hub_id
    if not hub_id:
        raise ValueError(f'{model_name} has no published weights (timm releases none for it); {_published_line()}')
    if tag and hub_id.split('/', 1)[-1] != name:
        raise ValueError(f"{model_name}'s published weights are {hub_id.split('/', 1)[-1]}, not {name}; "
                         f'{_published_line()}')
    return model_name, hub_id


def source(name: str) -> str:
    """The canonical weights source of a published name: ``'pretrained:MODEL.TAG'``."""
    return PREFIX + resolve(name)[1].split('/', 1)[-1]


def _huggingface_hub():
    try:
        import huggingface_hub
    except ImportError:
        raise MissingDependency('published weights are downloaded with huggingface_hub, which is not '
                                'installed: pip install huggingface_hub') from None
    return huggingface_hub


def download(name: str) -> Tuple[str, str, str]:
    """``(model_name, hf_hub_id, local path)`` of a published name's ``model.safetensors``: from the
    Hugging Face cache, downloaded into it first where it is not there (``hf_hub_download``).

    Errors, each one line: an unknown or unpublished name (ValueError, naming the published ones);
    ``huggingface_hub`` missing (``MissingDependency``); the file neither cached nor reachable
    (``NotCached``: ``HF_HUB_OFFLINE`` set or no connection; says where the file goes, or how to
    read a downloaded copy directly); anything else the Hub answers (OSError).
    """
    model_name, hub_id = resolve(name)
    hf = _huggingface_hub()
    from huggingface_hub import constants
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError
    try:
        path = hf.hf_hub_download(hub_id, FILENAME)
    except LocalEntryNotFoundError as e:
        cause = e.__cause__ or e.__context__
        why = ('HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE
               else f'no connection: {_first_line(cause)}' if cause is not None else 'no connection')
        url = hf.hf_hub_url(hub_id, FILENAME)
        folder = 'models--' + hub_id.replace('/', '--')
        raise NotCached(
            f'published weights {model_name} ({hub_id} {FILENAME}) are not in the Hugging Face cache '
            f'{constants.HF_HUB_CACHE} and the Hub cannot be reached ({why}): fetch them into that cache where '
            f'the Hub is reachable (`hf download {hub_id} {FILENAME}` with this HF_HOME, or copy a cache\'s '
            f'{folder} folder there), or download {url} and read that file directly: --src/--checkpoint FILE '
            f"--model {model_name}, or weights.load(FILE, '{model_name}')") from None
    except (HfHubHTTPError, OSError) as e:
        raise OSError(f'cannot download {hub_id} {FILENAME}: {_first_line(e)}') from e
    return model_name, hub_id, path


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

