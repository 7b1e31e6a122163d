"""Suite-wide guard: a test that starts a Mercato service process (or torchrun) must be
marked ``slow``, so ``make test-fast`` (``-m "not slow"``) really runs without them."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

_REAL_INIT = subprocess.Popen.__init__


def _starts_a_service(args: Any) -> bool:
    argv = (
        [str(a) for a in args]
        if isinstance(args, Sequence) and not isinstance(args, str)
        else str(args).split()
    )
    if any(a.endswith("torchrun") for a in argv):
        return True
    for i, a in enumerate(argv[:-1]):
        if a == "-m":
            target = argv[i + 1]
            if target.startswith("services.") or target in ("mercato.cli", "torch.distributed.run"):
                return True
    return False


@pytest.fixture(autouse=True)
def _fast_tests_start_no_service(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("slow") is not None:
        yield
        return

    def guarded(self: subprocess.Popen[Any], args: Any, *a: Any, **kw: Any) -> None:
        if _starts_a_service(args):
            raise AssertionError(
                f"{request.node.nodeid} starts {args!r} but is not marked slow: add "
                "@pytest.mark.slow (or pytestmark) so `make test-fast` stays fast"
            )
        _REAL_INIT(self, args, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "__init__", guarded)
        yield
