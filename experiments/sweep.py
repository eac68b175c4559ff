"""Run a sweep of the paper's ablations: every (variant, seed) of a sweep file, trained and measured.

  python experiments/sweep.py --sweep experiments/sweeps/attention.py --scale demo \
      --out experiments/results/spread_attention [--config.num_epochs=2 ...]
  python experiments/sweep.py --sweep experiments/sweeps/attention.py --scale imagenet \
      --out experiments/launch/attention --workdir-root gs://BUCKET/ghostnetv2_experiments/attention
  python experiments/sweep.py --out experiments/results/spread_attention --report-only

A sweep file defines ``get_sweep()``, returning an ``ml_collections.ConfigDict`` (or a dict) with
``base`` (a training config file), ``variants`` ((name, overrides) pairs, the overrides in the
trainer's dotted form, e.g. ``{'model_overrides.attention': 'se'}``), ``seeds`` and optionally
``name``, ``imagenet_base`` and ``settings`` (overrides for every run). ``--config.FIELD=VALUE``
arguments apply to every run too (over the sweep's settings; a variant's overrides win over both).

``--scale demo`` trains each run on this machine through ``trainer.train_and_evaluate`` in
``OUT/runs/VARIANT/seedN`` and appends one row to ``OUT/results.csv`` per finished run (so a
killed sweep loses only the run in progress, and resumes from that run's checkpoint); runs whose
row is already there are skipped. Then ``OUT/results.md`` and ``OUT/results.png`` are written from
the CSV (``experiments/report.py``). ``--scale imagenet`` runs nothing: it writes ``OUT/launch.sh``,
one ``python -m ghostnetv2_jax train`` command per run, and ``OUT/launch.json``.
"""
from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # run as a script from any cwd: the checkout's packages
    sys.path.insert(0, str(REPO))

import ml_collections  # noqa: E402
from ml_collections.config_flags import config_path  # noqa: E402

from experiments import report  # noqa: E402

COLUMNS = ('sweep', 'variant', 'seed', 'overrides', 'settings', 'base', 'params', 'macs', 'image_size',
           'num_classes', 'top1', 'ema_top1', 'top5', 'latency_ms', 'latency_batch', 'wall_s', 'metrics_file', 'version',
           'finished')
KEY_COLUMNS = ('variant', 'seed', 'overrides', 'settings', 'base')   # what makes two runs the same run
SWEEP_FIELDS = {'name', 'base', 'imagenet_base', 'settings', 'variants', 'seeds'}
DEFAULT_IMAGENET_BASE = 'configs/imagenet_ghostnetv2_100.py'
NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')


class SweepError(Exception):
    """Bad input (a missing file, an unknown config field, ...): one line, exit status 1."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A sweep file's contents, checked: variants in order, overrides normalised to tuples;
    ``settings``: overrides for every run (under any ``--config.FIELD=VALUE`` given)."""
    name: str
    base: str
    imagenet_base: str
    settings: Dict[str, Any]
    variants: Dict[str, Dict[str, Any]]
    seeds: Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Run:
    variant: str
    seed: int
    overrides: Dict[str, Any]


# ----------------------------------------------------------------------------- values and files
def normalize(value: Any) -> Any:
    """Lists and ranges -> tuples, recursively: the config's tuple fields and one JSON form."""
    if isinstance(value, (list, tuple, range)):
        return tuple(normalize(v) for v in value)
    if isinstance(value, Mapping):
        return {str(k): normalize(v) for k, v in value.items()}
    return value


def to_json(overrides: Mapping[str, Any]) -> str:
    """The canonical text of a set of overrides (the CSV's key for finished runs)."""
    return json.dumps(normalize(overrides), sort_keys=True)


def parse_literal(text: str) -> Any:
    """A ``--config.FIELD=VALUE`` value as ml_collections' config flags read it: a Python literal,
    else the string itself (``true``/``false`` are booleans)."""
    if text in ('true', 'false'):
        return text == 'true'
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text


def resolve(path: str) -> pathlib.Path:
    """A path as given, else relative to the repository (configs/... works from any cwd)."""
    given = pathlib.Path(path).expanduser()
    return given if given.is_absolute() or given.exists() else REPO / given


def label(path: pathlib.Path) -> str:
    """A file's name for the CSV and launch lines: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def load_python(path: str, function: str, what: str) -> Any:
    """``function()`` of the Python file at ``path`` (a sweep or a config file)."""
    file = resolve(path)
    if not file.is_file():
        raise SweepError(f'no such {what} file: {path}')
    spec = importlib.util.spec_from_file_location(f'_{what}_{file.stem}', file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, function, None)):
        raise SweepError(f'{what} file {path} defines no {function}()')
    return getattr(module, function)()


def code_version() -> str:
    """``git describe`` of the checkout (short hash, ``-dirty`` with local edits), or 'unknown'."""
    try:
        out = subprocess.run(['git', '-C', str(REPO), 'describe', '--always', '--dirty', '--tags'],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return out.stdout.strip() or 'unknown'


# ----------------------------------------------------------------------------- the sweep file
def _fields(spec: Any, path: str) -> Dict[str, Any]:
    if isinstance(spec, ml_collections.ConfigDict):
        return spec.to_dict()
    if dataclasses.is_dataclass(spec):
        return dataclasses.asdict(spec)
    if isinstance(spec, Mapping):
        return dict(spec)
    raise SweepError(f'get_sweep() of {path} returned a {type(spec).__name__}, not a ConfigDict')


def _variants(given: Any, path: str) -> Dict[str, Dict[str, Any]]:
    pairs = list(given.items()) if isinstance(given, Mapping) else list(given or ())
    variants: Dict[str, Dict[str, Any]] = {}
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], Mapping)):
            raise SweepError(f'{path}: each variant must be a (name, overrides dict) pair, got {pair!r}')
        name, overrides = pair
        if not isinstance(name, str) or not NAME.match(name) or name in variants:
            raise SweepError(f'{path}: variant names must be unique words (letters, digits, _.-), got {name!r}')
        variants[name] = normalize(overrides)
    if not variants:
        raise SweepError(f'{path}: the sweep has no variants')
    return variants


def load_sweep(path: str) -> Sweep:
    """The sweep file at ``path``, checked."""
    fields = _fields(load_python(path, 'get_sweep', 'sweep'), path)
    unknown = sorted(set(fields) - SWEEP_FIELDS)
    if unknown or 'base' not in fields or 'variants' not in fields or 'seeds' not in fields:
        raise SweepError(f'{path}: get_sweep() needs base, variants and seeds (and may set name, '
                         f'imagenet_base, settings); unknown: {unknown}')
    seeds = tuple(fields['seeds'])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError(f'{path}: seeds must be a non-empty list of integers, got {fields["seeds"]!r}')
    settings = normalize(fields.get('settings') or {})
    if not isinstance(settings, dict) or 'seed' in settings:
        raise SweepError(f'{path}: settings must be a dict of config overrides other than seed')
    name = fields.get('name') or pathlib.Path(path).stem
    return Sweep(name=name, base=fields['base'], imagenet_base=fields.get('imagenet_base') or DEFAULT_IMAGENET_BASE,
                 settings=settings, variants=_variants(fields['variants'], path), seeds=seeds)


def select(sweep: Sweep, variants: Optional[str], seeds: Optional[str]) -> List[Run]:
    """The runs, seed by seed (every variant's first seed before any second seed), limited to
    the comma-separated ``variants`` and ``seeds`` when given."""
    names = list(sweep.variants)
    if variants:
        names = [v.strip() for v in variants.split(',') if v.strip()]
        unknown = [v for v in names if v not in sweep.variants]
        if unknown:
            raise SweepError(f'unknown variant {unknown[0]!r}; the sweep has {list(sweep.variants)}')
    try:
        chosen = [int(s) for s in seeds.split(',')] if seeds else list(sweep.seeds)
    except ValueError:
        raise SweepError(f'--seeds must be comma-separated integers, got {seeds!r}') from None
    return [Run(v, s, sweep.variants[v]) for s in chosen for v in names]


# ----------------------------------------------------------------------------- configs
def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str) -> None:
    """Set each dotted field of ``overrides`` in ``config``; an unknown field or a value of the
    wrong type is a SweepError naming ``where``."""
    for key, value in overrides.items():
        try:
            if config_path.get_type(key, config) is str and isinstance(value, (int, float)):
                value = str(value)   # e.g. --config.data.train_split=1 read as a literal
            config_path.set_value(key, config, normalize(value))
        except (KeyError, AttributeError, IndexError, ValueError):
            raise SweepError(f'{where}: unknown config field {key}') from None
        except TypeError as e:
            raise SweepError(f'{where}: {key}={value!r}: {" ".join(str(e).split())}') from None


def build_config(base: str, settings: Mapping[str, Any], run: Run) -> ml_collections.ConfigDict:
    """``base``'s config with the settings for every run, then the variant's overrides and seed."""
    config = load_python(base, 'get_config', 'config')
    apply_overrides(config, settings, '--config')
    apply_overrides(config, run.overrides, f'variant {run.variant!r}')
    config.seed = run.seed
    config.lock()
    return config


def parse_settings(extra: Sequence[str]) -> Dict[str, Any]:
    """``--config.FIELD=VALUE`` arguments -> {FIELD: value}; anything else is an error."""
    settings = {}
    for arg in extra:
        match = re.match(r'^--config\.([^=]+)=(.*)$', arg)
        if not match:
            raise SweepError(f'unexpected argument {arg!r} (overrides are --config.FIELD=VALUE)')
        settings[match.group(1)] = parse_literal(match.group(2))
    if 'seed' in settings:
        raise SweepError('--config.seed: the seeds are the sweep\'s (use --seeds)')
    return settings


# ----------------------------------------------------------------------------- --scale demo
def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """The trainer's importable entry point (a seam for tests)."""
    from ghostnetv2_jax.train import trainer
    return trainer.train_and_evaluate(config, workdir)


def run_key(row: Mapping[str, Any]) -> Tuple[str, ...]:
    return tuple(str(row[c]) for c in KEY_COLUMNS)


def finished(csv_path: pathlib.Path) -> set:
    """Keys of the runs with a row in ``csv_path``."""
    if not csv_path.exists() or csv_path.stat().st_size == 0:
        return set()
    with open(csv_path, newline='') as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise SweepError(f'{csv_path} has columns {reader.fieldnames}, not this runner\'s; use another --out')
        return {run_key(row) for row in reader}


def append_row(csv_path: pathlib.Path, row: Mapping[str, Any]) -> None:
    """One row, written and flushed now (the header first in a new file)."""
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    with open(csv_path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()


def keep_curve(workdir: pathlib.Path, out: pathlib.Path, run: Run) -> str:
    """Copy the run's metrics.jsonl (train and eval metrics by step) next to the CSV; returns
    its path relative to ``out``."""
    dest = out / 'metrics' / run.variant / f'seed{run.seed}.jsonl'
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(workdir / 'metrics.jsonl', dest)
    return str(dest.relative_to(out))


def model_of(config: ml_collections.ConfigDict):
    """The flax model ``config`` trains (the trainer's own ``build_model``)."""
    from ghostnetv2_jax.data.pipeline import num_classes_of
    from ghostnetv2_jax.train import trainer
    return trainer.build_model(config, num_classes_of(config.data))


def measure_model(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """Params and MACs at the config's image size, and the task's class count."""
    from experiments import measure
    from ghostnetv2_jax.data.pipeline import num_classes_of
    model, size = model_of(config), config.data.image_size
    params, macs = measure.params_and_macs(model, size)
    return dict(params=params, macs=macs, image_size=size, num_classes=num_classes_of(config.data))


LATENCY_COLUMNS = ('variant', 'latency_ms', 'latency_batch', 'rounds', 'image_size', 'load_before',
                   'load_after', 'version', 'measured')


def measure_latencies(configs: Mapping[str, ml_collections.ConfigDict], out: pathlib.Path, batch: int,
                      rounds: int) -> pathlib.Path:
    """OUT/latency.csv: per variant, the median of ``rounds`` interleaved timed calls of
    ``jax.jit(predict_fn(model))`` on ``batch`` images (the cost tables' method: each round one
    call of every variant, rotated), measured after the sweep's runs, never while it trains. The
    machine's load average before and after is recorded beside: on a busy machine the figures are
    not worth keeping (the load after includes the timing's own threads; the load before says
    whether anything else ran). Rows of variants not timed now are kept."""
    from experiments import measure
    load_before = round(os.getloadavg()[0], 2)
    calls = {v: measure.compiled_predict(model_of(c), batch, c.data.image_size) for v, c in configs.items()}
    times = measure.interleaved_ms(calls, rounds)
    load_after = round(os.getloadavg()[0], 2)
    path = out / 'latency.csv'
    kept = [r for r in report.read_latency(out)[1] if r['variant'] not in configs]
    tmp = path.with_suffix('.tmp')
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=LATENCY_COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
        for variant, config in configs.items():
            writer.writerow(dict(variant=variant, latency_ms=round(statistics.median(times[variant]), 3),
                                 latency_batch=batch, rounds=rounds, image_size=config.data.image_size,
                                 load_before=load_before, load_after=load_after, version=code_version(),
                                 measured=time.strftime('%Y-%m-%dT%H:%M:%S')))
    os.replace(tmp, path)
    if load_before > 1.0:    # the load after counts this timing's own threads
        print(f'warning: load average {load_before} when timing began: the latencies in {path} '
              'are not from a quiet machine; rerun with --latency-only when nothing else runs', flush=True)
    print(f'latency of {len(configs)} variants: {path}', flush=True)
    return path


def check_models(configs: Mapping[str, ml_collections.ConfigDict]) -> None:
    """Trace each variant's model once (shapes only), so that a bad option inside a field, e.g. an
    unknown ``attention_kwargs`` key, stops the sweep before any training, naming the variant."""
    from experiments import measure
    for variant, config in configs.items():
        try:
            measure.abstract_variables(model_of(config), config.data.image_size)
        except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
            raise SweepError(f'variant {variant!r}: {" ".join(str(e).split())}') from None


def run_one(run: Run, config, out: pathlib.Path, common: Mapping[str, Any], args) -> Dict[str, Any]:
    """Train and measure one run; its row for the CSV."""
    workdir = out / 'runs' / run.variant / f'seed{run.seed}'
    print(f'== {common["sweep"]}: {run.variant} seed {run.seed} in {workdir}', flush=True)
    start = time.perf_counter()
    metrics = train(config, str(workdir))
    wall = time.perf_counter() - start
    if metrics.get('preempted'):
        raise SweepError(f'{run.variant} seed {run.seed} was preempted at step {metrics["step"]}; '
                         'rerun the same command to resume it')
    metric = lambda name: round(metrics[name], 4) if name in metrics else ''   # % of the eval split
    row = dict(common, variant=run.variant, seed=run.seed, overrides=to_json(run.overrides),
               top1=metric('top1'), ema_top1=metric('ema_top1'), top5=metric('top5'),
               wall_s=round(wall, 1), metrics_file=keep_curve(workdir, out, run),
               finished=time.strftime('%Y-%m-%dT%H:%M:%S'), latency_ms='', latency_batch='',
               **measure_model(config))
    if not args.keep_workdirs:
        shutil.rmtree(workdir)
        for parent in (workdir.parent, workdir.parent.parent):   # runs/VARIANT, runs/ once empty
            if not any(parent.iterdir()):
                parent.rmdir()
    return row


def run_demo(sweep: Sweep, runs: List[Run], settings: Dict[str, Any], out: pathlib.Path, args) -> None:
    """Every run without a row in OUT/results.csv, one after another, then the report."""
    base = args.base or sweep.base
    configs = {(r.variant, r.seed): build_config(base, settings, r) for r in runs}   # every override checked first
    common = dict(sweep=sweep.name, settings=to_json(settings), base=label(resolve(base)), version=code_version())
    csv_path = out / 'results.csv'
    done = finished(csv_path)
    pending = [r for r in runs if run_key(dict(common, variant=r.variant, seed=r.seed,
                                               overrides=to_json(r.overrides))) not in done]
    print(f'{sweep.name}: {len(runs) - len(pending)} of {len(runs)} runs already in {csv_path}', flush=True)
    if args.latency_only:
        pending = []
    if pending or args.latency_only or not (out / 'latency.csv').exists():
        from ghostnetv2_jax import process
        process.fast_cpu_defaults()   # as the train CLI: before the backend starts
    if pending:
        check_models({r.variant: configs[r.variant, r.seed] for r in pending})
    for run in pending:
        try:
            append_row(csv_path, run_one(run, configs[run.variant, run.seed], out, common, args))
        except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
            raise SweepError(f'{run.variant} seed {run.seed}: {" ".join(str(e).split())}') from None
    if pending or args.latency_only or not (out / 'latency.csv').exists():
        chosen = {r.variant: configs[r.variant, r.seed] for r in runs}     # timed together
        measure_latencies(chosen, out, args.latency_batch, args.latency_rounds)
    report.write_report(csv_path, out)


# ----------------------------------------------------------------------------- --scale imagenet
def literal(value: Any) -> str:
    """A Python literal of ``value`` with double-quoted strings (readable inside the single
    quotes of a shell word): ``{"kernel": (7, 7)}``."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return '{' + ', '.join(f'{literal(k)}: {literal(v)}' for k, v in value.items()) + '}'
    if isinstance(value, tuple):
        return '(' + ', '.join(map(literal, value)) + (',)' if len(value) == 1 else ')')
    return repr(value)


def flag_value(value: Any) -> str:
    """A value as ``--config.FIELD=`` text that config_flags parses back to it."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return value if isinstance(value, str) else literal(normalize(value))


def launch_argv(base: str, workdir: str, fields: Mapping[str, Any]) -> List[str]:
    """``python -m ghostnetv2_jax train`` and its flags (overrides after --config, as absl needs)."""
    return (['python', '-m', 'ghostnetv2_jax', 'train', f'--config={base}', f'--workdir={workdir}']
            + [f'--config.{k}={flag_value(v)}' for k, v in fields.items()])


def write_launch(sweep: Sweep, runs: List[Run], settings: Dict[str, Any], out: pathlib.Path, args) -> None:
    """OUT/launch.sh (one train command per run) and OUT/launch.json (each run's overrides)."""
    base = args.imagenet_base or sweep.imagenet_base
    for run in runs:
        build_config(base, settings, run)   # every override checked against the ImageNet config
    root = (args.workdir_root or f'gs://YOUR_BUCKET/ghostnetv2_experiments/{sweep.name}').rstrip('/')
    config_file = label(resolve(base))
    entries = []
    for run in runs:
        workdir = f'{root}/{run.variant}/seed{run.seed}'
        fields = {'seed': run.seed, **settings, **run.overrides}
        entries.append(dict(variant=run.variant, seed=run.seed, workdir=workdir, overrides=run.overrides,
                            settings=settings, argv=launch_argv(config_file, workdir, fields)))
    lines = ['#!/usr/bin/env bash',
             f'# Sweep {sweep.name}: {len(runs)} ImageNet runs, from the repository root. Each line is one',
             '# training job; launch them on your TPU/GPU hosts as docs/training.md describes.',
             'set -euo pipefail'] + [shlex.join(e['argv']) for e in entries]
    (out / 'launch.sh').write_text('\n'.join(lines) + '\n')
    (out / 'launch.sh').chmod(0o755)
    (out / 'launch.json').write_text(json.dumps(entries, indent=2) + '\n')
    print(f'{len(runs)} launch lines in {out / "launch.sh"}; overrides per run in {out / "launch.json"}')


# ----------------------------------------------------------------------------- command line
def parse_args(argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False)
    parser.add_argument('--sweep', help='sweep file (experiments/sweeps/*.py)')
    parser.add_argument('--scale', choices=('demo', 'imagenet'), default='demo')
    parser.add_argument('--out', help='results folder (default experiments/results/SWEEP_NAME)')
    parser.add_argument('--base', help="demo scale: training config instead of the sweep's base")
    parser.add_argument('--imagenet-base', help="imagenet scale: config instead of the sweep's imagenet_base")
    parser.add_argument('--workdir-root', help='imagenet scale: workdirs are ROOT/VARIANT/seedN (gs:// ok)')
    parser.add_argument('--variants', help='comma-separated subset of the variants')
    parser.add_argument('--seeds', help="comma-separated seeds instead of the sweep's")
    parser.add_argument('--latency-batch', type=int, default=8, help='images per timed predict call')
    parser.add_argument('--latency-rounds', type=int, default=40,
                        help='interleaved rounds of timed calls, one per variant each (the median is kept)')
    parser.add_argument('--latency-only', action='store_true',
                        help='train nothing new: time every variant again (OUT/latency.csv) and rewrite the report')
    parser.add_argument('--keep-workdirs', action='store_true', help='keep checkpoints of finished runs')
    parser.add_argument('--report-only', action='store_true', help='rewrite results.md/png from OUT/results.csv')
    args, extra = parser.parse_known_args(argv)
    if not args.sweep and not (args.report_only and args.out):
        parser.error('--sweep is required (with --report-only, --out is enough)')
    return args, parse_settings(extra)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args, settings = parse_args(argv)
        if args.report_only and not args.sweep:
            out = pathlib.Path(args.out)
        else:
            sweep = load_sweep(args.sweep)
            out = pathlib.Path(args.out) if args.out else REPO / 'experiments' / 'results' / sweep.name
        if args.report_only:
            csv_path = out / 'results.csv'
            if not csv_path.is_file():
                raise SweepError(f'no results in {csv_path}')
            report.write_report(csv_path, out)
            return 0
        runs = select(sweep, args.variants, args.seeds)
        out.mkdir(parents=True, exist_ok=True)
        settings = {**sweep.settings, **settings}
        (run_demo if args.scale == 'demo' else write_launch)(sweep, runs, settings, out, args)
    except SweepError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
