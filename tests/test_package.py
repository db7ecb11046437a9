import pytest

import epp
import kvindex
from epp import cli as epp_cli
from kvtools import cli as kvindex_cli


def test_versions() -> None:
    assert kvindex.__version__ == epp.__version__


@pytest.mark.parametrize("cli", [kvindex_cli, epp_cli])
def test_every_registered_command_builds(cli: object) -> None:
    # Importing and registering every subcommand catches a module listed but missing.
    parser = cli.build_parser()  # type: ignore[attr-defined]
    assert parser.prog in {"kvindex", "epp"}
