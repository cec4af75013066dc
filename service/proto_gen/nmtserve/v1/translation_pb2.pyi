from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttentionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTENTION_NONE: _ClassVar[AttentionMode]
    ATTENTION_LAYER_AVERAGE: _ClassVar[AttentionMode]
    ATTENTION_LAYER_HEADS: _ClassVar[AttentionMode]
    ATTENTION_ALL_LAYERS: _ClassVar[AttentionMode]
ATTENTION_NONE: AttentionMode
ATTENTION_LAYER_AVERAGE: AttentionMode
ATTENTION_LAYER_HEADS: AttentionMode
ATTENTION_ALL_LAYERS: AttentionMode

class TranslateOptions(_message.Message):
    __slots__ = ("max_output_tokens", "attention", "attention_layer", "return_pieces", "return_scores", "return_alignment", "target_language")
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_LAYER_FIELD_NUMBER: _ClassVar[int]
    RETURN_PIECES_FIELD_NUMBER: _ClassVar[int]
    RETURN_SCORES_FIELD_NUMBER: _ClassVar[int]
    RETURN_ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    max_output_tokens: int
    attention: AttentionMode
    attention_layer: int
    return_pieces: bool
    return_scores: bool
    return_alignment: bool
    target_language: str
    def __init__(self, max_output_tokens: _Optional[int] = ..., attention: _Optional[_Union[AttentionMode, str]] = ..., attention_layer: _Optional[int] = ..., return_pieces: _Optional[bool] = ..., return_scores: _Optional[bool] = ..., return_alignment: _Optional[bool] = ..., target_language: _Optional[str] = ...) -> None: ...

class TranslateRequest(_message.Message):
    __slots__ = ("sentences", "options", "request_id")
    SENTENCES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    sentences: _containers.RepeatedScalarFieldContainer[str]
    options: TranslateOptions
    request_id: str
    def __init__(self, sentences: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[TranslateOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class TranslateResponse(_message.Message):
    __slots__ = ("results", "request_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TranslationResult]
    request_id: str
    def __init__(self, results: _Optional[_Iterable[_Union[TranslationResult, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class Matrix(_message.Message):
    __slots__ = ("shape", "values")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class TranslationResult(_message.Message):
    __slots__ = ("index", "translation", "token_ids", "source_pieces", "target_pieces", "token_log_probs", "sequence_log_prob", "attention", "alignment", "alignment_pharaoh", "finish_reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TRANSLATION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PIECES_FIELD_NUMBER: _ClassVar[int]
    TARGET_PIECES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_PHARAOH_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    translation: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    source_pieces: _containers.RepeatedScalarFieldContainer[str]
    target_pieces: _containers.RepeatedScalarFieldContainer[str]
    token_log_probs: _containers.RepeatedScalarFieldContainer[float]
    sequence_log_prob: float
    attention: Matrix
    alignment: _containers.RepeatedScalarFieldContainer[int]
    alignment_pharaoh: str
    finish_reason: str
    def __init__(self, index: _Optional[int] = ..., translation: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., source_pieces: _Optional[_Iterable[str]] = ..., target_pieces: _Optional[_Iterable[str]] = ..., token_log_probs: _Optional[_Iterable[float]] = ..., sequence_log_prob: _Optional[float] = ..., attention: _Optional[_Union[Matrix, _Mapping]] = ..., alignment: _Optional[_Iterable[int]] = ..., alignment_pharaoh: _Optional[str] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("format_version", "vocab_size", "d_model", "heads", "encoder_layers", "decoder_layers", "max_source_tokens", "max_target_tokens", "target_tokens_a", "target_tokens_b", "max_sentences_per_request", "execution_provider", "precision", "model_sha256", "source_language", "target_language", "decode_lanes", "threads_per_lane", "target_languages", "tokenizer", "corpus", "metrics")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DECODER_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_A_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_B_FIELD_NUMBER: _ClassVar[int]
    MAX_SENTENCES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    DECODE_LANES_FIELD_NUMBER: _ClassVar[int]
    THREADS_PER_LANE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGES_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    CORPUS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    vocab_size: int
    d_model: int
    heads: int
    encoder_layers: int
    decoder_layers: int
    max_source_tokens: int
    max_target_tokens: int
    target_tokens_a: float
    target_tokens_b: float
    max_sentences_per_request: int
    execution_provider: str
    precision: str
    model_sha256: str
    source_language: str
    target_language: str
    decode_lanes: int
    threads_per_lane: int
    target_languages: _containers.RepeatedScalarFieldContainer[str]
    tokenizer: str
    corpus: CorpusSummary
    metrics: _containers.RepeatedCompositeFieldContainer[TestMetrics]
    def __init__(self, format_version: _Optional[int] = ..., vocab_size: _Optional[int] = ..., d_model: _Optional[int] = ..., heads: _Optional[int] = ..., encoder_layers: _Optional[int] = ..., decoder_layers: _Optional[int] = ..., max_source_tokens: _Optional[int] = ..., max_target_tokens: _Optional[int] = ..., target_tokens_a: _Optional[float] = ..., target_tokens_b: _Optional[float] = ..., max_sentences_per_request: _Optional[int] = ..., execution_provider: _Optional[str] = ..., precision: _Optional[str] = ..., model_sha256: _Optional[str] = ..., source_language: _Optional[str] = ..., target_language: _Optional[str] = ..., decode_lanes: _Optional[int] = ..., threads_per_lane: _Optional[int] = ..., target_languages: _Optional[_Iterable[str]] = ..., tokenizer: _Optional[str] = ..., corpus: _Optional[_Union[CorpusSummary, _Mapping]] = ..., metrics: _Optional[_Iterable[_Union[TestMetrics, _Mapping]]] = ...) -> None: ...

class CorpusSummary(_message.Message):
    __slots__ = ("kind", "sizes", "seed", "files", "problems")
    class SizesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    sizes: _containers.ScalarMap[str, int]
    seed: int
    files: _containers.ScalarMap[str, str]
    problems: int
    def __init__(self, kind: _Optional[str] = ..., sizes: _Optional[_Mapping[str, int]] = ..., seed: _Optional[int] = ..., files: _Optional[_Mapping[str, str]] = ..., problems: _Optional[int] = ...) -> None: ...

class TestMetrics(_message.Message):
    __slots__ = ("precision", "sentences", "exact_match", "bleu", "bleu_tokenize", "chrf", "exact_match_by_group", "seconds")
    class ExactMatchByGroupEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    SENTENCES_FIELD_NUMBER: _ClassVar[int]
    EXACT_MATCH_FIELD_NUMBER: _ClassVar[int]
    BLEU_FIELD_NUMBER: _ClassVar[int]
    BLEU_TOKENIZE_FIELD_NUMBER: _ClassVar[int]
    CHRF_FIELD_NUMBER: _ClassVar[int]
    EXACT_MATCH_BY_GROUP_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    precision: str
    sentences: int
    exact_match: float
    bleu: float
    bleu_tokenize: str
    chrf: float
    exact_match_by_group: _containers.ScalarMap[str, float]
    seconds: float
    def __init__(self, precision: _Optional[str] = ..., sentences: _Optional[int] = ..., exact_match: _Optional[float] = ..., bleu: _Optional[float] = ..., bleu_tokenize: _Optional[str] = ..., chrf: _Optional[float] = ..., exact_match_by_group: _Optional[_Mapping[str, float]] = ..., seconds: _Optional[float] = ...) -> None: ...
