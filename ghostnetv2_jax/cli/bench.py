"""``ghostnetv2-jax bench [--models ghostnetv2_100] [--batches 1,32,128] [--modes infer,train] ...``:
this project's inference (``predict_fn``) and the trainer's step side by side with timm's, each
contender in its own worker process, timed in alternating rounds; ``--modes deploy`` times this
project's ONNX export against timm's in ONNX Runtime and OpenVINO; ``--modes pipeline`` times this
project's train and eval input pipelines against timm's loader with the same transforms, on a
generated JPEG folder and the same files as tfds records (img/s per core). The report goes to --out
as bench.json and bench.md. Method and current figures: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence

from ghostnetv2_jax.bench import (DEFAULT_MODES, DEFAULT_TRAIN_CONFIG, DTYPES, JAX_IMPLS, MALLOC_POLICIES, MODES,
                                  PIPELINE_SOURCES, RUNTIMES, TORCH_LAYOUTS, XLA_OPTIONS)
from ghostnetv2_jax.bench_pipeline import DEFAULT_IMAGES
from ghostnetv2_jax.cli.common import Parser, usage_error


def _csv(kind, choices: Optional[Sequence[str]] = None):
    def parse(text: str):
        items = [kind(t) for t in text.split(',') if t.strip()]
        bad = [t for t in items if choices is not None and t not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f'expected a comma-separated list of {", ".join(choices) if choices else kind.__name__}, got {text!r}')
        return items
    return parse


def _chunk(text: str) -> str:
    if text != 'auto' and not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 'auto' or a non-negative integer, got {text!r}")
    return text


def build_parser() -> Parser:
    p = Parser('bench', __doc__)
    p.add_argument('--models', type=_csv(str), default=['ghostnetv2_100'])
    p.add_argument('--batches', type=_csv(int), default=[1, 32, 128])
    p.add_argument('--size', type=int, default=224, help='square input size')
    p.add_argument('--modes', type=_csv(str, MODES), default=list(DEFAULT_MODES),
                   help="infer and train: this project's JAX against timm's eager PyTorch; deploy: this "
                        "project's ONNX export against timm's torch.onnx.export of the same weights in "
                        "each of --runtimes, float32; pipeline: this project's train and eval input "
                        "pipelines against timm's loader with the same transforms, img/s per core, "
                        "--batches images a batch, --repeats batches a round (default: infer,train)")
    p.add_argument('--dtypes', type=_csv(str, DTYPES), default=list(DTYPES))
    p.add_argument('--impls', type=_csv(str, JAX_IMPLS), default=['native', 'shift', 'xla'],
                   help="this project's depthwise implementations ('auto' = the backend's default)")
    p.add_argument('--apply', action=argparse.BooleanOptionalAction, default=True,
                   help='infer: also time plain jax.jit(model.apply) (no predict_fn)')
    p.add_argument('--deploy', action=argparse.BooleanOptionalAction, default=True,
                   help='also time the BN-folded inference model (ghostnetv2_jax.fold_batchnorm)')
    p.add_argument('--bound', action=argparse.BooleanOptionalAction, default=True,
                   help='infer: also time bound_predict_fn (the weights compiled into the program) of '
                        'the eval model and, with --deploy, of the BN-folded one')
    p.add_argument('--layouts', type=_csv(str, TORCH_LAYOUTS), default=list(TORCH_LAYOUTS))
    p.add_argument('--runtimes', type=_csv(str, RUNTIMES), default=list(RUNTIMES),
                   help='the deploy mode\'s runtimes, each with --threads threads')
    p.add_argument('--torch', action=argparse.BooleanOptionalAction, default=True,
                   help='time timm (without it no ratios are computed)')
    p.add_argument('--rounds', type=int, default=5, help='alternation rounds')
    p.add_argument('--repeats', type=int, default=3, help='timed iterations per contender per round')
    p.add_argument('--warmup', type=int, default=2, help='untimed iterations after compile')
    p.add_argument('--settle', type=float, default=3.0,
                   help='seconds of idle before each contender runs, so the previous one\'s spinning '
                        'worker threads are asleep')
    p.add_argument('--threads', type=int, default=None,
                   help='torch threads, and ONNX Runtime\'s and OpenVINO\'s (default: usable cores); '
                        'the pipeline mode\'s pipelines use every usable core')
    p.add_argument('--malloc', choices=list(MALLOC_POLICIES), default='default',
                   help="default: each worker as its users' processes run (JAX: this project's "
                        "fast_cpu_defaults, as its commands call it); retain: glibc tunables keeping "
                        "freed memory in every worker, timm's included (docs/benchmarks.md)")
    p.add_argument('--xla-options', type=_csv(str, XLA_OPTIONS), default=['project'],
                   help="JAX contenders compiled with this project's compiler options "
                        "(ghostnetv2_jax.xla_options) and/or with XLA's defaults")
    p.add_argument('--chunks', type=_csv(_chunk), default=['auto'],
                   help="JAX inference over chunks of the batch (ghostnetv2_jax.runtime): 'auto' "
                        "(8 images on CPU, the whole batch elsewhere), 0 (the whole batch) or N images")
    p.add_argument('--xla-flags', default='', help='appended to XLA_FLAGS in the JAX workers')
    p.add_argument('--train-config', default=DEFAULT_TRAIN_CONFIG,
                   help='training config (configs/*.py) whose optimizer, schedule, label smoothing, EMA and '
                        'dropout the train mode uses (default: the ImageNet recipe of GhostNetV2 1.0x)')
    p.add_argument('--pipeline-data', default=None, metavar='DIR',
                   help='the pipeline mode\'s images: an image folder (DIR/train/<class>/*.jpg, '
                        'DIR/validation/...) used as it is, or a directory to generate them in and reuse '
                        '(default: generated in a temporary directory, removed at the end)')
    p.add_argument('--pipeline-images', type=int, default=DEFAULT_IMAGES,
                   help='JPEGs generated per split (train, validation) for the pipeline mode')
    p.add_argument('--pipeline-profile', type=float, default=0.0, metavar='SECONDS',
                   help="the pipeline mode: also time the train chain stage by stage on one thread, "
                        "SECONDS per stage (bench_pipeline.stage_profile), in the harness's own process "
                        "after the rounds (0: not)")
    p.add_argument('--pipeline-sources', type=_csv(str, PIPELINE_SOURCES), default=list(PIPELINE_SOURCES),
                   help='what the pipelines read: the JPEG folder and/or the same files as tfds records')
    p.add_argument('--out', default='bench_out', help='directory for bench.json and bench.md')
    return p


def _validate(args) -> None:
    from ghostnetv2_jax.models.registry import get_spec
    for name in args.models:
        try:
            get_spec(name)
        except ValueError as error:   # an unknown name, with the list of known ones
            usage_error(str(error))
    for flag, value in (('--rounds', args.rounds), ('--repeats', args.repeats), ('--size', args.size)):
        if value < 1:
            usage_error(f'{flag} must be >= 1, got {value}')
    if args.warmup < 0:
        usage_error(f'--warmup must be >= 0, got {args.warmup}')
    if any(b < 1 for b in args.batches):
        usage_error(f'--batches must be positive, got {args.batches}')
    if args.settle < 0:
        usage_error(f'--settle must be >= 0, got {args.settle}')
    if args.threads is not None and args.threads < 1:
        usage_error(f'--threads must be >= 1, got {args.threads}')
    if args.pipeline_profile < 0:
        usage_error(f'--pipeline-profile must be >= 0 seconds, got {args.pipeline_profile}')
    if args.pipeline_images < 1:
        usage_error(f'--pipeline-images must be >= 1, got {args.pipeline_images}')
    if 'pipeline' in args.modes and args.pipeline_data and os.path.exists(args.pipeline_data) \
            and not os.path.isdir(args.pipeline_data):
        usage_error(f'--pipeline-data: not a directory: {args.pipeline_data}')
    if 'train' in args.modes and not os.path.isfile(args.train_config):
        usage_error(f'--train-config: no such file: {args.train_config} (the train mode reads the '
                         "repository's configs/)")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(argv if argv is not None else [])
    args = build_parser().parse_args(argv)
    _validate(args)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.pipeline_data = args.pipeline_data and os.path.expanduser(args.pipeline_data)
    from ghostnetv2_jax import bench
    bench.run(args, ' '.join(['ghostnetv2-jax bench'] + argv), log=lambda s: print(s, flush=True))
    return 0
