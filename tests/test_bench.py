"""The benchmark harness: a tiny end-to-end run (JSON, markdown, ratios), the plan, the ratio
arithmetic, the train steps it times (the trainer's and timm's), and one-line errors for bad flags."""
import importlib.util
import json
import os
import sys
import time

import jax
import numpy as np
import pytest

from ghostnetv2_jax import bench
from ghostnetv2_jax.cli import bench as bench_cli
from ghostnetv2_jax.train import steps


def test_smoke_run_writes_json_and_markdown_with_ratios(tmp_path):
    out = tmp_path / 'bench'
    argv = ['--models', 'ghostnet_050', '--batches', '2', '--size', '64', '--modes', 'infer',
            '--dtypes', 'float32', '--impls', 'native', '--no-deploy', '--layouts', 'nchw,channels_last',
            '--rounds', '2', '--repeats', '1', '--warmup', '0', '--settle', '0.2', '--out', str(out)]
    assert bench_cli.main(argv) == 0
    report = json.loads((out / 'bench.json').read_text())
    assert report['machine']['usable_cpus'] == len(os.sched_getaffinity(0)) == report['machine']['torch_threads']
    assert report['config']['rounds'] == 2 and report['command'].startswith('ghostnetv2-jax bench')
    by_label = {r['label']: r for r in report['results']}
    assert set(by_label) == {'jax:native:float32', 'jax:apply:float32', 'jax:bound:float32', 'torch:nchw:float32',
                             'torch:channels_last:float32'}   # apply: plain jax.jit(model.apply); bound:
    # bound_predict_fn, the weights compiled in
    for r in by_label.values():
        assert 'error' not in r, r.get('error')
        assert len(r['times']) == 2 and len(r['img_per_s_rounds']) == 2     # 2 rounds x 1 repeat
        assert r['img_per_s'] == pytest.approx(2 / r['median_s'])
        assert r['memory']['maxrss_mb'] > 0 and r['memory']['peak_added_mb'] >= 0
        # each worker as its users run it: JAX with this project's commands' policy, timm with glibc's
        assert r['malloc'] == ('retain (fast_cpu_defaults)' if r['label'].startswith('jax') else 'default')
        assert [len(f) for f in r['round_faults']] == [len(t) for t in r['round_times']]   # per iteration
        assert r['faults_max'] == max(f for fs in r['round_faults'] for f in fs) >= 0
    jax_res = by_label['jax:native:float32']
    best = max((by_label['torch:nchw:float32'], by_label['torch:channels_last:float32']),
               key=lambda r: r['img_per_s'])
    assert jax_res['timm_best'] == best['label']
    assert jax_res['ratio_vs_timm_best'] == pytest.approx(jax_res['img_per_s'] / best['img_per_s'])
    assert jax_res['compile_s'] > 0 and jax_res['memory']['xla_total_mb'] > 0
    assert jax_res['async_dispatch'] is False     # each call returns when its step has run, as torch's
    assert 'ratio_vs_timm_best' not in by_label['torch:nchw:float32']
    md = (out / 'bench.md').read_text()
    assert '| model | batch | mode | contender | img/s |' in md and 'vs timm best' in md
    assert md.count('| page faults, max |') == 1
    assert f'| jax:native:float32 | {jax_res["img_per_s"]:.1f} |' in md
    assert f'{jax_res["ratio_vs_timm_best"]:.2f}x' in md
    assert report['machine']['cpu_model'] in md
    if len(os.sched_getaffinity(0)) > 1:    # the core-placement probe ran before every turn
        for r in by_label.values():
            assert len(r['cross_core']) == 2 and all(p > 0 for p in r['cross_core'])
            assert 0 <= r['split_rounds'] <= 2
        assert '| split rounds |' in md


def test_plan_alternates_every_contender_of_a_group():
    args = bench_cli.build_parser().parse_args(
        ['--batches', '1,32', '--modes', 'infer,train', '--dtypes', 'float32', '--impls', 'shift,xla'])
    groups = bench.plan(args)
    assert [(g.batch, g.mode) for g in groups] == [(1, 'infer'), (1, 'train'), (32, 'infer'), (32, 'train')]
    infer = [c.label for c in groups[0].contenders]
    assert infer == ['jax:shift:float32', 'jax:xla:float32', 'jax:deploy:float32', 'jax:bound:float32',
                     'jax:bound-deploy:float32', 'jax:apply:float32', 'torch:nchw:float32', 'torch:channels_last:float32']
    train = [c.label for c in groups[1].contenders]
    assert not {'jax:deploy:float32', 'jax:apply:float32', 'jax:bound:float32'} & set(train)   # inference only


def test_plan_adds_xla_default_contenders_on_request():
    args = bench_cli.build_parser().parse_args(
        ['--batches', '1', '--modes', 'train', '--dtypes', 'float32', '--impls', 'shift',
         '--xla-options', 'project,default', '--no-torch'])
    (group,) = bench.plan(args)
    assert [c.label for c in group.contenders] == ['jax:shift:float32', 'jax:shift+xla-default:float32']


def test_plan_times_inference_chunkings_on_request_and_train_once():
    args = bench_cli.build_parser().parse_args(
        ['--batches', '8', '--dtypes', 'float32', '--impls', 'native', '--chunks', 'auto,0', '--no-torch'])
    infer, train = bench.plan(args)
    assert [c.label for c in infer.contenders] == [
        'jax:native:float32', 'jax:deploy:float32', 'jax:bound:float32', 'jax:bound-deploy:float32',
        'jax:native+chunk0:float32', 'jax:deploy+chunk0:float32', 'jax:bound+chunk0:float32',
        'jax:bound-deploy+chunk0:float32', 'jax:apply:float32']   # plain jax.jit(model.apply): once, it has no chunking
    assert [c.label for c in train.contenders] == ['jax:native:float32']   # a train step is never chunked


def test_ratios_use_the_best_timm_layout_of_the_same_dtype():
    res = [dict(framework='torch', label='torch:nchw:float32', img_per_s=50.0),
           dict(framework='torch', label='torch:channels_last:float32', img_per_s=80.0),
           dict(framework='torch', label='torch:nchw:bfloat16', img_per_s=20.0, dtype='bfloat16'),
           dict(framework='jax', label='jax:shift:float32', img_per_s=120.0),
           dict(framework='jax', label='jax:shift:bfloat16', img_per_s=30.0, dtype='bfloat16')]
    for r in res:
        r.setdefault('dtype', 'float32')
        r.update(model='m', batch=32, mode='infer')
    bench.add_ratios(res)
    assert res[3]['timm_best'] == 'torch:channels_last:float32' and res[3]['ratio_vs_timm_best'] == 1.5
    assert res[4]['timm_best'] == 'torch:nchw:bfloat16' and res[4]['ratio_vs_timm_best'] == 1.5


def test_split_rounds_are_counted_and_shared_rounds_give_their_own_ratio():
    jax_res = dict(framework='jax', label='jax:native:float32', img_per_s=100.0,
                   cross_core=[1.1, 3.2, 1.0], round_times=[[0.1, 0.12], [0.3, 0.3], [0.1, 0.1]])
    torch_res = dict(framework='torch', label='torch:channels_last:float32', img_per_s=50.0,
                     cross_core=[3.0, 1.2, 1.1], round_times=[[0.25, 0.25], [0.2, 0.2], [0.2, 0.2]])
    for r in (jax_res, torch_res):
        r.update(model='m', batch=10, mode='infer', dtype='float32')
        bench._shared_rounds(r, 10)
    assert jax_res['split_rounds'] == 1 and torch_res['split_rounds'] == 1
    assert jax_res['img_per_s_shared'] == pytest.approx(10 / 0.1)   # median of 0.1, 0.12, 0.1, 0.1
    assert torch_res['img_per_s_shared'] == pytest.approx(10 / 0.2)
    bench.add_ratios([jax_res, torch_res])
    assert jax_res['ratio_vs_timm_best'] == 2.0 and jax_res['ratio_vs_timm_best_shared'] == pytest.approx(2.0)
    unprobed = dict(cross_core=[None, None], round_times=[[0.1], [0.1]])
    bench._shared_rounds(unprobed, 10)
    assert 'split_rounds' not in unprobed and 'img_per_s_shared' not in unprobed


def test_cross_core_penalty_needs_two_cpus_and_restores_the_affinity():
    cpus = os.sched_getaffinity(0)
    if len(cpus) > 1:
        penalty = bench.cross_core_penalty(mb=1, reps=3)
        assert penalty is not None and penalty > 0
        assert os.sched_getaffinity(0) == cpus
    os.sched_setaffinity(0, {min(cpus)})
    try:
        assert bench.cross_core_penalty() is None
    finally:
        os.sched_setaffinity(0, cpus)


def _train_spec(framework, variant):
    return dict(framework=framework, variant=variant, dtype='float32', xla_options='project', model='ghostnet_050',
                batch=2, mode='train', size=32, threads=1, train_config=bench.DEFAULT_TRAIN_CONFIG)


def test_jax_train_contender_is_the_trainers_step(monkeypatch):
    """The JAX train contender runs train.steps.make_train_step, jitted by steps.jit_train_step
    (as the trainer jits it), on a create_state state with the recipe's optimizer and EMA. (The
    registered model on a two-row table: what is checked is how the step is made, not the model.)"""
    from ghostnetv2_jax.models import registry
    from ghostnetv2_jax.train.state import TrainState
    create = registry.create_model
    monkeypatch.setattr(registry, 'create_model', lambda name, **kw: create(
        name, cfgs=(((3, 16, 16, 0, 1),), ((3, 48, 24, 0.25, 2),)), **kw))
    made, jitted = [], []
    make, jit = steps.make_train_step, steps.jit_train_step
    monkeypatch.setattr(steps, 'make_train_step', lambda *a: made.append(a) or make(*a))
    monkeypatch.setattr(steps, 'jit_train_step', lambda *a, **k: jitted.append(k) or jit(*a, **k))
    runner = bench._JaxRunner(_train_spec('jax', 'native'))
    assert len(made) == 1 and jitted == [{'project_options': True}]
    config = made[0][3]
    assert (config.optimizer, config.batch_size, config.label_smoothing, config.ema_decay) == ('rmsprop_tf', 2, 0.1, 0.9999)
    state = runner.state
    assert isinstance(state, TrainState) and state.ema_params is not None
    n = sum(p.size for p in jax.tree.leaves(state.params))
    assert {leaf.shape for leaf in jax.tree.leaves(state.opt_state)} <= {(), (n,)}   # the flat optimizer
    kernel0 = np.array(state.params['conv_stem']['kernel'])
    ema_mean0 = np.array(state.ema_batch_stats['bn1']['mean'])
    runner.step()
    assert state.params['conv_stem']['kernel'].is_deleted()          # donated, updated in place
    new = runner.state
    assert int(new.step) == 1
    assert not np.array_equal(new.params['conv_stem']['kernel'], kernel0)
    assert not np.array_equal(new.ema_batch_stats['bn1']['mean'], ema_mean0)   # the EMA ran
    runner.step()
    assert int(runner.state.step) == 2 and runner.memory()['xla_total_mb'] > 0


def test_torch_train_contender_is_timms_recipe_step():
    """timm's equivalent: RMSpropTF without decay on biases/BN, label smoothing, ModelEmaV3."""
    pytest.importorskip('torch')
    import torch
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import RMSpropTF
    from timm.utils import ModelEmaV3
    runner = bench._TorchRunner(_train_spec('torch', 'channels_last'))
    assert isinstance(runner.opt, RMSpropTF) and isinstance(runner.ema, ModelEmaV3)
    assert isinstance(runner.loss_fn, LabelSmoothingCrossEntropy) and runner.loss_fn.smoothing == 0.1
    assert sorted(g['weight_decay'] for g in runner.opt.param_groups) == [0.0, 1e-5]
    group = runner.opt.param_groups[0]
    assert (group['alpha'], group['eps'], group['momentum']) == (0.9, 1e-3, 0.9)
    assert runner.ema.decay == 0.9999 and runner.model.training
    before = runner.model.conv_stem.weight.detach().clone()
    ema_before = runner.ema.module.bn1.running_mean.clone()
    runner.step()
    assert not torch.equal(runner.model.conv_stem.weight, before)
    assert not torch.equal(runner.ema.module.bn1.running_mean, ema_before)   # the EMA ran


@pytest.mark.parametrize('argv,message', [
    (['--models', 'ghostnet_999'], 'unknown model'),
    (['--modes', 'eval'], 'expected a comma-separated list'),
    (['--rounds', '0'], '--rounds must be >= 1'),
    (['--settle', '-1'], '--settle must be >= 0'),
    (['--xla-options', 'fast'], 'expected a comma-separated list'),
    (['--chunks', 'half'], "expected 'auto' or a non-negative integer"),
    (['--modes', 'pipeline', '--pipeline-images', '0'], '--pipeline-images must be >= 1'),
    (['--pipeline-sources', 'lmdb'], 'expected a comma-separated list'),
    (['--modes', 'train', '--train-config', '/nonexistent/recipe.py'], '--train-config: no such file'),
])
def test_bad_flags_exit_nonzero_with_one_line(argv, message, capsys, tmp_path):
    try:
        code = bench_cli.main(['--out', str(tmp_path / 'o')] + argv)
    except SystemExit as e:       # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not (tmp_path / 'o').exists()     # nothing is written for a rejected command


def test_a_dead_worker_is_a_failed_contender_not_a_crashed_run():
    worker = bench.Worker('torch', '')
    worker.proc.kill()                       # as the kernel's OOM killer would
    reply = worker.ask(cmd='run', n=1)
    assert reply['error'].startswith('worker exited with code -9') and 'out of memory' in reply['error']
    worker.close()


def test_report_is_written_after_every_group(tmp_path, monkeypatch):
    calls = []

    def fake_group(group, args, log):
        if calls:
            raise RuntimeError('second group dies')
        calls.append(group)
        common = dict(model=group.model, batch=group.batch, mode=group.mode, dtype='float32')
        return [dict(framework='jax', label='jax:shift:float32', img_per_s=30.0, median_s=1 / 30,
                     img_per_s_rounds=[30.0], **common),
                dict(framework='jax', label='jax:xla:float32', error='boom', **common),
                dict(framework='torch', label='torch:nchw:float32', img_per_s=20.0, median_s=0.05,
                     img_per_s_rounds=[20.0], **common)]
    monkeypatch.setattr(bench, 'run_group', fake_group)
    out = tmp_path / 'o'
    with pytest.raises(RuntimeError):
        bench_cli.main(['--batches', '1,2', '--modes', 'infer', '--dtypes', 'float32', '--out', str(out)])
    report = json.loads((out / 'bench.json').read_text())
    assert [r['batch'] for r in report['results']] == [1, 1, 1]    # the first group survived
    assert report['results'][0]['ratio_vs_timm_best'] == 1.5       # with its ratios
    md = (out / 'bench.md').read_text()
    assert 'failed: boom' in md and '1.50x' in md


def test_native_contender_is_skipped_off_cpu(monkeypatch):
    """On GPU/TPU the CPU-only 'native' depthwise contender is skipped, not failed."""
    spec = dict(framework='jax', variant='native', dtype='float32', xla_options='project',
                model='ghostnet_050', batch=1, mode='infer', size=32)
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    with pytest.raises(bench.Skip, match='CPU-only'):
        bench._JaxRunner(spec)

    class FakeWorker:
        def __init__(self, *args, **kwargs):
            self.closed = False

        def ask(self, **msg):
            return {'skipped': 'the native depthwise kernels are CPU-only (backend: gpu)'}

        def close(self):
            self.closed = True

    monkeypatch.setattr(bench, 'Worker', FakeWorker)
    args = bench_cli.build_parser().parse_args(['--impls', 'native', '--no-torch', '--modes', 'infer',
                                            '--batches', '1', '--no-deploy', '--settle', '0'])
    lines = []
    assert bench.run_group(bench.plan(args)[0], args, lines.append) == []
    assert any('skipped (the native depthwise kernels are CPU-only' in l for l in lines)


def test_malloc_env_adds_the_retain_tunables_and_keeps_the_callers():
    env = bench.malloc_env({'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0', 'A': '1'}, 'retain')
    assert env['GLIBC_TUNABLES'] == 'glibc.malloc.tcache_count=0:' + bench.RETAIN_TUNABLES
    assert env['A'] == '1'
    assert bench.malloc_env({}, 'retain')['GLIBC_TUNABLES'] == bench.RETAIN_TUNABLES
    assert 'GLIBC_TUNABLES' not in bench.malloc_env({}, 'default')


def test_deploy_mode_times_our_onnx_against_timms_in_each_runtime(tmp_path):
    """End to end at a tiny setting: in each runtime our export and timm's, the same logits,
    and the ratio over timm's file in the same runtime (not over timm's eager contender)."""
    for module in ('onnx', 'onnxruntime', 'openvino', 'torch', 'timm'):
        pytest.importorskip(module)
    out = tmp_path / 'bench'
    argv = ['--models', 'ghostnet_050', '--batches', '2', '--size', '32', '--modes', 'deploy',
            '--rounds', '1', '--repeats', '2', '--warmup', '0', '--settle', '0', '--out', str(out)]
    assert bench_cli.main(argv) == 0
    report = json.loads((out / 'bench.json').read_text())
    by_label = {r['label']: r for r in report['results']}
    assert list(by_label) == ['jax:bound-deploy:float32'] + [f'{rt}:{v}:float32' for rt in bench.RUNTIMES
                                                             for v in ('ours', 'timm')]
    md = (out / 'bench.md').read_text()
    # this project's deploy form (bound_predict_fn, BN folded) in the same rounds, over the fastest runtime
    jax_res = by_label.pop('jax:bound-deploy:float32')
    fastest = max(by_label.values(), key=lambda r: r['img_per_s'])
    assert jax_res['runtime_best'] == fastest['label'] and 'ratio_vs_timm_best' not in jax_res
    assert jax_res['ratio_vs_runtime_best'] == pytest.approx(jax_res['img_per_s'] / fastest['img_per_s'])
    assert f'{jax_res["ratio_vs_runtime_best"]:.2f}x {fastest["label"]}' in md
    for rt in bench.RUNTIMES:
        ours, timm = by_label[f'{rt}:ours:float32'], by_label[f'{rt}:timm:float32']
        for r in (ours, timm):
            assert 'error' not in r, r.get('error')
            assert r['mode'] == 'deploy' and len(r['times']) == 2 and r['runtime'].startswith(rt)
            assert 'logits' not in r                 # compared in the parent, not stored
        assert ours['timm_best'] == timm['label']
        assert ours['ratio_vs_timm_best'] == pytest.approx(ours['img_per_s'] / timm['img_per_s'])
        assert ours['logits_vs_timm'] <= bench.DEPLOY_TOLERANCE
        assert 'ratio_vs_timm_best' not in timm
        assert ours['onnx_ops']['Conv'] == timm['onnx_ops']['Conv']    # BN folded in both: convs only
        assert 'BatchNormalization' not in ours['onnx_ops']
        assert f'| {ours["label"]} | {ours["img_per_s"]:.1f} |' in md
        assert f'{ours["ratio_vs_timm_best"]:.2f}x' in md
    assert by_label['openvino:ours:float32']['INFERENCE_PRECISION_HINT'] == 'f32'
    assert "logits vs timm's ONNX" in md


def test_deploy_mode_is_opt_in_and_follows_runtimes_and_torch():
    parse = bench_cli.build_parser().parse_args
    assert parse([]).modes == ['infer', 'train']
    (group,) = bench.plan(parse(['--batches', '1', '--modes', 'deploy', '--dtypes', 'bfloat16']))
    assert [c.label for c in group.contenders] == [
        'jax:bound-deploy:float32', 'onnxruntime:ours:float32', 'onnxruntime:timm:float32', 'openvino:ours:float32',
        'openvino:timm:float32']
    (group,) = bench.plan(parse(['--batches', '1', '--modes', 'deploy', '--runtimes', 'openvino', '--no-torch',
                                 '--no-bound']))
    assert [c.label for c in group.contenders] == ['openvino:ours:float32']


def test_deploy_ratios_are_over_timms_onnx_in_the_same_runtime():
    res = [dict(framework='torch', variant='channels_last', label='torch:channels_last:float32', img_per_s=80.0),
           dict(framework='onnxruntime', variant='timm', label='onnxruntime:timm:float32', img_per_s=100.0),
           dict(framework='onnxruntime', variant='ours', label='onnxruntime:ours:float32', img_per_s=110.0),
           dict(framework='openvino', variant='timm', label='openvino:timm:float32', img_per_s=200.0),
           dict(framework='openvino', variant='ours', label='openvino:ours:float32', img_per_s=190.0)]
    for r in res:
        r.update(model='m', batch=32, mode='deploy', dtype='float32')
    bench.add_ratios(res)
    assert res[2]['timm_best'] == 'onnxruntime:timm:float32' and res[2]['ratio_vs_timm_best'] == pytest.approx(1.1)
    assert res[4]['timm_best'] == 'openvino:timm:float32' and res[4]['ratio_vs_timm_best'] == pytest.approx(0.95)
    assert all('ratio_vs_timm_best' not in r for r in res[:2] + res[3:4])


def test_deploy_logits_are_compared_per_runtime():
    c = bench.Contender('onnxruntime', 'ours', 'float32')
    ref = [[1.0, -2.0], [0.5, 4.0]]
    results = [dict(label=c.label), dict(label='onnxruntime:timm:float32')]
    lines = []
    bench.compare_logits(results, {c: [[1.0, -2.0], [0.5, 4.0 + 4e-3]],
                                   bench.dataclasses.replace(c, variant='timm'): ref}, lines.append)
    assert results[0]['logits_vs_timm'] == pytest.approx(1e-3) and 'logits_vs_timm' not in results[1]
    assert 'NOT the same' in lines[0]


def test_deploy_contender_without_its_runtime_is_skipped(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'openvino', None)      # import openvino raises ImportError
    spec = dict(framework='openvino', variant='ours', dtype='float32', model='ghostnet_050', batch=1, size=32,
                threads=1)
    with pytest.raises(bench.Skip, match='^openvino is not installed'):
        bench._DeployRunner(spec)


# ----------------------------------------------------------------------------- the pipeline mode
from ghostnetv2_jax import bench_pipeline  # noqa: E402


def _jpeg_tables(quality):
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new('RGB', (16, 16)).save(buf, 'JPEG', quality=quality)
    return Image.open(buf).quantization


def test_benchmark_folder_is_deterministic_photographs_of_the_stated_sizes(tmp_path):
    from PIL import Image
    manifest = bench_pipeline.generate_folder(str(tmp_path / 'a'), images=16, seed=3)
    assert manifest['images_per_split'] == 16 and 'grace_hopper.jpg' in manifest['derived_from']
    bench_pipeline.generate_folder(str(tmp_path / 'b'), images=8, seed=3)     # a smaller folder: a prefix
    bench_pipeline.generate_folder(str(tmp_path / 'c'), images=8, seed=4)
    files = sorted(p.relative_to(tmp_path / 'a') for p in (tmp_path / 'a').rglob('*.jpg'))
    assert len(files) == 32 and {p.parts[0] for p in files} == set(bench_pipeline.SPLITS)
    assert {p.parts[1] for p in files} == {f'c{k}' for k in range(bench_pipeline.CLASSES)}
    quality90 = _jpeg_tables(90)
    for rel in files:
        with Image.open(tmp_path / 'a' / rel) as image:
            short, long = sorted(image.size)
            assert image.format == 'JPEG' and image.mode == 'RGB'
            assert 300 <= short <= 500 and long <= 1.5 * short + 1
            assert image.quantization == quality90
    for split in bench_pipeline.SPLITS:
        for i in range(8):        # image i depends on (seed, split, i) only
            rel = os.path.join(split, f'c{i % 8}', f'{i:05d}.jpg')
            first = (tmp_path / 'a' / rel).read_bytes()
            assert (tmp_path / 'b' / rel).read_bytes() == first
            assert (tmp_path / 'c' / rel).read_bytes() != first        # another seed
    stats = bench_pipeline.folder_stats(str(tmp_path / 'a'))
    for split in bench_pipeline.SPLITS:
        paths = list((tmp_path / 'a' / split).rglob('*.jpg'))
        sizes = [p.stat().st_size for p in paths]
        pixels = sum(np.prod(Image.open(p).size) for p in paths)
        assert stats[split]['images'] == 16
        assert stats[split]['mean_kib'] == pytest.approx(np.mean(sizes) / 1024)
        assert stats[split]['bits_per_pixel'] == pytest.approx(8 * sum(sizes) / pixels)
        assert 300 <= min(stats[split]['mean_width'], stats[split]['mean_height']) <= 750


def test_benchmark_folder_is_reused_or_refused(tmp_path):
    root = str(tmp_path / 'cache')
    assert bench_pipeline.prepare_folder(root, images=8)['images_per_split'] == 8
    mtime = os.path.getmtime(os.path.join(root, bench_pipeline.MANIFEST))
    assert bench_pipeline.prepare_folder(root, images=8)['images_per_split'] == 8      # reused, not rewritten
    assert os.path.getmtime(os.path.join(root, bench_pipeline.MANIFEST)) == mtime
    with pytest.raises(bench_pipeline.PipelineDataError, match='generated folder of 8 images per split'):
        bench_pipeline.prepare_folder(root, images=16)
    users = tmp_path / 'users'
    for split in bench_pipeline.SPLITS:
        (users / split / 'cat').mkdir(parents=True)
    assert bench_pipeline.prepare_folder(str(users)) is None      # a user's folder, used as it is
    (tmp_path / 'other' / 'x').mkdir(parents=True)
    with pytest.raises(bench_pipeline.PipelineDataError, match='neither empty nor an image folder'):
        bench_pipeline.prepare_folder(str(tmp_path / 'other'))


def test_benchmark_images_need_matplotlib_and_say_so_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    with pytest.raises(bench_pipeline.PipelineDataError) as err:
        bench_pipeline.prepare_folder(str(tmp_path / 'new'))
    assert 'matplotlib is not installed' in str(err.value) and '\n' not in str(err.value)


def test_tfds_records_hold_the_folders_jpeg_bytes_and_our_pipeline_reads_them(tmp_path, monkeypatch):
    from ghostnetv2_jax import process
    monkeypatch.setattr(process, 'fast_cpu_defaults', lambda: False)   # a worker's setting, not this process's
    root = str(tmp_path / 'f')
    bench_pipeline.generate_folder(root, images=8)
    data_dir = bench_pipeline.prepare_tfds(root)
    assert bench_pipeline.prepare_tfds(root) == data_dir            # built once
    from ghostnetv2_jax.data import sources
    source = sources.tfds_dataset(bench_pipeline.TFDS_NAME, 'validation', data_dir)
    assert source.num_examples == 8 and source.num_classes == bench_pipeline.CLASSES
    files = {p.read_bytes() for p in (tmp_path / 'f' / 'validation').rglob('*.jpg')}
    assert {r['image'].numpy() for r in source.records(0, 1)} == files
    runner = bench_pipeline.PipelineRunner(dict(framework='ours', variant='train', source='tfds', batch=4,
                                                size=32, cores=2, root=root, tfds_dir=data_dir))
    reply = runner.run_round(3, skip=1)
    assert reply['images'] == 12 and reply['times'][0] > 0 and runner.describe()['epoch_batches'] == 2


def test_pipeline_mode_is_opt_in_and_plans_ours_and_timms_per_source_once_per_batch():
    parse = bench_cli.build_parser().parse_args
    assert 'pipeline' not in parse([]).modes
    groups = bench.plan(parse(['--models', 'ghostnet_050,ghostnetv2_100', '--batches', '4,64', '--modes',
                               'infer,pipeline', '--dtypes', 'float32', '--impls', 'native', '--no-deploy']))
    assert [(g.model, g.batch, g.mode) for g in groups] == [
        ('ghostnet_050', 4, 'infer'), ('ghostnet_050', 64, 'infer'), ('ghostnetv2_100', 4, 'infer'),
        ('ghostnetv2_100', 64, 'infer'), ('-', 4, 'pipeline'), ('-', 64, 'pipeline')]
    assert [c.label for c in groups[-1].contenders] == [
        'ours:train:folder', 'timm:train:folder', 'ours:eval:folder', 'timm:eval:folder',
        'ours:train:tfds', 'timm:train:tfds', 'ours:eval:tfds', 'timm:eval:tfds']
    (group,) = bench.plan(parse(['--batches', '64', '--modes', 'pipeline', '--pipeline-sources', 'folder',
                                 '--no-torch']))
    assert [c.label for c in group.contenders] == ['ours:train:folder', 'ours:eval:folder']


def test_pipeline_ratios_are_per_core_over_timms_loader_on_the_same_source():
    res = [dict(framework='timm', variant='train', source='folder', label='timm:train:folder', img_per_s=200.0),
           dict(framework='ours', variant='train', source='folder', label='ours:train:folder', img_per_s=300.0),
           dict(framework='timm', variant='eval', source='folder', label='timm:eval:folder', img_per_s=800.0),
           dict(framework='ours', variant='eval', source='folder', label='ours:eval:folder', img_per_s=600.0),
           dict(framework='ours', variant='train', source='tfds', label='ours:train:tfds', img_per_s=250.0)]
    for r in res:
        r.update(model='-', batch=64, mode='pipeline', dtype='float32', cores=4)
    bench.add_ratios(res)
    ours_train, ours_eval, ours_tfds = res[1], res[3], res[4]
    assert ours_train['img_per_s_per_core'] == 75.0 and ours_train['cores_per_1000_img_s'] == pytest.approx(1000 / 75)
    assert res[0]['img_per_s_per_core'] == 50.0 and 'ratio_per_core_vs_timm' not in res[0]
    assert ours_train['timm_best'] == 'timm:train:folder' and ours_train['ratio_per_core_vs_timm'] == 1.5
    assert ours_eval['timm_best'] == 'timm:eval:folder' and ours_eval['ratio_per_core_vs_timm'] == 0.75
    assert 'ratio_per_core_vs_timm' not in ours_tfds      # no timm loader on the records here


def test_pipeline_smoke_run_reports_per_core_rates_and_the_jpegs(tmp_path):
    """End to end at a tiny setting: a generated 16-image folder in a temporary directory (removed
    at the end), our train and eval pipelines and timm's loader, per-core figures and the ratios."""
    out = tmp_path / 'bench'
    argv = ['--modes', 'pipeline', '--batches', '4', '--size', '64', '--pipeline-images', '16',
            '--pipeline-sources', 'folder', '--rounds', '1', '--repeats', '2', '--warmup', '0', '--settle', '0',
            '--pipeline-profile', '0.05', '--out', str(out)]
    assert bench_cli.main(argv) == 0
    report = json.loads((out / 'bench.json').read_text())
    by_label = {r['label']: r for r in report['results']}
    has_timm = all(m in sys.modules or importlib.util.find_spec(m) for m in ('torch', 'timm'))
    expected = ['ours:train:folder', 'timm:train:folder', 'ours:eval:folder', 'timm:eval:folder']
    assert list(by_label) == (expected if has_timm else expected[::2])
    cores = len(os.sched_getaffinity(0))
    for r in by_label.values():
        assert 'error' not in r, r.get('error')
        assert r['cores'] == cores and len(r['times']) == 1 and r['batch'] == 4
        assert r['img_per_s_per_core'] == pytest.approx(r['img_per_s'] / cores)
        assert r['cores_per_1000_img_s'] == pytest.approx(1000 / r['img_per_s_per_core'])
        assert r['split_images'] == 16 and r['epoch_batches'] == 4 and len(r['round_restarts']) == 1
    assert by_label['ours:train:folder']['malloc'] == 'retain (fast_cpu_defaults)'
    data = report['pipeline']
    assert data['temporary'] and not os.path.exists(data['root'])
    assert data['jpeg']['train']['images'] == data['jpeg']['validation']['images'] == 16
    md = (out / 'bench.md').read_text()
    assert '## Input pipeline' in md and 'derived from one photograph' in md and 'bits per pixel' in md
    assert '| page faults, max |' not in md           # no model table in a pipeline-only run
    stages = [row['stage'] for row in data['profile']]
    assert stages == list(bench_pipeline.PROFILE_STAGES) and all(row['ms_per_image'] > 0 for row in data['profile'])
    assert 'Where the time goes' in md and '| randaugment |' in md
    for r in by_label.values():
        assert f'| 4 | {r["label"]} | {r["img_per_s"]:.1f} | {r["img_per_s_per_core"]:.1f} |' in md
    if has_timm:
        for variant in ('train', 'eval'):
            ours, timm = by_label[f'ours:{variant}:folder'], by_label[f'timm:{variant}:folder']
            per_core = ours['img_per_s_per_core'] / timm['img_per_s_per_core']
            assert ours['ratio_per_core_vs_timm'] == pytest.approx(per_core)
            assert f'{ours["ratio_per_core_vs_timm"]:.2f}x' in md
        assert by_label['timm:train:folder']['multi_epochs_loader'] is True


def test_timms_pipeline_without_timm_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, 'timm', None)
    with pytest.raises(bench.Skip, match="^timm is not installed \\(timm's loader\\)"):
        bench._pipeline_runner(dict(framework='timm', variant='train', source='folder'))


def test_a_frozen_worker_is_stopped_between_commands_and_exits_when_closed():
    worker = bench.Worker('timm', '', freeze=True)
    def state():
        with open(f'/proc/{worker.proc.pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    assert worker.ask(cmd='noop') == {}
    for _ in range(100):          # the signal is delivered asynchronously
        if state() == 'T':
            break
        time.sleep(0.02)
    assert state() == 'T'                                        # stopped
    assert worker.ask(cmd='noop') == {}                          # continued for the command
    worker.close()
    assert worker.proc.returncode == 0
