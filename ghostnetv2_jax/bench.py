"""Side-by-side speed of this project and timm, measured in one run.

``python -m ghostnetv2_jax bench [--models ghostnetv2_100] [--batches 1,32,128]
[--modes infer,train,deploy,pipeline] [--dtypes float32,bfloat16] [--impls native,shift,xla]
[--layouts nchw,channels_last] [--runtimes onnxruntime,openvino] [--pipeline-data DIR] [--out DIR] ...``

Every contender (this project with one depthwise implementation and dtype, timm in one memory
layout, or an ONNX file in a deployment runtime) runs in its own worker process; the contenders
of one group are timed in alternating rounds. Inference times
``jax.jit(runtime.predict_fn(model))`` of the eval model and (``--deploy``, default) of the
BN-folded one against timm's ``model.eval()`` under ``torch.inference_mode``; training times the
trainer's own step against timm's equivalent, both set up from ``--train-config``. ``--modes
deploy`` (not in the default modes) times this project's ONNX export (``export.to_bytes``) against
timm's ``torch.onnx.export`` of the same weights in ONNX Runtime and OpenVINO (``--runtimes``),
float32, and in the same rounds (``--bound``) this project's own deploy form,
``bound_predict_fn`` of the BN-folded model, reported over the fastest runtime. ``--modes
pipeline`` (not in the default modes either) times input pipelines, no model: this project's
``data.create_split`` with the recipe's train and eval transforms against timm's
``create_loader`` with the same ones, over a JPEG folder derived from one photograph
(bench_pipeline.py: generated in ``--pipeline-data`` or a temporary directory, or a user's folder)
and over the same files as tfds records; every pipeline uses all usable cores and is stopped
between its turns, and the report gives img/s per core and cores per 1,000 img/s (``run_group``
says what a round times). ``--apply`` (default) also times plain ``jax.jit(model.apply)``, and
``--bound`` (default) ``jax.jit(runtime.bound_predict_fn(model, variables))`` of the eval and
the folded model, the weights compiled into the program. Every worker runs in
the environment its users' processes have (``--malloc default``): the JAX workers call
``process.fast_cpu_defaults()`` first, as this project's commands do, and timm's change nothing;
``--malloc retain`` adds glibc tunables that keep freed memory mapped (RETAIN_TUNABLES) to every
worker, timm's included, a tuned variant to report beside the default. The report goes to
``--out`` as ``bench.json`` and ``bench.md``: img/s (batch / median iteration time) and the ratio
over the best timm layout (over timm's ONNX in the same runtime for the deploy mode). The method
in full, and the results: docs/benchmarks.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from ghostnetv2_jax import process

MODES = ('infer', 'train', 'deploy', 'pipeline')
DEFAULT_MODES = ('infer', 'train')
DTYPES = ('float32', 'bfloat16')
JAX_IMPLS = ('auto', 'native', 'shift', 'xla')
# JAX inference variants of the whole model (the backend's default depthwise impl): the BN-folded
# model, plain model.apply, and bound_predict_fn of the eval and of the folded model.
WHOLE_MODEL_VARIANTS = ('deploy', 'apply', 'bound', 'bound-deploy')
XLA_OPTIONS = ('project', 'default')
TORCH_LAYOUTS = ('nchw', 'channels_last')
# The deploy mode: each runtime runs this project's ONNX export ('ours') and timm's ('timm').
RUNTIMES = ('onnxruntime', 'openvino')
DEPLOY_VARIANTS = ('ours', 'timm')
DEPLOY_TOLERANCE = 1e-4   # ours vs timm's ONNX logits, relative to the largest: the same network
# The train mode times the recipe's step (configs/, in the repository); --train-config another.
DEFAULT_TRAIN_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    'configs', 'imagenet_ghostnetv2_100.py')
IMAGENET_TRAIN_EXAMPLES = 1281167   # the schedule's steps per epoch at the benchmark's batch
# The pipeline mode: this project's data pipeline ('ours') against timm's loader ('timm'), the
# recipe's train transforms and the eval ones, over the JPEG folder and the same files as tfds
# records (bench_pipeline.py). Every pipeline uses all usable cores.
PIPELINE_VARIANTS = ('train', 'eval')
PIPELINE_SOURCES = ('folder', 'tfds')
PIPELINE_SKIP = 2          # untimed batches at the start of each round, after the worker resumes


# ----------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class Contender:
    framework: str            # 'jax' | 'torch' | a deployment runtime ('onnxruntime', 'openvino') |
                              # a pipeline's ('ours', 'timm')
    variant: str              # depthwise impl (jax), 'deploy' (jax, folded BN), 'bound' / 'bound-deploy'
                              # (jax, bound_predict_fn of either), memory layout (torch),
                              # whose ONNX file a runtime runs ('ours' | 'timm'), or a pipeline's
                              # transforms ('train' | 'eval')
    dtype: str
    xla_options: str = 'project'  # jax: this project's compiler options ('project') or XLA's ('default')
    chunk: str = 'auto'           # jax inference: batch chunking (ghostnetv2_jax.runtime), 'auto' or N
    source: str = ''              # pipeline mode: what the pipeline reads ('folder' | 'tfds')

    @property
    def label(self) -> str:
        if self.source:           # the pipeline mode: framework 'ours' | 'timm', variant 'train' | 'eval'
            return f'{self.framework}:{self.variant}:{self.source}'
        suffix = '' if self.xla_options == 'project' else f'+xla-{self.xla_options}'
        suffix += '' if self.chunk == 'auto' else f'+chunk{self.chunk}'
        return f'{self.framework}:{self.variant}{suffix}:{self.dtype}'


@dataclasses.dataclass(frozen=True)
class Group:
    model: str
    batch: int
    mode: str
    contenders: tuple


def pipeline_contenders(args) -> tuple:
    """The pipeline mode's contenders, source by source, ours then timm's for train and eval."""
    frameworks = ('ours', 'timm') if args.torch else ('ours',)
    return tuple(Contender(f, v, 'float32', source=source) for source in args.pipeline_sources
                 for v in PIPELINE_VARIANTS for f in frameworks)


def plan(args) -> List[Group]:
    """The groups to run: per model, batch and mode; the pipeline mode once per batch (no model)."""
    groups = []
    for model in args.models:
        for batch in args.batches:
            for mode in args.modes:
                if mode == 'pipeline':
                    continue
                if mode == 'deploy':     # float32 ONNX files, whatever --dtypes says
                    variants = DEPLOY_VARIANTS if args.torch else ('ours',)
                    cs = [Contender(rt, v, 'float32') for rt in args.runtimes for v in variants]
                    if args.bound:   # this project's own deploy form, in the same rounds
                        cs.insert(0, Contender('jax', 'bound-deploy', 'float32'))
                    groups.append(Group(model, batch, mode, tuple(cs)))
                    continue
                cs = []
                for dtype in args.dtypes:
                    chunks = args.chunks if mode == 'infer' else ['auto']
                    for opts in args.xla_options:
                        for chunk in chunks:
                            cs += [Contender('jax', impl, dtype, opts, chunk) for impl in args.impls]
                            if args.deploy and mode == 'infer':
                                cs.append(Contender('jax', 'deploy', dtype, opts, chunk))
                            if args.bound and mode == 'infer':
                                cs += [Contender('jax', v, dtype, opts, chunk)
                                       for v in ('bound', 'bound-deploy')[:1 + bool(args.deploy)]]
                    if args.apply and mode == 'infer':
                        cs.append(Contender('jax', 'apply', dtype))
                    if args.torch:
                        cs += [Contender('torch', layout, dtype) for layout in args.layouts]
                groups.append(Group(model, batch, mode, tuple(cs)))
    if 'pipeline' in args.modes:
        groups += [Group('-', batch, 'pipeline', pipeline_contenders(args)) for batch in args.batches]
    return groups


# ----------------------------------------------------------------------------- workers (child side)
# glibc malloc tunables for --malloc retain (every worker, timm's included): no mmap'd chunks, and
# never trim the heap top; read at process start, so they go into each worker's environment. The
# JAX workers have the same policy by default, set at run time as this project's commands set it
# (process.fast_cpu_defaults: mallopt). Measurements: docs/benchmarks.md.
RETAIN_TUNABLES = 'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776'


MALLOC_POLICIES = ('default', 'retain')


def malloc_env(env: Dict[str, str], policy: str) -> Dict[str, str]:
    """``env`` with the glibc tunables of ``policy`` ('retain'; 'default': none) added."""
    if policy == 'retain':
        env = dict(env, GLIBC_TUNABLES=':'.join(filter(None, [env.get('GLIBC_TUNABLES'), RETAIN_TUNABLES])))
    return env


def _malloc_policy(framework: str) -> str:
    """What this worker runs with: the tunables its environment has (set by the parent), and for
    this project's workers (JAX, our pipeline) the run-time policy of ``process.fast_cpu_defaults``."""
    if platform.libc_ver()[0] != 'glibc':
        return 'system (no glibc)'
    if RETAIN_TUNABLES in os.environ.get('GLIBC_TUNABLES', ''):
        return 'retain (tunables)'
    return 'retain (fast_cpu_defaults)' if framework in ('jax', 'ours') else 'default'



def _rss_mb() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def _maxrss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


class Skip(Exception):
    """A contender that does not apply here (e.g. a CPU-only implementation on GPU)."""


def train_config(spec: Dict[str, Any]):
    """The training config both train contenders follow: ``spec['train_config']`` (default the
    ImageNet recipe) with the group's model, batch and compute dtype and, for JAX, its
    depthwise implementation."""
    import importlib.util
    path = spec.get('train_config') or DEFAULT_TRAIN_CONFIG
    module_spec = importlib.util.spec_from_file_location('bench_train_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config()
    config.model, config.batch_size, config.dtype = spec['model'], spec['batch'], spec['dtype']
    config.grad_accum_steps = 1
    if spec['framework'] == 'jax' and spec['variant'] not in WHOLE_MODEL_VARIANTS:
        config.model_overrides.depthwise_impl = spec['variant']
    return config


class _JaxRunner:
    """One jitted inference step of this project's model, or the trainer's own train step."""

    def __init__(self, spec: Dict[str, Any]):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from ghostnetv2_jax import process, xla_options
        from ghostnetv2_jax.models.registry import create_model
        from ghostnetv2_jax.train.state import init_variables
        process.fast_cpu_defaults()   # before the backend starts, as this project's commands do
        self.jax = jax
        self.chunk = None
        self.bound = False
        dtype = jnp.bfloat16 if spec['dtype'] == 'bfloat16' else jnp.float32
        impl = 'auto' if spec['variant'] in WHOLE_MODEL_VARIANTS else spec['variant']
        if impl == 'native' and jax.default_backend() != 'cpu':
            raise Skip(f"the native depthwise kernels are CPU-only (backend: {jax.default_backend()})")
        rng = np.random.default_rng(0)
        images = jnp.asarray(rng.standard_normal((spec['batch'], spec['size'], spec['size'], 3), np.float32))
        labels = jnp.asarray(rng.integers(0, 1000, spec['batch']), jnp.int32)
        project = spec['xla_options'] == 'project'
        if spec['mode'] == 'train':
            from ghostnetv2_jax.train import optim, steps
            from ghostnetv2_jax.train.state import create_state
            config = train_config(spec)
            model = create_model(config.model, num_classes=1000, drop_rate=config.drop_rate, dtype=dtype,
                                 depthwise_impl=impl)
            schedule = optim.create_learning_rate_schedule(config, IMAGENET_TRAIN_EXAMPLES // spec['batch'],
                                                           config.num_epochs)
            tx = optim.create_optimizer(config, schedule)
            init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
            # The trainer's initial state (_initial_state), created the way it creates it.
            self.state = xla_options.run_once(lambda r: create_state(
                init_variables(model, r, spec['size']), tx, state_rng, config.ema_decay > 0), init_rng)
            self.batch = {'images': images, 'labels': labels}
            t0 = time.perf_counter()
            fn = steps.jit_train_step(steps.make_train_step(model, tx, schedule, config), project_options=project)
            self.compiled = fn.lower(self.state, self.batch).compile()
        else:
            from ghostnetv2_jax import runtime
            model = create_model(spec['model'], depthwise_impl=impl, dtype=dtype)
            variables = xla_options.run_once(lambda r: init_variables(model, r, spec['size']), jax.random.PRNGKey(0))
            if spec['variant'] in ('deploy', 'bound-deploy'):
                model, variables = runtime.fold_batchnorm(model, variables)
            chunk = spec.get('chunk', 'auto')
            chunk = chunk if chunk == 'auto' else int(chunk)
            self.chunk = runtime.resolve_chunk(chunk, jax.default_backend())
            self.variables, self.images = variables, images
            t0 = time.perf_counter()
            options = xla_options.compiler_options(train=False) if project else None
            self.bound = spec['variant'] in ('bound', 'bound-deploy')
            if spec['variant'] == 'apply':   # what a user writes first: no predict_fn, XLA's options
                fn = jax.jit(model.apply)
            elif self.bound:                 # the weights compiled in: a call passes the images
                fn = jax.jit(runtime.bound_predict_fn(model, variables, chunk), compiler_options=options)
            else:
                fn = jax.jit(runtime.predict_fn(model, chunk), compiler_options=options)
            self.compiled = fn.lower(*(() if self.bound else (variables,)), images).compile()
        self.compile_s = time.perf_counter() - t0
        self.train = spec['mode'] == 'train'
        self.device = jax.devices()[0]

    def step(self) -> None:
        if self.train:
            self.state, metrics = self.compiled(self.state, self.batch)   # the state is donated
            self.jax.block_until_ready((self.state, metrics))
        elif self.bound:
            self.jax.block_until_ready(self.compiled(self.images))
        else:
            self.jax.block_until_ready(self.compiled(self.variables, self.images))

    def memory(self) -> Dict[str, float]:
        info: Dict[str, float] = {}
        ma = self.compiled.memory_analysis()
        if ma is not None:
            info['xla_temp_mb'] = ma.temp_size_in_bytes / 2 ** 20
            info['xla_total_mb'] = (ma.temp_size_in_bytes + ma.argument_size_in_bytes
                                    + ma.output_size_in_bytes - ma.alias_size_in_bytes) / 2 ** 20
        stats = self.device.memory_stats() if self.device.platform != 'cpu' else None
        if stats and 'peak_bytes_in_use' in stats:
            info['device_peak_mb'] = stats['peak_bytes_in_use'] / 2 ** 20
        return info

    def describe(self) -> Dict[str, Any]:
        return {'backend': self.jax.default_backend(), 'device': self.device.device_kind,
                'jax': self.jax.__version__, 'chunk': self.chunk,
                'async_dispatch': bool(self.jax.config.read('jax_cpu_enable_async_dispatch'))}


class _TorchRunner:
    """timm's model in one memory layout; eval under inference_mode, or timm's train step."""

    def __init__(self, spec: Dict[str, Any]):
        import timm
        import torch
        self.torch = torch
        torch.set_num_threads(spec['threads'])
        self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        torch.manual_seed(0)
        self.train = spec['mode'] == 'train'
        config = train_config(spec) if self.train else None
        drop = {'drop_rate': config.drop_rate} if self.train else {}
        model = timm.create_model(spec['model'], pretrained=False, **drop).to(self.device)
        images = torch.randn(spec['batch'], 3, spec['size'], spec['size'], device=self.device)
        self.labels = torch.randint(0, 1000, (spec['batch'],), device=self.device)
        if spec['variant'] == 'channels_last':
            model = model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        self.model, self.images = model, images
        self.amp = spec['dtype'] == 'bfloat16'
        if self.train:
            self._setup_train(config)
        else:
            model.eval()
        self.compile_s = None

    def _setup_train(self, config) -> None:
        """What timm's train.py runs for the recipe's flags: RMSpropTF (``--opt rmsproptf``, no
        weight decay on biases, BatchNorm and other 1-D parameters: ``filter_bias_and_bn``),
        label smoothing, and ModelEmaV3 updated after every optimizer step."""
        import timm.loss
        import timm.optim
        import timm.utils
        if config.optimizer != 'rmsprop_tf':
            raise ValueError(f'the timm train contender follows the rmsprop_tf recipe, not {config.optimizer!r}')
        self.model.train()
        # timm's lr at the first step: its scheduler's warmup_lr_init (the JAX step reads its schedule).
        scaled = (config.learning_rate * config.batch_size / config.lr_base_batch if config.lr_base_batch > 0
                  else config.learning_rate)   # optim.scaled_learning_rate
        lr = config.warmup_lr if config.warmup_epochs > 0 else scaled
        self.opt = timm.optim.create_optimizer_v2(self.model, 'rmsproptf', lr=lr, weight_decay=config.weight_decay,
                                                  momentum=config.momentum, eps=config.opt_eps,
                                                  alpha=config.rmsprop_decay)
        smoothing = config.label_smoothing
        self.loss_fn = (timm.loss.LabelSmoothingCrossEntropy(smoothing) if smoothing
                        else self.torch.nn.CrossEntropyLoss())
        self.ema = timm.utils.ModelEmaV3(self.model, decay=config.ema_decay) if config.ema_decay > 0 else None

    def step(self) -> None:
        torch = self.torch
        if self.train:
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = self.loss_fn(self.model(self.images), self.labels)
            loss.backward()
            self.opt.step()
            if self.ema is not None:
                self.ema.update(self.model)
        else:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp), torch.inference_mode():
                self.model(self.images)
        if self.device.type == 'cuda':
            torch.cuda.synchronize()

    def memory(self) -> Dict[str, float]:
        if self.device.type == 'cuda':
            return {'device_peak_mb': self.torch.cuda.max_memory_allocated() / 2 ** 20}
        return {}

    def describe(self) -> Dict[str, Any]:
        import timm
        return {'backend': self.device.type, 'threads': self.torch.get_num_threads(),
                'torch': self.torch.__version__, 'timm': timm.__version__}


# The deploy mode's runtime settings, the same for both ONNX files. OpenVINO: one stream for one
# synchronous request (the latency hint) and float32 arithmetic (on CPUs with bf16 instructions
# its default precision is bf16); the model reshaped to the group's static batch.
OPENVINO_CONFIG = {'PERFORMANCE_HINT': 'LATENCY', 'INFERENCE_PRECISION_HINT': 'f32'}


def _import_or_skip(module: str, why: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise Skip(f'{module} is not installed ({why})') from None


def deploy_weights(model_name: str):
    """timm's ``model_name`` as timm initialises it (seed 0), with BatchNorm's statistics and
    affine set from seed 1 so that folding them is not the identity, in eval mode: the weights
    both ONNX files of the deploy mode hold."""
    torch = _import_or_skip('torch', "timm's weights and torch.onnx.export")
    timm = _import_or_skip('timm', "timm's weights and torch.onnx.export")
    if model_name not in timm.list_models():
        raise Skip(f'timm {timm.__version__} has no {model_name}')
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


def onnx_ours(timm_model, model_name: str, size: int) -> bytes:
    """This project's ONNX export (BN folded; NHWC 'images') of ``timm_model``'s weights."""
    from ghostnetv2_jax import convert, export
    from ghostnetv2_jax.models.registry import create_model
    sd = {k: v.detach().numpy() for k, v in timm_model.state_dict().items()}
    variables = convert.torch_to_flax(sd, model_name)
    return export.to_bytes('.onnx', create_model(model_name), variables, (size, size))


def onnx_timm(timm_model, size: int) -> bytes:
    """timm's model in its deploy form (``timm.utils.reparameterize_model``: GhostNetV3's branches
    merged, a no-op for V1/V2) through torch's TorchScript ONNX exporter (our exporter's opset,
    constant folding, which folds BatchNorm into the convs; a dynamic batch; NCHW 'images'): what a
    timm user ships."""
    import io
    import warnings
    import torch
    from timm.utils import reparameterize_model
    from ghostnetv2_jax.export.onnx import OPSET
    timm_model = reparameterize_model(timm_model)     # a copy
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')      # the exporter's deprecation notices
        torch.onnx.export(timm_model, (torch.zeros(1, 3, size, size),), f, input_names=['images'],
                          output_names=['logits'], dynamic_axes={'images': {0: 'batch'}, 'logits': {0: 'batch'}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    return f.getvalue()


class _DeployRunner:
    """One ONNX file in a deployment runtime: this project's export (NHWC input) or timm's
    (NCHW input), both of ``deploy_weights``; the export and the session are set-up, not timed."""

    def __init__(self, spec: Dict[str, Any]):
        import numpy as np
        runtime, variant, size = spec['framework'], spec['variant'], spec['size']
        if spec['dtype'] != 'float32':
            raise Skip('the ONNX exports are float32')
        _import_or_skip('onnx', 'the ONNX exports')
        rt = _import_or_skip(runtime, f'the {runtime} contenders')
        model = deploy_weights(spec['model'])
        t0 = time.perf_counter()
        blob = onnx_ours(model, spec['model'], size) if variant == 'ours' else onnx_timm(model, size)
        self.export_s = time.perf_counter() - t0
        # The same images for both files, each in the layout its users feed.
        images = np.random.default_rng(0).standard_normal((spec['batch'], size, size, 3)).astype(np.float32)
        self.images = images if variant == 'ours' else np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        threads = spec['threads']
        t0 = time.perf_counter()
        if runtime == 'onnxruntime':
            options = rt.SessionOptions()     # graph optimisation: ORT_ENABLE_ALL, its default
            options.intra_op_num_threads = threads
            session = rt.InferenceSession(blob, options, providers=['CPUExecutionProvider'])
            feed = {session.get_inputs()[0].name: self.images}
            self._run = lambda: session.run(None, feed)[0]
            self.info = {'runtime': f'onnxruntime {rt.__version__}', 'threads': threads,
                         'graph_optimization': str(options.graph_optimization_level)}
        else:
            core = rt.Core()
            ov_model = core.read_model(blob)
            ov_model.reshape({ov_model.inputs[0].get_any_name(): list(self.images.shape)})
            compiled = core.compile_model(ov_model, 'CPU', {**OPENVINO_CONFIG, 'INFERENCE_NUM_THREADS': threads})
            request = compiled.create_infer_request()

            def run():
                request.infer({0: self.images})
                return request.get_output_tensor(0).data
            self._run = run
            props = {k: compiled.get_property(k) for k in ('INFERENCE_NUM_THREADS', 'PERFORMANCE_HINT',
                                                            'INFERENCE_PRECISION_HINT', 'NUM_STREAMS',
                                                            'ENABLE_CPU_PINNING')}
            self.info = {'runtime': f'openvino {rt.__version__}',   # as compiled: f32, not bf16
                         **{k: v.get_type_name() if hasattr(v, 'get_type_name') else str(v) for k, v in props.items()}}
        self.compile_s = time.perf_counter() - t0
        import onnx
        import collections
        nodes = onnx.load_from_string(blob).graph.node
        self.info.update(onnx_nodes=len(nodes), onnx_ops=dict(collections.Counter(n.op_type for n in nodes).most_common()),
                         onnx_bytes=len(blob), export_s=self.export_s)
        # The logits of the timed images, for the parent to compare ours with timm's.
        self.logits = np.array(self._run(), np.float32)

    def step(self) -> None:
        self._run()

    def memory(self) -> Dict[str, float]:
        return {}

    def describe(self) -> Dict[str, Any]:
        return {'backend': 'cpu', **self.info, 'logits': self.logits.tolist()}


def _pipeline_runner(spec: Dict[str, Any]):
    """A pipeline contender (bench_pipeline.PipelineRunner); timm's without torch or timm is skipped."""
    from ghostnetv2_jax import bench_pipeline
    if spec['framework'] == 'timm':
        _import_or_skip('torch', "timm's loader")
        _import_or_skip('timm', "timm's loader")
    return bench_pipeline.PipelineRunner(spec)


RUNNERS = {'jax': _JaxRunner, 'torch': _TorchRunner, 'ours': _pipeline_runner, 'timm': _pipeline_runner}


def _minor_faults() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn, n: int, faults: Optional[List[int]] = None) -> List[float]:
    """Seconds per call of ``fn``, ``n`` calls; their minor page faults go to ``faults``."""
    times = []
    for _ in range(n):
        f0, t0 = _minor_faults(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if faults is not None:
            faults.append(_minor_faults() - f0)
    return times


def _die_with_parent() -> None:
    """Linux: SIGKILL for this worker when the harness's process ends, however it ends (a frozen
    worker could not notice; its DataLoader children, stopped in an orphaned process group, then
    get the kernel's SIGHUP)."""
    libc = process._libc()
    if libc is not None and platform.system() == 'Linux':
        libc.prctl(1, signal.SIGKILL)       # PR_SET_PDEATHSIG


def worker_main() -> int:
    """Child process: JSON commands on stdin, one JSON reply per line on stdout."""
    _die_with_parent()
    out = sys.stdout
    sys.stdout = sys.stderr   # library chatter must not corrupt the protocol
    runner, rss_before = None, 0.0
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg['cmd'] == 'setup':
                spec = msg['spec']
                runner = RUNNERS.get(spec['framework'], _DeployRunner)(spec)
                process.release_free_heap()   # the compiler's memory: with memory retained it would stay resident
                rss_before = _rss_mb()
                first = _timed(runner.step, 1)[0]
                warm = _timed(runner.step, spec['warmup'])
                reply = {'compile_s': runner.compile_s, 'first_call_s': first, 'warmup_s': warm,
                         'malloc': _malloc_policy(spec['framework']), **runner.describe()}
            elif msg['cmd'] == 'run' and hasattr(runner, 'run_round'):   # a pipeline: one rate per round
                reply = runner.run_round(msg['n'], msg.get('skip', 0))
            elif msg['cmd'] == 'run':
                faults: List[int] = []
                reply = {'times': _timed(runner.step, msg['n'], faults), 'faults': faults}
            elif msg['cmd'] == 'stats':
                reply = {'rss_before_mb': rss_before, 'maxrss_mb': _maxrss_mb(),
                         'peak_added_mb': max(0.0, _maxrss_mb() - rss_before), **runner.memory()}
            else:
                reply = {}
        except Skip as e:
            reply = {'skipped': str(e)}
        except Exception as e:   # reported to the parent as this contender's failure
            reply = {'error': f'{type(e).__name__}: {" ".join(str(e).split())[:500]}'}
        out.write(json.dumps(reply) + '\n')
        out.flush()
        if msg['cmd'] == 'exit':
            return 0
    return 0


# ----------------------------------------------------------------------------- workers (parent side)
class Worker:
    """One contender's worker process. ``freeze``: the worker and its children (a process group
    of their own) are stopped (SIGSTOP) between commands and continued (SIGCONT) for the next, so
    a pipeline neither takes cores from the contender being timed nor refills its prefetch
    buffers while it waits for its turn."""

    def __init__(self, framework: str, xla_flags: str, malloc: str = 'default', freeze: bool = False):
        env = malloc_env(dict(os.environ), malloc)
        if framework == 'jax':
            env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'   # leave GPU memory to the torch worker
            if xla_flags:
                env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + xla_flags).strip()
        self.freeze, self.frozen = freeze, False
        self.proc = subprocess.Popen([sys.executable, '-m', 'ghostnetv2_jax.bench', '--worker'],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     start_new_session=freeze)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:      # the group is gone
            pass
        self.frozen = sig == signal.SIGSTOP

    def ask(self, **msg) -> Dict[str, Any]:
        """Send one command, return the reply; a dead worker becomes an error reply, so one
        contender's crash (e.g. the kernel's OOM killer) does not end the run."""
        if self.frozen:
            self._signal(signal.SIGCONT)
        reply = self._ask(msg)
        if self.freeze and msg.get('cmd') != 'exit' and self.proc.poll() is None:
            self._signal(signal.SIGSTOP)
        return reply

    def _ask(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        line = ''
        try:
            self.proc.stdin.write(json.dumps(msg) + '\n')
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError:      # BrokenPipeError: the worker is gone
            pass
        if not line:
            code = self.proc.wait()
            hint = ' (SIGKILL: out of memory? each live contender holds its own buffers)' if code == -9 else ''
            return {'error': f'worker exited with code {code}{hint}'}
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask(cmd='exit')     # continues a frozen worker first
            except (BrokenPipeError, OSError):
                pass
        self.proc.wait()


# ----------------------------------------------------------------------------- core placement
SPLIT_CORES = 2.0   # cross_core_penalty above this: the first two usable CPUs share no cache


def cross_core_penalty(mb: int = 4, reps: int = 5) -> Optional[float]:
    """Median over ``reps`` of (time for the second usable CPU to read ``mb`` MB the first one
    just wrote) / (time to read them after writing them itself); None with one usable CPU.
    Both threads are pinned for the measurement and the caller's affinity is restored."""
    import threading
    import numpy as np
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    data = np.ones(mb * 2 ** 18, np.float32)
    written, read = threading.Event(), threading.Event()
    ratios, stop = [], []

    def writer():    # on Linux, sched_setaffinity(0) pins the calling thread only
        os.sched_setaffinity(0, {cpus[0]})
        for _ in range(reps):
            read.wait()
            read.clear()
            if stop:
                return
            data.fill(1.0)
            written.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    os.sched_setaffinity(0, {cpus[1]})
    try:
        for _ in range(reps):
            read.set()
            written.wait()
            written.clear()
            t0 = time.perf_counter()
            data.max()                       # vectorised: reads at memory speed
            remote = time.perf_counter() - t0
            data.fill(1.0)
            t0 = time.perf_counter()
            data.max()
            ratios.append(remote / max(time.perf_counter() - t0, 1e-9))
    finally:
        stop.append(True)    # a writer still waiting (the reader failed) returns
        read.set()
        thread.join()
        os.sched_setaffinity(0, set(cpus))
    return _median(ratios)


def _shared_rounds(res: Dict[str, Any], batch: int) -> None:
    """``split_rounds`` and, over the rounds that ran on cache-sharing cores, ``img_per_s_shared``."""
    penalties = res.get('cross_core') or []
    if not penalties or None in penalties:
        return
    shared = [t for p, ts in zip(penalties, res['round_times']) if p <= SPLIT_CORES for t in ts]
    res['split_rounds'] = sum(p > SPLIT_CORES for p in penalties)
    if shared:
        res['img_per_s_shared'] = batch / _median(shared)


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def pipeline_warmup(warmup: int, cores: int) -> int:
    """Untimed batches after a pipeline's first: at least what its start-up fills (timm: two
    batches per DataLoader worker in flight; tf.data: a batch per core assembled in parallel, and
    its prefetch), so that the first round starts from a drained pipeline."""
    return max(warmup, 2 * cores + 2)


def run_group(group: Group, args, log) -> List[Dict[str, Any]]:
    """Set the group's contenders up one by one, then time them in alternating rounds.

    The pipeline mode's workers are frozen between their turns (``Worker(freeze=True)``): each
    round continues a pipeline in the state its last round left it, drained by a consumer pulling
    as fast as it can, so no turn starts with prefetched batches or competes with another
    pipeline. A turn skips ``PIPELINE_SKIP`` batches, then times ``--repeats``: one rate per round.
    """
    live, results = [], []
    logits: Dict[Contender, Any] = {}
    pipeline = group.mode == 'pipeline'
    try:
        for c in group.contenders:
            spec = dict(framework=c.framework, variant=c.variant, dtype=c.dtype, xla_options=c.xla_options,
                        chunk=c.chunk,
                        model=group.model, batch=group.batch, mode=group.mode, size=args.size,
                        threads=args.threads, warmup=args.warmup, malloc=args.malloc,
                        train_config=args.train_config)
            if pipeline:
                cores = len(os.sched_getaffinity(0))
                spec.update(source=c.source, root=args.pipeline_root, tfds_dir=args.pipeline_tfds_dir,
                            cores=cores, warmup=pipeline_warmup(args.warmup, cores))
            w = Worker(c.framework, args.xla_flags, args.malloc, freeze=pipeline)
            info = w.ask(cmd='setup', spec=spec)
            if 'skipped' in info:
                log(f'  {c.label}: skipped ({info["skipped"]})')
                w.close()
                continue
            if 'logits' in info:
                logits[c] = info.pop('logits')
            res = dict(label=c.label, framework=c.framework, variant=c.variant, dtype=c.dtype,
                       xla_options=c.xla_options if c.framework == 'jax' else None,
                       model=group.model, batch=group.batch, mode=group.mode, **info)
            if pipeline:
                res.update(source=c.source, cores=spec['cores'])
            results.append(res)
            if 'error' in info:
                log(f'  {c.label}: FAILED {info["error"]}')
                w.close()
                continue
            live.append((w, res))
            comp = f'compile {info["compile_s"]:.1f}s' if info.get('compile_s') is not None else \
                f'first call {info["first_call_s"]:.2f}s'
            log(f'  {c.label}: ready ({comp})')
        compare_logits(results, logits, log)
        for r in range(args.rounds):
            shift = r % max(len(live), 1)
            for w, res in live[shift:] + live[:shift]:     # rotate: no contender always goes first
                time.sleep(args.settle)
                penalty = cross_core_penalty()
                reply = w.ask(cmd='run', n=args.repeats, skip=PIPELINE_SKIP if pipeline else 0)
                if 'error' in reply:
                    res['error'] = reply['error']
                    continue
                res.setdefault('round_times', []).append(reply['times'])
                res.setdefault('round_faults', []).append(reply['faults'])
                res.setdefault('cross_core', []).append(penalty)
                if 'restarts' in reply:     # a pipeline: new iterators made in the round
                    res.setdefault('round_restarts', []).append(reply['restarts'])
        for w, res in live:
            res['memory'] = w.ask(cmd='stats')
    finally:
        for w, _ in live:
            w.close()
    for res in results:
        if res.get('round_times') and 'error' not in res:
            res['times'] = [t for ts in res['round_times'] for t in ts]
            res['round_medians'] = [_median(ts) for ts in res['round_times']]
            res['median_s'] = _median(res['times'])
            res['img_per_s'] = group.batch / res['median_s']
            res['img_per_s_rounds'] = [group.batch / t for t in res['round_medians']]
            res['faults_max'] = max((f for fs in res['round_faults'] for f in fs), default=None)
            _shared_rounds(res, group.batch)
    return results


def compare_logits(results: List[Dict[str, Any]], logits: Dict[Contender, Any], log=print) -> None:
    """Each deploy 'ours' result gets ``logits_vs_timm``: max |ours - timm's| / max |timm's| over
    the logits of the timed images, both ONNX files run in the same runtime."""
    import numpy as np
    for c, ours in logits.items():
        ref = logits.get(dataclasses.replace(c, variant='timm'))
        if c.variant != 'ours' or ref is None:
            continue
        ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
        diff = (float(np.abs(ours - ref).max() / np.abs(ref).max()) if ours.shape == ref.shape
                else float('inf'))
        res = next(r for r in results if r['label'] == c.label)
        res['logits_vs_timm'] = diff
        verdict = 'the same' if diff <= DEPLOY_TOLERANCE else f'NOT the same (allowed {DEPLOY_TOLERANCE:.0e})'
        log(f'  {c.label}: logits {verdict} as timm\'s ONNX: max relative difference {diff:.1e}')


# ----------------------------------------------------------------------------- report
def _ratio_role(r: Dict[str, Any]) -> Optional[str]:
    """'reference' (timm eager, timm's ONNX, timm's loader), 'contender' (ours) or None."""
    if r['framework'] in RUNTIMES:
        return {'timm': 'reference', 'ours': 'contender'}.get(r.get('variant'))
    return {'torch': 'reference', 'jax': 'contender', 'timm': 'reference', 'ours': 'contender'}.get(r['framework'])


def add_ratios(results: List[Dict[str, Any]]) -> None:
    """ratio_vs_timm_best = img/s / (best timm layout's img/s, same model/batch/mode/dtype); in the
    deploy mode over timm's ONNX file in the same runtime; in the pipeline mode over timm's loader
    with the same transforms on the same source, where each result also gets img/s per core (over
    the usable cores, which every pipeline uses), cores per 1,000 img/s and the ratio per core."""
    for r in results:
        if r['mode'] == 'pipeline' and 'img_per_s' in r:
            r['img_per_s_per_core'] = r['img_per_s'] / r['cores']
            r['cores_per_1000_img_s'] = 1000 / r['img_per_s_per_core']

    def key(r):
        where = r['framework'] if r['framework'] in RUNTIMES else ''
        if r['mode'] == 'pipeline':
            where = (r['variant'], r['source'])
        return (r['model'], r['batch'], r['mode'], r['dtype'], where)
    best: Dict[tuple, Dict[str, Any]] = {}
    for r in results:
        if _ratio_role(r) == 'reference' and 'img_per_s' in r:
            if key(r) not in best or r['img_per_s'] > best[key(r)]['img_per_s']:
                best[key(r)] = r
    for r in results:
        ref = best.get(key(r))
        if _ratio_role(r) == 'contender' and 'img_per_s' in r and ref is not None:
            r['timm_best'] = ref['label']
            r['ratio_vs_timm_best'] = r['img_per_s'] / ref['img_per_s']
            if 'img_per_s_per_core' in r:
                r['ratio_per_core_vs_timm'] = r['img_per_s_per_core'] / ref['img_per_s_per_core']
            if 'img_per_s_shared' in r and 'img_per_s_shared' in ref:
                r['ratio_vs_timm_best_shared'] = r['img_per_s_shared'] / ref['img_per_s_shared']
    # In the deploy mode, this project's JAX contender over the fastest runtime of its group.
    for r in results:
        if r['mode'] != 'deploy' or r['framework'] != 'jax' or 'img_per_s' not in r:
            continue
        runtimes = [o for o in results if o['framework'] in RUNTIMES and o['model'] == r['model']
                    and o['batch'] == r['batch'] and o['mode'] == 'deploy' and 'img_per_s' in o]
        if runtimes:
            ref = max(runtimes, key=lambda o: o['img_per_s'])
            r['runtime_best'] = ref['label']
            r['ratio_vs_runtime_best'] = r['img_per_s'] / ref['img_per_s']
            if 'img_per_s_shared' in r and 'img_per_s_shared' in ref:
                r['ratio_vs_runtime_best_shared'] = r['img_per_s_shared'] / ref['img_per_s_shared']


def machine_info(threads: int) -> Dict[str, Any]:
    model_name = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
        model_name = next(l.split(':', 1)[1].strip() for l in lscpu.splitlines() if l.startswith('Model name'))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {'cpu_model': model_name, 'logical_cpus': os.cpu_count(),
            'usable_cpus': len(os.sched_getaffinity(0)), 'torch_threads': threads,
            'python': platform.python_version(), 'platform': platform.platform()}


def _fmt(v, spec='.1f', missing='-') -> str:
    return missing if v is None else format(v, spec)


def markdown(report: Dict[str, Any]) -> str:
    m, cfg = report['machine'], report['config']
    lines = [
        '# Benchmark: ghostnetv2_jax vs timm', '',
        f'- Machine: {m["cpu_model"]}, {m["usable_cpus"]} usable CPUs; torch threads {m["torch_threads"]}; '
        f'load average {report["load_start"]} at start, {report["load_end"]} at end',
        f'- Command: `{report["command"]}`',
    ]
    models = [r for r in report['results'] if r['mode'] != 'pipeline']
    pipelines = [r for r in report['results'] if r['mode'] == 'pipeline']
    if models or not pipelines:
        lines += _model_table(report, models)
    if pipelines:
        lines += _pipeline_section(report, pipelines)
    return '\n'.join(lines)


def _ratio_text(v: Optional[float]) -> str:
    return '-' if v is None else f'{v:.2f}x'


def _model_table(report: Dict[str, Any], results: List[Dict[str, Any]]) -> List[str]:
    """The inference, train and deploy modes' table and notes."""
    m, cfg = report['machine'], report['config']
    lines = [
        f'- Input {cfg["size"]}x{cfg["size"]}; {cfg["rounds"]} alternating rounds x {cfg["repeats"]} '
        f'iterations, {cfg["warmup"]} warm-up; malloc policy `{cfg["malloc"]}`; img/s = batch / median',
        '', '| model | batch | mode | contender | img/s | rounds min-max | vs timm best | split rounds | '
            'img/s, vs timm (shared rounds) | compile s | peak added MB | XLA MB | page faults, max |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in results:
        if 'img_per_s' not in r:
            lines.append(f'| {r["model"]} | {r["batch"]} | {r["mode"]} | {r["label"]} | failed: '
                         f'{r.get("error", "no timing")} | | | | | | | | |')
            continue
        rounds = r['img_per_s_rounds']
        mem = r.get('memory', {})
        split = f'{r["split_rounds"]} of {len(rounds)}' if 'split_rounds' in r else '-'
        vs_runtime = 'ratio_vs_runtime_best' in r   # the deploy mode's JAX contender: over the best runtime
        ratio = (f'{_ratio_text(r["ratio_vs_runtime_best"])} {r["runtime_best"]}' if vs_runtime
                 else _ratio_text(r.get('ratio_vs_timm_best')))
        shared = ('-' if 'img_per_s_shared' not in r else
                  f'{r["img_per_s_shared"]:.1f}, '
                  f'{_ratio_text(r.get("ratio_vs_runtime_best_shared" if vs_runtime else "ratio_vs_timm_best_shared"))}')
        lines.append(
            f'| {r["model"]} | {r["batch"]} | {r["mode"]} | {r["label"]} | {r["img_per_s"]:.1f} | '
            f'{min(rounds):.1f}-{max(rounds):.1f} | {ratio} | {split} | '
            f'{shared} | {_fmt(r.get("compile_s"))} | {_fmt(mem.get("peak_added_mb"), ".0f")} | '
            f'{_fmt(mem.get("xla_total_mb"), ".0f")} | {_fmt(r.get("faults_max"), ",")} |')
    lines += ['', 'compile s: trace + lower + XLA compile (JAX); timm has none. peak added MB: worker '
              'maxrss minus its RSS before the first call. XLA MB: compiled.memory_analysis() '
              'temporaries + arguments + outputs - aliased (donated). split rounds: rounds run while '
              f'the first two CPUs shared no cache (cross_core_penalty > {SPLIT_CORES}); the shared-rounds '
              'columns are img/s and the ratio over the other rounds, timm\'s included. page faults, max: '
              'the most minor page faults of one timed iteration (a re-faulted buffer costs ~2 us per '
              '4 KiB page here).', '']
    deploy = [r for r in results if r['framework'] in RUNTIMES]
    if deploy:
        lines += [f'Deploy mode (contender runtime:file:dtype): float32 ONNX files, {m["torch_threads"]} threads '
                  '(ONNX Runtime: intra-op threads, its default graph optimisation; OpenVINO: INFERENCE_NUM_THREADS, '
                  + ', '.join(f'{k} {v}' for k, v in OPENVINO_CONFIG.items())
                  + ', static batch); `ours` is this project\'s export (BN folded, NHWC input), `timm` '
                  'timm\'s torch.onnx.export of the same weights (NCHW input); vs timm best is over `timm` in the '
                  'same runtime; compile s is the session creation (ORT) or compile_model (OpenVINO).', '',
                  '| model | batch | contender | export s | ONNX nodes | logits vs timm\'s ONNX (max rel. diff.) |',
                  '|---|---|---|---|---|---|']
        for r in deploy:
            lines.append(f'| {r["model"]} | {r["batch"]} | {r["label"]} | {_fmt(r.get("export_s"))} | '
                         f'{_fmt(r.get("onnx_nodes"), "d")} | {_fmt(r.get("logits_vs_timm"), ".1e")} |')
        lines.append('')
    return lines


def _jpeg_text(stats: Dict[str, float]) -> str:
    return (f'{stats["images"]} images, mean {stats["mean_kib"]:.1f} KiB, {stats["mean_width"]:.0f}x'
            f'{stats["mean_height"]:.0f} px, {stats["bits_per_pixel"]:.2f} bits per pixel')


def _pipeline_section(report: Dict[str, Any], results: List[Dict[str, Any]]) -> List[str]:
    """The pipeline mode's table: the images, how the pipelines ran, img/s and per core."""
    cfg, data = report['config'], report.get('pipeline', {})
    cores = results[0].get('cores', report['machine']['usable_cpus'])
    manifest = data.get('manifest')
    origin = (f'generated by the harness (seed {manifest["seed"]}), all derived from one photograph '
              f'({manifest["derived_from"]}) by random crops, flips, colour gains and noise, JPEG quality '
              f'{manifest["quality"]}' if manifest else 'an image folder given with --pipeline-data, used as it is')
    stats = data.get('jpeg', {})
    lines = [
        '', '## Input pipeline', '',
        f'- Images: `{data.get("root", "?")}`' + (' (a temporary directory, removed at the end)'
                                                  if data.get('temporary') else '') + f', {origin}. '
        + '; '.join(f'{split}: {_jpeg_text(s)}' for split, s in stats.items()) + '.',
        f'- tfds records: {data.get("tfds", "not built")}.',
        f'- Each pipeline uses all {cores} usable cores: ours `data.create_split` with tf.data num_threads '
        f'{cores}; timm\'s `create_loader` with {cores} DataLoader worker processes (torch 1 thread in the '
        f'loader\'s process), the same transforms (train: the recipe\'s RandomResizedCrop with random '
        'bilinear/bicubic, hflip 0.5, RandAugment rand-m9-mstd0.5, random erasing 0.2 pixel; eval: '
        f'resize to size / 0.875 bicubic, centre crop); {cfg["size"]}x{cfg["size"]} float32 batches. timm\'s '
        'train loader over the folder is its MultiEpochsDataLoader, going on into the next epoch as ours does.',
        f'- Steady state: after the first batch, max(--warmup, 2 x cores + 2) untimed batches; every '
        f'pipeline is stopped between its turns; a turn skips {PIPELINE_SKIP} batches, then times '
        f'{cfg["repeats"]}; {cfg["rounds"]} alternating rounds; img/s = images / time of a round, '
        'median over rounds; per core = img/s / usable cores. An iterator that ends (an eval pass, a '
        'timm epoch) is replaced outside the timed time (restarts); the new pass\'s first batches are timed.',
        '', '| batch | contender | img/s | img/s per core | rounds min-max | ours / timm per core | '
            'cores per 1,000 img/s | batches per pass | restarts |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for r in results:
        if 'img_per_s' not in r:
            lines.append(f'| {r["batch"]} | {r["label"]} | failed: {r.get("error", "no timing")} | | | | | | |')
            continue
        rounds = r['img_per_s_rounds']
        lines.append(
            f'| {r["batch"]} | {r["label"]} | {r["img_per_s"]:.1f} | {r["img_per_s_per_core"]:.1f} | '
            f'{min(rounds):.1f}-{max(rounds):.1f} | {_ratio_text(r.get("ratio_per_core_vs_timm"))} | '
            f'{r["cores_per_1000_img_s"]:.1f} | {_fmt(r.get("epoch_batches"), "d")} | '
            f'{sum(r.get("round_restarts", []))} |')
    lines.append('')
    profile = data.get('profile')
    if profile:
        lines += ['Where the time goes: the train chain on one thread (tf.data, one core), each row running '
                  'every stage up to its own (`--pipeline-profile`, bench_pipeline.stage_profile); the last row '
                  f'is `create_split` itself, batches of {report["config"]["batches"][0]} included.', '',
                  '| stage | ms per image, cumulative | this stage |', '|---|---|---|']
        previous = 0.0
        for row in profile:
            batched = row['stage'] == profile[-1]['stage']
            own = '-' if batched else f'{row["ms_per_image"] - previous:.2f}'
            lines.append(f'| {row["stage"]} | {row["ms_per_image"]:.2f} | {own} |')
            previous = previous if batched else row['ms_per_image']
        lines.append('')
    return lines


def _write_atomic(path: str, text: str) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def _write_report(out: str, report: Dict[str, Any]) -> None:
    report['load_end'] = [round(x, 2) for x in os.getloadavg()]
    _write_atomic(os.path.join(out, 'bench.json'), json.dumps(report, indent=1))
    _write_atomic(os.path.join(out, 'bench.md'), markdown(report))


PIPELINE_PASS_PER_CORE = 8   # batches per pass and core under which a pass's ends weigh on its rate


def prepare_pipeline_data(args, root: str, log=print) -> Dict[str, Any]:
    """The pipeline mode's images in ``root`` (bench_pipeline.prepare_folder: generated,
    reused, or a user's folder) and, with 'tfds' in ``args.pipeline_sources``, the same files as
    tfds records; sets ``args.pipeline_root`` and ``args.pipeline_tfds_dir`` for the workers
    (``args.pipeline_sources`` loses 'tfds' where tensorflow_datasets is missing). Returns what
    the report says about them."""
    from ghostnetv2_jax import bench_pipeline
    manifest = bench_pipeline.prepare_folder(root, args.pipeline_images, log=log)
    stats = bench_pipeline.folder_stats(root)
    cores = len(os.sched_getaffinity(0))
    for split, split_stats in stats.items():
        if split_stats['images'] < max(args.batches):
            raise bench_pipeline.PipelineDataError(
                f'{os.path.join(root, split)} has {split_stats["images"]} images, fewer than a batch of '
                f'{max(args.batches)}; generate more with --pipeline-images in a new --pipeline-data')
        if split_stats['images'] < PIPELINE_PASS_PER_CORE * cores * max(args.batches):
            log(f'  note: {split} holds {split_stats["images"] // max(args.batches)} batches of '
                f'{max(args.batches)}, under {PIPELINE_PASS_PER_CORE} per core: the start and end of each pass '
                'weigh on the rates of the pipelines that restart; --pipeline-images '
                f'{PIPELINE_PASS_PER_CORE * cores * max(args.batches)} makes longer passes')
    data = {'root': root, 'manifest': manifest, 'jpeg': stats}
    args.pipeline_root, args.pipeline_tfds_dir = root, None
    if 'tfds' in args.pipeline_sources:
        try:
            import tensorflow_datasets  # noqa: F401
        except ImportError:
            log('  tfds records: skipped (tensorflow_datasets is not installed)')
            args.pipeline_sources = [s for s in args.pipeline_sources if s != 'tfds']
            data['tfds'] = 'not built: tensorflow_datasets is not installed'
        else:
            args.pipeline_tfds_dir = bench_pipeline.prepare_tfds(root)
            data['tfds'] = (f'the same JPEG files, bytes unchanged, as the prepared tfds dataset '
                            f'`{bench_pipeline.TFDS_NAME}` (TFRecord) in `{args.pipeline_tfds_dir}`')
    return data


def run(args, command: str, log=print) -> Dict[str, Any]:
    """Run every group of ``args`` (the bench command's options), writing ``bench.json`` and
    ``bench.md`` to ``args.out`` after each group; returns the report. The pipeline mode's images
    go to ``args.pipeline_data``, or to a temporary directory removed at the end."""
    import shutil
    import tempfile
    os.makedirs(args.out, exist_ok=True)
    report = {'command': command, 'config': {k: v for k, v in vars(args).items()},
              'machine': machine_info(args.threads),
              'load_start': [round(x, 2) for x in os.getloadavg()], 'results': []}
    temporary = None
    try:
        if 'pipeline' in args.modes:
            root = args.pipeline_data or tempfile.mkdtemp(prefix='ghostnetv2-bench-images-')
            temporary = None if args.pipeline_data else root
            log('input pipeline images:')
            report['pipeline'] = dict(prepare_pipeline_data(args, root, log), temporary=bool(temporary))
        _run_groups(args, report, log)
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
    return report


def _run_groups(args, report: Dict[str, Any], log) -> None:
    for group in plan(args):
        log(f'input pipelines, batch {group.batch}:' if group.mode == 'pipeline'
            else f'{group.model} batch {group.batch} {group.mode}:')
        report['results'] += run_group(group, args, log)
        add_ratios(report['results'])
        _write_report(args.out, report)     # after every group: a later failure keeps these
        for r in report['results']:
            if r['model'] == group.model and r['batch'] == group.batch and r['mode'] == group.mode \
                    and 'img_per_s' in r:
                vs = 'runtime' if 'ratio_vs_runtime_best' in r else 'timm'
                ratio, shared = r.get(f'ratio_vs_{vs}_best'), r.get(f'ratio_vs_{vs}_best_shared')
                log(f'    {r["label"]:<28} {r["img_per_s"]:8.1f} img/s'
                    + (f' ({r["img_per_s_per_core"]:.1f} per core)' if 'img_per_s_per_core' in r else '')
                    + ('' if ratio is None else f'   {ratio:.2f}x {r[f"{vs}_best"]}')
                    + ('' if shared is None else f'; {shared:.2f}x over rounds on cache-sharing cores')
                    + (f'; {r["split_rounds"]} of {len(r["img_per_s_rounds"])} rounds split'
                       if r.get('split_rounds') else ''))
    if 'pipeline' in args.modes and getattr(args, 'pipeline_profile', 0) > 0 and 'pipeline' in report:
        from ghostnetv2_jax import bench_pipeline
        log('where the time goes (one thread, cumulative):')
        report['pipeline']['profile'] = bench_pipeline.stage_profile(report['pipeline']['root'],
                                                                     args.pipeline_profile, args.size,
                                                                     args.batches[0])
        for row in report['pipeline']['profile']:
            log(f'    {row["stage"]:<28} {row["ms_per_image"]:7.2f} ms/image')
    _write_report(args.out, report)
    log(f'wrote {os.path.join(args.out, "bench.json")} and bench.md')


if __name__ == '__main__':   # a contender's worker process (Worker starts it)
    sys.exit(worker_main())
