"""The package's floors: commands (ghostnetv2_jax/cli/) on top; the library below takes arguments,
reads no flags and imports no command."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'ghostnetv2_jax'
FLAG_MODULES = ('absl.flags', 'absl.app', 'ml_collections.config_flags', 'argparse')


def _imports(path: pathlib.Path):
    """Every module ``path`` imports (``from a import b`` counts as a and a.b)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f'{node.module}.{alias.name}' for alias in node.names)


def _library_modules():
    for path in sorted(PACKAGE.rglob('*.py')):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] != 'cli' and relative.name != '__main__.py':
            yield relative, set(_imports(path))


def test_no_library_module_reads_flags():
    offenders = {str(r): sorted(m for m in mods if m.startswith(FLAG_MODULES))
                 for r, mods in _library_modules() if any(m.startswith(FLAG_MODULES) for m in mods)}
    assert not offenders, offenders


def test_no_library_module_imports_a_command():
    offenders = {str(r): sorted(m for m in mods if m.startswith('ghostnetv2_jax.cli'))
                 for r, mods in _library_modules() if any(m.startswith('ghostnetv2_jax.cli') for m in mods)}
    assert not offenders, offenders


def test_commands_use_no_other_commands_private_helpers():
    for path in sorted((PACKAGE / 'cli').glob('*.py')):
        for module in _imports(path):
            parts = module.split('.')
            private = [p for p in parts[2:] if p.startswith('_') and not p.startswith('__')]
            assert not (module.startswith('ghostnetv2_jax.cli.') and private), (path.name, module)


def test_every_command_is_a_module_with_main_and_a_parser():
    from ghostnetv2_jax import cli
    for command in cli.COMMANDS:
        module = __import__(f'ghostnetv2_jax.cli.{command}', fromlist=['main'])
        assert callable(module.main) and module.build_parser().prog == f'ghostnetv2-jax {command}', command
