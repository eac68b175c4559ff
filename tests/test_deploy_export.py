"""Deployment exports: a trained run's weights and every model family as ONNX (ONNX Runtime),
LiteRT (the LiteRT interpreter) and StableHLO (reloaded in a fresh process), each within 1e-4 of
``model.apply``; the graphs hold native depthwise ops and no custom ones; bad input is one line
and overwrites nothing."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import randomized_variables, rel_err
from ghostnetv2_jax import create_model, export, weights
from test_trainer import REPO, TINY_RUN_STEPS, compile_cache, tiny_run, train_env  # noqa: F401

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
pytest.importorskip('ai_edge_litert')
pytest.importorskip('tensorflow')

TOLERANCE = 1e-4


def cli(*args, cache: str, timeout: int = 300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'ghostnetv2_jax', *args], env={**train_env(cache), **(env or {})},
                          capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess, code=1) -> str:
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope='module')
def trained(tiny_run):
    """The tiny recipe (GhostNetV2 with DFC, SE, 16 px digits) trained six steps, with an EMA
    (checkpoints at 2, 4 and 6): the session's shared run (read only)."""
    return tiny_run


def _variables(model, images):
    """Random kernels, BatchNorm statistics and affines. GhostNetV3 sums up to five parallel
    conv+BN branches per conv (``*_rpr_*``): at unit BN scale on each, activations grow about
    fivefold per layer and the logits reach 1e12, where float32 comparisons say nothing; a quarter
    of the scale on each branch keeps them at a trained network's size."""
    variables = randomized_variables(model, images[:1])
    quarter = lambda path, leaf: leaf / 4 if '_rpr_' in jax.tree_util.keystr(path) and \
        getattr(path[-1], 'key', '') in ('scale', 'bias') else leaf
    return jax.tree_util.tree_map_with_path(quarter, variables)


def _op_types(model_proto):
    return [n.op_type for n in model_proto.graph.node]


def test_a_trained_run_exports_to_onnx_tflite_and_stablehlo_within_1e4(trained, tmp_path, compile_cache):
    w = weights.load(str(trained), step='best', ema=True)
    model = w.model()
    images = np.random.default_rng(1).standard_normal((5, 16, 16, 3)).astype(np.float32)
    reference = np.asarray(jax.jit(model.apply)(w.variables, images))

    # The command runs the same steps for every format (the run's weights at the image size of its
    # data config, export.to_bytes, export.verify in the format's runtime, the file written): once,
    # for StableHLO; ONNX and LiteRT through the same two calls in this process.
    dst = tmp_path / 'model.stablehlo'
    out = ok(cli('export', '--src', str(trained), '--step', 'best', '--ema', '--dst', str(dst), cache=compile_cache))
    assert 'checked in ' in out and f'wrote {dst}' in out and '16x16' in out, out
    for suffix in ('.onnx', '.tflite'):
        blob = export.to_bytes(suffix, model, w.variables, (16, 16))
        assert export.verify(blob, suffix, model, w.variables, (16, 16)).startswith('checked in ')
        (tmp_path / f'model{suffix}').write_bytes(blob)

    # ONNX Runtime, a batch unlike the traced one (dynamic batch)
    session = ort.InferenceSession(str(tmp_path / 'model.onnx'), providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape[0] == 'batch'
    assert rel_err(session.run(None, {'images': images})[0], reference) <= TOLERANCE

    # LiteRT: batch 1, image by image
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(tmp_path / 'model.tflite'))
    interpreter.allocate_tensors()
    inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    logits = []
    for image in images:
        interpreter.set_tensor(inp['index'], image[None])
        interpreter.invoke()
        logits.append(interpreter.get_tensor(outp['index'])[0].copy())
    assert rel_err(np.stack(logits), reference) <= TOLERANCE

    # StableHLO: deserialized in a fresh process that never built the model
    np.save(tmp_path / 'images.npy', images)
    code = textwrap.dedent(f'''
        import json, re, jax, numpy as np
        exported = jax.export.deserialize(bytearray(open({str(tmp_path / 'model.stablehlo')!r}, 'rb').read()))
        np.save({str(tmp_path / 'out.npy')!r}, np.asarray(exported.call(np.load({str(tmp_path / 'images.npy')!r}))))
        print(json.dumps([exported.platforms, sorted(set(re.findall(r'custom_call @(\\w+)', exported.mlir_module())))]))
    ''')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    platforms, custom_calls = json.loads(proc.stdout.strip().splitlines()[-1])
    assert platforms == ['cpu', 'cuda', 'tpu'] and set(custom_calls) <= {'shape_assertion'}, proc.stdout   # JAX's own
    assert rel_err(np.load(tmp_path / 'out.npy'), reference) <= TOLERANCE


# Each family once, and the released V2 at the odd size too (DFC's pooling and up-sampling of odd
# maps: V3's deploy form is a BN-folded V2 network, so its 97 px case shares those paths).
@pytest.mark.parametrize('name,size', [('ghostnet_100', 224), ('ghostnetv2_100', 224), ('ghostnetv2_100', 97),
                                       ('ghostnetv3_100', 97)])
def test_each_family_exports_to_onnx_and_tflite_with_native_depthwise_ops(name, size):
    """V1, V2 (DFC: 2x2 pooling and PyTorch-floor nearest up-sampling, odd maps included) and
    V3 (its re-parameterised deploy form), with random BatchNorm statistics and affines."""
    model = create_model(name)
    images = np.random.default_rng(0).standard_normal((3, size, size, 3)).astype(np.float32)
    variables = _variables(model, images)
    reference = np.asarray(jax.jit(model.apply)(variables, images))
    assert 0.1 < np.abs(reference).max() < 100

    proto = onnx.load_from_string(export.to_bytes('.onnx', model, variables, (size, size)))
    onnx.checker.check_model(proto, full_check=True)
    ops = _op_types(proto)
    assert set(ops) <= {'Conv', 'Relu', 'Clip', 'Sigmoid', 'Add', 'Mul', 'Div', 'Concat', 'Slice', 'Reshape',
                        'Transpose', 'ReduceSum', 'AveragePool', 'Resize', 'MatMul', 'Identity'}, set(ops)
    assert all(n.domain in ('', 'ai.onnx') for n in proto.graph.node)       # no custom ops
    assert 'BatchNormalization' not in ops
    grouped = [n for n in proto.graph.node if n.op_type == 'Conv'
               and any(a.name == 'group' and a.i > 1 for a in n.attribute)]
    assert grouped                                                          # depthwise = grouped Conv
    session = ort.InferenceSession(proto.SerializeToString(), providers=['CPUExecutionProvider'])
    assert rel_err(session.run(None, {'images': images})[0], reference) <= TOLERANCE

    blob = export.to_bytes('.tflite', model, variables, (size, size))
    from ghostnetv2_jax.export.tflite import op_counts
    counts = op_counts(blob)
    assert counts.get('DEPTHWISE_CONV_2D') == len(grouped), counts
    assert 'CUSTOM' not in counts and not any(op.startswith('FLEX') for op in counts), counts
    assert rel_err(export.runner(blob, '.tflite')(images), reference) <= TOLERANCE


def test_tflite_quantization_reports_the_accuracy_change_on_labelled_images(trained, tmp_path, compile_cache):
    from ghostnetv2_jax.export.tflite import op_counts
    dst = tmp_path / 'model_int8.tflite'
    out = ok(cli('export', '--src', str(trained), '--ema', '--dst', str(dst), '--quantize', 'int8',
                 '--num-images', '64', cache=compile_cache))
    line = next(line for line in out.splitlines() if line.startswith('int8: top-1 '))
    assert 'unquantized' in line and 'of 64 labelled images' in line, out
    counts = op_counts(dst.read_bytes())
    assert 'DEPTHWISE_CONV_2D' in counts and 'QUANTIZE' in counts and 'DEQUANTIZE' in counts, counts
    # dynamic range: int8 weights, float activations (no QUANTIZE of the input), through the library
    w = weights.load(str(trained), ema=True)
    images = np.random.default_rng(2).standard_normal((64, 16, 16, 3)).astype(np.float32)
    blob = export.to_bytes('.tflite', w.model(), w.variables, (16, 16), quantize='dynamic')
    assert len(blob) < 0.5 * len(export.to_bytes('.tflite', w.model(), w.variables, (16, 16)))
    line = export.accuracy_change(blob, '.tflite', w.model(), w.variables, images, np.zeros(64, int), name='dynamic')
    assert line.startswith('dynamic: top-1 ') and 'of 64 labelled images' in line


def test_bad_input_is_one_line_and_overwrites_nothing(trained, tmp_path, compile_cache):
    dst = tmp_path / 'model.onnx'
    dst.write_bytes(b'an earlier export')

    empty = tmp_path / 'empty_run'
    empty.mkdir()
    (empty / 'config.json').write_text(json.dumps({}))
    assert 'checkpoint' in one_line_error(cli('export', '--src', str(empty), '--dst', str(dst), cache=compile_cache))

    # a damaged step: every checkpoint's files emptied
    damaged = tmp_path / 'damaged'
    subprocess.run(['cp', '-r', str(trained), str(damaged)], check=True)
    for root, _, files in os.walk(damaged / 'checkpoints'):
        for f in files:
            open(os.path.join(root, f), 'wb').close()
    one_line_error(cli('export', '--src', str(damaged), '--step', str(TINY_RUN_STEPS), '--dst', str(dst),
                       cache=compile_cache))

    # a file of another model
    other = tmp_path / 'other.safetensors'
    w = weights.load(str(trained), ema=True)
    weights.save_variables(str(other), w.variables, w.model_name, w.overrides)
    message = one_line_error(cli('export', '--src', str(other), '--model', 'ghostnet_100', '--dst', str(dst),
                                 cache=compile_cache))
    assert 'ghostnet_100' in message

    # an unknown suffix: a usage error before anything is loaded
    message = one_line_error(cli('export', '--src', str(trained), '--dst', str(tmp_path / 'model.onnyx'),
                                 cache=compile_cache), code=2)
    assert '.onnyx' in message and '.onnx' in message
    assert not (tmp_path / 'model.onnyx').exists()

    # a missing optional dependency (onnx made unimportable)
    blocker = tmp_path / 'blocker'
    blocker.mkdir()
    (blocker / 'onnx.py').write_text("raise ImportError('No module named onnx')\n")
    env = {'PYTHONPATH': f'{blocker}{os.pathsep}{REPO}'}
    message = one_line_error(cli('export', '--src', str(trained), '--dst', str(dst), cache=compile_cache, env=env))
    assert "pip install 'ghostnetv2_jax[deploy]'" in message

    assert dst.read_bytes() == b'an earlier export'
