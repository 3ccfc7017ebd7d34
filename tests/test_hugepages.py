"""The command line's restart with glibc's malloc taking huge pages."""

import os
import subprocess
import sys

import pytest

from dlfb_localization.hugepages import huge_pages_environment

GLIBC = ("glibc", "2.36")


def test_the_tunable_is_added_beside_the_ones_already_set():
    environ = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    got = huge_pages_environment(environ, libc=GLIBC, thp_mode="madvise")
    assert got == {
        "PATH": "/bin",
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
    }
    got = huge_pages_environment({}, libc=("glibc", "2.35"), thp_mode="madvise")
    assert got == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # The caller's mapping is not changed.
    assert environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"


@pytest.mark.parametrize(
    ("environ", "libc", "thp_mode"),
    [
        # The user's choice stands, whatever its value.
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise"),
        ({"GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=2"}, GLIBC, "madvise"),
        # A C library without the tunable: musl, glibc before 2.35, none found.
        ({}, ("musl", "1.2.4"), "madvise"),
        ({}, ("glibc", "2.34"), "madvise"),
        ({}, ("", ""), "madvise"),
        # The kernel gives every program huge pages already, or none.
        ({}, GLIBC, "always"),
        ({}, GLIBC, "never"),
    ],
)
def test_no_restart_where_it_would_change_nothing(environ, libc, thp_mode):
    assert huge_pages_environment(environ, libc=libc, thp_mode=thp_mode) is None


def test_a_program_restarts_once_with_the_tunable_and_its_arguments():
    """`restart_with_huge_pages` in a fresh interpreter: where this machine
    allows huge pages, the program runs again, in the same process, with the
    tunable and its own arguments; elsewhere it runs once, unchanged."""
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    code = (
        "import os, sys\n"
        "print('start', os.getpid(), flush=True)\n"
        "from dlfb_localization.hugepages import restart_with_huge_pages\n"
        "restart_with_huge_pages()\n"
        "print('tunables', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--out", "a b"],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    lines = result.stdout.splitlines()
    expected = huge_pages_environment(environ)
    if expected is None:
        assert lines[1:] == ["tunables None ['--out', 'a b']"]
        assert len(lines) == 2
    else:
        # Started twice in one process; the second start did not restart.
        assert lines[0] == lines[1] and lines[0].startswith("start ")
        assert lines[2:] == ["tunables glibc.malloc.hugetlb=1 ['--out', 'a b']"]
