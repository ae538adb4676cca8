"""HOST:PORT, parsed once for every daemon's flags (common/address.py)."""
import argparse

import pytest

from common.address import host_port, join_host_port, split_host_port


@pytest.mark.parametrize("text, want", [("h:1", ("h", 1)), ("127.0.0.1:0", ("127.0.0.1", 0)), (":80", ("", 80)),
                                        ("[::1]:50051", ("::1", 50051)), ("0.0.0.0:65535", ("0.0.0.0", 65535))])
def test_split(text, want):
    assert split_host_port(text) == want


@pytest.mark.parametrize("text", ["h", "h:", "h:x", "h:70000", "h:-1", "h:1.5", ""])
def test_split_refuses(text):
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        split_host_port(text)


def test_flag_type_defaults_to_loopback_and_says_what_it_wanted():
    assert host_port(":8080") == ("127.0.0.1", 8080)
    assert host_port("[::]:1") == ("::", 1)
    with pytest.raises(argparse.ArgumentTypeError, match="expected HOST:PORT, got 'nope'"):
        host_port("nope")


@pytest.mark.parametrize("host, port, text", [("h", 1, "h:1"), ("::1", 5, "[::1]:5"), ("", 9, ":9")])
def test_join_round_trips(host, port, text):
    assert join_host_port(host, port) == text
    assert split_host_port(text) == (host, port)
