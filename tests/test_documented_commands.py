"""Every command line the README, docs, recipes and commands' help show parses: the command
exists, its options exist and take the values shown, and every ``--config.FIELD`` names a field
of the recipe it is given with."""
import pathlib
import re
import shlex

import pytest

from ghostnetv2_jax import cli

REPO = pathlib.Path(__file__).resolve().parent.parent
SOURCES = (['README.md', 'experiments/README.md'] + sorted(str(p.relative_to(REPO)) for p in (REPO / 'docs').glob('*.md'))
           + sorted(str(p.relative_to(REPO)) for p in (REPO / 'configs').glob('*.py'))
           + sorted(str(p.relative_to(REPO)) for p in (REPO / 'ghostnetv2_jax' / 'cli').glob('*.py')))
PROGRAM = r'(?:python -m ghostnetv2_jax|ghostnetv2-jax)'
LINE = re.compile(r'^\s*(?:\S*/)?' + PROGRAM + r'\b(.*)$')       # a shell line in a code block
INLINE = re.compile(r'`' + PROGRAM + r'\b([^`\n]*)`')             # `python -m ghostnetv2_jax ...` in prose


def documented_commands():
    found = []
    for name in SOURCES:
        lines = (REPO / name).read_text().splitlines()
        for i, line in enumerate(lines):
            for m in INLINE.finditer(line):
                if len(m.group(1).split()) > 1:   # more than a command's name in prose
                    found.append((f'{name}:{i + 1}', m.group(1)))
            m = LINE.match(line)
            if m and not INLINE.search(line):
                text, j = m.group(1), i
                while text.rstrip().endswith('\\') and j + 1 < len(lines):
                    j += 1
                    text = text.rstrip()[:-1] + ' ' + lines[j].strip()
                found.append((f'{name}:{i + 1}', text))
    return found


def tokens(text: str):
    text = text.split(' #')[0].strip()
    if text.count('"') % 2:   # the end of a quoted remote command (gcloud ... --command="...")
        text = text.rstrip('"')
    words = [w.strip('[]') for w in shlex.split(text)]
    return [w for w in words if w and w not in ('...', '|')]


COMMANDS = documented_commands()


def test_the_docs_show_every_command():
    shown = {tokens(text)[0] for _, text in COMMANDS if tokens(text)}
    assert not set(cli.COMMANDS) - shown


@pytest.mark.parametrize('where, text', COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_line_parses(where, text):
    argv = tokens(text)
    if not argv or argv[0] in ('-h', '--help') or argv[0].isupper():   # `ghostnetv2-jax COMMAND ...`
        return
    assert argv[0] in cli.COMMANDS, where
    module = __import__(f'ghostnetv2_jax.cli.{argv[0]}', fromlist=['build_parser'])
    try:
        if argv[0] == 'train':
            args, overrides = module.build_parser().parse_known_args(argv[1:])
            assert all(o.startswith('--config.') for o in overrides), (where, overrides)
            recipe = REPO / args.config
            if recipe.is_file():
                from ghostnetv2_jax.cli.config import load_config
                load_config(str(recipe), [o if '=' in o else o + '=None' for o in overrides
                                          if o.split('=')[0] not in ('--config.field', '--config.FIELD')])
        else:
            module.build_parser().parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f'{where}: {text!r} does not parse (exit {e.code})')
