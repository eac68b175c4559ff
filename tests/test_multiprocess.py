"""Two training processes on localhost, launched as docs/training.md says (no cluster manager:
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), with CPU collectives: a SIGKILLed
process makes its peer exit with one line naming the resume step, and the rerun is bit-identical
to a straight two-process run; SIGTERM to one process makes both save the same step and exit 0."""
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from ghostnetv2_jax.train import sharding
from test_trainer import committed_steps, compile_cache, load_state, train_command, train_env  # noqa: F401

PROCESSES = 2
K = 3      # checkpoint and kill after K steps; the straight run does 2K
COMMON = (f'--config.num_train_steps={2 * K}', f'--config.checkpoint_every_steps={K}')
TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch(tmp_path, workdir, *overrides, cache, **env):
    """One process per id, each given the coordinator, the process count and its id."""
    address = f'127.0.0.1:{_free_port()}'
    procs = []
    for pid in range(PROCESSES):
        proc_env = train_env(cache, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=PROCESSES,
                             JAX_PROCESS_ID=pid, **env)
        procs.append(subprocess.Popen(train_command(tmp_path, workdir, *overrides), env=proc_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=str(tmp_path)))
    return procs


def finish(procs, timeout=TIMEOUT):
    """(returncode, stdout, stderr) of each process; all are killed if one overruns."""
    deadline = time.time() + timeout
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(deadline - time.time(), 1))
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def assert_all_ok(results):
    for pid, (code, out, err) in enumerate(results):
        assert code == 0, f'process {pid} exit {code}\n{out}\n{err[-4000:]}'


def wait_until(predicate, procs, what, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while not predicate():
        for pid, proc in enumerate(procs):
            if proc.poll() is not None:
                for other in procs:
                    if other.poll() is None:
                        other.kill()
                out, err = proc.communicate()
                raise AssertionError(f'process {pid} exited ({proc.returncode}) before {what}:\n{out}\n{err[-3000:]}')
        if time.time() > deadline:
            for proc in procs:
                proc.kill()
            raise AssertionError(f'timed out waiting for {what}')
        time.sleep(0.2)


def assert_same_state(a, b):
    want, got = load_state(a, 2 * K), load_state(b, 2 * K)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def lose_process_1_after_step_k(tmp_path, workdir, *overrides, cache, seconds):
    """Both processes train; from batch K on every batch first sleeps ``seconds``; process 1 is
    SIGKILLed once the step-K checkpoint is committed. Process 0's (returncode, stdout, stderr)
    and the seconds it took to exit after the kill."""
    mark = tmp_path / f'slow-{workdir.name}'
    procs = launch(tmp_path, workdir, *overrides, cache=cache, SLOW_AFTER=K, SLOW_SECONDS=seconds,
                   SLOW_MARK=mark, GHOSTNETV2_PEER_TIMEOUT_S=5)
    wait_until(lambda: mark.exists() and committed_steps(workdir) == [K], procs, f'the step-{K} checkpoint')
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    (code, out, err), _ = finish(procs, timeout=60)
    return code, out, err, time.time() - killed


def assert_one_line_naming_step_k(code, out, err, took):
    """Exit 1 in seconds, one error line naming the step a rerun resumes from, no dump."""
    assert code == 1, f'exit {code} after {took:.0f}s\n{out}\n{err[-4000:]}'
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(errors) == 1, err[-4000:]
    assert errors[0].startswith('error: a peer process was lost (') and errors[0].endswith(
        f'); rerunning the same command on every process resumes from step {K}'), errors[0]
    for noise in ('Traceback', 'Fatal Python error', 'Extension modules', 'Check failure', '@     0x'):
        assert noise not in err, err[-4000:]
    assert took < 40, f'{took:.0f}s'


def test_a_lost_idle_peer_is_one_line_and_the_rerun_resumes_bit_identical(tmp_path, compile_cache):
    """A straight two-process run of 2K steps; the same run with the input stalled after the
    step-K checkpoint and process 1 SIGKILLed: process 0, waiting in its input pipeline, is told by
    the peer watchdog (its timeout 5 s here) and leaves with one line naming step K, exit 1, no
    dump, in seconds (by os._exit: the workdir is as a SIGKILL of both leaves it). Rerunning the
    same command on both processes resumes from step K and ends bit-identical to the straight run."""
    straight = launch(tmp_path, tmp_path / 'straight', *COMMON, cache=compile_cache)
    results = finish(straight)
    assert_all_ok(results)
    assert 'on 2 devices' in results[0][1]               # one mesh over both processes
    assert committed_steps(tmp_path / 'straight') == [K, 2 * K]

    workdir = tmp_path / 'resumed'
    assert_one_line_naming_step_k(*lose_process_1_after_step_k(tmp_path, workdir, *COMMON, cache=compile_cache,
                                                               seconds=600))
    assert committed_steps(workdir) == [K]
    results = finish(launch(tmp_path, workdir, *COMMON, cache=compile_cache))
    assert_all_ok(results)
    assert f'(step {K})' in results[0][1]
    assert_same_state(tmp_path / 'straight', workdir)


def test_sigterm_to_one_process_makes_both_save_the_same_step_and_exit_0(tmp_path, compile_cache):
    workdir, mark = tmp_path / 'run', tmp_path / 'slow'
    procs = launch(tmp_path, workdir, '--config.num_train_steps=40', cache=compile_cache,
                   SLOW_AFTER=2, SLOW_SECONDS=0.5, SLOW_MARK=mark)
    wait_until(mark.exists, procs, 'training to be under way')
    procs[1].send_signal(signal.SIGTERM)
    results = finish(procs)
    assert_all_ok(results)
    steps = committed_steps(workdir)
    assert len(steps) == 1 and 2 <= steps[0] < 40
    for pid, (_, out, _) in enumerate(results):
        assert f'[process {pid}] preempted: saved step {steps[0]} in' in out


def test_a_launch_missing_the_process_count_is_one_clear_line():
    with pytest.raises(ValueError, match='missing: num_processes, process_id'):
        sharding.distributed_args(environ={'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1234'})
    with pytest.raises(ValueError, match=r'process id 2 is not in \[0, 2\)'):
        sharding.distributed_args('127.0.0.1:1', 2, 2, environ={})
    assert sharding.distributed_args(environ={'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '2',
                                              'JAX_PROCESS_ID': '1'}) == dict(
        coordinator_address='h:1', num_processes=2, process_id=1)
    # config values win over the environment; a cluster manager supplies what is not given
    assert sharding.distributed_args('c:2', 4, 3, environ={'JAX_COORDINATOR_ADDRESS': 'h:1'}) == dict(
        coordinator_address='c:2', num_processes=4, process_id=3)
    assert sharding.distributed_args(environ={'JAX_COORDINATOR_ADDRESS': 'h:1', 'SLURM_NTASKS': '2'}) == dict(
        coordinator_address='h:1')
    assert sharding.multihost_requested('auto', {}, num_processes=2)


def test_a_peer_lost_during_a_collective_is_one_line_naming_the_resume_step(tmp_path, compile_cache):
    """Process 0 runs on into the next step's all-reduce without process 1 (it fails at once):
    the same one line as for an idle survivor, exit 1, no dump, in seconds."""
    assert_one_line_naming_step_k(*lose_process_1_after_step_k(
        tmp_path, tmp_path / 'run', '--config.num_train_steps=40', f'--config.checkpoint_every_steps={K}',
        cache=compile_cache, seconds=0.3))
