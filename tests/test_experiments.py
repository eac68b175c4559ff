"""experiments/: a demo-scale sweep at a tiny budget (CSV, report, per-run metrics), its resume,
the ImageNet launch lines read back by the train CLI's own flag parser, bad input, and the costs
table on a tiny model."""
import csv
import json
import math
import pathlib
import shlex
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # experiments/ is a folder of the checkout, not an installed package
    sys.path.insert(0, str(REPO))

from experiments import checkouts_ab, costs, report, sweep, thunks  # noqa: E402

TINY = str(REPO / 'configs' / 'tiny.py')
ATTENTION = str(REPO / 'experiments' / 'sweeps' / 'attention.py')
ABLATIONS = str(REPO / 'experiments' / 'sweeps' / 'dfc_ablations.py')
DEMO_ARGS = ['--sweep', ATTENTION, '--scale', 'demo', '--base', TINY, '--variants', 'dfc,none', '--seeds', '0,1',
             '--config.num_train_steps=2', '--latency-batch', '2', '--latency-rounds', '2']


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error:')]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """The attention sweep's dfc and none variants, two seeds, 2 train steps of the tiny model."""
    out = tmp_path_factory.mktemp('sweep') / 'attention'
    assert sweep.main([*DEMO_ARGS, '--out', str(out)]) == 0
    return out


def test_demo_sweep_writes_a_row_per_run_the_latencies_and_the_report(demo):
    rows = read_csv(demo / 'results.csv')
    assert tuple(rows[0]) == sweep.COLUMNS
    assert [(r['variant'], r['seed']) for r in rows] == [('dfc', '0'), ('none', '0'), ('dfc', '1'), ('none', '1')]
    assert json.loads(rows[1]['overrides']) == {'model_overrides.attention': 'none'}
    assert json.loads(rows[0]['settings']) == {'num_train_steps': 2}
    assert {r['sweep'] for r in rows} == {'spread_attention'} and {r['base'] for r in rows} == {'configs/tiny.py'}
    for r in rows:
        assert 0 <= float(r['top1']) <= 100 and 0 <= float(r['ema_top1']) <= 100
        assert r['latency_ms'] == '' and r['image_size'] == '16' and r['num_classes'] == '10'   # timed after the runs
        assert float(r['wall_s']) > 0 and r['version']
        records = [json.loads(line) for line in (demo / r['metrics_file']).read_text().splitlines()]
        assert records[-1]['step'] == 2 and records[-1]['eval/top1'] == pytest.approx(float(r['top1']), abs=1e-4)
    dfc, none = rows[0], rows[1]
    assert int(dfc['params']) > int(none['params']) and int(dfc['macs']) > int(none['macs'])   # DFC's branch
    latency = read_csv(demo / 'latency.csv')
    assert [r['variant'] for r in latency] == ['dfc', 'none']
    assert all(float(r['latency_ms']) > 0 and r['latency_batch'] == '2' and r['rounds'] == '2' for r in latency)
    assert not (demo / 'runs').exists()   # finished workdirs are removed
    md = (demo / 'results.md').read_text()
    assert '| dfc |' in md and '| none |' in md and 'paired (2 seeds)' not in md
    assert 'interleaved rounds' in md and 'timed after the sweep' in md
    assert 'Stability of `dfc` over 2 seeds' in md and 'First evaluation 5 points above chance' in md
    assert f'Command: `python experiments/sweep.py --sweep experiments/sweeps/attention.py --out {demo}`' in md
    assert 'Wall time of the 4 runs: ' in md   # beside the table, with the command that resumes the sweep
    diff = report.differences(report.summarize(rows))[0]
    assert diff.method == 'paired (2 seeds)' and f'{diff.mean:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}]' in md
    assert (demo / 'results.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_rerun_skips_finished_runs_and_report_only_rewrites(demo, monkeypatch, capsys):
    def no_training(*args):
        raise AssertionError('a finished run was trained again')
    monkeypatch.setattr(sweep, 'train', no_training)
    monkeypatch.setattr(sweep, 'measure_model', no_training)
    (demo / 'results.md').unlink()
    assert sweep.main([*DEMO_ARGS, '--out', str(demo)]) == 0
    monkeypatch.setattr(sweep, 'measure_latencies', no_training)
    assert '4 of 4 runs already' in capsys.readouterr().out
    assert len(read_csv(demo / 'results.csv')) == 4 and (demo / 'results.md').exists()
    (demo / 'results.png').unlink()
    assert sweep.main(['--out', str(demo), '--report-only']) == 0
    assert (demo / 'results.png').exists()


def test_report_calls_a_difference_significant_only_where_its_interval_excludes_zero(tmp_path):
    """Means and sample stds per variant; the difference to the first variant with its 95%
    interval, paired by seed (t with n - 1 degrees of freedom), or Welch's without shared seeds."""
    rows = [dict(sweep='s', variant=v, seed=s + offset, overrides='{}', settings='{}', base='b', params=10,
                 macs=2_000_000, image_size=40, top1=t, ema_top1='', top5='', latency_ms='', latency_batch='',
                 wall_s=3, metrics_file='', version='v', finished='')
            for v, tops, offset in (('ref', (90, 92), 0), ('close', (90.5, 91.5), 0), ('far', (80, 81), 0),
                                    ('other_seeds', (70, 72), 10))
            for s, t in enumerate(tops)]
    path = tmp_path / 'results.csv'
    for row in rows:
        sweep.append_row(path, row)
    md, png = report.write_report(path, tmp_path)
    text = md.read_text()
    half = 12.7062 * math.sqrt(0.5) / math.sqrt(2)           # t(0.975, 1) x sd of the paired differences / sqrt(2)
    assert '| ref | `{}` | 2 | 91.00 ± 1.41 | reference |' in text
    assert f'| close | `{{}}` | 2 | 91.00 ± 0.71 | +0.00 [{-half:+.2f}, {half:+.2f}] | within noise |' in text
    assert f'| far | `{{}}` | 2 | 80.50 ± 0.71 | -10.50 [{-10.5 - half:+.2f}, {-10.5 + half:+.2f}] | significant |' in text
    welch = report.difference(report.summarize(rows)[0], report.summarize(rows)[3])
    assert welch.method == 'Welch' and welch.mean == pytest.approx(-20.0) and welch.verdict == 'significant'
    assert welch.high == pytest.approx(-20.0 + 4.3027 * math.sqrt(2), abs=1e-3)   # t(0.975, 2 df)
    assert 'Significant: far' in text and 'Within noise: close' in text
    assert png.exists()


def _parse_with_cli(line: str):
    """The config the train command builds from a launch line (its own config loader), as a dict."""
    from ghostnetv2_jax.cli import train
    from ghostnetv2_jax.cli.config import load_config
    argv = shlex.split(line)
    assert argv[:4] == ['python', '-m', 'ghostnetv2_jax', 'train']
    args, overrides = train.build_parser().parse_known_args(argv[4:])
    return load_config(args.config, overrides).to_dict()


def test_imagenet_scale_writes_launch_lines_the_cli_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)   # the lines run from the repository root
    out = tmp_path / 'launch'
    assert sweep.main(['--sweep', ABLATIONS, '--scale', 'imagenet', '--out', str(out), '--seeds', '0,1',
                       '--workdir-root', 'gs://bucket/abl/', '--config.data.data_dir=gs://bucket/tfds']) == 0
    lines = [line for line in (out / 'launch.sh').read_text().splitlines() if line.startswith('python')]
    entries = json.loads((out / 'launch.json').read_text())
    spec = sweep.load_sweep(ABLATIONS)
    assert len(lines) == len(entries) == 2 * len(spec.variants)
    for line, entry in zip(lines, entries):
        assert f'--workdir=gs://bucket/abl/{entry["variant"]}/seed{entry["seed"]}' in line
        run = sweep.Run(entry['variant'], entry['seed'], spec.variants[entry['variant']])
        assert sweep.normalize(entry['overrides']) == run.overrides
        expected = sweep.build_config(spec.imagenet_base, {**spec.settings, 'data.data_dir': 'gs://bucket/tfds'}, run)
        assert _parse_with_cli(line) == expected.to_dict(), line


def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys):
    assert sweep.main(['--sweep', str(tmp_path / 'nope.py')]) == 1
    assert 'no such sweep file' in error_line(capsys)
    bad = tmp_path / 'bad.py'
    bad.write_text("def get_sweep():\n    return dict(base='configs/tiny.py', seeds=(0,),\n"
                   "                variants=(('x', {'model_overrides.attentio': 'se'}),))\n")
    assert sweep.main(['--sweep', str(bad), '--out', str(tmp_path / 'o')]) == 1
    assert error_line(capsys) == "error: variant 'x': unknown config field model_overrides.attentio"
    bad.write_text(bad.read_text().replace("'model_overrides.attentio': 'se'",
                                           "'model_overrides.attention_kwargs': {'kernal': (3, 3)}"))
    assert sweep.main(['--sweep', str(bad), '--out', str(tmp_path / 'o')]) == 1   # before any training
    assert "error: variant 'x':" in error_line(capsys) and not (tmp_path / 'o' / 'results.csv').exists()
    assert sweep.main(['--sweep', ATTENTION, '--variants', 'dfc,sse', '--out', str(tmp_path / 'o')]) == 1
    assert "unknown variant 'sse'" in error_line(capsys)
    assert sweep.main(['--sweep', ATTENTION, '--scale', 'imagenet', '--config.no_such=1',
                       '--out', str(tmp_path / 'o')]) == 1
    assert error_line(capsys) == 'error: --config: unknown config field no_such'
    assert not list((tmp_path / 'o').glob('launch*'))


def test_verdicts():
    assert costs.verdict(1.2, 'slower', 0.05) == 'yes' and costs.verdict(0.8, 'slower', 0.05) == 'no'
    assert costs.verdict(0.9, 'faster', 0.05) == 'yes' and costs.verdict(1.03, 'faster', 0.05) == 'tie (within 5%)'
    assert costs.verdict(1.04, 'similar', 0.05) == 'yes' and costs.verdict(1.3, 'similar', 0.05) == 'no'
    assert costs.verdict(2.0, None, 0.05) == '-' and costs.verdict(math.nan, 'faster', 0.05) == '-'


def test_costs_table_on_a_tiny_model(tmp_path):
    tiny = sweep.load_python(TINY, 'get_config', 'config').model_overrides
    overrides = json.dumps({'cfgs': tiny.cfgs, 'attention_blocks': tiny.attention_blocks})
    assert costs.main(['--overrides', overrides, '--size', '16', '--rounds', '2', '--paths', 'unfused',
                       '--out', str(tmp_path)]) == 0
    rows = read_csv(tmp_path / 'costs.csv')
    assert [r['variant'] for r in rows] == [v.name for v in costs.VARIANTS]
    by_name = {r['variant']: r for r in rows}
    assert all(float(r['ms_unfused']) > 0 and r['ms_fused'] == 'nan' for r in rows)
    assert by_name['gate_after_upsample']['agrees_unfused'] in ('yes', 'no', 'tie (within 5%)')
    assert by_name['se']['agrees_unfused'] == '-' and by_name['bicubic']['reference'] == 'bilinear'
    assert int(by_name['none']['macs']) < int(by_name['released']['macs'])
    assert json.loads(by_name['v1_matched']['overrides'])['width'] >= 1.0
    md = (tmp_path / 'costs.md').read_text()
    assert all(f'| {v.name} |' in md for v in costs.VARIANTS) and 'Table 10' in md


def test_thunk_profile_groups_a_calls_thunks_by_kind_and_rejects_unknown_forms(tmp_path, capsys):
    out = tmp_path / 'thunks.md'
    assert thunks.main(['--size', '64', '--forms', 'eval,bound', '--rounds', '1', '--calls', '2', '--out', str(out)]) == 0
    md = out.read_text()
    rows = [line.split(' | ') for line in md.splitlines() if line.startswith('| ') and not line.startswith('| kind')]
    kinds = {r[0].lstrip('| ') for r in rows}
    assert 'native op gnv2_stem_conv' in kinds and any(k.startswith('XLA ') for k in kinds)
    assert all(int(r[1]) > 0 and float(r[2]) >= 0 for r in rows if not r[0].endswith('(the rest)'))
    assert '**eval** (643 arrays as arguments)' in md and 'ms a call' in md   # 642 variables, the images
    assert '**bound** (1 array as arguments)' in md   # bound_predict_fn: the images alone
    assert thunks.main(['--forms', 'eval,deploy']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: --forms')


def test_checkouts_ab_times_both_forms_of_two_checkouts_and_rejects_a_folder_that_is_not_one(tmp_path, capsys):
    args = [str(REPO), str(REPO), '--model', 'ghostnet_050', '--size', '32', '--rounds', '2', '--calls', '1']
    assert checkouts_ab.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith('ghostnet_050, batch 1, 32x32') and '2 alternating rounds of 1 calls' in lines[0]
    assert [line.split(':')[0] for line in lines[1:]] == ['eval', 'folded']
    assert all('A / B per round' in line and 'quartiles' in line for line in lines[1:])
    assert checkouts_ab.main([str(REPO), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f'error: {tmp_path} is not a checkout of this project'


def test_a_run_leaves_chance_at_its_first_evaluation_clear_of_it():
    curve = [{'step': 10, 'train/loss': 2.3}, {'step': 128, 'eval/top1': 14.9}, {'step': 256, 'eval/top1': 15.2},
             {'step': 1280, 'eval/top1': 90.0}]
    assert report.left_chance(curve, 10) == (256, 0.2)     # chance 10%: 15% or more has left it
    assert math.isnan(report.left_chance(curve[:2], 10)[0])


def test_the_first_training_window_is_the_one_after_step_one():
    curve = [{'step': 1, 'train/top1': 0.5}, {'step': 128, 'train/top1': 0.152}, {'step': 128, 'eval/top1': 11.6},
             {'step': 256, 'train/top1': 0.4}, {'step': 256, 'eval/top1': 55.0}]
    first_eval, first_train = report.first_points(curve)
    assert first_eval == {'step': 128, 'eval/top1': 11.6} and first_train == {'step': 128, 'train/top1': 0.152}
    assert report.first_points([{'step': 1, 'train/top1': 0.5}]) == (None, None)


def _row(variant, seed, top1, metrics_file=''):
    return dict(sweep='s', variant=variant, seed=seed, overrides='{}', settings='{}', base='b',
                params=1000 if variant != 'bigger' else 1100, macs=2_000_000, image_size=96, num_classes=10,
                top1=top1, ema_top1='', top5='', latency_ms='', latency_batch='', wall_s=3,
                metrics_file=metrics_file, version='v', finished='')


def test_comparisons_with_the_paper_say_only_what_the_intervals_allow():
    """Against a claim: agrees or contradicts only where the 95% interval excludes 0; within noise
    it cannot tell (a claimed difference) or is consistent (a claimed similarity); one seed is not
    decidable, a variant the results lack is not run yet."""
    tops = {'ref': (90, 91, 92), 'agrees': (85, 86.5, 87), 'contradicts': (95, 96.5, 97),
            'cannot_tell': (88, 93, 90), 'consistent': (90.5, 90, 92.5), 'unlike': (80, 81.5, 82),
            'bigger': (85, 86.5, 87), 'one_seed': (95,)}
    rows = [_row(v, s, t) for v, ts in tops.items() for s, t in enumerate(ts)]
    summaries = report.summarize(rows)
    claims = {name: report.Claim('Table X', f'claim about {name}', expect) for name, expect in
              (('agrees', 'lower'), ('contradicts', 'lower'), ('cannot_tell', 'lower'), ('consistent', 'similar'),
               ('unlike', 'similar'), ('one_seed', 'higher'), ('missing', 'lower'))}
    order = ['ref', 'missing', *list(tops)[1:]]
    comparisons = report.compare(summaries, 'ref', claims, order)
    outcomes = {c.variant: c.outcome for c in comparisons}
    assert outcomes == {'missing': report.NOT_RUN, 'agrees': report.AGREES, 'contradicts': report.CONTRADICTS,
                        'cannot_tell': report.CANNOT_TELL, 'consistent': report.CONSISTENT,
                        'unlike': report.CONTRADICTS, 'bigger': 'significant', 'one_seed': report.NOT_DECIDABLE}
    assert [c.variant for c in comparisons] == order[1:]

    table = report.comparison_table(comparisons, 'ref', summaries, seeds=(0, 1, 2))
    assert '| **ref** | 3 of 3 | 1,000 | 2.00M | 91.00 ± 1.00 | reference |' in table
    assert '| bigger | 3 of 3 | 1,100 (+10.0%) | 2.00M (+0.0%) |' in table
    assert '| one_seed | 1 of 3 |' in table and '+4.00 (one seed) | Table X: claim about one_seed | one seed: not decidable |' in table
    assert '| missing | 0 of 3 | - | - | - | - | Table X: claim about missing | not run yet |' in table
    assert 'cannot tell (within noise)' in table and 'agrees (significant)' in table

    text = report.conclusions(comparisons, 'ref')
    assert '6 of 8 comparisons are decidable' in text
    d = {c.variant: c.difference for c in comparisons}['agrees']
    assert f'(agrees): `agrees` {d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}].' in text
    assert '(contradicts): `contradicts`' in text and '`unlike`' in text.split('(contradicts): ')[1].split('\n')[0]
    assert '- Not decidable (no interval): `one_seed` (+4.00 on its one seed).' in text
    assert '- Not run yet: `missing`.' in text
    assert 'about 0.3 significant by chance' in text

    alone = report.compare([s for s in summaries if s.variant != 'ref'], 'ref', claims, order)
    assert {c.outcome for c in alone} == {report.NOT_RUN, report.NOT_DECIDABLE}
    assert '`ref` not run yet: not decidable' in report.comparison_table(alone, 'ref', summaries[1:])
    assert '`agrees` (`ref` not run yet)' in report.conclusions(alone, 'ref')


def test_the_notebooks_read_a_sweep_missing_or_partial_and_draw_it(tmp_path):
    from matplotlib.figure import Figure
    assert report.read_sweep(tmp_path / 'not_run') == ([], [])
    (tmp_path / 'metrics').mkdir()
    for seed, steps in ((0, (128, 256, 384)), (1, (128, 256))):        # seed 1 stopped early
        (tmp_path / 'metrics' / f'seed{seed}.jsonl').write_text('\n'.join(
            json.dumps({'step': s, 'eval/top1': s / 10 + seed}) for s in steps) + '\n{"step": 1, "train/loss": 2.3}\n')
    for row in (_row('ref', 0, 90, 'metrics/seed0.jsonl'), _row('ref', 1, 91, 'metrics/seed1.jsonl'),
                _row('other', 0, 89, 'metrics/gone.jsonl')):
        sweep.append_row(tmp_path / 'results.csv', row)
    rows, summaries = report.read_sweep(tmp_path)
    assert [s.variant for s in summaries] == ['ref', 'other']
    assert report.curves(tmp_path, rows, 'ref') == ([128, 256], [[12.8, 25.6], [13.8, 26.6]])
    assert report.curves(tmp_path, rows, 'other') == ([], [])
    comparisons = report.compare(summaries, 'ref', {}, ['ref', 'other', 'later'])
    ax_diff, ax_curve = Figure().subplots(1, 2)
    report.draw_differences(ax_diff, comparisons, summaries, 'ref')
    assert report.draw_curves(ax_curve, tmp_path, rows, ['ref', 'other', 'later'], reference='ref') == 1
    report.draw_differences(ax_diff, report.compare([], 'ref', {}, ['ref', 'later']), [], 'ref')
