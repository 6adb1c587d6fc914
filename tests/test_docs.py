"""README.md and docs/*.md: every relative link resolves and every command block names files that exist.

README.md is the entry point and the depth is in docs/ (issue 26), so the pages link to each other a lot: a
moved file or a renamed heading must fail here, not on a user's screen. Checked, in README.md and every
docs/*.md:

- every relative markdown link and image (``[text](path)``, ``![alt](path)``, ``[ref]: path``, ``src=``/
  ``href=``) resolves to a file or folder of the repository, relative to the page; a ``#anchor`` (alone, or
  after a ``.md`` path) names a heading of that page, slugged as GitHub does;
- every fenced ``bash`` block: the tokens that look like repository paths (``options/``, ``tools/``, ``docs/``,
  ``cdnsr_plugin/``, ``tests/``, comments included) exist, ``{a,b}`` sets expanded and globs matching at least
  one file; outputs (after ``--out``, ``--output``, ``--json``, ``--network-out``, ``--work``, ``>``) and
  placeholders (``<backbone>``, ``NAME``, ``train_X.yml``, ``...``) are skipped, and so is everything
  under the user's or the run's folders (``datasets/``, ``experiments/``, ``results/``, ``../shared``);
  ``python -m cdnsr_plugin.x`` names a module of the package;
- README.md stays short (at most 220 lines) and keeps the setup/lint/test blocks that ``.ci/run`` reads.

Plain text only: no network, no ``.git`` (CI runs the tests in a copy without it), no ``../shared``.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))
README_MAX_LINES = 220

FENCE = re.compile(r'^(```|~~~)(.*)$')
# [text](target) and ![alt](target); the text may hold one level of brackets and span lines
INLINE_LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
REFERENCE_LINK = re.compile(r'^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$', re.MULTILINE)
HTML_LINK = re.compile(r'\b(?:src|href)\s*=\s*"([^"]+)"')
HEADING = re.compile(r'^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$')
REPO_PATH = re.compile(r'(?<![\w./~$-])((?:options|tools|docs|cdnsr_plugin|tests)/'
                       r'(?:[^\s\'"`;:()\[\]|&,{}]|\{[^}\s]*\})*)')
MODULE = re.compile(r'(?:^|\s)-m\s+(cdnsr_plugin(?:\.\w+)*)')
OUTPUT_FLAG = re.compile(r'(?:--(?:out|output|json|network-out|work)[= ]|>)\s*$')  # what a command writes
PLACEHOLDER = re.compile(r'<|>|\.\.\.|…|(?<![A-Za-z0-9])(?:X|NAME|N)(?![A-Za-z0-9])')


def split_fences(text):
    """The page's prose (fenced blocks blanked, lines kept) and its fenced blocks as (info string, body)."""
    prose, blocks, fence, info, body = [], [], None, '', []
    for line in text.splitlines():
        match = FENCE.match(line.strip())
        if fence is None and match:
            fence, info, body = match.group(1), match.group(2).strip(), []
            prose.append('')
        elif fence is not None and line.strip() == fence:
            blocks.append((info, '\n'.join(body)))
            fence = None
            prose.append('')
        elif fence is not None:
            body.append(line)
            prose.append('')
        else:
            prose.append(line)
    return '\n'.join(prose), blocks


def strip_code_spans(prose):
    """Prose without inline code (a ``[x](y)`` inside backticks is not a link)."""
    return re.sub(r'(`+)(?:(?!\1).)+?\1', '', prose, flags=re.DOTALL)


def slug(heading):
    """GitHub's anchor of a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)
    text = re.sub(r'<[^>]+>', '', text).strip().lower()
    text = re.sub(r'[^\w\- ]', '', text)
    return text.replace(' ', '-')


def anchors(page):
    """Every anchor of a markdown page: its headings' slugs (repeats get -1, -2, ...) and explicit ids."""
    prose, _ = split_fences(page.read_text(encoding='utf-8'))
    found, seen = set(), {}
    for line in prose.splitlines():
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f'{base}-{count}')
    found.update(re.findall(r'<a\s+(?:name|id)="([^"]+)"', prose))
    return found


def link_targets(text):
    """Every link and image target in a page's prose."""
    prose = strip_code_spans(split_fences(text)[0])
    targets = INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose) + HTML_LINK.findall(prose)
    return [target for target in targets if not re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*:', target)]  # no URLs


def link_problems(page, root=ROOT):
    """The links of a page that do not resolve, one message each."""
    problems = []
    for target in link_targets(page.read_text(encoding='utf-8')):
        path, _, anchor = target.partition('#')
        resolved = (page.parent / path).resolve() if path else page
        where = f'{page.relative_to(root)}: link {target!r}'
        if root.resolve() not in resolved.parents and resolved != root.resolve():
            problems.append(f'{where} leaves the repository')
        elif not resolved.exists():
            problems.append(f'{where}: no file {resolved.relative_to(root.resolve())}')
        elif anchor and resolved.suffix == '.md' and anchor not in anchors(resolved):
            problems.append(f'{where}: no heading with anchor #{anchor} in {resolved.relative_to(root.resolve())}')
    return problems


def expand_braces(token):
    """``a{b,c}d`` -> ``abd``, ``acd`` (nested sets too)."""
    match = re.search(r'\{([^{}]*)\}', token)
    if not match:
        return [token]
    head, tail = token[:match.start()], token[match.end():]
    return [name for part in match.group(1).split(',') for name in expand_braces(head + part + tail)]


def command_problems(page, root=ROOT):
    """The repository paths and modules named in a page's bash blocks that do not exist, one message each."""
    problems = []
    for info, body in split_fences(page.read_text(encoding='utf-8'))[1]:
        if info.split()[:1] not in (['bash'], ['sh'], ['shell'], ['console']):
            continue
        for match in REPO_PATH.finditer(body):
            token = match.group(1).rstrip('.')
            if PLACEHOLDER.search(token) or OUTPUT_FLAG.search(body[:match.start()]):
                continue
            for name in expand_braces(token):
                if any(char in name for char in '*?['):
                    found = any(root.glob(name))
                else:
                    found = (root / name).exists()
                if not found:
                    problems.append(f'{page.relative_to(root)}: a command names {name}, which does not exist')
        for module in MODULE.findall(body):
            base = root.joinpath(*module.split('.'))
            if not (base.with_suffix('.py').is_file() or (base / '__init__.py').is_file()):
                problems.append(f'{page.relative_to(root)}: a command runs -m {module}, which is not a module')
    return problems


def test_the_pages_exist():
    assert (ROOT / 'README.md').is_file()
    assert len(PAGES) > 3, PAGES


@pytest.mark.parametrize('page', PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_every_relative_link_resolves(page):
    problems = link_problems(page)
    assert not problems, '\n'.join(problems)


@pytest.mark.parametrize('page', PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_every_command_block_names_files_that_exist(page):
    problems = command_problems(page)
    assert not problems, '\n'.join(problems)


def test_readme_is_short_and_keeps_the_blocks_ci_reads():
    lines = (ROOT / 'README.md').read_text(encoding='utf-8').splitlines()
    assert len(lines) <= README_MAX_LINES, f'README.md has {len(lines)} lines: move depth to docs/'
    for name in ('setup', 'lint', 'test'):  # what .ci/run's block() reads, marker lines exactly
        start, end = lines.index(f'<!-- {name} -->'), lines.index(f'<!-- /{name} -->')
        body = [line for line in lines[start + 1:end] if not line.startswith('```')]
        assert lines[start + 1] == '```bash' and lines[end - 1] == '```', name
        assert len(body) == 1 and body[0].strip(), (name, body)


def test_the_checks_catch_a_broken_link_anchor_and_command(tmp_path):
    (tmp_path / 'docs' / 'images').mkdir(parents=True)
    (tmp_path / 'docs' / 'images' / 'a.png').write_bytes(b'')
    (tmp_path / 'tools').mkdir()
    (tmp_path / 'tools' / 'run.py').write_text('')
    (tmp_path / 'docs' / 'page.md').write_text('# A page\n\n## The `tools/run.py` tool, twice\n\n## A page\n')
    readme = tmp_path / 'README.md'
    readme.write_text('\n'.join([
        '# Title', '![ok](docs/images/a.png) [ok](docs/page.md#the-toolsrunpy-tool-twice) [ok](#title)',
        '[ok](docs/page.md#a-page-1) [web](https://example.com/x) `[code](not/a/link.md)`',
        '![gone](docs/images/b.png) [gone](docs/other.md) [bad anchor](docs/page.md#nowhere) [bad](#none)', '```bash',
        '# [not a link](x.md)', 'python tools/run.py --network options/networks/CDNSR_<backbone>.yml',
        'python tools/gone.py -opt options/train_X.yml --out results/NAME datasets/x/tools/y.py --json docs/new.json',
        'python -m cdnsr_plugin.gone ../shared/tools/z.py tools/{run,lost}.py tools/*.py docs/*.txt', '```'
    ]))
    problems = link_problems(readme, tmp_path)
    assert len(problems) == 4, problems
    assert all(['b.png' in problems[0], 'other.md' in problems[1], '#nowhere' in problems[2], '#none' in problems[3]])
    problems = command_problems(readme, tmp_path)
    assert [problem.split(': ')[1] for problem in problems] == [
        'a command names tools/gone.py, which does not exist', 'a command names tools/lost.py, which does not exist',
        'a command names docs/*.txt, which does not exist', 'a command runs -m cdnsr_plugin.gone, which is not a module'
    ]
    assert not link_problems(tmp_path / 'docs' / 'page.md', tmp_path)
