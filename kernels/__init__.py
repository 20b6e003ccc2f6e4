"""Triton kernels, installed as ``ivfast.kernels``.

One file per op family, each holding its kernels, launch functions and autograd Functions.
The readable PyTorch references live beside their users (``ivfast.ops``,
``ivfast.models.diffusion``); kernels know nothing of models.

This folder is only ever ``ivfast.kernels``. Run from the repository root, Python puts the root
first on ``sys.path``, so a plain ``import kernels`` finds this folder before Hugging Face's
``kernels`` package (which ``transformers`` imports). Imported under that top-level name, this
file hands the import over to the next ``kernels`` on ``sys.path`` (the installed one), or fails
exactly as if this folder were not there; no ivfast module is ever bound to ``kernels``.
"""
if __name__ != "ivfast.kernels":
    def _hand_over(name: str) -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        def holds_this_folder(entry: str, root: str) -> bool:
            try:
                return os.path.samefile(entry or os.curdir, root)
            except OSError:
                return False

        def is_hand_over(origin) -> bool:
            try:
                with open(origin, encoding="utf-8") as f:
                    return "_hand_over(__name__)" in f.read()
            except (OSError, TypeError, UnicodeDecodeError):
                return False

        # skip this checkout's root, and that of any other ivfast checkout on sys.path (a second
        # clone or worktree holds this same file: the two would hand the import to each other)
        search, root = list(sys.path), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        while True:
            search = [p for p in search if not holds_this_folder(p, root)]
            spec = importlib.machinery.PathFinder.find_spec(name, search)
            if spec is None or not is_hand_over(spec.origin):
                break
            root = os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))
        if spec is None:
            sys.modules.pop(name, None)
            raise ModuleNotFoundError(f"No module named {name!r} (the repository's kernels/ folder is "
                                      f"ivfast.kernels, not a top-level package)", name=name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module   # the import statement returns what sys.modules holds afterwards
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise

    _hand_over(__name__)
    del _hand_over
