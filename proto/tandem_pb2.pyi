from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_P: _ClassVar[Codec]
    CODEC_Q: _ClassVar[Codec]
CODEC_P: Codec
CODEC_Q: Codec

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class OpenRequest(_message.Message):
    __slots__ = ("fingerprint", "sampling", "codec", "prompt", "client", "lead", "max_tokens", "ignore_eos", "lead_first", "lead_in_reply", "prompt_zstd")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    LEAD_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LEAD_FIRST_FIELD_NUMBER: _ClassVar[int]
    LEAD_IN_REPLY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ZSTD_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    sampling: Sampling
    codec: Codec
    prompt: _containers.RepeatedScalarFieldContainer[int]
    client: str
    lead: bool
    max_tokens: int
    ignore_eos: bool
    lead_first: int
    lead_in_reply: bool
    prompt_zstd: bytes
    def __init__(self, fingerprint: _Optional[str] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., codec: _Optional[_Union[Codec, str]] = ..., prompt: _Optional[_Iterable[int]] = ..., client: _Optional[str] = ..., lead: _Optional[bool] = ..., max_tokens: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., lead_first: _Optional[int] = ..., lead_in_reply: _Optional[bool] = ..., prompt_zstd: _Optional[bytes] = ...) -> None: ...

class OpenReply(_message.Message):
    __slots__ = ("session", "fingerprint", "n_vocab", "token_width", "n_ctx", "max_draft", "target", "emulated", "ar_token_s", "verify_a_s", "verify_b_s", "p_top_k", "p_tail", "server_s", "session_key", "tree_branches", "lead_token", "accepts_prompt_zstd")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    N_VOCAB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_WIDTH_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    EMULATED_FIELD_NUMBER: _ClassVar[int]
    AR_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    VERIFY_A_S_FIELD_NUMBER: _ClassVar[int]
    VERIFY_B_S_FIELD_NUMBER: _ClassVar[int]
    P_TOP_K_FIELD_NUMBER: _ClassVar[int]
    P_TAIL_FIELD_NUMBER: _ClassVar[int]
    SERVER_S_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    TREE_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    LEAD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_PROMPT_ZSTD_FIELD_NUMBER: _ClassVar[int]
    session: str
    fingerprint: str
    n_vocab: int
    token_width: int
    n_ctx: int
    max_draft: int
    target: str
    emulated: bool
    ar_token_s: float
    verify_a_s: float
    verify_b_s: float
    p_top_k: int
    p_tail: int
    server_s: float
    session_key: str
    tree_branches: int
    lead_token: int
    accepts_prompt_zstd: bool
    def __init__(self, session: _Optional[str] = ..., fingerprint: _Optional[str] = ..., n_vocab: _Optional[int] = ..., token_width: _Optional[int] = ..., n_ctx: _Optional[int] = ..., max_draft: _Optional[int] = ..., target: _Optional[str] = ..., emulated: _Optional[bool] = ..., ar_token_s: _Optional[float] = ..., verify_a_s: _Optional[float] = ..., verify_b_s: _Optional[float] = ..., p_top_k: _Optional[int] = ..., p_tail: _Optional[int] = ..., server_s: _Optional[float] = ..., session_key: _Optional[str] = ..., tree_branches: _Optional[int] = ..., lead_token: _Optional[int] = ..., accepts_prompt_zstd: _Optional[bool] = ...) -> None: ...

class Draft(_message.Message):
    __slots__ = ("epoch", "start", "tokens", "fixed", "q", "q_sparse", "want_bonus", "more_tail", "parents", "handover")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIXED_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    Q_SPARSE_FIELD_NUMBER: _ClassVar[int]
    WANT_BONUS_FIELD_NUMBER: _ClassVar[int]
    MORE_TAIL_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    HANDOVER_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    start: int
    tokens: bytes
    fixed: int
    q: bytes
    q_sparse: _containers.RepeatedScalarFieldContainer[bytes]
    want_bonus: bool
    more_tail: bool
    parents: bytes
    handover: bool
    def __init__(self, epoch: _Optional[int] = ..., start: _Optional[int] = ..., tokens: _Optional[bytes] = ..., fixed: _Optional[int] = ..., q: _Optional[bytes] = ..., q_sparse: _Optional[_Iterable[bytes]] = ..., want_bonus: _Optional[bool] = ..., more_tail: _Optional[bool] = ..., parents: _Optional[bytes] = ..., handover: _Optional[bool] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("epoch", "start", "accepted", "token", "p_payload", "verify_us", "tail", "lead", "path", "sibling_accept")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    P_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    VERIFY_US_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    LEAD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIBLING_ACCEPT_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    start: int
    accepted: int
    token: int
    p_payload: bytes
    verify_us: int
    tail: bytes
    lead: bool
    path: bytes
    sibling_accept: float
    def __init__(self, epoch: _Optional[int] = ..., start: _Optional[int] = ..., accepted: _Optional[int] = ..., token: _Optional[int] = ..., p_payload: _Optional[bytes] = ..., verify_us: _Optional[int] = ..., tail: _Optional[bytes] = ..., lead: _Optional[bool] = ..., path: _Optional[bytes] = ..., sibling_accept: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("fingerprint", "sampling", "prompt", "max_tokens", "ignore_eos", "client", "session", "prompt_zstd")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ZSTD_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    sampling: Sampling
    prompt: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    ignore_eos: bool
    client: str
    session: str
    prompt_zstd: bytes
    def __init__(self, fingerprint: _Optional[str] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., prompt: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., client: _Optional[str] = ..., session: _Optional[str] = ..., prompt_zstd: _Optional[bytes] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("tokens", "done", "finish_reason", "emulated")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    EMULATED_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    done: bool
    finish_reason: str
    emulated: bool
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., done: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., emulated: _Optional[bool] = ...) -> None: ...

class CloseRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class CloseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
