"""Deployment formats: a model and its variables as ONNX, LiteRT (TFLite) or StableHLO, each
traced from the layers' plain-XLA forms (``layers.platform.plain_xla``) with BatchNorm folded
(GhostNetV3 re-parameterised), and run back in its own runtime to check it::

    from ghostnetv2_jax import export, weights
    w = weights.load('WORKDIR', step='best', ema=True)
    export.save('model.onnx', w.model(), w.variables, image_size=(224, 224))   # suffix: the format
    err = export.check(export.runner('model.onnx'), w.model(), w.variables, images)

``check`` is the largest difference from ``model.apply`` relative to the largest logit.
docs/deploy.md gives each route, why it was chosen, and the measured errors and speed.
"""
from __future__ import annotations

import importlib
import os
import tempfile
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple

import numpy as np

from ghostnetv2_jax.export.stablehlo import PLATFORMS
from ghostnetv2_jax.export.tflite import QUANTIZE

FORMATS = {'.onnx': 'ONNX', '.tflite': 'LiteRT (TFLite)', '.stablehlo': 'StableHLO (jax.export)'}
TOLERANCE = 1e-4          # float32 exports: max |exported - model.apply| / max |model.apply|
_NEEDS = {'.onnx': ('onnx', 'deploy'), '.tflite': ('tensorflow', 'deploy')}
_RUNTIMES = {'.onnx': ('onnxruntime', 'ONNX Runtime'), '.tflite': ('ai_edge_litert', 'LiteRT'),
             '.stablehlo': ('jax', 'jax.export')}


def format_of(path: str) -> str:
    """The format ``path``'s suffix names; ValueError for any other suffix."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise ValueError(f'unknown export format {suffix or "(no suffix)"!r} of {path}: expected one of '
                         f'{", ".join(FORMATS)}')
    return suffix


def require(module: str, extra: str, what: str) -> Any:
    """Import an optional dependency, or one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModuleNotFoundError(f"{what} needs the {module} package: pip install 'ghostnetv2_jax[{extra}]'") from None


def inference_function(model, variables, fold: bool = True) -> Callable:
    """``images -> logits``: the model's inference, with BatchNorm folded into the convs (and a
    GhostNetV3 re-parameterised) unless ``fold`` is False."""
    if fold:
        from ghostnetv2_jax.runtime import fold_batchnorm
        model, variables = fold_batchnorm(model, variables)
    return lambda images: model.apply(variables, images)


def to_bytes(fmt: str, model, variables, image_size: Tuple[int, int], *, fold: bool = True, batch: int = 1,
             quantize: Optional[str] = None, representative: Optional[Iterable[np.ndarray]] = None,
             platforms: Sequence[str] = PLATFORMS) -> bytes:
    """The exported bytes of format ``fmt`` ('.onnx', '.tflite', '.stablehlo') for NHWC float32
    images of ``image_size``. ``batch`` and ``quantize`` are LiteRT's (ONNX and StableHLO take
    any batch); ``platforms`` StableHLO's."""
    from ghostnetv2_jax.layers.platform import plain_xla
    to_bytes_requirements(fmt)
    if quantize is not None and fmt != '.tflite':
        raise ValueError(f'quantization is for .tflite exports, not {fmt}')
    shape = tuple(image_size) + (3,)
    fn = inference_function(model, variables, fold)
    with plain_xla():
        if fmt == '.onnx':
            from ghostnetv2_jax.export.onnx import to_onnx
            return to_onnx(fn, shape, doc=f'{type(model).__name__} logits from NHWC float32 images').SerializeToString()
        if fmt == '.tflite':
            from ghostnetv2_jax.export.tflite import to_tflite
            return to_tflite(fn, shape, batch=batch, quantize=quantize, representative=representative)
        if fmt == '.stablehlo':
            from ghostnetv2_jax.export.stablehlo import to_stablehlo
            return to_stablehlo(fn, shape, platforms=platforms)
    raise ValueError(f'unknown export format {fmt!r}: expected one of {", ".join(FORMATS)}')


def to_bytes_requirements(fmt: str) -> None:
    """Raise (one line) where exporting to ``fmt`` needs a package that is not installed."""
    if fmt in _NEEDS:
        require(_NEEDS[fmt][0], _NEEDS[fmt][1], f'{FORMATS[fmt]} export')


def write_atomic(path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` through a temporary file beside it: an existing file is
    replaced only by a complete one."""
    path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save(path: str, model, variables, image_size: Tuple[int, int] = (224, 224), **kwargs) -> str:
    """Export to ``path`` in the format its suffix names (``to_bytes``'s keyword arguments)."""
    return write_atomic(path, to_bytes(format_of(path), model, variables, image_size, **kwargs))


def runtime_name(fmt: str) -> str:
    module, name = _RUNTIMES[fmt]
    version = getattr(importlib.import_module(module), '__version__', '')
    return f'{name} {version}'.strip()


def runner(source, fmt: Optional[str] = None, num_threads: Optional[int] = None) -> Callable[[np.ndarray], np.ndarray]:
    """``images -> outputs`` running an exported file (a path, or its bytes with ``fmt``) in
    its runtime: ONNX Runtime, the LiteRT interpreter, or ``jax.export.deserialize``."""
    fmt = fmt or format_of(source)
    if fmt == '.onnx':
        ort = require('onnxruntime', 'dev', 'running an ONNX export')
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        session = ort.InferenceSession(source, options, providers=['CPUExecutionProvider'])
        name = session.get_inputs()[0].name
        return lambda images: session.run(None, {name: np.asarray(images, np.float32)})[0]
    if fmt == '.tflite':
        require('ai_edge_litert', 'dev', 'running a LiteRT export')
        from ghostnetv2_jax.export.tflite import Runner
        return Runner(source, num_threads)
    if fmt == '.stablehlo':
        from ghostnetv2_jax.export.stablehlo import load
        if not isinstance(source, (bytes, bytearray)):
            with open(source, 'rb') as f:
                source = f.read()
        exported = load(source)
        return lambda images: np.asarray(exported.call(np.asarray(images, np.float32)))
    raise ValueError(f'unknown export format {fmt!r}')


def relative_error(outputs: np.ndarray, reference: np.ndarray) -> float:
    reference = np.asarray(reference, np.float64)
    return float(np.abs(np.asarray(outputs, np.float64) - reference).max() / np.abs(reference).max())


def check(run: Callable[[np.ndarray], np.ndarray], model, variables, images: np.ndarray) -> float:
    """max |run(images) - model.apply(variables, images)| / max |model.apply(...)|."""
    import jax
    reference = jax.jit(lambda x: model.apply(variables, x))(images)
    return relative_error(run(images), reference)


def verify(blob: bytes, fmt: str, model, variables, image_size: Tuple[int, int], *, batch: int = 1,
           required: bool = True, tolerance: float = TOLERANCE) -> str:
    """Run exported ``blob`` in its runtime on random images and compare with ``model.apply``:
    a line saying how far apart they are, or a ValueError beyond ``tolerance`` where
    ``required``. Without the runtime installed, a line saying it was not checked."""
    module, name = _RUNTIMES[fmt]
    try:
        importlib.import_module(module)
    except ImportError:
        return f'not checked: {name} is not installed ({module})'
    n = 2 * batch if fmt == '.tflite' else 3    # two batches; a batch unlike the traced one
    images = np.random.default_rng(0).standard_normal((n,) + tuple(image_size) + (3,)).astype(np.float32)
    err = check(runner(blob, fmt), model, variables, images)
    line = f'checked in {runtime_name(fmt)}: max relative error {err:.1e} on {n} random images'
    if required and not err <= tolerance:
        raise ValueError(f'the {FORMATS[fmt]} export differs from the model by {err:.1e} relative '
                         f'(allowed {tolerance:.0e}); nothing was written')
    return line


def accuracy_change(blob: bytes, fmt: str, model, variables, images: np.ndarray, labels: np.ndarray,
                    name: str = 'export') -> str:
    """Top-1 of the exported model and of ``model.apply`` on labelled ``images``, and how often
    their predictions agree: one line."""
    import jax
    run = runner(blob, fmt)
    usable = len(images) - len(images) % getattr(run, 'batch', 1)
    images, labels = images[:usable], labels[:usable]
    ours = np.asarray(run(images)).argmax(-1)
    ref = np.asarray(jax.jit(lambda x: model.apply(variables, x))(images)).argmax(-1)
    top1, top1_ref = 100 * np.mean(ours == labels), 100 * np.mean(ref == labels)
    return (f'{name}: top-1 {top1:.2f}% against {top1_ref:.2f}% unquantized ({top1 - top1_ref:+.2f} points), '
            f'the same prediction on {100 * np.mean(ours == ref):.1f}% of {usable} labelled images')


__all__ = ['FORMATS', 'PLATFORMS', 'QUANTIZE', 'TOLERANCE', 'accuracy_change', 'check', 'format_of',
           'inference_function', 'relative_error', 'require', 'runner', 'runtime_name', 'save', 'to_bytes',
           'to_bytes_requirements', 'verify', 'write_atomic']
