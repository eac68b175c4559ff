"""A sweep's ``results.md`` and ``results.png``, computed from its ``results.csv`` alone.

Per variant (in the CSV's order): mean ± sample standard deviation over seeds of top-1 (and EMA
top-1), latency and train time; params and MACs; and the difference of its top-1 to the first
variant's (the reference) with a 95% confidence interval: paired by seed over the seeds both
ran (a seed fixes the data order and augmentation draws of every variant, so the seeds pair), or
Welch's interval where fewer than two seeds are shared. A difference is called significant only
where its interval excludes 0; otherwise it is within noise. The figure: top-1 per variant (mean
and 95% interval of the mean, each seed a dot) and top-1 against latency.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

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


def read_latency(out: pathlib.Path) -> Tuple[Dict[str, float], List[Dict[str, str]]]:
    """OUT/latency.csv (the sweep's quiet timing after its runs): variant -> ms, and its rows."""
    path = out / 'latency.csv'
    if not path.is_file():
        return {}, []
    rows = read_rows(path)
    return {r['variant']: float(r['latency_ms']) for r in rows}, rows


def mean_std(values: Sequence[float]) -> MeanStd:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def _number(text: str) -> float:
    return float(text) if text not in ('', None) else math.nan


def summarize(rows: Sequence[Dict[str, str]], latency: Optional[Dict[str, float]] = None) -> List[Summary]:
    """One Summary per variant, in the order the variants first appear; ``latency`` (variant ->
    ms, from the sweep's quiet measurement) instead of the rows' own latency column."""
    groups: Dict[str, List[Dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(row['variant'], []).append(row)
    out = []
    for variant, group in groups.items():
        column = lambda name: [_number(r[name]) for r in group]
        out.append(Summary(variant=variant, overrides=group[0]['overrides'], seeds=[int(r['seed']) for r in group],
                           top1=mean_std(column('top1')), ema_top1=mean_std(column('ema_top1')),
                           top1_values=column('top1'), params=int(float(group[0]['params'])),
                           macs=int(float(group[0]['macs'])),
                           latency_ms=((latency[variant], math.nan) if latency and variant in latency
                                       else mean_std(column('latency_ms'))),
                           wall_s=mean_std(column('wall_s'))))
    return out


@dataclasses.dataclass
class Difference:
    """A variant's top-1 minus the reference's, with its 95% confidence interval."""
    variant: str
    mean: float
    low: float
    high: float
    method: str          # 'paired (n seeds)' | 'Welch' | '' (not decidable)

    @property
    def significant(self) -> bool:
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)

    @property
    def verdict(self) -> str:
        if math.isnan(self.low):
            return 'not decidable'
        return 'significant' if self.significant else 'within noise'


def _t(q: float, df: float) -> float:
    from scipy import stats   # scikit-learn's dependency, so present wherever the digits load
    return float(stats.t.ppf(q, df))


def mean_interval(values: Sequence[float], level: float = 0.95) -> Tuple[float, float]:
    """The mean and the half-width of its ``level`` t-interval (nan for fewer than 2 values)."""
    values = [v for v in values if not math.isnan(v)]
    if len(values) < 2:
        return (statistics.fmean(values) if values else math.nan), math.nan
    n = len(values)
    return statistics.fmean(values), _t(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)


def difference(ref: 'Summary', other: 'Summary', level: float = 0.95) -> Difference:
    """``other`` - ``ref`` in top-1: paired by seed over shared seeds (>= 2), else Welch."""
    a = dict(zip(ref.seeds, ref.top1_values))
    b = dict(zip(other.seeds, other.top1_values))
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:
        d = [b[k] - a[k] for k in shared]
        mean, half = mean_interval(d, level)
        return Difference(other.variant, mean, mean - half, mean + half, f'paired ({len(shared)} seeds)')
    x, y = list(a.values()), list(b.values())
    mean = statistics.fmean(y) - statistics.fmean(x)
    if len(x) < 2 or len(y) < 2:
        return Difference(other.variant, mean, math.nan, math.nan, '')
    vx, vy = statistics.variance(x) / len(x), statistics.variance(y) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:
        return Difference(other.variant, mean, mean, mean, 'Welch')
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    half = _t(0.5 + level / 2, df) * se
    return Difference(other.variant, mean, mean - half, mean + half, 'Welch')


def differences(summaries: Sequence['Summary']) -> List[Difference]:
    """Every variant after the first against the first."""
    return [difference(summaries[0], s) for s in summaries[1:]]


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
    """Which variants' top-1 differs significantly from the first variant's (95% interval of
    the difference excludes 0) and which are within noise."""
    if len(summaries) < 2:
        return 'One variant: nothing to compare.'
    ref = summaries[0]
    groups: Dict[str, List[str]] = {'significant': [], 'within noise': [], 'not decidable': []}
    for d in differences(summaries):
        text = f'{d.variant} ({d.mean:+.2f}' + ('' if math.isnan(d.low) else f', [{d.low:+.2f}, {d.high:+.2f}]') + ')'
        groups[d.verdict].append(text)
    parts = [f'Top-1 against `{ref.variant}`: the difference of means with its 95% confidence interval '
             '(paired by seed; Welch where fewer than two seeds are shared); significant only where the '
             'interval excludes 0.',
             f'Significant: {", ".join(groups["significant"]) or "no variant"}.',
             f'Within noise: {", ".join(groups["within noise"]) or "no variant"}.']
    if groups['not decidable']:
        parts.append(f'Not decidable (a single seed): {", ".join(groups["not decidable"])}.')
    return ' '.join(parts)


CHANCE_MARGIN = 5.0   # points above chance (100 / classes) that count as having left it


def left_chance(curve: Sequence[Dict[str, float]], num_classes: int) -> Tuple[float, float]:
    """(step, fraction of training) of the first evaluation whose top-1 is CHANCE_MARGIN points
    above chance; (nan, nan) if none is. ``curve``: the run's metrics.jsonl records."""
    evals = [r for r in curve if 'eval/top1' in r]
    total = max((r['step'] for r in curve), default=0)
    for r in evals:
        if r['eval/top1'] >= 100.0 / num_classes + CHANCE_MARGIN:
            return r['step'], r['step'] / total if total else math.nan
    return math.nan, math.nan


def stability_lines(rows: Sequence[Dict[str, str]], out: pathlib.Path) -> List[str]:
    """The reference variant's seeds: top-1 spread, and when each run left chance."""
    ref = rows[0]['variant']
    runs = [r for r in rows if r['variant'] == ref]
    tops = [_number(r['top1']) for r in runs]
    mean, std = mean_std(tops)
    lines = [f'Stability of `{ref}` over {len(runs)} seeds: top-1 {fmt((mean, std))} (sample std {std:.2f} '
             f'points; range {min(tops):.2f}-{max(tops):.2f}).']
    parts = []
    for r in runs:
        path = out / r['metrics_file'] if r.get('metrics_file') else None
        classes = int(float(r['num_classes'])) if r.get('num_classes') else 0
        if not path or not path.is_file() or not classes:
            continue
        import json
        curve = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        step, fraction = left_chance(curve, classes)
        parts.append(f'seed {r["seed"]}: ' + ('never' if math.isnan(step) else f'step {int(step)} ({100 * fraction:.0f}%)'))
    if parts:
        lines.append(f'First evaluation {CHANCE_MARGIN:.0f} points above chance (100 / classes): '
                     + '; '.join(parts) + '.')
    return lines


def latency_inputs(rows: Sequence[Dict[str, str]]) -> str:
    """What the latency was timed on, e.g. '8 images of 40x40'."""
    return ', '.join(sorted({f'{r["latency_batch"]} images of {r["image_size"]}x{r["image_size"]}' for r in rows
                             if r.get('latency_batch')})) or 'nothing (not timed)'


def latency_method(rows: Sequence[Dict[str, str]], latency_rows: Sequence[Dict[str, str]]) -> str:
    """How the latency column was measured: the sweep's quiet timing (latency.csv) or the rows'."""
    if latency_rows:
        r = latency_rows[0]
        return (f'median of {r["rounds"]} interleaved rounds (one call of every variant per round) of '
                f'`jax.jit(predict_fn(model))` on {latency_inputs(latency_rows)}, this machine\'s CPU, timed after '
                f'the sweep\'s runs ({r["measured"]}, code `{r["version"]}`; load average {r["load_before"]} before, '
                f'{r["load_after"]} after)')
    return (f'median of timed `jax.jit(predict_fn(model))` calls on this machine\'s CPU, on {latency_inputs(rows)}, '
            'right after each run')


def _distinct(rows: Sequence[Dict[str, str]], column: str) -> str:
    return '; '.join(f'`{v}`' for v in sorted({r[column] for r in rows}))


def _interval(d: Optional[Difference]) -> str:
    if d is None:
        return 'reference'
    if math.isnan(d.low):
        return f'{d.mean:+.2f} (one seed)'
    return f'{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]'


def markdown(rows: Sequence[Dict[str, str]], summaries: Sequence[Summary],
             latency_rows: Sequence[Dict[str, str]] = (), out: Optional[pathlib.Path] = None) -> str:
    diffs = {d.variant: d for d in differences(summaries)} if len(summaries) > 1 else {}
    head = ['| variant | overrides | seeds | top-1 (%) | vs reference (95% CI) | | EMA top-1 (%) | params | MACs | '
            'latency (ms) | train (s) |',
            '|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|']
    body = [f'| {s.variant} | `{s.overrides}` | {len(s.seeds)} | {fmt(s.top1)} | {_interval(diffs.get(s.variant))} | '
            f'{diffs[s.variant].verdict if s.variant in diffs else ""} | {fmt(s.ema_top1)} | '
            f'{s.params:,} | {count(s.macs)} | {fmt(s.latency_ms)} | {fmt(s.wall_s, 0)} |' for s in summaries]
    return '\n'.join([
        f'# Sweep {_distinct(rows, "sweep")}', '',
        f'{len(rows)} runs. Base config: {_distinct(rows, "base")}. Settings for every run: '
        f'{_distinct(rows, "settings")}. Code: {_distinct(rows, "version")}.', '',
        *head, *body, '',
        noise_line(summaries), '',
        *([' '.join(stability_lines(rows, out)), ''] if out is not None else []),
        'Mean ± sample standard deviation over seeds. MACs of one image at the config\'s size; latency: '
        f'{latency_method(rows, latency_rows)}; train: wall time of `train_and_evaluate` (compilation included). '
        'Per-step metrics of each run: the files named in the CSV\'s `metrics_file` column.', ''])


def plot(summaries: Sequence[Summary], title: str, inputs: str, png: pathlib.Path) -> None:
    """Top-1 per variant (mean ± std, seeds as dots) and top-1 against latency."""
    from matplotlib.figure import Figure   # no pyplot: no GUI backend, safe in any process
    fig = Figure(figsize=(12, 4.8))
    left, right = fig.subplots(1, 2)
    zero = lambda std: 0.0 if math.isnan(std) else std
    for i, s in enumerate(summaries):
        left.scatter([i] * len(s.top1_values), s.top1_values, color='0.6', s=12, zorder=1)
        left.errorbar(i, s.top1[0], yerr=zero(mean_interval(s.top1_values)[1]), fmt='o', color=f'C{i % 10}',
                      capsize=5, zorder=2)
        right.errorbar(s.latency_ms[0], s.top1[0], xerr=zero(s.latency_ms[1]), yerr=zero(s.top1[1]),
                       fmt='o', color=f'C{i % 10}', capsize=4)
        right.annotate(s.variant, (s.latency_ms[0], s.top1[0]), textcoords='offset points', xytext=(5, 5),
                       fontsize=8)
    left.set_xticks(range(len(summaries)), [s.variant for s in summaries], rotation=30, ha='right')
    left.set_ylabel('top-1 (%)')
    left.set_title('top-1: mean and 95% interval of the mean (dots: seeds)')
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
    latency, latency_rows = read_latency(out)
    summaries = summarize(rows, latency)
    md, png = out / 'results.md', out / 'results.png'
    md.write_text(markdown(rows, summaries, latency_rows, out))
    title = f'sweep {", ".join(sorted({r["sweep"] for r in rows}))}: {len(rows)} runs'
    plot(summaries, title, latency_inputs(latency_rows or rows), png)
    print(f'report: {md}, {png}', flush=True)
    return md, png
