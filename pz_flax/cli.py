"""``pz-flax-convert``: move weights between Flax NNX and pz_flax checkpoints, or inspect one.

Subcommands:

* ``nnx-to-pz --model MODULE:FACTORY --in SRC --out DST``: read an NNX checkpoint (a saved
  ``nnx.state``) into the model ``FACTORY`` builds (only its structure is used; the weights
  come from SRC), convert it with ``pz_flax.interop.from_nnx``, and save a pz_flax checkpoint,
  which then restores with no model code at all.
* ``pz-to-nnx --in SRC --out DST [--allow-module NAME ...]``: restore a pz_flax checkpoint,
  convert it with ``pz_flax.interop.to_nnx``, and save ``nnx.state`` as an NNX checkpoint.
* ``inspect PATH``: print the table of arrays (path, axis names, shape, dtype, size) of a
  pz_flax or plain Orbax checkpoint.

Errors print one to three lines on stderr, without a traceback, and exit with status 1
(2 for bad usage); outputs are written atomically, so a failed run leaves nothing at DST.
Heavy imports (JAX, Orbax) happen after argument parsing, so ``--help`` is instant.

The ``pz-flax-convert`` console script runs :func:`main`; ``conversion_tools/convert_checkpoint.py``
in the repository runs it from a source checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import pathlib
import sys
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


class Progress:
    """A one-line progress bar on stderr, redrawn in place; silent when disabled.

    Conversions are a few long stages (build the structure, read the arrays, convert, write),
    so the bar advances per stage and names the stage running now.
    """

    def __init__(self, total: int, *, enabled: bool, stream: TextIO, width: int = 24):
        self.total = total
        self.enabled = enabled
        self.stream = stream
        self.width = width
        self.done = 0

    def stage(self, description: str) -> None:
        """Shows that the next stage, ``description``, has started."""
        self._draw(description)

    def advance(self) -> None:
        """Marks the current stage finished."""
        self.done += 1
        if self.done == self.total:
            self._draw("done")
            if self.enabled:
                self.stream.write("\n")
                self.stream.flush()

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        """Shows ``description`` while the ``with`` body runs, then marks that stage finished.

        A stage that raises is not counted as finished.
        """
        self.stage(description)
        yield
        self.advance()

    def _draw(self, description: str) -> None:
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} {description:<28}")
        self.stream.flush()


class _VersionAction(argparse.Action):
    """Prints ``pz_flax.__version__``, importing pz_flax only when ``--version`` is given."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import pz_flax

        print(f"{PROGRAM} {pz_flax.__version__}")
        parser.exit()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
            help="checkpoint directory to create (written atomically)",
        )
        command.add_argument("--force", action="store_true", help="replace an existing DST")
        command.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="show a progress bar on stderr (default: when stderr is a terminal)",
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
        help="a module name or .py file, and a zero-argument callable in it returning the model",
    )
    add_output_options(nnx_to_pz)

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
        help="trust classes of this module (and submodules) named by the checkpoint; repeatable",
    )

    inspect = commands.add_parser(
        "inspect",
        help="list the arrays of a checkpoint",
        description="Print path, axis names, shape, dtype and size of every array.",
    )
    inspect.add_argument("path", metavar="PATH")
    return parser


def _load_factory(spec: str) -> Callable[[], Any]:
    """Finds FACTORY in MODULE (an importable name or a ``.py`` file) as the user asked."""
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"--model must look like MODULE:FACTORY, got {spec!r}.")
    if module_name.endswith(".py") or os.sep in module_name:
        file = pathlib.Path(module_name)
        if not file.is_file():
            raise UsageError(f"--model: no such file {module_name}.")
        module_spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[file.stem] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UsageError(f"--model: cannot import {module_name}: {exc}") from None
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise UsageError(f"--model: {module_name} has no attribute {attribute!r}.")
    if not callable(factory):
        raise UsageError(f"--model: {spec} is not callable.")
    return factory


def _check_destination(destination: str, force: bool) -> None:
    from pz_flax.checkpoint import errors

    if os.path.lexists(destination) and not force:
        raise errors.CheckpointExistsError(
            f"{os.path.abspath(destination)} already exists; pass --force to replace it."
        )


def _nnx_to_pz(args: argparse.Namespace, progress: Progress) -> None:
    from pz_flax import checkpoint
    from pz_flax.interop import from_nnx

    _check_destination(args.destination, args.force)
    with progress.step("loading the model factory"):
        factory = _load_factory(args.model)
    with progress.step("reading NNX arrays"):
        module = checkpoint.load_nnx_module(args.source, factory)
    with progress.step("converting to pz_flax"):
        layer = from_nnx(module)
        del module
    with progress.step("writing pz_flax checkpoint"):
        checkpoint.save(args.destination, layer, force=args.force)


def _pz_to_nnx(args: argparse.Namespace, progress: Progress) -> None:
    from pz_flax import checkpoint
    from pz_flax.interop import to_nnx

    _check_destination(args.destination, args.force)
    with progress.step("reading pz_flax checkpoint"):
        layer = checkpoint.restore(args.source, allow_modules=args.allow_modules)
    with progress.step("converting to NNX"):
        module = to_nnx(layer)
        del layer
    with progress.step("writing NNX checkpoint"):
        checkpoint.write_nnx_checkpoint(args.destination, module, force=args.force)


def _inspect(args: argparse.Namespace) -> None:
    from pz_flax import checkpoint

    print(checkpoint.inspect_checkpoint(args.path).format_table())


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
        The exit status: 0 on success, 1 on a failed conversion, 2 on bad usage.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return int(exit_request.code or 0)
    _quiet_libraries()
    stages = {"nnx-to-pz": 4, "pz-to-nnx": 3}.get(args.command, 1)
    progress_enabled = getattr(args, "progress", None)
    if progress_enabled is None:
        progress_enabled = sys.stderr.isatty()
    progress = Progress(stages, enabled=progress_enabled, stream=sys.stderr)
    try:
        if args.command == "nnx-to-pz":
            _nnx_to_pz(args, progress)
        elif args.command == "pz-to-nnx":
            _pz_to_nnx(args, progress)
        else:
            _inspect(args)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{PROGRAM}: interrupted; nothing was written.\n")
        return 130
    except UsageError as exc:
        if progress.enabled:
            sys.stderr.write("\n")
        sys.stderr.write(f"{PROGRAM}: error: {_short_message(exc)}\n")
        return 2
    except Exception as exc:
        # Everything, including bugs, ends as a short message: a traceback is no use to the
        # person converting a checkpoint, and the outputs are atomic, so nothing is half-done.
        if progress.enabled:
            sys.stderr.write("\n")
        sys.stderr.write(f"{PROGRAM}: error: {_short_message(exc)}\n")
        return 1
    return 0

