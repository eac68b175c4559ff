"""The package's structure: the model is architecture only, and no module imports in a circle."""
import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'ghostnetv2_jax'
# The model files read like the paper: what these names stand for lives in kernels/ and runtime/.
MODEL_FILES = sorted(PACKAGE.glob('models/*.py')) + [PACKAGE / 'layers' / 'attention.py']
FORBIDDEN = ('ghostnetv2_jax.kernels', 'ghostnetv2_jax.runtime', 'native', 'fused', 'fusible', 'ffi',
             'custom_call', 'gate_only', 'affine_only', 'kernel_only', 'conv_fn', 'strided', 'platform',
             'default_backend', 'chunk')


def _imports(path: pathlib.Path):
    """Modules of this package that ``path`` imports (at any depth: function-level too)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('ghostnetv2_jax'):
            names.add(node.module)
            names.update(f'{node.module}.{a.name}' for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith('ghostnetv2_jax'))
    return names


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


@pytest.mark.parametrize('path', MODEL_FILES, ids=lambda p: p.name)
def test_the_model_files_hold_architecture_only(path):
    text = path.read_text().lower()
    found = [word for word in FORBIDDEN if re.search(rf'\b{re.escape(word.lower())}', text)]
    assert not found, f'{path.relative_to(PACKAGE)} mentions {found}'
    imported = _imports(path)
    assert not [m for m in imported if m.startswith(('ghostnetv2_jax.kernels', 'ghostnetv2_jax.runtime'))]


def test_kernels_import_nothing_from_the_layers_or_the_models():
    # the shared C++ build cache is the one module outside kernels/ they may use
    allowed = ('ghostnetv2_jax.kernels', 'ghostnetv2_jax.native_build')
    for path in (PACKAGE / 'kernels').glob('*.py'):
        imported = _imports(path)
        bad = [m for m in imported if not m.startswith(allowed)
               and not (m == 'ghostnetv2_jax' and 'ghostnetv2_jax.native_build' in imported)]
        assert not bad, f'{path.name} imports {bad}'


def test_no_import_circle_in_the_package():
    modules = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imported in _imports(path):
            # 'from pkg import mod' names a module; 'from mod import fn' names the module itself
            target = imported if imported in modules else imported.rsplit('.', 1)[0]
            if target in modules and target != name:
                deps.add(target)
        graph[name] = deps
    # a package's __init__ re-exporting its submodules is not a circle through them
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = 'open'
        for dep in sorted(graph[node]):
            if dep.startswith(node + '.'):
                continue
            if state.get(dep) == 'open':
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 'done'
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f'import circles: {cycles}'
