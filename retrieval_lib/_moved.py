"""The flat layout's module paths, kept importable after the move into stage folders.

``import retrieval_lib.modeling`` and ``from retrieval_lib.modeling import DualTowerRetriever``
(saved code, an old notebook) still work: a meta-path finder serves each old module as a thin
module whose names are looked up in the modules that hold them now, with a
``DeprecationWarning`` that names the new import. ``python -m retrieval_lib.experiment`` runs
``python -m retrieval_lib experiment``. Old names that are folders now (``data``, ``evaluation``,
``training``, ``results``, ``serving``) are real packages whose ``__init__`` exports what the
old module did.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

PACKAGE = __name__.rpartition(".")[0]

#: Old flat module -> the modules its names live in now (first match wins).
MOVED: dict[str, tuple[str, ...]] = {
    "config": ("settings.config",), "allocator": ("settings.allocator",),
    "hub": ("settings.hub",), "checkpoint": ("settings.checkpoint", "settings.saved_folder"),
    "distributed": ("settings.distributed",),
    "records": ("data.records",), "bm25": ("data.bm25",), "tokenizer": ("data.tokenizer",),
    "demo_corpus": ("data.demo_corpus",),
    "data": ("data.sources", "data.splits", "data.statistics"),
    "windows": ("evaluation.windows",),
    "evaluation": ("evaluation.metrics", "evaluation.search"),
    "losses": ("models.losses",), "gradcache": ("models.gradcache",), "m3": ("models.m3",),
    "minimind": ("models.minimind",), "modeling": ("models.base", "models.checkpoints",
                                                       "models.retriever"),
    "expansion": ("models.expansion",), "pretraining": ("models.pretraining",),
    "batching": ("training.batching",), "mining": ("training.mining",),
    "training": ("training.collator", "training.optim", "training.resume", "training.loop"),
    "memory": ("training.memory",),
    "runs": ("results.runs",), "results": ("results.tables",),
    "baselines": ("results.baselines",), "reranker": ("results.reranker",),
    "export": ("serving.export",), "serving": ("serving.onnx_runtime",),
    "index": ("serving.index",),
    "experiment": ("course.experiment", "course.inputs"), "notebook_utils": ("course.notebooks",),
    "plotting": ("course.plotting", "course.result_plots"),
    "studies": ("course.expansion", "course.beyond", "course.ablation"),
}

#: Old modules that could be run with ``python -m``: their command of ``python -m retrieval_lib``.
_COMMANDS = {"experiment": "experiment", "memory": "memory", "notebook_utils": "notebooks"}

#: Old module names that are folders now: the real package is imported, not an alias.
_FOLDERS = frozenset({"data", "evaluation", "training", "results", "serving"})


def new_home(old: str, name: str) -> str | None:
    """The module that holds ``name`` of the old module ``old`` now, or None.

    >>> new_home("modeling", "DualTowerRetriever")
    'retrieval_lib.models.retriever'
    """
    modules = [importlib.import_module(f"{PACKAGE}.{target}") for target in MOVED[old]]
    for module in modules:  # the module that defines it, not one that imports it
        if name in getattr(module, "__all__", ()):
            return module.__name__
    for module in modules:
        if name in vars(module):
            return module.__name__
    return None


class _MovedModule(types.ModuleType):
    """An old module: each name is read from its new module, with a warning naming it."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        old = self.__name__.rpartition(".")[2]
        home = new_home(old, name)
        if home is None:
            raise AttributeError(
                f"{self.__name__} moved into {', '.join(f'{PACKAGE}.{t}' for t in MOVED[old])}, "
                f"and none of them has {name!r}")
        warnings.warn(f"{self.__name__} moved: import {name} from {home}", DeprecationWarning,
                      stacklevel=2)
        return getattr(sys.modules[home], name)

    def __dir__(self):
        return sorted({n for t in MOVED[self.__name__.rpartition(".")[2]]
                       for n in dir(importlib.import_module(f"{PACKAGE}.{t}"))})


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``retrieval_lib.<old>`` for the old flat modules that are not folders now."""

    def find_spec(self, fullname, path=None, target=None):
        parent, _, old = fullname.rpartition(".")
        if parent != PACKAGE or old not in MOVED or old in _FOLDERS:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return _MovedModule(spec.name)

    def exec_module(self, module):
        module.__file__ = None

    def get_code(self, fullname):
        """``python -m retrieval_lib.<old>``: the same command of ``python -m retrieval_lib``."""
        old = fullname.rpartition(".")[2]
        if old not in _COMMANDS:
            raise ImportError(f"{fullname} has no command line; it moved into "
                              + ", ".join(f"{PACKAGE}.{t}" for t in MOVED[old]))
        command = _COMMANDS[old]
        source = (f"import sys\n"
                  f"from {PACKAGE}.__main__ import main\n"
                  f"print('python -m {fullname} is now: python -m {PACKAGE} {command}', "
                  f"file=sys.stderr)\n"
                  f"raise SystemExit(main([{command!r}, *sys.argv[1:]]))\n")
        return compile(source, f"<{fullname}>", "exec")

    def get_source(self, fullname):
        return None

    def is_package(self, fullname):
        return False



def install() -> None:
    """Put the finder for the old module paths on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
