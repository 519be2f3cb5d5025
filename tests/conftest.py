import pytest
import torch

from tests.helpers import NO_DATA, NO_GPU, fashion_mnist_root

torch.set_num_threads(min(2, torch.get_num_threads()))

# The only skips the default run may report, each with why it is acceptable.  Any other skip
# fails the run: a feature whose test skips under `pip install -e ".[dev]"; pytest` is untested.
ALLOWED_SKIPS = {
    NO_DATA: "the real-data tests need files the repository does not ship; synthetic data covers the rest",
    "fallback forced by FXCOMPILE_KERNELS=python":
        "the C++-kernel checks do not apply when the user forces the pure-PyTorch casts",
    "the output-buffer cache belongs to the C++ kernels": "same: only under FXCOMPILE_KERNELS=python",
    "g++ is not installed; hls4ml's C simulation builds with it": "no compiler, no C simulation to compare",
    NO_GPU: "the CUDA-marked cases run natively on a GPU machine; here the interpreter cases check the same kernels",
    "a GPU is present: the benchmark runs instead of refusing": "only on a GPU machine, where the refusal cannot happen",
    "Triton is not installed (pip install triton)": "Triton ships with PyTorch on Linux; elsewhere the CUDA path is untestable",
    "TRITON_INTERPRET=1: Triton's library is interpreted, not compiled":
        "only when the user runs the suite under the interpreter",
    "Triton's NVIDIA backend (with its bundled ptxas) is missing":
        "the PTX check needs the NVIDIA backend that Linux wheels of Triton bundle",
}


@pytest.fixture
def fashion_root():
    """The Fashion-MNIST root (FXCOMPILE_DATA or ../shared/data/fashion-mnist), or skip."""
    root = fashion_mnist_root()
    if root is None:
        pytest.skip(NO_DATA)
    return root


_UNLISTED: list[tuple[str, str]] = []   # (test id, reason) of each skip outside ALLOWED_SKIPS


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = (longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)).removeprefix("Skipped: ")
        if reason not in ALLOWED_SKIPS:
            _UNLISTED.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    if _UNLISTED and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _UNLISTED:
        terminalreporter.section("skips not listed in tests/conftest.py ALLOWED_SKIPS (they fail the run)", red=True)
        for nodeid, reason in _UNLISTED:
            terminalreporter.line(f"{nodeid}: {reason}")
