"""Start coverage in a test-suite process when it first imports easylaunch.

scripts/test.sh copies this module into the TEST venv's site-packages with a .pth that imports
it (never into a user's environment). When EASYLAUNCH_COVERAGE_START names a coverage config,
it puts a finder first on sys.meta_path that, on the first ``import easylaunch...``, starts
coverage with that config (as coverage.process_startup() would) and removes itself. Processes
that never import easylaunch (test helper scripts, version probes, pip) pay nothing; coverage's
own start-up costs about 0.1 s a process. Forked children restart coverage themselves
(``patch = fork`` in the config); Slurm jobs inherit the variable.
"""

import os
import sys


class _StartCoverage:
    """A meta path finder that finds nothing: it only starts coverage, once."""

    def __init__(self, config: str):
        self.config = config

    def find_spec(self, name, path=None, target=None):
        if name == "easylaunch" or name.startswith("easylaunch."):
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass
            try:
                import coverage
                import coverage.collector
                from coverage.control import _start_process_coverage

                # debugging aid only (a Collector's origin): inspect.stack() reads source files
                coverage.collector.short_stack = lambda *args, **kwargs: ""

                if not hasattr(coverage.process_startup, "coverage"):
                    coverage.process_startup.coverage = _start_process_coverage(self.config)
            except Exception:  # coverage must never make a test fail
                pass
        return None


def _install() -> None:
    config = os.environ.get("EASYLAUNCH_COVERAGE_START")
    if config and not any(isinstance(f, _StartCoverage) for f in sys.meta_path):
        sys.meta_path.insert(0, _StartCoverage(config))


_install()
