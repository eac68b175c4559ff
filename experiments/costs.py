"""The paper's efficiency claims, measured here: params, MACs and CPU latency of every DFC switch
and attention variant, the paper's claim beside each, and whether this machine agrees.

  python experiments/costs.py [--size 224] [--batch 1] [--rounds 40] [--threshold 0.05] \
      [--out experiments/results/costs]

Every variant is GhostNetV2 1.0x (``--model``) with one change. Latency is the median over
``--rounds`` rounds; each round times one call of every variant in turn (order rotated per
round), so that the machine's drift falls on all alike. Two paths are timed: this project's
``predict_fn`` (``fused``: on CPU the released DFC gate, a sigmoid before a nearest up-sampling,
runs inside the fused ghost-module op, the other switches do not) and ``predict_fn(fuse=False)``
(``unfused``: every variant as its modules are written, the like-for-like comparison of the
operations themselves). A claim about latency is checked on the ratio of medians against the
variant it names: 'yes' when beyond ``--threshold`` in the claimed direction (or within it for
a claim of similar latency), 'no' when beyond it the other way, 'tie' otherwise.
Writes OUT/costs.csv and OUT/costs.md.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import pathlib
import platform
import statistics
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # run as a script from any cwd: the checkout's packages
    sys.path.insert(0, str(REPO))

from experiments import measure  # noqa: E402
from experiments.sweep import code_version, normalize  # noqa: E402
from ghostnetv2_jax import create_model  # noqa: E402

PATHS = ('fused', 'unfused')
V1_WIDTHS = tuple(round(1.0 + 0.05 * i, 2) for i in range(9))   # 1.0 .. 1.4: the V1 width search
COLUMNS = ('variant', 'description', 'model', 'overrides', 'params', 'macs', 'ms_fused', 'ms_unfused',
           'reference', 'ratio_fused', 'ratio_unfused', 'paper', 'agrees_fused', 'agrees_unfused')


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    description: str
    overrides: Mapping[str, Any]        # create_model overrides on top of --model's
    model: Optional[str] = None         # another registered model (V1)


@dataclasses.dataclass(frozen=True)
class Claim:
    reference: str                      # the variant the claim compares with
    expect: Optional[str]               # this variant is 'faster' | 'slower' | 'similar'; None: no latency claim
    paper: str


def _dfc(**switch) -> Dict[str, Any]:
    return {'attention_kwargs': switch}


VARIANTS = (
    Variant('released', 'GhostNetV2: DFC 5x5, avg pool, sigmoid, then nearest up-sampling', {}),
    Variant('gate_after_upsample', 'sigmoid after the up-sampling', _dfc(gate_before_upsample=False)),
    Variant('max_pool', '2x2 max pooling to down-sample', _dfc(downsample='max')),
    Variant('bilinear', 'bilinear up-sampling', _dfc(upsample='bilinear')),
    Variant('bicubic', 'bicubic up-sampling', _dfc(upsample='bicubic')),
    Variant('se', 'SE in place of DFC', {'attention': 'se'}),
    Variant('cbam', 'CBAM in place of DFC', {'attention': 'cbam'}),
    Variant('coord', 'Coordinate Attention in place of DFC', {'attention': 'coord'}),
    Variant('none', 'no attention (GhostNet V1 at the same width)', {'attention': 'none'}),
    Variant('v1_matched', 'GhostNet V1 widened to the released model\'s MACs', {}, model='ghostnet_100'),
)

CLAIMS = {
    'gate_after_upsample': Claim('released', 'slower', 'Table 9: the sigmoid before up-sampling is much faster '
                                 'than after it, at similar accuracy'),
    'max_pool': Claim('released', 'faster', 'Table 10: max pooling is slightly faster than average pooling '
                      '(37.5 vs 38.4 ms on a phone, 2%)'),
    'bilinear': Claim('released', None, 'no claim for nearest (the released code\'s choice); Table 10 '
                      'compares bilinear with bicubic'),
    'bicubic': Claim('bilinear', 'slower', 'Table 10: bicubic is slower than bilinear (39.9 vs 37.5 ms, 6%)'),
    'se': Claim('released', None, 'Table 5 (on MobileNetV2): DFC is more accurate than SE; no cost claim'),
    'cbam': Claim('released', None, 'Table 5 (on MobileNetV2): DFC is more accurate than CBAM; no cost claim'),
    'coord': Claim('released', None, 'Table 5 (on MobileNetV2): DFC is more accurate than CA; no cost claim'),
    'none': Claim('released', None, 'GhostNet V1 1.0x: 141M FLOPs to V2\'s 167M; no latency claim at equal width'),
    'v1_matched': Claim('released', 'similar', 'Sec. 3.1: at similar FLOPs (167M) and latency (about 37 ms), '
                        'V2 reaches 75.3% to V1\'s 74.5%'),
}


def verdict(ratio: float, expect: Optional[str], threshold: float) -> str:
    """Whether a latency ratio (variant / reference) agrees with the claimed relation."""
    if expect is None or math.isnan(ratio):
        return '-'
    if expect == 'similar':
        return 'yes' if abs(ratio - 1) <= threshold else 'no'
    faster, slower = ratio < 1 - threshold, ratio > 1 + threshold
    if (faster, slower) == (False, False):
        return f'tie (within {threshold:.0%})'
    return 'yes' if (expect == 'faster') == faster else 'no'


def build_models(model: str, base: Mapping[str, Any], size: int) -> Dict[str, Any]:
    """Every variant's flax model; V1's width is the one of V1_WIDTHS whose MACs are closest to
    the released model's at ``size``."""
    models = {v.name: create_model(v.model or model, **{**base, **v.overrides}) for v in VARIANTS}
    target = measure.params_and_macs(models['released'], size)[1]
    v1 = {w: create_model('ghostnet_100', **{**base, 'width': w}) for w in V1_WIDTHS}
    width = min(V1_WIDTHS, key=lambda w: abs(measure.params_and_macs(v1[w], size)[1] - target))
    models['v1_matched'] = v1[width]
    return models


def _row(v: Variant, flax_model, ms: Mapping[tuple, float], size: int, threshold: float,
         model: str) -> Dict[str, Any]:
    """A variant's row: its costs, and each path's latency ratio to the claim's variant, judged."""
    params, macs = measure.params_and_macs(flax_model, size)
    claim = CLAIMS.get(v.name, Claim('', None, '-'))
    overrides = {**v.overrides, 'width': flax_model.width} if v.model else v.overrides
    row = dict(variant=v.name, description=v.description + (f' (width {flax_model.width})' if v.model else ''),
               model=v.model or model, overrides=json.dumps(normalize(overrides), sort_keys=True),
               params=params, macs=macs, reference=claim.reference, paper=claim.paper)
    for p in PATHS:
        mine, ref = ms.get((v.name, p), math.nan), ms.get((claim.reference, p), math.nan)
        ratio = mine / ref if claim.reference else math.nan
        row.update({f'ms_{p}': round(mine, 3), f'ratio_{p}': round(ratio, 3),
                    f'agrees_{p}': verdict(ratio, claim.expect, threshold)})
    return row


def measure_all(model: str = 'ghostnetv2_100', base: Optional[Mapping[str, Any]] = None, size: int = 224,
                batch: int = 1, rounds: int = 40, paths: Sequence[str] = PATHS,
                threshold: float = 0.05) -> List[Dict[str, Any]]:
    """One row per variant (COLUMNS): params, MACs, median latency per path, the claim and verdict.
    Every program is compiled before any is timed."""
    models = build_models(model, normalize(base or {}), size)
    calls = {(name, p): measure.compiled_predict(m, batch, size, fuse=p == 'fused')
             for name, m in models.items() for p in paths}
    ms = {key: statistics.median(t) for key, t in measure.interleaved_ms(calls, rounds).items()}
    return [_row(v, models[v.name], ms, size, threshold, model) for v in VARIANTS]


def markdown(rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    from experiments.report import count
    cell = lambda x: '-' if isinstance(x, float) and math.isnan(x) else x
    lines = [
        '# What the DFC switches and attention variants cost on this machine', '',
        f'{settings["model"]} variants at {settings["size"]}x{settings["size"]}, batch {settings["batch"]}, '
        f'CPU ({settings["machine"]}); latency: median of {settings["rounds"]} interleaved rounds, in ms; '
        f'a claim holds when the ratio to the named variant is beyond ±{settings["threshold"]:.0%} in its '
        f'direction (within it for "similar"). Code: `{settings["version"]}`.', '',
        '| variant | change | params | MACs | ms fused | ms unfused | vs | ratio fused | ratio unfused | '
        'the paper | agrees (fused) | agrees (unfused) |',
        '|---|---|---:|---:|---:|---:|---|---:|---:|---|---|---|']
    for r in rows:
        lines.append(f'| {r["variant"]} | {r["description"]} | {r["params"]:,} | {count(r["macs"])} | '
                     f'{cell(r["ms_fused"])} | {cell(r["ms_unfused"])} | {r["reference"] or "-"} | '
                     f'{cell(r["ratio_fused"])} | {cell(r["ratio_unfused"])} | {r["paper"]} | '
                     f'{r["agrees_fused"]} | {r["agrees_unfused"]} |')
    lines += ['', '`fused`: `predict_fn(model)` as users run it (the released gate is fused into the ghost-module '
              'op, other switches run unfused); `unfused`: `predict_fn(model, fuse=False)`, every variant as '
              'written. The paper\'s latencies are on a phone (ARM, batch 1); its FLOPs are MACs. MACs as '
              '`ghostnetv2_jax.summary.count_macs` counts them: it counts the interpolation-matrix products of '
              'the bilinear and bicubic up-sampling (`layers.helpers.resize`), not the copies of the nearest one.', '']
    return '\n'.join(lines)


def write(rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any], out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / 'costs.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / 'costs.md').write_text(markdown(rows, settings))
    print(f'costs: {out / "costs.md"}, {out / "costs.csv"}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False)
    parser.add_argument('--model', default='ghostnetv2_100')
    parser.add_argument('--overrides', default='{}', help='JSON: create_model overrides for every variant')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--rounds', type=int, default=40)
    parser.add_argument('--paths', default=','.join(PATHS), help='fused, unfused or both')
    parser.add_argument('--threshold', type=float, default=0.05, help='relative latency difference called real')
    parser.add_argument('--out', default=str(REPO / 'experiments' / 'results' / 'costs'))
    args = parser.parse_args(argv)
    paths = [p for p in args.paths.split(',') if p]
    try:
        base = json.loads(args.overrides)
        if set(paths) - set(PATHS) or not paths or not isinstance(base, dict):
            raise ValueError(f'--paths must name {PATHS}, --overrides a JSON object')
        rows = measure_all(args.model, base, args.size, args.batch, args.rounds, paths, args.threshold)
    except (ValueError, TypeError) as e:
        print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
        return 1
    settings = dict(vars(args), machine=f'{platform.machine()}, {os.cpu_count()} cores', version=code_version())
    write(rows, settings, pathlib.Path(args.out))
    return 0


if __name__ == '__main__':
    sys.exit(main())
