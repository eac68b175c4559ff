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
import re
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

MeanStd = Tuple[float, float]   # std is nan with a single value
REPO = pathlib.Path(__file__).resolve().parents[1]


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


def first_points(curve: Sequence[Dict[str, float]]) -> Tuple[Optional[Dict[str, float]], Optional[Dict[str, float]]]:
    """The first evaluation record and the first training record after step 1 (the mean over
    its logging window: step 1, mostly compilation, is logged alone), or None."""
    evals = [r for r in curve if 'eval/top1' in r]
    trains = [r for r in curve if 'train/top1' in r and r['step'] > 1]
    return (evals[0] if evals else None), (trains[0] if trains else None)


def stability_lines(rows: Sequence[Dict[str, str]], out: pathlib.Path) -> List[str]:
    """The reference variant's seeds: top-1 spread, and when each run left chance, by the
    validation curve (CHANCE_MARGIN points above chance) and by the training curve (the training
    top-1 of the first logging window after step 1)."""
    ref = rows[0]['variant']
    runs = [r for r in rows if r['variant'] == ref]
    tops = [_number(r['top1']) for r in runs]
    mean, std = mean_std(tops)
    lines = [f'Stability of `{ref}` over {len(runs)} seeds: top-1 {fmt((mean, std))} (sample std {std:.2f} '
             f'points; range {min(tops):.2f}-{max(tops):.2f}).']
    parts, early = [], []
    for r in runs:
        path = out / r['metrics_file'] if r.get('metrics_file') else None
        classes = int(float(r['num_classes'])) if r.get('num_classes') else 0
        if not path or not path.is_file() or not classes:
            continue
        import json
        curve = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        total = max(c['step'] for c in curve)
        step, fraction = left_chance(curve, classes)
        parts.append(f'seed {r["seed"]}: ' + ('never' if math.isnan(step) else f'step {int(step)} ({100 * fraction:.0f}%)'))
        first_eval, first_train = first_points(curve)
        if first_eval is not None and first_train is not None:
            early.append(f'seed {r["seed"]}: {first_eval["eval/top1"]:.1f}% validation at step {first_eval["step"]} '
                         f'({100 * first_eval["step"] / total:.0f}%), {100 * first_train["train/top1"]:.1f}% training '
                         f'over steps 2-{first_train["step"]}')
    if parts:
        lines.append(f'First evaluation {CHANCE_MARGIN:.0f} points above chance ({100 / classes:.0f}%): '
                     + '; '.join(parts) + '.')
    if early:
        lines.append('Top-1 at the first evaluation and over the first training window (chance '
                     f'{100 / classes:.0f}%): ' + '; '.join(early) + '.')
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
                f'{r["load_after"]} after, the timing\'s own threads included)')
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


def sweep_file(name: str) -> Optional[str]:
    """The sweep file (relative to the repository) whose ``get_sweep()`` names ``name``: its
    ``sweep.name = '...'`` line, or its file name where it sets none."""
    for path in sorted((REPO / 'experiments' / 'sweeps').glob('*.py')):
        m = re.search(r"^\s*sweep\.name\s*=\s*['\"]([^'\"]+)['\"]", path.read_text(), flags=re.M)
        if (m.group(1) if m else path.stem) == name:
            return str(path.relative_to(REPO))
    return None


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f'{minutes // 60} h {minutes % 60} min' if minutes >= 60 else f'{minutes} min'


def reproduce_line(rows: Sequence[Dict[str, str]], out: Optional[pathlib.Path]) -> str:
    """The command that fills this sweep (a rerun resumes it) and the runs' wall time in all."""
    names = sorted({r['sweep'] for r in rows})
    files = [sweep_file(n) for n in names]
    where = out.resolve() if out is not None else None
    if where is not None and where.is_relative_to(REPO):
        where = where.relative_to(REPO)
    total = sum(_number(r['wall_s']) for r in rows if not math.isnan(_number(r['wall_s'])))
    command = (f'`python experiments/sweep.py --sweep {files[0]}{f" --out {where}" if where else ""}`'
               if len(files) == 1 and files[0] else None)
    return ((f'Command: {command} (a rerun resumes it; `--latency-only` times the latency again, `--report-only` '
             'rewrites this report). ' if command else '') +
            f'Wall time of the {len(rows)} runs: {_duration(total)} in all (each run\'s is in the CSV\'s `wall_s`).')


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
        reproduce_line(rows, out), '',
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


# ----------------------------------------------------------------------------- for the notebooks
def read_sweep(out: pathlib.Path) -> Tuple[List[Dict[str, str]], List[Summary]]:
    """OUT's rows and per-variant summaries (latency from OUT/latency.csv where it has the
    variant); ([], []) while OUT has no results.csv (a sweep not run yet)."""
    path = pathlib.Path(out) / 'results.csv'
    if not path.is_file():
        return [], []
    rows = read_rows(path)
    return rows, summarize(rows, read_latency(pathlib.Path(out))[0])


def read_curve(path: pathlib.Path) -> List[Dict[str, float]]:
    """A run's metrics.jsonl records ([] if the file is missing)."""
    import json
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves(out: pathlib.Path, rows: Sequence[Dict[str, str]], variant: str,
           key: str = 'eval/top1') -> Tuple[List[float], List[List[float]]]:
    """``key`` over training for every run of ``variant`` whose metrics file OUT holds: the steps
    every such run logged it at, and one list of values per run (its seed order in the rows)."""
    runs = []
    for row in rows:
        if row['variant'] == variant and row.get('metrics_file'):
            records = [r for r in read_curve(pathlib.Path(out) / row['metrics_file']) if key in r]
            if records:
                runs.append({r['step']: r[key] for r in records})
    if not runs:
        return [], []
    steps = sorted(set.intersection(*(set(r) for r in runs)))
    return steps, [[r[s] for s in steps] for r in runs]


@dataclasses.dataclass(frozen=True)
class Claim:
    """A paper's accuracy claim about a variant against the reference."""
    source: str          # where the paper makes it, e.g. 'Table 5'
    text: str            # the claim in words
    expect: str          # the variant's top-1 against the reference's that it implies: 'lower' | 'higher' | 'similar'


# What a comparison with a claim can say, strongest first; the verdict words are Difference's.
AGREES = 'agrees'                    # significant, in the claimed direction
CONTRADICTS = 'contradicts'          # significant, the other way (or at all, for a claim of similar accuracy)
CANNOT_TELL = 'cannot tell'          # within noise where the claim is a difference
CONSISTENT = 'consistent'            # within noise where the claim is similar accuracy
NOT_DECIDABLE = 'not decidable'      # fewer than two seeds on a side
NOT_RUN = 'not run yet'


@dataclasses.dataclass
class Comparison:
    """One variant of a sweep against its reference and, where the paper makes one, its claim."""
    variant: str
    summary: Optional[Summary]           # None: not run yet
    difference: Optional[Difference]     # None: the variant or the reference not run yet
    claim: Optional[Claim]

    @property
    def outcome(self) -> str:
        """NOT_RUN, NOT_DECIDABLE, or against the claim AGREES / CONTRADICTS / CANNOT_TELL /
        CONSISTENT (without a claim: the difference's verdict, 'significant' or 'within noise')."""
        d = self.difference
        if self.summary is None:
            return NOT_RUN
        if d is None or math.isnan(d.low):
            return NOT_DECIDABLE
        if self.claim is None:
            return d.verdict
        if not d.significant:
            return CONSISTENT if self.claim.expect == 'similar' else CANNOT_TELL
        seen = 'higher' if d.low > 0 else 'lower'
        return AGREES if seen == self.claim.expect else CONTRADICTS


def compare(summaries: Sequence[Summary], reference: str, claims: Optional[Dict[str, Claim]] = None,
            variants: Optional[Sequence[str]] = None) -> List[Comparison]:
    """Every variant but ``reference`` (``variants``' order, e.g. the sweep file's, so that those not
    run yet are listed too; else the summaries') against it: the 95% interval of the top-1
    difference (``difference``) and the claim of ``claims`` about it."""
    by_name = {s.variant: s for s in summaries}
    ref = by_name.get(reference)
    names = list(variants) if variants is not None else [s.variant for s in summaries]
    names += [s.variant for s in summaries if s.variant not in names]     # rows of variants the list lacks
    out = []
    for name in names:
        if name == reference:
            continue
        s = by_name.get(name)
        d = difference(ref, s) if s is not None and ref is not None else None
        out.append(Comparison(name, s, d, (claims or {}).get(name)))
    return out


def _relative(value: float, ref: Optional[float]) -> str:
    if not ref or math.isnan(ref) or math.isnan(value):
        return ''
    return f' ({100 * (value / ref - 1):+.1f}%)'


def comparison_table(comparisons: Sequence[Comparison], reference: str, summaries: Sequence[Summary],
                     seeds: Optional[Sequence[int]] = None) -> str:
    """A Markdown table: ``reference``, then every comparison, with seeds run (of ``seeds``, the
    planned ones), params and MACs (and their change against the reference's), latency where the
    sweep timed it, top-1, the 95% interval of the difference, the paper's claim and the outcome."""
    name = reference
    reference = {s.variant: s for s in summaries}.get(name)
    planned = f' of {len(seeds)}' if seeds else ''
    timed = any(c.summary is not None and not math.isnan(c.summary.latency_ms[0]) for c in comparisons) or (
        reference is not None and not math.isnan(reference.latency_ms[0]))
    head = ['| variant | seeds | params | MACs | ' + ('latency (ms) | ' if timed else '') +
            f'top-1 (%) | minus `{name}`, 95% CI | the paper | here |',
            '|---|---:|---:|---:|' + ('---:|' if timed else '') + '---:|---:|---|---|']

    def cells(s: Optional[Summary]) -> List[str]:
        if s is None:
            return ['0' + planned, '-', '-'] + (['-'] if timed else []) + ['-']
        ref_params = reference.params if reference is not None else None
        ref_macs = reference.macs if reference is not None else None
        return ([f'{len(s.seeds)}{planned}', f'{s.params:,}' + (_relative(s.params, ref_params) if s is not reference else ''),
                 count(s.macs) + (_relative(s.macs, ref_macs) if s is not reference else '')]
                + ([fmt(s.latency_ms)] if timed else []) + [fmt(s.top1)])

    body = [f'| **{name}** | ' + ' | '.join(cells(reference)) + ' | reference | | ' +
            ('' if reference is not None else NOT_RUN) + ' |']
    for c in comparisons:
        d = c.difference
        interval = ('-' if d is None else f'{d.mean:+.2f} (one seed)' if math.isnan(d.low)
                    else f'{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]')
        claim = f'{c.claim.source}: {c.claim.text}' if c.claim else '-'
        if c.outcome == NOT_DECIDABLE:
            verdict = (f'`{name}` not run yet: not decidable' if d is None else 'one seed: not decidable'
                       if len(c.summary.seeds) < 2 else f'one seed of `{name}`: not decidable')
        else:
            verdict = c.outcome if c.claim is None or c.outcome == NOT_RUN else f'{c.outcome} ({d.verdict})'
        body.append(f'| {c.variant} | ' + ' | '.join(cells(c.summary)) + f' | {interval} | {claim} | {verdict} |')
    return '\n'.join(head + body)


def _listing(items: Sequence[Comparison], reference: str) -> str:
    """The variants of one outcome: each with its interval, or why it has none."""
    parts = []
    for c in items:
        d = c.difference
        if c.summary is None:
            parts.append(f'`{c.variant}`')
        elif d is None:
            parts.append(f'`{c.variant}` (`{reference}` not run yet)')
        elif math.isnan(d.low):
            one = 'its one seed' if len(c.summary.seeds) < 2 else f'one seed of `{reference}`'
            parts.append(f'`{c.variant}` ({d.mean:+.2f} on {one})')
        else:
            parts.append(f'`{c.variant}` {d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]')
    return ', '.join(parts)


OUTCOMES = (   # the order and words of ``conclusions``
    (AGREES, 'Significant, in the direction the paper claims (agrees)'),
    (CONTRADICTS, 'Significant, against the paper\'s claim (contradicts)'),
    ('significant', 'Significant (no claim of the paper to check)'),
    (CANNOT_TELL, 'Within noise where the paper claims a difference (cannot tell: the interval holds 0, so '
                  'it shows neither the claim nor its opposite)'),
    (CONSISTENT, 'Within noise where the paper claims similar accuracy (consistent with the claim, not a proof '
                 'of it: any difference inside the interval fits the data)'),
    ('within noise', 'Within noise (no claim of the paper to check)'),
    (NOT_DECIDABLE, 'Not decidable (no interval)'),
    (NOT_RUN, 'Not run yet'),
)


def conclusions(comparisons: Sequence[Comparison], reference: str) -> str:
    """What the intervals say, as Markdown: the variants of each outcome (``OUTCOMES``) with their
    top-1 minus ``reference``'s and its 95% interval, only as strongly as the intervals allow."""
    if not comparisons:
        return 'No variant besides the reference: nothing to compare.'
    groups: Dict[str, List[Comparison]] = {}
    for c in comparisons:
        groups.setdefault(c.outcome, []).append(c)
    decidable = [c for c in comparisons if c.outcome not in (NOT_RUN, NOT_DECIDABLE)]
    head = (f'Top-1 of each variant minus `{reference}`\'s, in points, with the 95% interval of the difference '
            '(paired by seed; Welch where fewer than two seeds are shared); significant only where the '
            f'interval excludes 0. {len(decidable)} of {len(comparisons)} comparisons are decidable.')
    lines = [f'- {text}: {_listing(groups[key], reference)}.' for key, text in OUTCOMES if key in groups]
    tail = []
    if len(decidable) > 1:
        tail = ['', f'Each interval is 95% on its own: if no variant differed from `{reference}`, '
                    f'{len(decidable)} comparisons would still show about {0.05 * len(decidable):.1f} '
                    'significant by chance, so one significant result among several is weak evidence.']
    return '\n'.join([head, '', *lines, *tail])


OUTCOME_COLORS = {AGREES: 'tab:green', CONTRADICTS: 'tab:red', 'significant': 'tab:purple',
                  CANNOT_TELL: 'tab:blue', CONSISTENT: 'tab:blue', 'within noise': 'tab:blue',
                  NOT_DECIDABLE: 'tab:orange', NOT_RUN: '0.6'}


def draw_differences(ax, comparisons: Sequence[Comparison], summaries: Sequence[Summary], reference: str) -> None:
    """On matplotlib axes ``ax``: each comparison's top-1 minus ``reference``'s, its seeds as dots
    (filled: against the reference's run of the same seed; hollow: against the reference's mean,
    where it has no such run) and the mean with its 95% interval (a diamond alone without one),
    coloured by outcome; variants not run yet are named at 0."""
    from matplotlib.lines import Line2D
    ref = {s.variant: s for s in summaries}.get(reference)
    ref_seed = dict(zip(ref.seeds, ref.top1_values)) if ref is not None else {}
    measured = False
    for i, c in enumerate(comparisons):
        color = OUTCOME_COLORS.get(c.outcome, 'k')
        if c.summary is None or ref is None:
            ax.text(i, 0, NOT_RUN if c.summary is None else f'{reference} {NOT_RUN}', rotation=90, ha='center',
                    va='center', fontsize=8, color='0.4')
            continue
        measured = True
        seeds = list(zip(c.summary.seeds, c.summary.top1_values))
        paired = [v - ref_seed[k] for k, v in seeds if k in ref_seed]
        alone = [v - ref.top1[0] for k, v in seeds if k not in ref_seed]
        ax.scatter([i] * len(paired), paired, s=14, color='0.4', zorder=2)
        ax.scatter([i] * len(alone), alone, s=14, facecolors='none', edgecolors='0.4', zorder=2)
        d = c.difference
        if math.isnan(d.low):
            ax.plot(i + 0.15, d.mean, 'D', color=color, zorder=3)
        else:
            ax.errorbar(i + 0.15, d.mean, yerr=[[d.mean - d.low], [d.high - d.mean]], fmt='D', color=color,
                        capsize=5, zorder=3)
    ax.axhline(0, color='k', lw=0.8)
    ax.set_xticks(range(len(comparisons)), [c.variant for c in comparisons], rotation=30, ha='right')
    ax.set_xlim(-0.7, len(comparisons) - 0.3)
    ax.set_ylabel(f'top-1 minus {reference} (points)')
    ax.grid(axis='y', alpha=0.3)
    if not measured:
        ax.set_ylim(-1, 1)
        return
    shown = [o for o in dict.fromkeys(c.outcome for c in comparisons) if o != NOT_RUN]
    handles = [Line2D([], [], marker='D', ls='', color=OUTCOME_COLORS.get(o, 'k'), label=o) for o in shown]
    handles.append(Line2D([], [], marker='o', ls='', color='0.4', markersize=4, label='a seed'))
    ax.legend(handles=handles, fontsize=7, loc='best')


def draw_curves(ax, out: pathlib.Path, rows: Sequence[Dict[str, str]], variants: Sequence[str],
                key: str = 'eval/top1', reference: Optional[str] = None) -> int:
    """On matplotlib axes ``ax``: ``key`` over training steps per variant, the mean over its seeds
    and a band from their minimum to their maximum (``curves``); ``reference`` drawn thicker in
    black. Returns how many variants had a curve."""
    drawn = 0
    for i, variant in enumerate(variants):
        steps, runs = curves(out, rows, variant, key)
        if not runs:
            continue
        color = 'k' if variant == reference else f'C{i % 10}'
        columns = list(zip(*runs))
        ax.plot(steps, [statistics.fmean(c) for c in columns], color=color, lw=2.2 if variant == reference else 1.2,
                marker='o', markersize=2.5,
                label=f'{variant} ({len(runs)} seed{"s" if len(runs) > 1 else ""})')
        if len(runs) > 1:
            ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=color, alpha=0.12)
        drawn += 1
    ax.set_xlabel('train step')
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, 'no runs yet', transform=ax.transAxes, ha='center', va='center', color='0.4')
    return drawn


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
