"""Start-up hook: register entry-point merge methods when mergekit loads them.

Run from ``circuit_merge_plugin-bootstrap.pth`` at interpreter start, so it must
be cheap (standard library only, no torch, no mergekit) and must never raise.
It puts a finder on ``sys.meta_path`` that waits for ``mergekit.merge_methods``
to be imported and, right after that module has executed, calls
:func:`circuit_merge_plugin.adapters.registration.register_entry_points`.
"""

import sys

TARGET = "mergekit.merge_methods"


def _after_import() -> None:
    try:
        from circuit_merge_plugin.adapters.registration import register_entry_points

        register_entry_points()
    except Exception as error:  # a plugin must never break its host
        import warnings

        warnings.warn(
            f"circuit-merge-plugin: could not register merge methods: {error}",
            RuntimeWarning,
            stacklevel=2,
        )


class _LoaderProxy:
    """Delegates to the real loader and runs the hook after exec_module."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        self._loader.exec_module(module)
        _after_import()


class _PostImportFinder:
    """A meta path finder that only ever wraps the loader of TARGET."""

    _circuit_merge_hook = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or getattr(finder, "_circuit_merge_hook", False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderProxy(spec.loader)
                return spec
        return None

    def invalidate_caches(self):
        pass


def install() -> None:
    """Install the hook once; if mergekit's registry is already loaded, register now."""
    try:
        if TARGET in sys.modules:
            _after_import()
            return
        if not any(getattr(f, "_circuit_merge_hook", False) for f in sys.meta_path):
            sys.meta_path.insert(0, _PostImportFinder())
    except Exception as error:  # pragma: no cover - defensive
        import warnings

        warnings.warn(f"circuit-merge-plugin: start-up hook failed: {error}")
