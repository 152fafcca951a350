"""The `ctxkern` command's entry point: `ctxkern search --index DIR` without torch where it can, else ctxkern.cli.

Why a module outside the package: importing anything under ctxkern runs ctxkern/__init__.py, which imports
torch and registers the operators (1.4-2 s on the development machine, against a 0.5 s target for a search of
a saved index). A search of an index that stores its query encoder (ctxkern/search/query_encoder.py) needs
only numpy, tokenizers and ONNX Runtime, so for that one command this module loads ctxkern's torch-free
modules under bare stand-ins for the packages ctxkern and ctxkern.search, whose __init__ files then do not run.
The stand-ins live only in this process, which imports nothing else of ctxkern; every other command, and a
search that asks for something the light path does not serve (another --model, --device, --backend,
--corpus, --help), goes to ctxkern.cli with nothing stood in.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


def _light_search_possible(argv: list[str]) -> bool:
    """A cheap first look, before anything is imported: `search ... --index DIR` with DIR holding a query
    encoder and ONNX Runtime installed."""
    if argv[:1] != ["search"] or "--index" not in argv[1:-1]:
        return False
    folder = Path(argv[argv.index("--index") + 1])
    return (folder / "query" / "model.onnx").is_file() and importlib.util.find_spec("onnxruntime") is not None


def _stand_in_packages() -> None:
    """ctxkern and ctxkern.search as bare packages: their submodules import, their __init__ files do not run."""
    root = Path(importlib.util.find_spec("ctxkern").origin).parent
    for name, folder in (("ctxkern", root), ("ctxkern.search", root / "search")):
        package = types.ModuleType(name, f"stand-in for {name} (see _ctxkern_cli)")
        package.__path__ = [str(folder)]
        sys.modules[name] = package


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _light_search_possible(argv):
        _stand_in_packages()
        from ctxkern import cli_index

        args = cli_index.light_search_arguments(argv[1:])
        if args is not None:
            try:
                return cli_index.search_index_light(args)
            except (ValueError, RuntimeError, TypeError, FileNotFoundError) as err:
                print(f"ctxkern: error: {err}", file=sys.stderr)
                return 2
        for name in [n for n in sys.modules if n == "ctxkern" or n.startswith("ctxkern.")]:
            del sys.modules[name]                 # the real packages from here on
    from ctxkern.cli import main as full_main

    return full_main(argv)


if __name__ == "__main__":
    sys.exit(main())
