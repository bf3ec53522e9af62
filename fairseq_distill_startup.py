"""Faster start-up for every fairseq CLI in this package's .venv: defers two eager imports of fairseq.

fairseq imports every task and criterion it ships when ``fairseq.tasks`` is first imported. Two of them,
``fairseq.criterions.sentence_prediction`` (GLUE metrics) and ``fairseq.tasks.audio_classification``
(EER), import scikit-learn and scipy.stats at module level, about 3 s of the 8-11 s a fairseq-train
process spends before its first batch on a 2-core machine (README, "CLI start-up"). Neither is used
unless those tasks run. While exactly those two modules execute, ``sklearn``, ``sklearn.metrics``,
``scipy`` and ``scipy.stats`` are placeholders whose names resolve on first use, so
``from sklearn.metrics import f1_score`` binds a stand-in that imports scikit-learn when called.
Every other import of scikit-learn or scipy, before or after, is the real one.

scripts/setup_env.sh installs a ``.pth`` file that calls :func:`install` at interpreter start-up.
``FAIRSEQ_DISTILL_EAGER_IMPORTS=1`` turns it off.
"""
import importlib
import importlib.machinery
import os
import sys
import types

DEFERRING_MODULES = frozenset({"fairseq.criterions.sentence_prediction", "fairseq.tasks.audio_classification"})
DEFERRED = ("sklearn", "sklearn.metrics", "scipy", "scipy.stats")


class _Deferred:
    """Stands for ``module.attr``: imports ``module`` on the first call or attribute access."""

    def __init__(self, module, attr):
        self._where = (module, attr)

    def _resolve(self):
        module, attr = self._where
        try:
            return getattr(importlib.import_module(module), attr)
        except AttributeError:  # a submodule not yet imported, e.g. ``from sklearn import metrics``
            return importlib.import_module(f"{module}.{attr}")

    def __call__(self, *args, **kwargs):
        return self._resolve()(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._resolve(), name)

    def __repr__(self):
        return "<deferred {}.{}>".format(*self._where)


class _Placeholder(types.ModuleType):
    """A module whose every public attribute is a :class:`_Deferred`."""

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Deferred(self.__name__, attr)


class _DeferringLoader:  # the loader protocol; importlib.abc is not imported, to keep start-up free
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        if any(name in sys.modules for name in DEFERRED):  # already paid for: nothing to save
            return self.loader.exec_module(module)
        placeholders = {name: _Placeholder(name) for name in DEFERRED}
        sys.modules.update(placeholders)
        try:
            self.loader.exec_module(module)
        finally:
            for name, placeholder in placeholders.items():
                if sys.modules.get(name) is placeholder:
                    del sys.modules[name]


class DeferringFinder:  # the meta path finder protocol
    """Finds the two fairseq modules as usual and wraps their loader in :class:`_DeferringLoader`."""

    def find_spec(self, name, path, target=None):
        if name not in DEFERRING_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _DeferringLoader(spec.loader)
        return spec


def install():
    """Put :class:`DeferringFinder` first on ``sys.meta_path`` (once), unless turned off."""
    if os.environ.get("FAIRSEQ_DISTILL_EAGER_IMPORTS", "") not in ("", "0"):
        return
    if not any(isinstance(f, DeferringFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, DeferringFinder())
