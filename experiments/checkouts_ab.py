"""Which of two checkouts runs ``predict_fn`` faster: each in its own long-lived process, timed
in alternating rounds, reported as the ratio of their medians round by round.

  python experiments/checkouts_ab.py A_DIR B_DIR [--model ghostnetv2_100] [--batch 1] \
      [--size 224] [--rounds 30] [--calls 40]

A_DIR and B_DIR are checkouts (``git worktree add DIR COMMIT``); each worker imports that
checkout's ``ghostnetv2_jax`` (its native kernels are built for it on first use) and is set up as
this project's commands set up a process (``fast_cpu_defaults()``). Each compiles
``jax.jit(predict_fn(model))`` of the eval model and of the BN-folded one, with the same random
variables, and warms up. A round asks one worker, then the other (the order alternating between
rounds, half a second of idle before each), for ``--calls`` calls of each form and takes their
median. The report gives each checkout's median over the rounds and the quartiles of the per-round
ratio A / B: a difference is one where the interquartile range excludes 1.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Dict, List

WORKER = r'''
import json, statistics, sys, time
sys.path.insert(0, CHECKOUT)
from ghostnetv2_jax import fast_cpu_defaults
fast_cpu_defaults()
import jax, jax.numpy as jnp, numpy as np
from experiments import measure
from ghostnetv2_jax import create_model, fold_batchnorm, predict_fn
model = create_model(MODEL)
variables = measure.random_variables(model, SIZE)
folded = fold_batchnorm(model, variables)
x = jnp.asarray(np.random.default_rng(0).standard_normal((BATCH, SIZE, SIZE, 3)), jnp.float32)
forms = {'eval': (model, variables), 'folded': folded}
compiled = {k: (jax.jit(predict_fn(m)).lower(v, x).compile(), v) for k, (m, v) in forms.items()}
for fn, v in compiled.values():
    for _ in range(20):
        jax.block_until_ready(fn(v, x))
print('ready', flush=True)
for _ in sys.stdin:
    out = {}
    for k, (fn, v) in compiled.items():
        times = []
        for _ in range(CALLS):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(v, x))
            times.append(time.perf_counter() - t0)
        out[k] = 1e3 * statistics.median(times)
    print(json.dumps(out), flush=True)
'''


def _quartiles(values: List[float]):
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('a', type=pathlib.Path)
    parser.add_argument('b', type=pathlib.Path)
    parser.add_argument('--model', default='ghostnetv2_100')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=30)
    parser.add_argument('--calls', type=int, default=40)
    args = parser.parse_args(argv)
    for d in (args.a, args.b):
        if not (d / 'ghostnetv2_jax' / '__init__.py').is_file():
            print(f'error: {d} is not a checkout of this project', file=sys.stderr)
            return 2
    if min(args.batch, args.size, args.rounds, args.calls) < 1 or args.rounds < 2:
        print('error: --batch, --size and --calls must be positive and --rounds at least 2', file=sys.stderr)
        return 2
    workers: Dict[str, subprocess.Popen] = {}
    try:
        for name, d in (('A', args.a), ('B', args.b)):
            code = (WORKER.replace('CHECKOUT', repr(str(d.resolve()))).replace('MODEL', repr(args.model))
                    .replace('BATCH', str(args.batch)).replace('SIZE', str(args.size))
                    .replace('CALLS', str(args.calls)))
            workers[name] = subprocess.Popen([sys.executable, '-c', code], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True)
        for (name, w), d in zip(workers.items(), (args.a, args.b)):   # both set up at once
            if w.stdout.readline().strip() != 'ready':
                print(f'error: the worker for {d} did not start', file=sys.stderr)
                return 1
        rounds: Dict[str, List[dict]] = {'A': [], 'B': []}
        for r in range(args.rounds):
            for name in ('A', 'B') if r % 2 == 0 else ('B', 'A'):
                time.sleep(0.5)
                w = workers[name]
                w.stdin.write('run\n')
                w.stdin.flush()
                rounds[name].append(json.loads(w.stdout.readline()))
    finally:
        for w in workers.values():
            w.kill()
    print(f'{args.model}, batch {args.batch}, {args.size}x{args.size}: A = {args.a}, B = {args.b}; '
          f'{args.rounds} alternating rounds of {args.calls} calls')
    for form in ('eval', 'folded'):
        a = [r[form] for r in rounds['A']]
        b = [r[form] for r in rounds['B']]
        lo, mid, hi = _quartiles([x / y for x, y in zip(a, b)])
        print(f'{form}: A {statistics.median(a):.2f} ms, B {statistics.median(b):.2f} ms a call; '
              f'A / B per round {mid:.3f} (quartiles {lo:.3f}-{hi:.3f})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
