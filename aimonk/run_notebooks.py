"""Run the numbered notebooks with papermill into ``reports/``, as ``make reports`` does.

    python -m aimonk.run_notebooks --data DIR [-p name value ...] [notebook ...]

Compared with calling papermill on each notebook:

- a parameter that no notebook declares (``-p epoch 5``) stops the run before anything executes,
  with the known names listed (papermill only warns, and the notebook never reads the value);
- each notebook gets only the parameters it declares, typed as it declares them;
- the kernels' output streams to the terminal while they run, so training shows its progress bars;
- the bars are plain text (``AIMONK_PROGRESS=text``), and the executed notebook keeps what a terminal
  would show at the end: each bar's final state, not a widget frozen at 0 %;
- absolute paths of this machine (the repository, the data folder, the Python environment, $HOME)
  are replaced by placeholders in the executed notebooks.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import nbformat
import papermill

from aimonk import config
from aimonk.files import atomic_write
from aimonk.progress import PROGRESS_ENV

NOTEBOOKS_DIR = config.PROJECT_ROOT / "notebooks"
BINARY_MIME_PREFIXES = ("image/png", "image/jpeg", "image/gif", "image/webp")  # base64: never scrubbed
# The kernel's own log (a TCP notice at start, an interrupt at shutdown) is noise in the terminal;
# cells' output and errors come back through papermill, and a dead kernel still raises.
KERNEL_QUIET = "--IPKernelApp.log_level=CRITICAL"
_TERMINAL_TOKENS = re.compile(r"(\r|\n|\x1b\[A)")  # carriage return, line feed, cursor up (tqdm's nested bars)


class ParameterError(ValueError):
    """A parameter that no notebook declares, or a value that does not fit its declared type."""


def find_notebooks(names: Sequence[str] = ()) -> list[Path]:
    """The notebooks to run: ``names`` (paths, or stems such as ``02_train``), or every numbered one in order.

    Args:
        names: notebook paths or stems; empty means ``notebooks/[0-9][0-9]_*.ipynb``.
    Returns:
        Existing ``.ipynb`` paths.
    Raises:
        FileNotFoundError: naming the notebook that does not exist.
    """
    if not names:
        return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    paths = []
    for name in names:
        path = Path(name) if name.endswith(".ipynb") else NOTEBOOKS_DIR / f"{name}.ipynb"
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no such notebook ({path})")
        paths.append(path)
    return paths


def parse_value(text: str, type_name: str = "None") -> object:
    """A command-line value as papermill's ``-p`` reads it, kept as text where the notebook declares ``str``.

    ``None``, ``True``, ``False``, integers and floats are converted; anything else stays a string.

    Args:
        text: the value as typed.
        type_name: papermill's ``inferred_type_name`` of the parameter (``"int"``, ``"str"``, ...).
    Returns:
        The value to inject.
    Raises:
        ParameterError: when a parameter declared ``int``/``float`` gets something else.
    """
    if text == "None":
        return None
    if type_name == "str":
        return text
    if text in ("True", "False"):
        return text == "True"
    for cast in (int, float):
        try:
            value = cast(text)
        except ValueError:
            continue
        return float(value) if type_name == "float" else value
    if type_name in ("int", "float", "bool"):
        raise ParameterError(f"expected {type_name}, got {text!r}")
    return text


def notebook_parameters(notebooks: Sequence[Path], given: dict[str, str]) -> dict[Path, dict[str, object]]:
    """Split ``given`` among ``notebooks``: each gets the parameters its ``parameters`` cell declares.

    Args:
        notebooks: the notebooks to run.
        given: parameter name -> value as typed (``-p name value``).
    Returns:
        notebook -> {name: typed value}.
    Raises:
        ParameterError: for a name that none of ``notebooks`` declares (the message lists the known
            names), or for a value that does not fit the declared type.
    """
    declared = {nb: papermill.inspect_notebook(str(nb)) for nb in notebooks}
    known = sorted({name for params in declared.values() for name in params})
    unknown = [name for name in given if name not in known]
    if unknown:
        close = [m for name in unknown for m in difflib.get_close_matches(name, known, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ParameterError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{hint}; "
                             f"{', '.join(nb.stem for nb in notebooks)} take: {', '.join(known)}")
    out = {}
    for nb, params in declared.items():
        out[nb] = {}
        for name, text in given.items():
            if name in params:
                try:
                    out[nb][name] = parse_value(text, params[name]["inferred_type_name"])
                except ParameterError as e:
                    raise ParameterError(f"{nb.name}: parameter {name}: {e}") from None
    return out


def path_replacements(data_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(absolute path, placeholder) pairs for this machine, longest path first.

    The data folder (when outside the repository) becomes ``<data>``, the repository ``<repo>``,
    the Python environment (when outside both) ``<python>``, and the home folder ``~``.
    """
    pairs = {str(config.PROJECT_ROOT): "<repo>", str(Path.home()): "~"}
    for prefix in {sys.prefix, sys.base_prefix, str(Path(sys.prefix).resolve())}:
        if prefix not in ("/", "/usr", "/usr/local"):  # those are no one machine's
            pairs.setdefault(prefix, "<python>")
    if data_dir:
        data = config.resolve_path(data_dir)
        if not data.is_relative_to(config.PROJECT_ROOT):
            pairs[str(data)] = "<data>"
    pairs = {path: placeholder for path, placeholder in pairs.items() if path not in ("/", "")}
    return sorted(pairs.items(), key=lambda pair: -len(pair[0]))


def scrub_paths(node, replacements: Sequence[tuple[str, str]]):
    """Replace every absolute path in ``replacements`` throughout a notebook (or any JSON-like value).

    Base64 image data is left alone; a path is only replaced whole (``/a/b`` never inside ``/a/bc``).

    Args:
        node: a notebook, or part of one.
        replacements: (path, placeholder) pairs, as from ``path_replacements``.
    Returns:
        ``node``, changed in place where it is a dict or a list.
    """
    if isinstance(node, str):
        for path, placeholder in replacements:
            node = re.sub(re.escape(path) + r"(?![\w.-])", placeholder, node)
        return node
    if isinstance(node, list):
        node[:] = [scrub_paths(item, replacements) for item in node]
    elif isinstance(node, dict):
        for key, value in node.items():
            if not key.startswith(BINARY_MIME_PREFIXES):
                node[key] = scrub_paths(value, replacements)
    return node


def terminal_text(text: str) -> str:
    """What a terminal shows once ``text`` is printed: ``\\r`` returns to the start of the line and
    ``ESC[A`` moves up one, so each progress bar keeps only its final state."""
    lines, row, col = [""], 0, 0
    for token in _TERMINAL_TOKENS.split(text):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        elif token == "\x1b[A":
            row = max(0, row - 1)
        elif token:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    shown = "\n".join(line.rstrip() for line in lines).rstrip("\n")
    return shown + "\n" if shown else ""


def final_streams(outputs: list) -> list:
    """Merge consecutive stream outputs of one name, as Jupyter shows them, and keep only the final
    state of any progress bar in them (``terminal_text``)."""
    merged: list = []
    for out in outputs:
        if out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream" \
                and merged[-1]["name"] == out["name"]:
            merged[-1]["text"] += out["text"]
        else:
            merged.append(out)
    kept = []
    for out in merged:
        if out.get("output_type") == "stream":
            if "\r" in out["text"] or "\x1b[A" in out["text"]:
                out["text"] = terminal_text(out["text"])
            if not out["text"].strip():  # a cleared bar, or a lone line feed: shows nothing
                continue
        kept.append(out)
    return kept


def tidy_report(path: Path, replacements: Sequence[tuple[str, str]]) -> None:
    """Rewrite an executed notebook with final-state progress bars and no absolute paths."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = final_streams(cell.outputs)
    with atomic_write(path, "w") as f:
        nbformat.write(scrub_paths(nb, replacements), f)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(notebooks: Sequence[Path], parameters: dict[str, str], output_dir: str | os.PathLike,
        stream: bool = True) -> list[Path]:
    """Execute ``notebooks`` in order into ``output_dir``, each from its own folder, then tidy the results.

    Args:
        notebooks: the notebooks, in the order to run them.
        parameters: name -> value as typed; checked against the notebooks before any runs.
        output_dir: where the executed notebooks go (same file names).
        stream: copy the kernels' stdout and stderr to this process's while they run.
    Returns:
        The executed notebooks' paths.
    Raises:
        ParameterError: before anything runs, for an unknown parameter or a badly typed value.
        papermill.PapermillExecutionError: when a cell fails (its notebook is still written and tidied).
    """
    per_notebook = notebook_parameters(notebooks, parameters)
    replacements = path_replacements(parameters.get("data_dir"))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, nb in enumerate(notebooks, 1):
        out = output_dir / nb.name
        print(f"== {nb.stem} ({i}/{len(notebooks)})", flush=True)
        start = time.perf_counter()
        try:
            with _environ(**{PROGRESS_ENV: "text"}):  # the kernel inherits it
                papermill.execute_notebook(
                    _shown(nb), _shown(out), parameters=per_notebook[nb], cwd=str(nb.parent), progress_bar=False,
                    stdout_file=sys.stdout if stream else None, stderr_file=sys.stderr if stream else None,
                    extra_arguments=[KERNEL_QUIET],
                )
        except papermill.PapermillExecutionError:
            print(f"\n   {nb.name} failed; {_shown(out)} shows where", flush=True)
            raise
        finally:
            if out.is_file():
                tidy_report(out, replacements)
        print(f"\n   wrote {_shown(out)} in {time.perf_counter() - start:.0f} s", flush=True)
        written.append(out)
    return written


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns the exit status (2 for a parameter error, 1 for a failed notebook)."""
    p = argparse.ArgumentParser(prog="python -m aimonk.run_notebooks", description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="*", help="notebook paths or stems (default: every notebooks/NN_*.ipynb)")
    p.add_argument("--data", help="the data folder, passed as data_dir (relative paths start at the repository root)")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a notebook parameter, as papermill's -p; repeatable")
    p.add_argument("--output-dir", default=str(config.REPORTS_DIR), help="where the executed notebooks go")
    args = p.parse_args(argv)
    given = {"data_dir": args.data} if args.data else {}
    given.update(dict(args.parameter))
    try:
        run(find_notebooks(args.notebooks), given, args.output_dir)
    except (ParameterError, FileNotFoundError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    except papermill.PapermillExecutionError as e:
        print(f"{p.prog}: cell {e.exec_count} failed with {e.ename}: {e.evalue}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
