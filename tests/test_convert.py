"""The converter: strict in both directions, the authors' file format, clear errors on bad files."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import timm
import torch
from safetensors.numpy import save_file

from ghostnetv2_jax import convert, parity, weights

NAME = 'ghostnetv2_100'


@pytest.fixture(scope='module')
def ref():
    return parity.timm_model(NAME, seed=3)


@pytest.fixture(scope='module')
def variables(ref):
    return convert.torch_to_flax(ref.state_dict(), NAME)


def cli(*args, cwd=None):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
    return subprocess.run([sys.executable, '-m', 'ghostnetv2_jax', *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_round_trip_flax_torch_flax_is_exact_and_timm_loads_strictly(variables):
    sd = convert.flax_to_torch(variables, NAME, as_torch=True)
    model = timm.create_model(NAME)
    model.load_state_dict(sd, strict=True)                      # raises on any missing/unexpected key
    back = convert.torch_to_flax(model.state_dict(), NAME)
    a, b = jax.tree_util.tree_flatten_with_path(variables)[0], jax.tree_util.tree_flatten_with_path(back)[0]
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_depthwise_and_dense_layouts(ref, variables):
    sd = ref.state_dict()
    dw = variables['params']['blocks_3_0']['conv_dw']['kernel']
    assert sd['blocks.3.0.conv_dw.weight'].shape == (72, 1, 5, 5) and dw.shape == (5, 5, 1, 72)
    np.testing.assert_array_equal(dw[1, 3, 0, 7], sd['blocks.3.0.conv_dw.weight'][7, 0, 1, 3].item())
    fc_w = variables['params']['blocks_3_0']['ghost1']['attn']['fc_w']['kernel']
    assert fc_w.shape == (1, 5, 1, 72)
    np.testing.assert_array_equal(np.asarray(variables['params']['classifier']['kernel']),
                                  sd['classifier.weight'].numpy().T)
    np.testing.assert_array_equal(np.asarray(variables['batch_stats']['blocks_9_0_bn1']['var']),
                                  sd['blocks.9.0.bn1.running_var'].numpy())


def test_missing_unexpected_and_shape_mismatch_are_named(ref):
    sd = dict(ref.state_dict())
    del sd['blocks.3.0.conv_dw.weight']
    sd['blocks.3.0.extra.weight'] = torch.zeros(3)
    sd['conv_stem.weight'] = torch.zeros(16, 3, 5, 5)
    with pytest.raises(convert.ConversionError) as e:
        convert.torch_to_flax(sd, NAME)
    msg = str(e.value)
    assert '\n' not in msg
    assert '1 missing keys: blocks.3.0.conv_dw.weight' in msg
    assert '1 unexpected keys: blocks.3.0.extra.weight' in msg
    assert 'shape mismatch at conv_stem.weight: checkpoint (16, 3, 5, 5) vs model (16, 3, 3, 3)' in msg


def test_authors_pth_tar_with_profiler_keys_converts_strictly(tmp_path, ref, variables):
    # The authors' release: a raw state_dict (not wrapped) plus thop's total_ops/total_params buffers.
    sd = dict(ref.state_dict())
    for module_name, _ in ref.named_modules():
        prefix = f'{module_name}.' if module_name else ''
        sd[prefix + 'total_ops'] = torch.zeros(1, dtype=torch.float64)
        sd[prefix + 'total_params'] = torch.zeros(1, dtype=torch.float64)
    src = tmp_path / 'ck_ghostnetv2_10.pth.tar'
    torch.save(sd, src)
    r = cli('convert', '--model', NAME, '--src', str(src), '--dst', str(tmp_path / 'out'))
    assert r.returncode == 0, r.stderr
    loaded, meta = weights.load_variables(str(tmp_path / 'out' / f'{NAME}.safetensors'))
    assert meta == {'model': NAME, 'overrides': {'num_classes': 1000}}   # the class count read from the file
    for (p, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(variables)[0],
                              jax.tree_util.tree_flatten_with_path(loaded)[0]):
        np.testing.assert_array_equal(np.asarray(x), y, err_msg=jax.tree_util.keystr(p))


def test_wrapped_checkpoint_and_ema_flag(tmp_path, ref):
    sd = ref.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    src = tmp_path / 'timm_train.pth.tar'
    torch.save({'epoch': 3, 'state_dict': sd, 'state_dict_ema': ema}, src)
    plain = convert.load_state_dict(str(src))
    averaged = convert.load_state_dict(str(src), use_ema=True)
    np.testing.assert_array_equal(plain['conv_stem.weight'], sd['conv_stem.weight'].numpy())
    np.testing.assert_array_equal(averaged['conv_stem.weight'], sd['conv_stem.weight'].numpy() + 1)
    torch.save({'model': sd}, tmp_path / 'm.pth')
    with pytest.raises(convert.ConversionError, match='no EMA weights'):
        convert.load_state_dict(str(tmp_path / 'm.pth'), use_ema=True)


def test_safetensors_checkpoint_converts_without_torch(tmp_path, ref):
    src = tmp_path / 'model.safetensors'
    save_file({k: v.numpy() for k, v in ref.state_dict().items()}, str(src))
    code = ('import sys; sys.modules["torch"] = None\n'          # any import of torch now fails
            'from ghostnetv2_jax import weights\n'
            f'w = weights.load("{src}", "{NAME}")\n'
            f'weights.save_variables("{tmp_path / "out.safetensors"}", w.variables, w.model_name, w.overrides)\n'
            'print("ok", "torch" in sys.modules and sys.modules["torch"] is not None)')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ['ok', 'False']


def test_export_cli_writes_a_state_dict_timm_loads(tmp_path, variables):
    """A torch.save file through ``python -m``; safetensors through the command's main in this process."""
    from ghostnetv2_jax.cli import main
    weights.save_variables(str(tmp_path / 'v.safetensors'), variables, NAME)
    r = cli('export', '--src', str(tmp_path / 'v.safetensors'), '--dst', str(tmp_path / 'model.pth'))
    assert r.returncode == 0, r.stderr
    assert main(['export', '--src', str(tmp_path / 'v.safetensors'), '--dst', str(tmp_path / 'model.safetensors')]) == 0
    for dst in ('model.pth', 'model.safetensors'):
        sd = convert.load_state_dict(str(tmp_path / dst))
        timm.create_model(NAME).load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)


def test_wrong_width_weights_fail_with_one_line_and_keep_existing_output(tmp_path):
    torch.manual_seed(0)
    torch.save(timm.create_model('ghostnetv2_130').state_dict(), tmp_path / 'wide.pth')
    out = tmp_path / 'out'
    out.mkdir()
    (out / f'{NAME}.safetensors').write_bytes(b'previous result')
    r = cli('convert', '--model', NAME, '--src', str(tmp_path / 'wide.pth'), '--dst', str(out))
    assert_one_line_error(r, 'does not fit ghostnetv2_100', 'shape mismatch at')
    assert (out / f'{NAME}.safetensors').read_bytes() == b'previous result'


def test_truncated_and_non_checkpoint_files_fail_with_one_line(tmp_path, ref):
    torch.save(ref.state_dict(), tmp_path / 'full.pth')
    data = (tmp_path / 'full.pth').read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(data[: len(data) // 2])
    (tmp_path / 'notes.pth').write_text('this is not a checkpoint\n')
    (tmp_path / 'bad.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    torch.save({'lr': 0.1, 'epoch': 3}, tmp_path / 'hparams.pth')
    for name in ('truncated.pth', 'notes.pth', 'bad.safetensors', 'hparams.pth', 'missing.pth'):
        r = cli('convert', '--model', NAME, '--src', str(tmp_path / name), '--dst', str(tmp_path / 'out'))
        assert_one_line_error(r, name)
    assert not (tmp_path / 'out' / f'{NAME}.safetensors').exists()


def test_parity_cli_reports_every_stage_and_passes(tmp_path):
    r = cli('parity', '--model', 'ghostnet_050', '--size', '96x80', '--batch', '2')
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('stage ') == 9 and 'logits' in r.stdout and 'PASS' in r.stdout


def test_parity_cli_fails_over_tolerance(capsys):
    """The command's main in this process (the run above is the one through ``python -m``)."""
    from ghostnetv2_jax.cli import main
    assert main(['parity', '--model', 'ghostnet_050', '--size', '64', '--tolerance', '1e-12']) == 1
    assert 'FAIL' in capsys.readouterr().out
