"""The documentation against the code: every command a page gives runs a script that exists and
takes the flags the page passes it, every recipe key a page overrides exists, every relative
link (and heading anchor) resolves, and the design page's package tree is the real one.

Commands are read from fenced code blocks (with `\\` continuations and `&&` chains) and from
inline code, which is how the command tables give them. Each documented script runs once with
`--helpfull` (absl prints every flag the script accepts, its own and any it takes from a shared
module, then exits 1); the flags are read from that output, never listed here, so a renamed flag
breaks the page that still names the old one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "WORKSPACE.md", *sorted((ROOT / "docs").glob("*.md")))
RECIPE_BASE = "configs/base.py"   # the settings every recipe starts from
RECIPE_SCRIPT = "launch/minitron.py"  # takes `--config.key=value` overrides named alone in prose

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
_SCRIPT = re.compile(r"(?:^|(?<=[\s\"'(]))(?:python3? +)?((?:launch|benchmarks)/\w+\.py)\b(.*)")
_FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w.]*)(?:=(\S*))?")
_HELP_FLAG = re.compile(r"^  (?:-\S,)?--(\[no\])?([\w.-]+):", re.M)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


@dataclasses.dataclass(frozen=True)
class Command:
  """One documented invocation of a launch script or benchmark.

  Attributes:
    doc: the page it is on, relative to the repository root.
    script: the script's path relative to the root, e.g. `launch/prune.py`.
    flags: `(name, value)` of every `--name[=value]` it passes (value "" when absent).
  """
  doc: str
  script: str
  flags: tuple[tuple[str, str], ...]


def split_fences(text: str) -> tuple[list[tuple[str, str]], str]:
  """Fenced code blocks as `(language, body)`, and the text outside them."""
  blocks = [(m.group(1), m.group(2)) for m in _FENCE.finditer(text)]
  return blocks, _FENCE.sub("\n", text)


def strip_comment(line: str) -> str:
  """The line without a shell comment (a `#` at the start or after a blank, outside quotes)."""
  quote = None
  for i, ch in enumerate(line):
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch == "#" and (i == 0 or line[i - 1].isspace()):
      return line[:i]
  return line


def shell_segments(body: str) -> list[str]:
  """The simple commands of a shell block: continuations joined, comments cut, `&&` split."""
  joined = re.sub(r"\\\n", " ", body)
  segments = []
  for line in joined.split("\n"):
    segments += re.split(r"&&|\|\||;", strip_comment(line))
  return [s.strip() for s in segments if s.strip()]


def inline_spans(prose: str) -> list[str]:
  """Inline code spans, each on one line (a span in prose may wrap)."""
  return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]


def parse_command(doc: str, text: str) -> Command | None:
  """The script invocation in a shell segment or code span, if it has one; recipe overrides
  given alone (`--config.distill.steps=8`) count as the recipe script's."""
  m = _SCRIPT.search(text)
  if m:
    script, args = m.group(1), m.group(2)
  elif text.startswith("--config."):
    script, args = RECIPE_SCRIPT, text
  else:
    return None
  flags = []
  for name, value in _FLAG.findall(args):
    if name.endswith("."):  # `--config.<key>=<value>`: a placeholder, not a setting
      continue
    flags.append((name, value.strip("\"'")))
  return Command(doc, script, tuple(flags))


def commands_in(doc: str, text: str) -> list[Command]:
  """Every documented invocation on one page: shell blocks and inline code."""
  blocks, prose = split_fences(text)
  pieces = [s for lang, body in blocks if lang in ("", "bash", "sh", "shell")
            for s in shell_segments(body)]
  pieces += inline_spans(prose)
  return [c for c in map(functools.partial(parse_command, doc), pieces) if c]


@functools.cache
def all_commands() -> tuple[Command, ...]:
  return tuple(c for path in DOCS
               for c in commands_in(str(path.relative_to(ROOT)), path.read_text("utf-8")))


def help_flags(help_text: str) -> dict[str, str]:
  """Flag name -> its help entry, from absl's help output; `--[no]x` also accepts `--nox`."""
  matches = list(_HELP_FLAG.finditer(help_text))
  ends = [m.start() for m in matches[1:]] + [len(help_text)]
  flags = {}
  for m, end in zip(matches, ends):
    flags[m.group(2)] = help_text[m.start():end]
    if m.group(1):
      flags["no" + m.group(2)] = flags[m.group(2)]
  return flags


def flag_default(entry: str) -> str | None:
  m = re.search(r"\(default: '([^']*)'\)", entry)
  return m.group(1) if m else None


@functools.cache
def run_help(script: str) -> tuple[int, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, script, "--helpfull"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  return p.returncode, p.stdout + p.stderr


def config_paths(value: str, default: str | None) -> list[str]:
  """The recipe files a `--config=` value names: braces expanded; a `<placeholder>` means any
  recipe, i.e. the base every recipe extends."""
  if not value:
    return [os.path.relpath(ROOT / default, ROOT) if default else RECIPE_BASE]
  if "<" in value:
    return [RECIPE_BASE]
  m = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", value)
  if m:
    return [m.group(1) + alt + m.group(3) for alt in m.group(2).split(",")]
  return [value]


@functools.cache
def recipe_config(path: str):
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # recipes import `configs.base`
  spec = importlib.util.spec_from_file_location("documented_recipe", ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def has_key(cfg, dotted: str) -> bool:
  """Whether `a.b.c` names a setting of a recipe config (groups are ConfigDicts or dicts)."""
  node = cfg
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


def flag_problems(command: Command, flags: dict[str, str]) -> list[str]:
  """What in one documented command the script does not accept."""
  problems = []
  given = dict(command.flags)
  for name, _ in command.flags:
    if name.startswith("config.") and "config" in flags:
      for path in config_paths(given.get("config", ""), flag_default(flags["config"])):
        if not (ROOT / path).is_file():
          problems.append(f"{command.doc}: {command.script}: no recipe file {path}")
        elif not has_key(recipe_config(path), name[len("config."):]):
          problems.append(f"{command.doc}: {command.script}: --{name}: no such key in {path}")
    elif name not in flags:
      problems.append(f"{command.doc}: {command.script}: --{name} is not a flag of the script")
  return problems


def tree_modules(tree: str, package: str = "minitron_jax") -> set[str]:
  """Module paths a layout tree lists under `package/` (two spaces per level; a line whose first
  word is not a `.py` file or a `dir/`, or that is indented past a child of the entry above,
  continues that entry's description)."""
  paths, stack = set(), []
  for line in tree.split("\n"):
    m = re.match(r"( *)(\S+)", line)
    if not m or not (m.group(2).endswith(".py") or m.group(2).endswith("/")):
      continue
    depth = len(m.group(1)) // 2
    if depth > len(stack):  # deeper than a child of the entry above: its description
      continue
    stack = stack[:depth] + [m.group(2).rstrip("/")]
    if stack[0] == package and m.group(2).endswith(".py"):
      paths.add("/".join(stack))
  return paths


def slug(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
  _, prose = split_fences(text)
  seen: dict[str, int] = {}
  out = set()
  for heading in _HEADING.findall(prose):
    s = slug(heading)
    out.add(s if s not in seen else f"{s}-{seen[s]}")
    seen[s] = seen.get(s, 0) + 1
  return out


def link_problems(path: Path) -> list[str]:
  """Relative links of one page that lead nowhere: a missing file or heading."""
  problems = []
  text = path.read_text("utf-8")
  _, prose = split_fences(text)
  for target in _LINK.findall(prose):
    if re.match(r"[a-z][\w+.-]*:", target):  # http:, https:, mailto:
      continue
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    where = f"{path.relative_to(ROOT)}: ({target})"
    if not dest.exists():
      problems.append(f"{where}: no such file")
    elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text("utf-8")):
      problems.append(f"{where}: no heading with that anchor")
  return problems


# --- the parsing itself, on made-up pages and help text


def test_commands_are_read_from_blocks_continuations_chains_and_tables():
  page = "\n".join([
      "Prose with `python launch/a.py --x=1",
      "--y` wrapped, `--z=2` alone (no script) and `--config.seed=1` (the recipe's).",
      "```bash",
      "pip install -e . && python launch/b.py --p=1 \\",
      "    --q=\"('a','b')\"   # --not_a_flag",
      "# python launch/commented.py --r",
      "python benchmarks/c.py --s=configs/x_{u,v}.py --config.<key>=<value> [--t --w]",
      "```",
      "| `python launch/d.py --m=DIR [--n=... \\| --o=16-31]` | what |",
      "```python",
      "python launch/not_shell.py --k",
      "```",
  ])
  got = {c.script: [n for n, _ in c.flags] for c in commands_in("page.md", page)}
  assert got == {"launch/a.py": ["x", "y"], "launch/b.py": ["p", "q"],
                 RECIPE_SCRIPT: ["config.seed"], "benchmarks/c.py": ["s", "t", "w"],
                 "launch/d.py": ["m", "n", "o"]}
  (b,) = [c for c in commands_in("page.md", page) if c.script == "launch/b.py"]
  assert dict(b.flags)["q"] == "('a','b')"
  assert config_paths("configs/x_{u,v}.py", None) == ["configs/x_u.py", "configs/x_v.py"]
  assert config_paths("configs/<recipe>.py", None) == [RECIPE_BASE]


def test_help_flags_and_problems_on_made_up_help():
  help_text = ("Does things.\n\n  python launch/t.py --old=1\n\nflags:\n\nlaunch/t.py:\n"
               "  -?,--[no]help: show this help\n"
               "  --config: Recipe config file.\n    (default: '" + str(ROOT / RECIPE_BASE)
               + "')\n  --[no]remat: Recompute.\n    (default: 'false')\n"
               "  --steps: Updates.\n    (an integer)\n")
  flags = help_flags(help_text)
  assert set(flags) == {"help", "nohelp", "config", "remat", "noremat", "steps"}
  assert flag_default(flags["config"]) == str(ROOT / RECIPE_BASE)
  ok = Command("p.md", "launch/t.py", (("steps", "3"), ("noremat", ""), ("config.seed", "1")))
  assert flag_problems(ok, flags) == []
  bad = Command("p.md", "launch/t.py", (("old", "1"), ("config.no_such_key", "1"),
                                        ("config.seed.deeper", "1"), ("config.teacher.s", "")))
  assert len(flag_problems(bad, flags)) == 4


def test_slug_follows_github():
  assert slug("Quick start (fresh machine, Python ≥ 3.10)") == (
      "quick-start-fresh-machine-python--310")
  assert slug("Where the default run's time goes") == "where-the-default-runs-time-goes"
  assert slug("The 8B → 4B recipe on a v5p pod or an 8×H100 node") == (
      "the-8b--4b-recipe-on-a-v5p-pod-or-an-8h100-node")


# --- the real documentation


def test_readme_links_every_docs_page():
  linked = {(ROOT / t.partition("#")[0]).resolve()
            for t in _LINK.findall((ROOT / "README.md").read_text("utf-8"))}
  pages = set((ROOT / "docs").glob("*.md"))
  assert pages, "no docs/ pages"
  assert sorted(p.name for p in pages if p.resolve() not in linked) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
  assert link_problems(path) == []


def test_tree_modules_on_a_made_up_tree():
  tree = ("minitron_jax/\n  config.py   frozen config,\n              model.py in words\n"
          "  io/         models\n    hf.py     HF\n  axes.py\nlaunch/     scripts\n")
  assert tree_modules(tree) == {"minitron_jax/config.py", "minitron_jax/io/hf.py",
                                "minitron_jax/axes.py"}


def test_design_page_lists_every_module():
  blocks, _ = split_fences((ROOT / "docs" / "design.md").read_text("utf-8"))
  listed = set().union(*(tree_modules(body) for _, body in blocks))
  real = {str(p.relative_to(ROOT)) for p in (ROOT / "minitron_jax").rglob("*.py")
          if p.name != "__init__.py"}
  assert (sorted(real - listed), sorted(listed - real)) == ([], [])


def test_every_launch_script_is_documented():
  documented = {c.script for c in all_commands()}
  scripts = {f"launch/{p.name}" for p in (ROOT / "launch").glob("*.py")
             if "app.run(" in p.read_text("utf-8")}  # scripts, not modules they share
  assert scripts
  assert sorted(scripts - documented) == []


@pytest.mark.parametrize("script", sorted({c.script for c in all_commands()}))
def test_documented_flags_are_the_scripts_flags(script):
  assert (ROOT / script).is_file(), f"documented but missing: {script}"
  rc, out = run_help(script)
  assert rc in (0, 1) and "Traceback" not in out, out[-3000:]
  flags = help_flags(out)
  assert flags, f"{script} --helpfull lists no flags:\n{out[-3000:]}"
  problems = [p for c in all_commands() if c.script == script for p in flag_problems(c, flags)]
  assert problems == []
