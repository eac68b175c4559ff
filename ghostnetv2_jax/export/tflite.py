"""A traced JAX inference function -> a LiteRT (TFLite) flatbuffer.

Route: ``jax2tf.convert`` (native serialization: the function's StableHLO inside one
``XlaCallModule``) into a ``tf.function`` at a fixed input shape, and TensorFlow's TFLite
converter, which legalizes the StableHLO ops to TFLite builtins (a depthwise convolution becomes
``DEPTHWISE_CONV_2D``). The batch is fixed (default 1, the mobile case): the converter cannot
legalize the dynamic slices a symbolic batch gives. Quantization is the converter's own:
``dynamic`` (int8 weights, float activations) or ``int8`` (int8 weights and activations,
calibrated on ``representative`` batches; float input and output).
"""
from __future__ import annotations

import collections
import os
import warnings
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np

QUANTIZE = ('dynamic', 'int8')


def to_tflite(fn: Callable, image_shape: Tuple[int, int, int], *, batch: int = 1,
              quantize: Optional[str] = None, representative: Optional[Iterable[np.ndarray]] = None) -> bytes:
    """``fn`` (NHWC float32 images -> one array) as a TFLite flatbuffer whose input is
    ``[batch, H, W, C]``."""
    if quantize not in (None,) + QUANTIZE:
        raise ValueError(f'quantize must be one of {QUANTIZE} or None, got {quantize!r}')
    if quantize == 'int8' and representative is None:
        raise ValueError('int8 quantization needs representative images to calibrate on')
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import tensorflow as tf
    from jax.experimental import jax2tf
    tf_fn = tf.function(jax2tf.convert(fn, with_gradient=False), autograph=False,
                        input_signature=[tf.TensorSpec((batch,) + tuple(image_shape), tf.float32)])
    concrete = tf_fn.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], tf_fn)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == 'int8':
        images = [np.asarray(b, np.float32) for b in representative]

        def calibration():
            for b in images:
                for i in range(0, len(b) - batch + 1, batch):
                    yield [b[i:i + batch]]
        converter.representative_dataset = calibration
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings():   # int8: "Statistics for quantized inputs were expected": float I/O is
        warnings.simplefilter('ignore', UserWarning)   # this exporter's choice
        return converter.convert()


def op_counts(flatbuffer: bytes) -> Dict[str, int]:
    """{TFLite builtin op name: count} over the model's subgraphs, read from the flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith('_')}
    codes = []
    for i in range(model.OperatorCodesLength()):
        c = model.OperatorCodes(i)
        codes.append(names.get(max(c.BuiltinCode(), c.DeprecatedBuiltinCode()), 'CUSTOM'))
    counts: Dict[str, int] = collections.Counter()
    for s in range(model.SubgraphsLength()):
        sub = model.Subgraphs(s)
        for o in range(sub.OperatorsLength()):
            counts[codes[sub.Operators(o).OpcodeIndex()]] += 1
    return dict(counts)


class Runner:
    """The flatbuffer in the LiteRT interpreter: ``runner(images) -> outputs`` for batches of
    the exported batch size (a larger batch runs in slices of it)."""

    def __init__(self, path_or_bytes, num_threads: Optional[int] = None):
        from ai_edge_litert.interpreter import Interpreter
        kw = {'model_content': path_or_bytes} if isinstance(path_or_bytes, bytes) else {'model_path': path_or_bytes}
        self.interpreter = Interpreter(num_threads=num_threads, **kw)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = int(self.input['shape'][0])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        outs = []
        for i in range(0, len(images), self.batch):
            part = images[i:i + self.batch]
            if len(part) < self.batch:
                raise ValueError(f'the model takes batches of {self.batch}; got {len(images)} images')
            self.interpreter.set_tensor(self.input['index'], part)
            self.interpreter.invoke()
            outs.append(np.array(self.interpreter.get_tensor(self.output['index'])))
        return np.concatenate(outs)
