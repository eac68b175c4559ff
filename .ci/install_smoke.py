"""Smoke test of a non-editable ``pip install ".[train,deploy]"`` (run by .ci/check_install.sh).

Run from a directory outside the checkout with the fresh virtualenv's python::

  python install_smoke.py CHECKOUT WORKDIR

(a) ``import ghostnetv2_jax`` and ``create_model`` pull in neither torch, timm, tensorflow nor
    the benchmark module, and the package comes from site-packages, not from the checkout;
(b) ``jax.jit(runtime.predict_fn(model))`` gives ``model.apply``'s logits;
(c) one training step through the command line on configs/tiny.py exits 0;
(d) the ghostnetv2-jax console script runs a command;
(e) the trained workdir exports to ONNX with the deploy extra alone (no runtime to check it in).
"""
import os
import pathlib
import subprocess
import sys
import time

HEAVY = ('torch', 'timm', 'tensorflow', 'ghostnetv2_jax.bench')
TOLERANCE = 1e-4   # max |predict - apply| / max |apply|


def step(name: str, t0: float) -> None:
    print(f'ok: {name} ({time.time() - t0:.1f} s)', flush=True)


def check_light_imports(where: str) -> None:
    loaded = [m for m in HEAVY if m in sys.modules]
    assert not loaded, f'{where} imported {loaded}'


def main(checkout: pathlib.Path, workdir: pathlib.Path) -> int:
    t0 = time.time()
    import ghostnetv2_jax
    model = ghostnetv2_jax.create_model('ghostnetv2_100', num_classes=10)
    check_light_imports('import ghostnetv2_jax + create_model')
    where = pathlib.Path(ghostnetv2_jax.__file__).resolve()
    assert checkout not in where.parents, f'ghostnetv2_jax imported from the checkout: {where}'
    assert 'site-packages' in where.parts, f'ghostnetv2_jax not from site-packages: {where}'
    step(f'(a) import ghostnetv2_jax {ghostnetv2_jax.__version__} from {where.parent}', t0)

    t0 = time.time()
    import jax
    import numpy as np
    import ghostnetv2_jax.runtime
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3), jax.numpy.float32)
    rng = jax.random.PRNGKey(0)
    # LLVM's optimisations skipped for the run-once init, as the trainer does: they make compiling
    # the RNG-heavy initialisers several times slower on CPU and save nothing on one run.
    options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
    variables = jax.jit(model.init).lower(rng, images).compile(options)(rng, images)
    got = np.asarray(jax.jit(ghostnetv2_jax.runtime.predict_fn(model))(variables, images))
    ref = np.asarray(jax.jit(model.apply)(variables, images))
    assert got.shape == ref.shape == (2, 10), (got.shape, ref.shape)
    scale = float(np.max(np.abs(ref)))
    err = float(np.max(np.abs(got - ref)))
    assert np.all(np.isfinite(got)) and scale > 0, (got, ref)
    assert err <= TOLERANCE * scale, f'predict_fn differs from model.apply: {err:.3g} > {TOLERANCE} x {scale:.3g}'
    check_light_imports('runtime.predict_fn')
    step(f'(b) runtime.predict_fn matches model.apply (max |diff| {err:.2g}, max |logit| {scale:.3g})', t0)

    t0 = time.time()
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'XLA_FLAGS')}
    env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
    cmd = [sys.executable, '-m', 'ghostnetv2_jax', 'train', '--config', str(checkout / 'configs' / 'tiny.py'),
           '--workdir', str(workdir / 'train'), '--config.num_train_steps=1']
    proc = subprocess.run(cmd, cwd=str(workdir), env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-8000:], sep='\n', file=sys.stderr)
        raise AssertionError(f'{" ".join(cmd[1:])} exited {proc.returncode}')
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:]
    step(f'(c) one training step through the CLI: {tail[0] if tail else "(no output)"}', t0)

    t0 = time.time()
    script = pathlib.Path(sys.executable).parent / 'ghostnetv2-jax'
    proc = subprocess.run([str(script), 'summary', '--model', 'ghostnet_050'], cwd=str(workdir), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith('ghostnet_050:'), proc.stderr[-3000:]
    step(f'(d) the ghostnetv2-jax console script: {proc.stdout.strip()}', t0)

    t0 = time.time()
    dst = workdir / 'model.onnx'
    proc = subprocess.run([str(script), 'export', '--src', str(workdir / 'train'), '--dst', str(dst)],
                          cwd=str(workdir), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and dst.stat().st_size > 0, proc.stderr[-3000:]
    assert 'not checked: ONNX Runtime is not installed' in proc.stdout, proc.stdout
    step(f'(e) export with the deploy extra: {proc.stdout.strip().splitlines()[-1]}', t0)
    return 0


if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit(f'usage: {sys.argv[0]} CHECKOUT WORKDIR')
    checkout, workdir = (pathlib.Path(a).resolve() for a in sys.argv[1:])
    if checkout in pathlib.Path.cwd().resolve().parents or checkout == pathlib.Path.cwd().resolve():
        sys.exit('run this from a directory outside the checkout')
    sys.exit(main(checkout, workdir))
