"""The residual codec a session uses at T>0, in one form on the edge.

Its values are the wire's (proto CODEC_*), so an OpenRequest takes it as is;
its name ('P', 'Q') is what users write in --codec and read in the stats.
"""
from __future__ import annotations

from enum import IntEnum

from proto import tandem_pb2 as pb


class Codec(IntEnum):
    P = pb.CODEC_P    # sparse p down once per rejection: the edge draws the correction
    Q = pb.CODEC_Q    # sparse q up with every drafted token: the verifier draws the correction
