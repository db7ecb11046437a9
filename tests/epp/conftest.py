"""`extproc_server`: the ext_proc edges every stream test runs over (the picker's own HTTP/2
edge and grpc.aio's server), so one behaviour suite covers both."""

from __future__ import annotations

from collections.abc import Iterator

import extproc_client
import pytest

from epp.server import EXTPROC_SERVERS


@pytest.fixture(params=EXTPROC_SERVERS)
def extproc_server(request: pytest.FixtureRequest) -> Iterator[str]:
    previous = extproc_client.EXTPROC_SERVER
    extproc_client.EXTPROC_SERVER = request.param
    yield request.param
    extproc_client.EXTPROC_SERVER = previous
