"""``ghostnetv2-jax export --src SOURCE --dst FILE``: weights -> a deployable file; FILE's suffix
picks the format.

  ghostnetv2-jax export --src WORKDIR --step best --ema --dst model.onnx
  ghostnetv2-jax export --pretrained ghostnetv2_100 --dst ghostnetv2_100.tflite
  ghostnetv2-jax export --src WORKDIR --ema --dst model_int8.tflite --quantize int8
  ghostnetv2-jax export --src ghostnetv2_100.safetensors --dst ghostnetv2_100.stablehlo
  ghostnetv2-jax export --src WORKDIR --step best --ema --dst model.pth

SOURCE: a training workdir (--step, --ema), a Flax variables .safetensors (convert), a PyTorch
file (with --model), or --pretrained NAME. Formats:
  .onnx        ONNX (opset 18), dynamic batch, NHWC float32 input; runs in ONNX Runtime, OpenVINO
  .tflite      LiteRT (TFLite), batch --batch (default 1); --quantize dynamic|int8
  .stablehlo   jax.export serialized, dynamic batch, for --platforms (default cpu,cuda,tpu)
  .safetensors / .pth   the PyTorch state_dict timm's create_model loads (strict)
The deployable formats fold BatchNorm into the convs (GhostNetV3: its re-parameterised form) and
are checked before they are written: run in their runtime on random images against the model,
at most 1e-4 apart relative to the largest logit (quantized: reported, not required). With
--quantize, the accuracy change is measured on the first --num-images of --dataset's eval split
(default: a workdir's own dataset); int8 calibrates on as many of its training images. Input size: --image-size, else a workdir's eval size, else
the model's (224).
"""
from __future__ import annotations

import os
from typing import List, Optional

from ghostnetv2_jax.cli.common import Parser, add_weights_arguments, load_weights, size, usage_error

STATE_DICTS = ('.safetensors', '.pth', '.pt')


def build_parser() -> Parser:
    p = Parser('export', __doc__)
    add_weights_arguments(p, '--src')
    p.add_argument('--dst', required=True, help='.onnx, .tflite, .stablehlo, or .safetensors / .pth (PyTorch)')
    p.add_argument('--image_size', '--image-size', type=size, default=None, metavar='N|HxW',
                   help="input size (default: a workdir's eval size, else the model's)")
    p.add_argument('--batch', type=int, default=1, help='.tflite: the fixed batch (default 1)')
    p.add_argument('--quantize', choices=['dynamic', 'int8'], default=None,
                   help='.tflite: int8 weights (dynamic) or int8 weights and activations (int8)')
    p.add_argument('--dataset', default=None, help="--quantize: labelled images ('digits', 'folder:/path' "
                   "or a tfds name; default: a workdir's dataset)")
    p.add_argument('--data_dir', '--data-dir', default=None, help='tfds data_dir (local or gs://)')
    p.add_argument('--num_images', '--num-images', type=int, default=500,
                   help='--quantize: how many eval images measure the accuracy change (and training images calibrate int8)')
    p.add_argument('--platforms', default='cpu,cuda,tpu', help='.stablehlo: comma-separated platforms')
    p.add_argument('--no_fold', '--no-fold', action='store_true', help='keep BatchNorm as separate ops')
    p.add_argument('--no_check', '--no-check', action='store_true',
                   help='write without running the export in its runtime first')
    return p


def _state_dict(args) -> int:
    from ghostnetv2_jax import weights
    w = load_weights(args)
    print(f'wrote {weights.save_state_dict(args.dst, w)}')
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    suffix = os.path.splitext(args.dst)[1].lower()
    if suffix in STATE_DICTS:
        return _state_dict(args)
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    from ghostnetv2_jax import export
    try:
        fmt = export.format_of(args.dst)
    except ValueError as e:
        usage_error(f'{e} (or {", ".join(STATE_DICTS)} for a PyTorch state_dict)')
    if args.quantize and fmt != '.tflite':
        usage_error('--quantize is for .tflite exports')
    if args.batch < 1:
        usage_error('--batch must be at least 1')
    if args.num_images < args.batch:
        usage_error('--num-images must be at least --batch')
    platforms = tuple(p for p in args.platforms.split(',') if p)
    if fmt == '.stablehlo' and (not platforms or set(platforms) - {'cpu', 'cuda', 'rocm', 'tpu'}):
        usage_error(f'--platforms: a comma-separated list of cpu, cuda, rocm, tpu; got {args.platforms!r}')
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.dst))):
        raise FileNotFoundError(f'the directory of --dst does not exist: {os.path.dirname(os.path.abspath(args.dst))}')
    export.to_bytes_requirements(fmt)

    w = load_weights(args)
    from ghostnetv2_jax import evaluate
    data = evaluate.data_config(w, dataset=args.dataset, data_dir=args.data_dir)
    image_size = args.image_size or (data.image_size, data.image_size)
    model = w.model()

    labelled = None
    if args.quantize:
        if args.dataset is None and w.config is None:
            if args.quantize == 'int8':
                usage_error('--quantize int8 calibrates on images: give --dataset (a workdir has its own)')
            print('accuracy change not measured: give --dataset to measure it on labelled images')
        else:
            data.image_size = image_size[0]
            labelled = evaluate.first_images(data, args.num_images)
    calibration = None
    if args.quantize == 'int8':   # images the accuracy is not measured on
        calibration = [evaluate.first_images(data, args.num_images, split=data.train_split)[0]]

    blob = export.to_bytes(fmt, model, w.variables, image_size, fold=not args.no_fold, batch=args.batch,
                           quantize=args.quantize, representative=calibration, platforms=platforms)
    what = f'{export.FORMATS[fmt]}, {image_size[0]}x{image_size[1]}'
    if not args.no_check:
        check = export.verify(blob, fmt, model, w.variables, image_size, batch=args.batch,
                              required=args.quantize is None)
        print(check)
    if labelled is not None:
        print(export.accuracy_change(blob, fmt, model, w.variables, *labelled, name=args.quantize))
    path = export.write_atomic(args.dst, blob)
    print(f'wrote {path} ({what}, {len(blob) / 2**20:.1f} MiB)')
    return 0
