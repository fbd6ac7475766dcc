"""``pz-flax-convert``: move weights between Flax NNX and pz_flax checkpoints, or inspect one.

Subcommands:

* ``nnx-to-pz --model MODULE:FACTORY --in SRC --out DST``: read an NNX checkpoint (a saved
  ``nnx.state``) into the model ``FACTORY`` builds (only its structure is used; the weights
  come from SRC), convert it with ``pz_flax.interop.from_nnx`` (naming overrides from
  ``--naming``/``--naming-file``), and save a pz_flax checkpoint, which then restores with no
  model code at all.
* ``pz-to-nnx --in SRC --out DST [--allow-module NAME ...]``: restore a pz_flax checkpoint,
  convert it with ``pz_flax.interop.to_nnx``, and save ``nnx.state`` as an NNX checkpoint.
* ``inspect PATH``: print the table of arrays (path, axis names, shape, dtype, size) of a
  pz_flax or plain Orbax checkpoint.

``MODULE:FACTORY`` is resolved like other ``module:attribute`` tools do
(``pkgutil.resolve_name``), with the current directory importable; ``MODULE`` may also be a
``.py`` file. A success prints one line saying what was written where; errors print one to
three lines on stderr, without a traceback, and exit with status 1 (2 for bad usage, 130 when
interrupted). Outputs are written atomically, so a failed or interrupted run leaves nothing at
DST. Heavy imports (JAX, Orbax) happen after argument parsing, so ``--help`` is instant.

The ``pz-flax-convert`` console script runs :func:`main`; ``conversion_tools/convert_checkpoint.py``
in the repository runs it from a source checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import pathlib
import pkgutil
import sys
import tomllib
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any
from typing import TextIO

PROGRAM = "pz-flax-convert"

_EXAMPLES = """\
examples:
  # NNX -> pz_flax: the factory builds the model's structure; weights come from --in
  pz-flax-convert nnx-to-pz --model my_project.models:make_mlp --in ckpt/nnx --out ckpt/pz
  pz-flax-convert nnx-to-pz --model path/to/models.py:make_mlp --in ckpt/nnx --out ckpt/pz

  # axis names for the converted model (options of pz_flax.from_nnx), as flags or a file
  pz-flax-convert nnx-to-pz --model models:make_cnn --in ckpt/nnx --out ckpt/pz \\
      --naming input_axes=height,width,channels --naming features=channels
  pz-flax-convert nnx-to-pz --model models:make_cnn --in ckpt/nnx --out ckpt/pz \\
      --naming-file naming.toml

  # pz_flax -> NNX (restorable with plain Orbax into nnx.state(nnx.eval_shape(factory)))
  pz-flax-convert pz-to-nnx --in ckpt/pz --out ckpt/nnx2 --force

  # a checkpoint naming classes outside pz_flax needs their module allowed explicitly
  pz-flax-convert pz-to-nnx --in ckpt/pz --out ckpt/nnx2 --allow-module my_project

  # what is inside (works on pz_flax and on plain Orbax/NNX checkpoints)
  pz-flax-convert inspect ckpt/pz
"""

# Messages are cut to this many lines; a mismatch report ends with a count of the rest.
_MAX_ERROR_LINES = 3


class UsageError(Exception):
    """A command-line argument is wrong in a way argparse cannot see (e.g. MODULE:FACTORY)."""


class _ArgumentParser(argparse.ArgumentParser):
    """Reports a usage error as one line (argparse prints the usage text and exits)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


class _VersionAction(argparse.Action):
    """Prints ``pz_flax.__version__``, importing pz_flax only when ``--version`` is given."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import pz_flax

        print(f"{PROGRAM} {pz_flax.__version__}")
        parser.exit()


class Progress:
    """Conversion progress on stderr with ``rich.progress``: stage, bar, bytes and time left.

    A conversion is a few long stages; the ones that move array data (reading, writing) carry
    its size, so the bar counts bytes and estimates the time left. On a terminal the bar
    redraws in place; elsewhere (a log file) rich prints it once, when finished, without
    carriage returns. Disabled, it shows nothing.
    """

    def __init__(self, *, enabled: bool, stream: TextIO):
        self.enabled = enabled
        self.stream = stream
        self._bar: Any = None
        self._task: Any = None

    @contextlib.contextmanager
    def running(self, total_bytes: int) -> Iterator[Progress]:
        """Shows the bar (if enabled) while the ``with`` body runs the stages."""
        if not self.enabled:
            yield self
            return
        from rich import console as rich_console
        from rich import progress as rich_progress

        self._bar = rich_progress.Progress(
            rich_progress.TextColumn("{task.description:<28}"),
            rich_progress.BarColumn(),
            rich_progress.DownloadColumn(binary_units=True),
            rich_progress.TimeRemainingColumn(),
            console=rich_console.Console(file=self.stream),
            transient=False,
        )
        self._task = self._bar.add_task("starting", total=max(total_bytes, 1))
        with self._bar:
            yield self
        self._bar = None

    @contextlib.contextmanager
    def step(self, description: str, nbytes: int = 0) -> Iterator[None]:
        """Shows ``description`` while the body runs, then counts ``nbytes`` as done.

        A stage that raises is not counted.
        """
        if self._bar is not None:
            self._bar.update(self._task, description=description)
        yield
        if self._bar is not None:
            self._bar.update(self._task, advance=nbytes)

    def finish(self) -> None:
        """Marks every stage done."""
        if self._bar is not None:
            task = self._bar.tasks[0]
            self._bar.update(self._task, description="done", completed=task.total)


def _build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=PROGRAM,
        description=(
            "Convert Flax NNX Orbax checkpoints to pz_flax checkpoints (which keep the model's"
            " structure and axis names) and back, or inspect a checkpoint."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the pz_flax version and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_output_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--in", dest="source", required=True, metavar="SRC", help="checkpoint to read"
        )
        command.add_argument(
            "--out",
            dest="destination",
            required=True,
            metavar="DST",
            help="checkpoint directory to create (written atomically; a local path or a URI)",
        )
        command.add_argument(
            "--force",
            action="store_true",
            help="replace DST if it is a checkpoint of the kind being written (nothing else)",
        )
        command.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="show progress (bytes, time left) on stderr (default: when it is a terminal)",
        )

    nnx_to_pz = commands.add_parser(
        "nnx-to-pz",
        help="NNX checkpoint -> pz_flax checkpoint",
        description=(
            "Read an NNX checkpoint (nnx.state saved by Orbax) into the model built by FACTORY"
            " (structure only; no weights are initialized), convert it to pz_flax, save it."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    nnx_to_pz.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help=(
            "a zero-argument callable returning the NNX model: an importable module (the"
            " current directory is importable) or a .py file, a colon, and the callable's name"
        ),
    )
    add_output_options(nnx_to_pz)
    nnx_to_pz.add_argument(
        "--naming",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help=(
            "an axis-naming option of pz_flax.from_nnx, e.g. features=embedding or"
            " input_axes=height,width,channels (commas make a tuple); repeatable"
        ),
    )
    nnx_to_pz.add_argument(
        "--naming-file",
        metavar="FILE",
        help=(
            "a JSON or TOML file of from_nnx naming options; an 'overrides' table maps module"
            " paths (or MODULE:CLASS names) to options for those modules. --naming flags win"
        ),
    )

    pz_to_nnx = commands.add_parser(
        "pz-to-nnx",
        help="pz_flax checkpoint -> NNX checkpoint",
        description="Restore a pz_flax checkpoint, convert it to NNX, save its nnx.state.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_output_options(pz_to_nnx)
    pz_to_nnx.add_argument(
        "--allow-module",
        dest="allow_modules",
        action="append",
        default=[],
        metavar="NAME",
        help=(
            "trust classes of this module (and submodules) named by the checkpoint; the current"
            " directory is importable; repeatable"
        ),
    )

    inspect = commands.add_parser(
        "inspect",
        help="list the arrays of a checkpoint",
        description="Print path, axis names, shape, dtype and size of every array.",
    )
    inspect.add_argument("path", metavar="PATH")
    return parser


#### Running user code: the model factory ####


@contextlib.contextmanager
def _user_code(spec: str) -> Iterator[None]:
    """Runs user code with the current directory importable and only ``spec`` in ``sys.argv``.

    A model file that parses the command line at import then sees no arguments of ours, and
    a ``sys.exit`` in user code becomes an error instead of ending the conversion silently.
    """
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [spec]
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        yield
    except SystemExit as exc:
        raise UsageError(
            f"{spec} called sys.exit({exc.code!r}) (does it parse the command line?); nothing"
            " was written."
        ) from None
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path


def _import_file(file: pathlib.Path) -> Any:
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[file.stem] = module
    module_spec.loader.exec_module(module)
    return module


def _load_factory(spec: str) -> Callable[[], Any]:
    """Finds FACTORY in MODULE (an importable name or a ``.py`` file) as the user asked."""
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"--model must look like MODULE:FACTORY, got {spec!r}.")
    with _user_code(spec):
        if module_name.endswith(".py") or os.sep in module_name:
            file = pathlib.Path(module_name)
            if not file.is_file():
                raise UsageError(f"--model: no such file {module_name}.")
            factory: Any = _import_file(file)
            for part in attribute.split("."):
                factory = getattr(factory, part, None)
                if factory is None:
                    raise UsageError(f"--model: {module_name} has no attribute {attribute!r}.")
        else:
            try:
                factory = pkgutil.resolve_name(spec)
            except ImportError as exc:
                raise UsageError(f"--model: cannot import {module_name}: {exc}") from None
            except AttributeError:
                raise UsageError(
                    f"--model: {module_name} has no attribute {attribute!r}."
                ) from None
    if not callable(factory):
        raise UsageError(f"--model: {spec} is not callable.")

    def build() -> Any:
        with _user_code(spec):
            return factory()

    build.__qualname__ = spec
    return build


#### Naming overrides ####


def _naming_value(option: str, text: str) -> Any:
    from pz_flax.interop import naming as naming_lib

    fields = {field.name: field for field in dataclasses.fields(naming_lib.NNXNaming)}
    field = fields.get(option)
    if field is not None and "tuple" in str(field.type):
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def _read_naming_file(file: str) -> dict[str, Any]:
    path = pathlib.Path(file)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except OSError as exc:
        raise UsageError(f"--naming-file: cannot read {file}: {exc.strerror or exc}") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(
            f"--naming-file: {file} is not valid {path.suffix[1:] or 'JSON'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"--naming-file: {file} must hold a table of naming options.")
    return data


def _naming_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments for ``from_nnx`` that ``--naming-file`` and ``--naming`` give."""
    options = _read_naming_file(args.naming_file) if args.naming_file else {}
    for item in args.naming:
        option, sep, value = item.partition("=")
        if not sep or not option.strip():
            raise UsageError(f"--naming must look like OPTION=VALUE, got {item!r}.")
        options[option.strip()] = _naming_value(option.strip(), value)
    overrides = options.pop("overrides", None)
    if overrides is not None:
        if not isinstance(overrides, dict):
            raise UsageError("--naming-file: 'overrides' must map module paths to options.")
        with _user_code(args.naming_file):
            try:
                options["overrides"] = {
                    pkgutil.resolve_name(key) if ":" in key else key: value
                    for key, value in overrides.items()
                }
            except (ImportError, AttributeError, ValueError) as exc:
                raise UsageError(
                    f"--naming-file: cannot resolve an overrides class: {exc}"
                ) from None
    from pz_flax.interop import naming as naming_lib

    try:
        naming_lib.DEFAULT_NAMING.replace(**{k: v for k, v in options.items() if k != "overrides"})
        naming_lib.check_overrides(options.get("overrides"))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"naming options: {exc}") from None
    return options


#### Commands ####


def _array_bytes(path: str) -> int:
    from pz_flax import checkpoint

    return checkpoint.inspect_checkpoint(path).total_bytes


def _written(kind: str, destination: str, source: str) -> str:
    from pz_flax import checkpoint
    from pz_flax.checkpoint import inspection

    summary = checkpoint.inspect_checkpoint(destination)
    return (
        f"{PROGRAM}: wrote the {kind} checkpoint {summary.path} ({len(summary.entries)} arrays,"
        f" {inspection.format_bytes(summary.total_bytes)}) from {source}"
    )


def _nnx_to_pz(args: argparse.Namespace, progress: Progress) -> str:
    from pz_flax import checkpoint
    from pz_flax.checkpoint import storage
    from pz_flax.interop import from_nnx

    storage.check_destination(
        args.destination, kind=storage.CheckpointKind.PZ_FLAX, force=args.force, keep=[args.source]
    )
    naming = _naming_options(args)
    nbytes = _array_bytes(args.source)
    with progress.running(2 * nbytes):
        with progress.step("loading the model factory"):
            factory = _load_factory(args.model)
        with progress.step("reading NNX arrays", nbytes):
            module = checkpoint.load_nnx_module(args.source, factory)
        with progress.step("converting to pz_flax"):
            layer = from_nnx(module, **naming)
            del module
        with progress.step("writing pz_flax checkpoint", nbytes):
            checkpoint.save(args.destination, layer, force=args.force)
        progress.finish()
    return _written("pz_flax", args.destination, args.source)


def _pz_to_nnx(args: argparse.Namespace, progress: Progress) -> str:
    from pz_flax import checkpoint
    from pz_flax.checkpoint import storage
    from pz_flax.interop import to_nnx

    storage.check_destination(
        args.destination, kind=storage.CheckpointKind.NNX, force=args.force, keep=[args.source]
    )
    nbytes = _array_bytes(args.source)
    with progress.running(2 * nbytes):
        allowed = ",".join(args.allow_modules) or PROGRAM
        with progress.step("reading pz_flax checkpoint", nbytes), _user_code(allowed):
            layer = checkpoint.restore(args.source, allow_modules=args.allow_modules)
        with progress.step("converting to NNX"):
            module = to_nnx(layer)
            del layer
        with progress.step("writing NNX checkpoint", nbytes):
            checkpoint.write_nnx_checkpoint(args.destination, module, force=args.force)
        progress.finish()
    return _written("NNX", args.destination, args.source)


def _inspect(args: argparse.Namespace) -> None:
    from rich import console as rich_console

    from pz_flax import checkpoint

    summary = checkpoint.inspect_checkpoint(args.path)
    if sys.stdout.isatty():
        rich_console.Console().print(summary)
    else:
        print(summary.format_table())


def _interrupted(args: argparse.Namespace) -> str:
    """What an interrupted run left behind, truthfully."""
    destination = getattr(args, "destination", None)
    if destination is None:
        return "interrupted."
    from pz_flax.checkpoint import storage

    try:
        path = storage.checkpoint_path(destination)
        leftovers = storage.staging_leftovers(path)
    except Exception:  # The message must come out even if the filesystem is the problem.
        return f"interrupted; {destination} may hold an unfinished hidden staging directory."
    if leftovers:
        listed = ", ".join(str(leftover) for leftover in leftovers)
        return f"interrupted; unfinished staging directories remain: {listed}"
    return f"interrupted; nothing was written to {path}."


def _short_message(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    if len(lines) > _MAX_ERROR_LINES:
        lines = [*lines[: _MAX_ERROR_LINES - 1], f"  ... and {len(lines) - 2} more"]
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """Keeps Orbax/absl chatter off stderr, where our progress bar and errors go."""
    warnings.filterwarnings("ignore")
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``pz-flax-convert`` with ``argv`` (default: ``sys.argv[1:]``).

    Args:
        argv: The command-line arguments, without the program name.

    Returns:
        The exit status: 0 on success, 1 on a failed conversion, 2 on bad usage, 130 when
        interrupted.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help and --version
        return int(exit_request.code or 0)
    except UsageError as exc:
        sys.stderr.write(f"{PROGRAM}: error: {_short_message(exc)}\n")
        return 2
    _quiet_libraries()
    progress_enabled = getattr(args, "progress", None)
    if progress_enabled is None:
        progress_enabled = sys.stderr.isatty()
    progress = Progress(enabled=progress_enabled, stream=sys.stderr)
    try:
        if args.command == "nnx-to-pz":
            print(_nnx_to_pz(args, progress))
        elif args.command == "pz-to-nnx":
            print(_pz_to_nnx(args, progress))
        else:
            _inspect(args)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{PROGRAM}: {_interrupted(args)}\n")
        return 130
    except UsageError as exc:
        sys.stderr.write(f"{PROGRAM}: error: {_short_message(exc)}\n")
        return 2
    except Exception as exc:
        # Everything, including bugs, ends as a short message: a traceback is no use to the
        # person converting a checkpoint, and the outputs are atomic, so nothing is half-done.
        sys.stderr.write(f"{PROGRAM}: error: {_short_message(exc)}\n")
        return 1
    return 0
