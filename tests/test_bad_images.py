"""Damaged images in an image folder: checked before training, skipped (masked out, named once,
counted per epoch) or an error naming the file; resume stays exact while skipping."""
import io
import json
import pathlib
import signal

import jax
import numpy as np
import pytest
from PIL import Image

from ghostnetv2_jax import data
from ghostnetv2_jax.data import pipeline, sources as S
from test_trainer import (assert_ok, committed_steps, compile_cache, load_state, read_jsonl,  # noqa: F401
                          run_training, start_training, wait_for)

GOOD = {'ant': 46, 'bee': 47}     # + 3 damaged files: 96 listed, 3 batches of 32 per epoch
BATCH = 32


def _png(rng) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, (16, 16, 3), np.uint8)).save(buffer, 'PNG')
    return buffer.getvalue()


def _jpeg(rng) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, (24, 24, 3), np.uint8)).save(buffer, 'JPEG')
    return buffer.getvalue()


def make_folder(root: pathlib.Path) -> dict:
    """train/{ant,bee} and validation/{ant,bee} with good PNGs, and in train three damaged files:
    a truncated JPEG, an empty file and a text file named .png. Returns the damaged paths."""
    rng = np.random.RandomState(0)
    for split, counts in (('train', GOOD), ('validation', {'ant': 8, 'bee': 8})):
        for name, n in counts.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                (root / split / name / f'{i:03d}.png').write_bytes(_png(rng))
    bad = {'truncated': root / 'train' / 'ant' / 'broken.jpg', 'empty': root / 'train' / 'bee' / 'empty.png',
           'text': root / 'train' / 'bee' / 'notes.png'}
    jpeg = _jpeg(rng)
    bad['truncated'].write_bytes(jpeg[:len(jpeg) // 2])
    bad['empty'].write_bytes(b'')
    bad['text'].write_text('not an image, whatever its name says\n')
    return {k: str(v) for k, v in bad.items()}


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('bad_images')
    return root, make_folder(root)


def _config(root, **fields):
    return {'dataset': f'folder:{root}', 'image_size': 16, 'crop_pct': 1.0, 'randaugment': '',
            'color_jitter': 0.0, 'reprob': 0.0, 'hflip': 0.0, **fields}


def test_check_image_file_names_what_is_wrong(folder):
    _, bad = folder
    assert S.check_image_file(bad['empty']) == 'empty file'
    assert S.check_image_file(bad['text']).startswith('not a JPEG, PNG, GIF or BMP image')
    assert S.check_image_file(bad['truncated']).startswith('damaged or truncated JPEG (')
    assert S.check_image_file(str(pathlib.Path(bad['empty']).with_name('000.png'))) is None
    assert S.check_image_file(bad['empty'] + '.missing').startswith('cannot be read')


def test_listing_reports_non_images_and_empty_class_folders(tmp_path):
    make_folder(tmp_path)
    (tmp_path / 'train' / 'ant' / 'README.txt').write_text('about the ants')
    (tmp_path / 'train' / 'ant' / '.DS_Store').write_text('hidden files are ignored')
    (tmp_path / 'train' / 'cat').mkdir()
    source = S.image_folder(str(tmp_path), 'train')
    assert source.class_names == ('ant', 'bee', 'cat')
    assert [(pathlib.Path(p).name, why.split(' (')[0]) for p, why in source.listing_problems] == [
        ('README.txt', 'not an image file by its extension'), ('cat', 'class folder without images')]


def _epochs(split, n):
    return [next(split.iterator) for _ in range(n * split.steps_per_epoch)]


def test_skip_masks_each_damaged_file_and_names_it_once(folder):
    root, bad = folder
    lines = []
    split = data.create_split(_config(root), split='train', train=True, global_batch=BATCH, seed=0,
                              on_skip=lines.append)
    # the check before any batch names all three, with what is wrong
    assert sorted(line.split(': ')[0] for line in lines) == sorted(f'skipped {p}' for p in bad.values())
    batches = _epochs(split, 2)
    assert split.steps_per_epoch == 3 and len(lines) == 3          # met twice, named once
    for epoch in (batches[:3], batches[3:]):
        masks = np.concatenate([b['mask'] for b in epoch])
        assert masks.sum() == 93 and (masks == 0).sum() == 3      # every good image once an epoch
    for b in batches:
        assert set(b) == {'images', 'labels', 'mask'} and b['images'].shape == (BATCH, 16, 16, 3)
        assert np.isfinite(b['images']).all()


def test_without_the_check_the_pipeline_itself_masks_unreadable_files(folder, monkeypatch):
    root, bad = folder
    monkeypatch.setattr(S, 'check_image_files', lambda paths: [])
    lines = []
    split = data.create_split(_config(root), split='train', train=True, global_batch=BATCH, seed=0,
                              on_skip=lines.append)
    assert lines == []
    masks = np.concatenate([b['mask'] for b in _epochs(split, 1)])
    assert (masks == 0).sum() == 3
    assert sorted(line.split(': ')[0] for line in lines) == sorted(f'skipped {p}' for p in bad.values())
    assert any('jpeg::Uncompress failed' in line for line in lines)    # the decoder's own reason

    strict = data.create_split(_config(root, bad_images='error'), split='train', train=True,
                               global_batch=BATCH, seed=0)
    with pytest.raises(S.DataError, match=r'^/.*: .*; fix or remove it, or set data.bad_images=skip'):
        _epochs(strict, 1)


def test_error_stops_before_any_batch_naming_the_first_file(folder):
    root, bad = folder
    with pytest.raises(S.DataError) as error:
        data.create_split(_config(root, bad_images='error'), split='train', train=True,
                          global_batch=BATCH, seed=0)
    message = str(error.value)
    assert message.startswith(f'{bad["truncated"]}: damaged or truncated JPEG (')   # first in path order
    assert '(and 2 more problems)' in message and '\n' not in message


def test_skipped_rows_weigh_nothing_in_the_loss():
    from ghostnetv2_jax.train import steps
    values = np.array([1.0, 2.0, 30.0, 4.0], np.float32)
    assert float(steps.masked_mean(values, np.array([1, 1, 0, 1], np.float32))) == pytest.approx(7 / 3)
    assert float(steps.masked_mean(values, None)) == pytest.approx(37 / 4)


def test_eval_masks_damaged_files_and_counts_only_good_ones(folder):
    root, _ = folder
    split = data.create_split(_config(root), split='train', train=False, global_batch=40, seed=0,
                              on_skip=lambda line: None)
    batches = list(split.iterator)
    assert len(batches) == 3 and sum(b['mask'].sum() for b in batches) == 93


def test_bad_images_must_be_skip_or_error():
    with pytest.raises(ValueError, match="bad_images must be one of"):
        pipeline.DataConfig(bad_images='ignore')


# ----------------------------------------------------------------------------- through the trainer
RUN = ('--config.num_train_steps=6', '--config.checkpoint_every_steps=2', '--config.eval_batch_size=16',
       '--config.log_every_steps=100')


def _dataset(root):
    return f'--config.data.dataset=folder:{root}'


def test_training_skips_names_once_and_counts_per_epoch_and_resumes_exactly(tmp_path, folder, compile_cache):
    root, bad = folder
    straight = run_training(tmp_path, tmp_path / 'straight', *RUN, _dataset(root), cache=compile_cache)
    assert_ok(straight)
    for path in bad.values():
        assert straight.stdout.count(f'data: skipped {path}: ') == 1, straight.stdout
    counts = [r['train/skipped_images'] for r in read_jsonl(tmp_path / 'straight' / 'metrics.jsonl')
              if 'train/skipped_images' in r]
    assert counts == [3.0, 3.0]                                     # 2 epochs of 3 steps
    assert 'epoch 1: 3 unreadable images skipped' in straight.stdout

    # SIGKILL mid-epoch (after the step-2 checkpoint), rerun: the same final state, bit for bit.
    workdir = tmp_path / 'resumed'
    proc = start_training(tmp_path, workdir, *RUN, _dataset(root), cache=compile_cache,
                          SLOW_AFTER=2, SLOW_SECONDS=600)
    try:
        wait_for(lambda: committed_steps(workdir) == [2], proc, what='the step-2 checkpoint')
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    resumed = run_training(tmp_path, workdir, *RUN, _dataset(root), cache=compile_cache)
    assert_ok(resumed)
    assert 'resumed from' in resumed.stdout
    want, got = load_state(tmp_path / 'straight', 6), load_state(workdir, 6)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    counts = [r['train/skipped_images'] for r in read_jsonl(workdir / 'metrics.jsonl') if 'train/skipped_images' in r]
    assert counts == [3.0, 3.0]          # the epoch cut by the kill still counts all three


def test_training_with_error_stops_before_compiling_in_one_line(tmp_path, folder, compile_cache):
    root, bad = folder
    result = run_training(tmp_path, tmp_path / 'run', *RUN, _dataset(root), '--config.data.bad_images=error',
                          cache=compile_cache)
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(error) == 1 and error[0].startswith(f'error: {bad["truncated"]}: damaged or truncated JPEG')
    assert 'step 1/' not in result.stdout and committed_steps(tmp_path / 'run') == []
