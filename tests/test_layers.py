"""The package's floors (docs/ARCHITECTURE.md): a module imports only from its own floor and the floors
below. Checked on the source with ``ast`` (imports inside functions count too)."""
from __future__ import annotations

import ast
from pathlib import Path

import cdnsr_plugin

# bottom to top; a name covers the module or the package of that dotted name (longest match wins)
FLOORS = [
    ['registry', 'compat', 'utils', 'weights'],
    ['inference', 'inference.tiling', 'inference.costs'],
    ['archs', 'losses'],
    ['data'],
    ['inference.policies', 'inference.laplacian', 'inference.engine'],
    ['models', 'preparation', 'tester', 'analysis', 'deploy'],
    ['__init__', 'train', 'test', 'demo', 'run', 'tester.cli'],
]


def floor_map(floors: list[list[str]]) -> dict[str, int]:
    return {name: level for level, names in enumerate(floors) for name in names}


def floor_of(module: str, floors: dict[str, int]) -> int | None:
    """The floor of a dotted module name inside the package (``inference.engine``), by longest prefix."""
    parts = module.split('.')
    for end in range(len(parts), 0, -1):
        if '.'.join(parts[:end]) in floors:
            return floors['.'.join(parts[:end])]
    return None


def module_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root).with_suffix('')
    parts = relative.parts[:-1] if relative.name == '__init__' and len(relative.parts) > 1 else relative.parts
    return '.'.join(parts)


def is_module(root: Path, dotted: str) -> bool:
    """Whether ``dotted`` (inside the package at ``root``) is a module or a subpackage."""
    path = root.joinpath(*dotted.split('.'))
    return path.with_suffix('.py').is_file() or (path / '__init__.py').is_file()


def imported_modules(path: Path, root: Path, package: str) -> list[str]:
    """Modules of ``package`` that ``path`` imports, as dotted names inside the package."""
    here = module_name(path, root).split('.') if path != root / '__init__.py' else []
    is_package = path.name == '__init__.py'
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = here[:len(here) - node.level + is_package]
                source = '.'.join([package, *base, *([node.module] if node.module else [])])
            else:
                source = node.module or ''
            for alias in node.names:  # ``from pkg.x import y`` imports the module pkg.x.y if there is one
                candidate = f'{source}.{alias.name}'
                inside = candidate.split('.', 1)[1] if '.' in candidate else ''
                found.append(candidate if source.startswith(package) and is_module(root, inside) else source)
    prefix = package + '.'
    inside = {name[len(prefix):] for name in found if name.startswith(prefix)}
    return sorted(inside | ({'__init__'} if package in found else set()))


def upward_imports(root: Path, floors: list[list[str]]) -> list[str]:
    """Every import of a higher floor, and every module with no floor, in the package at ``root``."""
    package, levels, problems = root.name, floor_map(floors), []
    for path in sorted(root.rglob('*.py')):
        importer = module_name(path, root)
        mine = floor_of(importer, levels)
        if mine is None:
            problems.append(f'{importer} has no floor; add it to FLOORS (and docs/ARCHITECTURE.md)')
            continue
        for imported in imported_modules(path, root, package):
            theirs = floor_of(imported, levels)
            if theirs is None or theirs > mine:
                problems.append(f'{importer} (floor {mine}) imports {imported} (floor {theirs})')
    return problems


def test_the_package_imports_only_downwards():
    assert upward_imports(Path(cdnsr_plugin.__file__).parent, FLOORS) == []


def test_an_upward_import_is_caught(tmp_path):
    package = tmp_path / 'pkg'
    (package / 'low').mkdir(parents=True)
    (package / '__init__.py').write_text('')
    (package / 'low' / '__init__.py').write_text('')
    (package / 'low' / 'base.py').write_text('import os\n')
    (package / 'high.py').write_text('from pkg.low.base import os\n')
    floors = [['low'], ['high', '__init__']]
    assert upward_imports(package, floors) == []
    (package / 'low' / 'bad.py').write_text('def late():\n    from pkg import high  # inside a function\n')
    (package / 'low' / 'worse.py').write_text('from ..high import os\n')  # relative
    (package / 'stray.py').write_text('')
    assert upward_imports(package, floors) == [
        'low.bad (floor 0) imports high (floor 1)', 'low.worse (floor 0) imports high (floor 1)',
        'stray has no floor; add it to FLOORS (and docs/ARCHITECTURE.md)'
    ]
