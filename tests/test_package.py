import epp
import kvindex


def test_versions() -> None:
    assert kvindex.__version__ == epp.__version__
