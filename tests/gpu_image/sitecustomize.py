"""Make this interpreter look like the lent GPU box's: the distributions named in MINIGPT4_ABSENT
(comma-separated, e.g. "boto3,moto") cannot be imported and have no metadata, as if not installed.

The GPU image lacks packages that this box has (boto3, moto, ...; ../shared/ENVIRONMENT.md), and a
bench call there carries one wheel bundle. The tests run the benches with this directory first on
PYTHONPATH (tests/conftest.py: `gpu_sh`), so a bench that needs what the device will not have
fails here, not in a scarce device call. Ray's workers inherit PYTHONPATH and the variable, so they
see the same image. Both `import x` and availability probes (`importlib.util.find_spec`,
`importlib.metadata`: transformers' and accelerate's checks) see the package as missing.
"""
import os
import sys

ABSENT = frozenset(n.strip().lower().replace("-", "_") for n in os.environ.get("MINIGPT4_ABSENT", "").split(",")
                   if n.strip())


def _absent(name: str | None) -> bool:
    return bool(name) and name.split(".")[0].lower().replace("-", "_") in ABSENT


class _Hidden:
    """Wraps the path finder: no spec and no distribution for the absent packages."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, fullname, path=None, target=None):
        return None if _absent(fullname) else self.finder.find_spec(fullname, path, target)

    def find_distributions(self, *args, **kwargs):
        for dist in self.finder.find_distributions(*args, **kwargs):
            if not _absent(dist.metadata["Name"]):
                yield dist

    def invalidate_caches(self):
        self.finder.invalidate_caches()

    def __getattr__(self, name):
        return getattr(self.finder, name)


if ABSENT:
    from importlib.machinery import PathFinder

    sys.meta_path[:] = [_Hidden(f) if f is PathFinder else f for f in sys.meta_path]
    for _name in [m for m in sys.modules if _absent(m)]:  # imported while the site ran (.pth files)
        del sys.modules[_name]
