"""Where the time of one ``predict_fn`` call goes on CPU: XLA's thunks by kind, from a profile.

  python experiments/thunks.py [--model ghostnetv2_100] [--batch 1] [--size 224] \
      [--forms eval,folded,bound,bound-folded] [--calls 40] [--rounds 300] [--out FILE.md]

Each form is called as a user calls it: ``eval`` and ``folded`` are
``jax.jit(ghostnetv2_jax.predict_fn(model))`` with the variables as arguments, of the model with
its BatchNorm and of the BN-folded one (``fold_batchnorm``); ``bound`` and ``bound-folded`` are
``jax.jit(ghostnetv2_jax.bound_predict_fn(model, variables))`` of the same two, the weights
compiled in (a call passes the images). The process is set up as this project's commands set it up
(``fast_cpu_defaults()``). For each form: the median wall time of a call (a copy compiled with
XLA's defaults; ``--rounds`` rounds of one call of every form, ``measure.interleaved_ms``, the cost
table's method), then ``--calls`` calls of a copy
compiled with XLA's per-thunk trace events on, profiled (``jax.profiler``), and its thunks
grouped by kind: the native ops by their FFI target, YNNPACK's fusions (the 1x1 convolutions),
XLA's dots, and XLA's own fusions by their name (control flow is not a row: its body's thunks
are). At batch 1 the thunk executor runs one thunk after another, so wall time minus the thunks'
sum is what a call spends outside them (arguments, dispatch, the gaps between thunks); at larger
batches the chunks' thunks overlap. Weights are random: the time of a dense network does not depend on them.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
from typing import Dict, List, Sequence, Tuple

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # run as a script from any cwd: the checkout's packages
    sys.path.insert(0, str(REPO))

from ghostnetv2_jax import fast_cpu_defaults  # noqa: E402

FORMS = ('eval', 'folded', 'bound', 'bound-folded')
# Control flow: its events enclose the thunks of its body, which are counted themselves.
CONTROL = re.compile(r'(while|conditional|call)(\.\d+)?$')


def _targets(hlo_text: str) -> Dict[str, str]:
    """Instruction name -> custom-call target, from the compiled module's text."""
    return {m.group(1): m.group(2) for m in
            re.finditer(r'%?([\w.-]+) = [^\n]*custom-call\([^\n]*custom_call_target="([^"]+)"', hlo_text)}


def kind_of(name: str, targets: Dict[str, str]) -> str:
    """The group a thunk's trace event belongs to."""
    if name in targets:
        return f'native op {targets[name]}' if targets[name].startswith('gnv2_') else f'custom call {targets[name]}'
    base = re.sub(r'\.\d+$', '', name)
    return 'YNNPACK fusion (1x1 convolutions)' if base == 'ynn_fusion' else f'XLA {base}'


def thunk_table(events: Sequence[dict], targets: Dict[str, str], calls: int,
                instructions: set) -> List[Tuple[str, int, float]]:
    """(kind, thunks per call, microseconds per call), longest first, from complete ('X') trace
    events whose names are instructions of the compiled module."""
    time_of: Dict[str, float] = collections.defaultdict(float)
    count: Dict[str, int] = collections.Counter()
    for e in events:
        if e.get('ph') != 'X' or e.get('name') not in instructions or CONTROL.match(e['name']):
            continue
        k = kind_of(e['name'], targets)
        time_of[k] += e.get('dur', 0) / calls
        count[k] += 1
    return sorted(((k, count[k] // calls, us) for k, us in time_of.items()), key=lambda r: -r[2])


def _instructions(hlo_text: str) -> set:
    return set(re.findall(r'^\s*(?:ROOT )?%?([\w.-]+) = ', hlo_text, flags=re.M))


def profile(fn, args, calls: int) -> List[dict]:
    """The complete events of ``calls`` calls of ``fn(*args)`` under ``jax.profiler``."""
    import jax
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        path = sorted(glob.glob(f'{d}/**/perfetto_trace.json.gz', recursive=True))[-1]
        with gzip.open(path) as f:
            trace = json.load(f)
    return trace['traceEvents'] if isinstance(trace, dict) else trace


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='ghostnetv2_100')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--forms', default=','.join(FORMS))
    parser.add_argument('--calls', type=int, default=40)
    parser.add_argument('--rounds', type=int, default=300)
    parser.add_argument('--out', type=pathlib.Path, default=None, help='also write the tables here (markdown)')
    args = parser.parse_args(argv)
    forms = [f for f in args.forms.split(',') if f]
    if not forms or any(f not in FORMS for f in forms):
        print(f'error: --forms takes a comma-separated subset of {",".join(FORMS)}', file=sys.stderr)
        return 2
    fast_cpu_defaults()
    import jax
    import jax.numpy as jnp
    from experiments import measure
    from experiments.sweep import code_version
    from ghostnetv2_jax import bound_predict_fn, create_model, fold_batchnorm, predict_fn

    model = create_model(args.model)
    variables = measure.random_variables(model, args.size)
    images = jnp.zeros((args.batch, args.size, args.size, 3), jnp.float32)
    compiled = {}
    for form in forms:
        m, v = (model, variables) if form in ('eval', 'bound') else fold_batchnorm(model, variables)
        if form.startswith('bound'):   # the weights compiled in: a call passes the images
            lowered, call_args = jax.jit(bound_predict_fn(m, v)).lower(images), (images,)
        else:
            lowered, call_args = jax.jit(predict_fn(m)).lower(v, images), (v, images)
        timed, traced = lowered.compile(), lowered.compile({'xla_cpu_enable_xprof_traceme': True})
        jax.block_until_ready(timed(*call_args))
        jax.block_until_ready(traced(*call_args))
        compiled[form] = (timed, traced, call_args, len(jax.tree_util.tree_leaves(call_args)))
    walls = measure.interleaved_ms({form: (lambda c=compiled[form]: c[0](*c[2])) for form in forms}, args.rounds)

    lines = [f'`predict_fn({args.model})`, batch {args.batch}, {args.size}x{args.size}, float32, '
             f'{jax.device_count()} CPU device(s); code `{code_version()}`; load average before '
             f'the profiles {os.getloadavg()[0]:.2f}.', '']
    for form in forms:
        timed, traced, call_args, leaves = compiled[form]
        text = traced.as_text()
        rows = thunk_table(profile(traced, call_args, args.calls), _targets(text), args.calls, _instructions(text))
        wall = 1e3 * statistics.median(walls[form])
        total = sum(us for _, _, us in rows)
        outside = (f'outside them {(wall - total) / 1e3:.2f} ms (arguments, dispatch, the gaps between thunks)'
                   if wall >= total else 'their sum exceeds the wall time: independent thunks ran at once')
        lines += [f'**{form}** ({leaves} array{"s" if leaves != 1 else ""} as arguments): {wall / 1e3:.2f} ms a call '
                  f'(median of {args.rounds} interleaved rounds); thunks {total / 1e3:.2f} ms in '
                  f'{sum(n for _, n, _ in rows)} thunks; {outside}.', '',
                  '| kind | thunks per call | us per call | share of the thunks |', '|---|---:|---:|---:|']
        lines += [f'| {k} | {n} | {us:.0f} | {100 * us / total:.0f}% |' for k, n, us in rows if us >= 0.005 * total]
        rest = [(n, us) for k, n, us in rows if us < 0.005 * total]
        if rest:
            lines.append(f'| (the rest) | {sum(n for n, _ in rest)} | {sum(us for _, us in rest):.0f} | '
                         f'{100 * sum(us for _, us in rest) / total:.0f}% |')
        lines.append('')
    report = '\n'.join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
