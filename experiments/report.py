"""A sweep's ``results.md`` and ``results.png``, computed from its ``results.csv`` alone.

Per variant (in the CSV's order): mean ± sample standard deviation over seeds of top-1 (and EMA
top-1), latency and train time; params and MACs. The noise line compares every variant's mean
top-1 with the first variant's: a difference smaller than the larger of the two standard
deviations is called within seed noise. The figure: top-1 per variant (mean ± std, each seed a
dot) and top-1 against latency.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
import statistics
from typing import Dict, List, Sequence, Tuple

MeanStd = Tuple[float, float]   # std is nan with a single value


@dataclasses.dataclass
class Summary:
    """One variant's runs, reduced."""
    variant: str
    overrides: str
    seeds: List[int]
    top1: MeanStd
    ema_top1: MeanStd
    top1_values: List[float]
    params: int
    macs: int
    latency_ms: MeanStd
    wall_s: MeanStd


def read_rows(csv_path: pathlib.Path) -> List[Dict[str, str]]:
    with open(csv_path, newline='') as f:
        return list(csv.DictReader(f))


def mean_std(values: Sequence[float]) -> MeanStd:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def _number(text: str) -> float:
    return float(text) if text not in ('', None) else math.nan


def summarize(rows: Sequence[Dict[str, str]]) -> List[Summary]:
    """One Summary per variant, in the order the variants first appear."""
    groups: Dict[str, List[Dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(row['variant'], []).append(row)
    out = []
    for variant, group in groups.items():
        column = lambda name: [_number(r[name]) for r in group]
        out.append(Summary(variant=variant, overrides=group[0]['overrides'], seeds=[int(r['seed']) for r in group],
                           top1=mean_std(column('top1')), ema_top1=mean_std(column('ema_top1')),
                           top1_values=column('top1'), params=int(float(group[0]['params'])),
                           macs=int(float(group[0]['macs'])), latency_ms=mean_std(column('latency_ms')),
                           wall_s=mean_std(column('wall_s'))))
    return out


def fmt(value: MeanStd, digits: int = 2) -> str:
    mean, std = value
    if math.isnan(mean):
        return '-'
    return f'{mean:.{digits}f}' + ('' if math.isnan(std) else f' ± {std:.{digits}f}')


def count(n: float) -> str:
    """1234567 -> '1.23M' (MACs and the like)."""
    for unit, size in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(n) >= size:
            return f'{n / size:.2f}{unit}'
    return str(int(n))


def noise_line(summaries: Sequence[Summary]) -> str:
    """Which variants' mean top-1 differs from the first variant's by less than seed noise."""
    if len(summaries) < 2:
        return 'One variant: nothing to compare.'
    ref = summaries[0]
    within, beyond, unknown = [], [], []
    for s in summaries[1:]:
        diff, noise = s.top1[0] - ref.top1[0], max(s.top1[1], ref.top1[1])
        text = f'{s.variant} ({diff:+.2f}'
        if math.isnan(noise):
            unknown.append(text + ')')
        elif abs(diff) < noise:
            within.append(text + f', noise {noise:.2f})')
        else:
            beyond.append(text + f', noise {noise:.2f})')
    parts = [f'Top-1 against `{ref.variant}` (difference of means; within seed noise when smaller than '
             'the larger of the two standard deviations over seeds).',
             f'Within seed noise: {", ".join(within) or "no variant"}.',
             f'Beyond seed noise: {", ".join(beyond) or "no variant"}.']
    if unknown:
        parts.append(f'Not decidable (a single seed): {", ".join(unknown)}.')
    return ' '.join(parts)


def latency_inputs(rows: Sequence[Dict[str, str]]) -> str:
    """What the latency was timed on, e.g. '8 images of 40x40'."""
    return ', '.join(sorted({f'{r["latency_batch"]} images of {r["image_size"]}x{r["image_size"]}' for r in rows}))


def _distinct(rows: Sequence[Dict[str, str]], column: str) -> str:
    return '; '.join(f'`{v}`' for v in sorted({r[column] for r in rows}))


def markdown(rows: Sequence[Dict[str, str]], summaries: Sequence[Summary]) -> str:
    head = ['| variant | overrides | seeds | top-1 (%) | EMA top-1 (%) | params | MACs | latency (ms) | train (s) |',
            '|---|---|---:|---:|---:|---:|---:|---:|---:|']
    body = [f'| {s.variant} | `{s.overrides}` | {len(s.seeds)} | {fmt(s.top1)} | {fmt(s.ema_top1)} | '
            f'{s.params:,} | {count(s.macs)} | {fmt(s.latency_ms)} | {fmt(s.wall_s, 0)} |' for s in summaries]
    return '\n'.join([
        f'# Sweep {_distinct(rows, "sweep")}', '',
        f'{len(rows)} runs. Base config: {_distinct(rows, "base")}. Settings for every run: '
        f'{_distinct(rows, "settings")}. Code: {_distinct(rows, "version")}.', '',
        *head, *body, '',
        noise_line(summaries), '',
        'Mean ± sample standard deviation over seeds. MACs of one image at the config\'s size; latency: '
        f'median of timed `jax.jit(predict_fn(model))` calls on this machine\'s CPU, on {latency_inputs(rows)}; '
        'train: wall time of `train_and_evaluate` (compilation included). Per-step metrics of each run: '
        'the files named in the CSV\'s `metrics_file` column.', ''])


def plot(summaries: Sequence[Summary], title: str, inputs: str, png: pathlib.Path) -> None:
    """Top-1 per variant (mean ± std, seeds as dots) and top-1 against latency."""
    from matplotlib.figure import Figure   # no pyplot: no GUI backend, safe in any process
    fig = Figure(figsize=(12, 4.8))
    left, right = fig.subplots(1, 2)
    zero = lambda std: 0.0 if math.isnan(std) else std
    for i, s in enumerate(summaries):
        left.scatter([i] * len(s.top1_values), s.top1_values, color='0.6', s=12, zorder=1)
        left.errorbar(i, s.top1[0], yerr=zero(s.top1[1]), fmt='o', color=f'C{i % 10}', capsize=5, zorder=2)
        right.errorbar(s.latency_ms[0], s.top1[0], xerr=zero(s.latency_ms[1]), yerr=zero(s.top1[1]),
                       fmt='o', color=f'C{i % 10}', capsize=4)
        right.annotate(s.variant, (s.latency_ms[0], s.top1[0]), textcoords='offset points', xytext=(5, 5),
                       fontsize=8)
    left.set_xticks(range(len(summaries)), [s.variant for s in summaries], rotation=30, ha='right')
    left.set_ylabel('top-1 (%)')
    left.set_title('top-1: mean ± std over seeds (dots: seeds)')
    right.set_xlabel(f'latency (ms, {inputs})')
    right.set_ylabel('top-1 (%)')
    right.set_title('top-1 against latency')
    right.grid(alpha=0.3)
    left.grid(axis='y', alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def write_report(csv_path: pathlib.Path, out: pathlib.Path) -> Tuple[pathlib.Path, pathlib.Path]:
    """``out/results.md`` and ``out/results.png`` from ``csv_path``."""
    rows = read_rows(csv_path)
    summaries = summarize(rows)
    md, png = out / 'results.md', out / 'results.png'
    md.write_text(markdown(rows, summaries))
    title = f'sweep {", ".join(sorted({r["sweep"] for r in rows}))}: {len(rows)} runs'
    plot(summaries, title, latency_inputs(rows), png)
    print(f'report: {md}, {png}', flush=True)
    return md, png
