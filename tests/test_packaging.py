"""pyproject.toml's dependency ranges against the exact pins of requirements*.txt, and its package
data against the files in the tree. Fast and offline: reads files only."""
import pathlib
import re
from typing import Dict, List, Optional, Tuple

import pytest

try:
    import tomllib
except ImportError:   # Python 3.10
    tomllib = pytest.importorskip('tomli')

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:   # a minimal stand-in: names, extras, and ==, !=, <, <=, >, >=, ~= on release numbers
    Requirement = Version = None

    def canonicalize_name(name: str) -> str:
        return re.sub(r'[-_.]+', '-', name).lower()

REPO = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / 'pyproject.toml').read_text())
PROJECT = PYPROJECT['project']
SELF = canonicalize_name(PROJECT['name'])


# ------------------------------------------------------------------ requirement parsing
_REQ = re.compile(r'^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*([^;]*?)\s*(?:;.*)?$')


def _release(text: str) -> Tuple[int, ...]:
    m = re.match(r'^\s*v?(\d+(?:\.\d+)*)', text)
    if not m:
        raise ValueError(f'cannot compare version {text!r} without packaging')
    return tuple(int(p) for p in m.group(1).split('.'))


def _cmp(a: Tuple[int, ...], b: Tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


def _minimal_contains(specifier: str, version: str) -> bool:
    v = _release(version)
    for clause in filter(None, (c.strip() for c in specifier.split(','))):
        op, bound = re.match(r'^(~=|==|!=|<=|>=|<|>)\s*(.+)$', clause).groups()
        if bound.endswith('.*'):
            prefix = _release(bound[:-2])
            same = v[:len(prefix)] == prefix
            if (op == '==') != same:
                return False
            continue
        b = _release(bound)
        c = _cmp(v, b)
        ok = {'==': c == 0, '!=': c != 0, '<': c < 0, '<=': c <= 0, '>': c > 0, '>=': c >= 0,
              '~=': c >= 0 and v[:len(b) - 1] == b[:len(b) - 1]}[op]
        if not ok:
            return False
    return True


class Req:
    """A requirement string: canonical name, extras, specifier (text), and ``contains(version)``."""

    def __init__(self, text: str):
        self.text = text
        if Requirement is not None:
            r = Requirement(text)
            self.name, self.extras, self.specifier = canonicalize_name(r.name), set(r.extras), str(r.specifier)
            self._spec = r.specifier
        else:
            m = _REQ.match(text)
            assert m, f'cannot parse requirement {text!r}'
            self.name = canonicalize_name(m.group(1))
            self.extras = {e.strip() for e in (m.group(2) or '').split(',') if e.strip()}
            self.specifier, self._spec = m.group(3).replace(' ', ''), None

    def contains(self, version: str) -> bool:
        if self._spec is not None:
            return self._spec.contains(Version(version), prereleases=True)
        return _minimal_contains(self.specifier, version)

    def pinned(self) -> Optional[str]:
        m = re.fullmatch(r'===?([^,*]+)', self.specifier)
        return m.group(1) if m else None

    def __repr__(self) -> str:
        return self.text


def read_requirements(path: pathlib.Path) -> List[Req]:
    """Requirement lines of a requirements file, following ``-r`` includes."""
    reqs = []
    for raw in path.read_text().splitlines():
        line = raw.split(' #')[0].strip() if not raw.lstrip().startswith('#') else ''
        if not line:
            continue
        if line.startswith(('-r ', '--requirement ')):
            reqs += read_requirements(path.parent / line.split(None, 1)[1])
        elif line.startswith('-'):
            continue   # other pip options
        else:
            reqs.append(Req(line))
    return reqs


def pins(path: pathlib.Path) -> Dict[str, Tuple[Req, str]]:
    out = {}
    for r in read_requirements(path):
        v = r.pinned()
        assert v is not None, f'{path.name}: {r} is not an exact pin (name==version)'
        assert r.name not in out or out[r.name][1] == v, f'{path.name}: {r.name} pinned twice differently'
        out[r.name] = (r, v)
    return out


RUNTIME = [Req(t) for t in PROJECT.get('dependencies', [])]
EXTRAS = {name: [Req(t) for t in reqs] for name, reqs in PROJECT.get('optional-dependencies', {}).items()}
RUNTIME_PINS = pins(REPO / 'requirements.txt')
ALL_PINS = pins(REPO / 'requirements-dev.txt')   # includes requirements.txt
LATEST_PINS = pins(REPO / 'requirements-latest.txt')   # the newest JAX line (make test-latest)


def declared() -> List[Tuple[str, Req]]:
    """(where, requirement) for every dependency pyproject declares, except self-references."""
    out = [('dependencies', r) for r in RUNTIME]
    out += [(f'optional-dependencies.{name}', r) for name, reqs in EXTRAS.items() for r in reqs if r.name != SELF]
    return out


# ------------------------------------------------------------------ the checks
def test_minimal_version_comparison():
    # the stand-in used when packaging is not installed; checked here either way
    assert _minimal_contains('>=0.10.2,<0.11', '0.10.2')
    assert _minimal_contains('>=0.10.2,<0.11', '0.10.9')
    assert not _minimal_contains('>=0.10.2,<0.11', '0.11.0')
    assert not _minimal_contains('>=0.10.2,<0.11', '0.10.1')
    assert _minimal_contains('>=2.4,<3', '2.4.0') and not _minimal_contains('>=2.4,<3', '3')
    assert _minimal_contains('~=1.0.29', '1.0.30') and not _minimal_contains('~=1.0.29', '1.1.0')
    assert _minimal_contains('==2.21.*', '2.21.3') and not _minimal_contains('!=2.21.*', '2.21.3')
    assert _minimal_contains('', '1.0')


def test_pyproject_declares_dependencies():
    assert RUNTIME, 'pyproject.toml declares no runtime dependencies'
    assert {'train', 'torch', 'dev'} <= set(EXTRAS), sorted(EXTRAS)
    for where, r in declared():
        assert r.specifier, f'{where}: {r} has no version range'


def test_pins_satisfy_pyproject_ranges():
    checked, bad = 0, []
    for where, req in declared():
        if req.name in ALL_PINS:   # extras without a pin (notebooks) are not installed by make
            pin, version = ALL_PINS[req.name]
            checked += 1
            if not req.contains(version):
                bad.append(f'{pin} (requirements) is outside pyproject {where}: {req}')
    assert not bad, bad
    assert checked >= len(RUNTIME)


def test_newest_jax_pins_satisfy_pyproject_ranges_and_pin_every_runtime_dependency():
    """The range covers both tested ends: requirements.txt (the oldest, Python 3.11) and
    requirements-latest.txt (the newest JAX line, Python >= 3.12)."""
    bad = [f'{LATEST_PINS[r.name][0]} is outside pyproject {where}: {r}' for where, r in declared()
           if r.name in LATEST_PINS and not r.contains(LATEST_PINS[r.name][1])]
    assert not bad, bad
    assert not [r.name for r in RUNTIME if r.name not in LATEST_PINS]
    jax_line = lambda pins_: tuple(int(x) for x in pins_['jax'][1].split('.')[:2])
    assert jax_line(RUNTIME_PINS) < jax_line(LATEST_PINS), 'the two environments test the same JAX line'


def test_every_runtime_dependency_is_pinned_in_requirements_txt():
    missing = [str(r) for r in RUNTIME if r.name not in RUNTIME_PINS]
    assert not missing, f'runtime dependencies without a pin in requirements.txt: {missing}'


def test_every_train_and_torch_dependency_is_pinned():
    missing = [f'{extra}: {r}' for extra in ('train', 'torch') for r in EXTRAS[extra] if r.name not in ALL_PINS]
    assert not missing, f'extras without a pin in requirements*.txt: {missing}'
    train_missing = [str(r) for r in EXTRAS['train'] if r.name not in RUNTIME_PINS]
    assert not train_missing, f'`make demo` installs requirements.txt only; it lacks {train_missing}'


def test_dev_extra_brings_the_torch_extra():
    dev = EXTRAS['dev']
    names = {r.name for r in dev}
    via_self = set().union(*(r.extras for r in dev if r.name == SELF))
    missing = [str(r) for r in EXTRAS['torch'] if r.name not in names and 'torch' not in via_self]
    assert not missing, f'dev extra lacks the torch extra: {missing}'
    assert {'pytest', 'pytest-xdist'} <= names


def test_self_references_name_existing_extras():
    for name, reqs in EXTRAS.items():
        for r in reqs:
            if r.name == SELF:
                assert r.extras <= set(EXTRAS), f'{name}: {r} names an unknown extra'
                assert name not in r.extras, f'{name} refers to itself'


def _package_data() -> List[Tuple[str, str]]:
    data = PYPROJECT.get('tool', {}).get('setuptools', {}).get('package-data', {})
    return [(pkg, glob) for pkg, globs in data.items() for glob in globs]


def test_package_data_is_declared():
    assert ('ghostnetv2_jax.kernels', 'csrc/*.cc') in _package_data()


@pytest.mark.parametrize('package, glob', _package_data())
def test_package_data_globs_match_files(package, glob):
    root = REPO / package.replace('.', '/') if package else REPO
    if package == 'ghostnetv2_jax.kernels' and not (root / 'csrc').is_dir():
        pytest.skip('ghostnetv2_jax/kernels/csrc/ does not exist yet (the C++ sources have not moved there)')
    assert root.is_dir(), f'package-data names {package}, which has no directory {root}'
    assert list(root.glob(glob)), f'package-data {package}: {glob!r} matches no file under {root}'
