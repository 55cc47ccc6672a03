"""Settings: environment variables (``FILTER_`` prefix, ``__`` between levels) over an optional TOML file.

Everything is validated before the worker touches Kafka or loads a model, and every error names the
environment variable to fix, because the person reading it is an operator looking at a pod's log.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from filter_worker.security import redaction, tls

ENV_PREFIX = "FILTER_"
DEFAULT_MODEL = "tabularisai/multilingual-sentiment-analysis"

# librdkafka properties whose values are secrets: never logged, never echoed in errors.
# ssl.key.location and ssl.keystore.location too: where a private key lies is itself kept quiet.
_SECRET_PROPERTY = re.compile(r"(password|secret|token|private\.key|\.pem$|jaas|ssl\.key\.|keystore)", re.IGNORECASE)


class ConfigError(Exception):
    """A setting is wrong; the message names it. Start-up stops with exit code 2."""


def _not_blank(value: Any) -> Any:
    # An empty value is always a mistake (often an unset variable interpolated by compose or a shell),
    # and some are dangerous: an empty model name would load whatever is in the working directory.
    # Also run before type checks (a path): a TOML bool or number is left for them to refuse.
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


Text = Annotated[str, AfterValidator(_not_blank)]

# Kafka's own rule for topic names (kafka.common.internals.Topic): a typo here would otherwise only
# show up as a topic that never exists.
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def _topic_name(value: str) -> str:
    if not _TOPIC.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"{value!r} is not a Kafka topic name (letters, digits, '.', '_', '-'; at most 249)")
    return value


Topic = Annotated[str, AfterValidator(_topic_name)]


def _secret_from_file(value: Any) -> Any:
    # Kubernetes and Docker hand secrets to containers as files. The file's content is the secret,
    # less one trailing newline (what `echo secret > file` and most secret editors leave there).
    # Messages never name the file: the variable says which one, and its path says where a secret lies.
    if value is None or isinstance(value, SecretStr):
        return value
    if not str(value).strip():
        raise ValueError("must not be empty")
    try:
        text = Path(str(value)).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError("the file does not exist") from None
    except UnicodeDecodeError:
        raise ValueError("the file is not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"the file cannot be read ({exc.strerror})") from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise ValueError("the file is empty")
    return SecretStr(secret)


SecretFile = Annotated[SecretStr, BeforeValidator(_secret_from_file)]


def _path_given(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


def _existing_file(path: Path) -> Path:
    # Only the fact, never the path: this type is also used for the private key's location.
    if not path.exists():
        raise ValueError("no such file")
    if not path.is_file():
        raise ValueError("not a file")
    return path


ExistingFile = Annotated[Path, BeforeValidator(_path_given), AfterValidator(_existing_file)]

# SASL mechanisms that authenticate with a user name and password; GSSAPI (Kerberos) and OAUTHBEARER
# take their credentials from elsewhere (a keytab, a token provider).
_PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# librdkafka properties the worker sets itself, because a delivery guarantee or the rebalance handling
# depends on their value: the pass-through variables may not override them. Each maps to the setting to
# use instead, or to None where the worker's value is the only safe one.
OWNED_PROPERTIES: dict[str, str | None] = {
    "enable.auto.commit": None,
    "enable.auto.offset.store": None,
    "isolation.level": None,
    "acks": None,
    "enable.idempotence": None,
    "transactional.id": "FILTER_KAFKA__TRANSACTIONAL_ID",
    "partition.assignment.strategy": "FILTER_KAFKA__ASSIGNMENT_STRATEGY",
    "group.id": "FILTER_KAFKA__GROUP_ID",
    "bootstrap.servers": "FILTER_KAFKA__BOOTSTRAP_SERVERS",
    "auto.offset.reset": "FILTER_KAFKA__AUTO_OFFSET_RESET",
    "session.timeout.ms": "FILTER_KAFKA__SESSION_TIMEOUT_MS",
    "max.poll.interval.ms": "FILTER_KAFKA__MAX_POLL_INTERVAL_MS",
}


class KafkaSettings(_Section):
    """Connection and group settings; ``properties`` passes any librdkafka property through."""

    bootstrap_servers: Text = "localhost:9092"
    group_id: Text = "filter-worker"
    # Eager "range" by default: incremental cooperative rebalancing has had commit pitfalls in
    # librdkafka (commits racing partial revocations), and eager revocation makes "commit what is
    # done, drop the rest" exact. Operators with many partitions per pod may choose cooperative-sticky.
    assignment_strategy: Literal["range", "roundrobin", "cooperative-sticky"] = "range"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = Field(45_000, ge=1_000)
    max_poll_interval_ms: int = Field(300_000, ge=1_000)
    commit_interval_ms: int = Field(1_000, ge=10)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None = None
    sasl_username: Text | None = None
    sasl_password: SecretStr | None = None
    # TLS (security protocol SSL or SASL_SSL), PEM files. Dedicated settings rather than ssl.* properties
    # passed through, because these are checked at start-up: each file exists and parses, the key opens
    # and belongs to the certificate. Without a CA, librdkafka trusts the system's CA store. A client
    # certificate and key are for brokers that require mutual TLS.
    ssl_ca_location: ExistingFile | None = None
    ssl_certificate_location: ExistingFile | None = None
    ssl_key_location: ExistingFile | None = None
    ssl_key_password: SecretStr | None = None
    # The same secrets read from files (mounted Kubernetes or Docker secrets); each stands for its
    # variable without _FILE, and setting both is an error.
    sasl_password_file: SecretFile | None = None
    ssl_key_password_file: SecretFile | None = None
    # Kafka transactions: outputs and consumed offsets commit atomically, so read_committed consumers
    # of the output topics see every input exactly once, crashes included.
    exactly_once: bool = False
    # Stable per worker and unique among running workers; a restarted worker with the same id fences
    # its previous incarnation and aborts its open transaction. Default: "<group_id>-<hostname>".
    transactional_id: Text | None = None
    # Exactly-once: transactions aborted in a row (each followed by a backoff and a re-read from the
    # last commit) before the worker gives up with exit code 1. A record refused for its size needs
    # up to three (its dead letter, cut, then left out), so keep it above 3.
    max_aborts: int = Field(5, ge=1)
    properties: dict[str, SecretStr] = Field(default_factory=dict)
    consumer_properties: dict[str, SecretStr] = Field(default_factory=dict)
    producer_properties: dict[str, SecretStr] = Field(default_factory=dict)

    @field_validator("sasl_password", "ssl_key_password")
    @classmethod
    def _password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("must not be empty")
        return value

    @field_validator("properties", "consumer_properties", "producer_properties", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): v if isinstance(v, SecretStr) else str(v) for k, v in value.items()}
        return value

    # Before every check that reads the passwords: a secret from a file counts as set.
    @model_validator(mode="after")
    def _secret_files(self) -> KafkaSettings:
        for name in ("sasl_password", "ssl_key_password"):
            from_file = getattr(self, f"{name}_file")
            if from_file is None:
                continue
            if getattr(self, name) is not None:
                variable = f"FILTER_KAFKA__{name.upper()}"
                raise ValueError(f"set {variable} or {variable}_FILE, not both")
            setattr(self, name, from_file)
        return self

    def _tls_settings(self) -> dict[str, tuple[str, Path | SecretStr | None]]:
        """Each dedicated TLS setting: its librdkafka property -> (its variable, its value)."""
        return {
            "ssl.ca.location": ("FILTER_KAFKA__SSL_CA_LOCATION", self.ssl_ca_location),
            "ssl.certificate.location": ("FILTER_KAFKA__SSL_CERTIFICATE_LOCATION", self.ssl_certificate_location),
            "ssl.key.location": ("FILTER_KAFKA__SSL_KEY_LOCATION", self.ssl_key_location),
            "ssl.key.password": ("FILTER_KAFKA__SSL_KEY_PASSWORD", self.ssl_key_password),
        }

    @model_validator(mode="after")
    def _tls(self) -> KafkaSettings:
        settings = self._tls_settings()
        given = [variable for variable, value in settings.values() if value is not None]
        if given and not self.security_protocol.endswith("SSL"):  # TLS files that would silently not be used
            raise ValueError(
                f"{given[0]} is set, but FILTER_KAFKA__SECURITY_PROTOCOL is {self.security_protocol}, which does not "
                "use TLS: set it to SSL or SASL_SSL"
            )
        for field in ("properties", "consumer_properties", "producer_properties"):
            for key, (variable, value) in settings.items():
                if value is not None and key in getattr(self, field):
                    raise ValueError(f"{variable} and {key!r} in FILTER_KAFKA__{field.upper()} both set it: keep one")
        problem = self._tls_files_problem()
        if problem:
            raise ValueError(problem)
        return self

    def _tls_files_problem(self) -> str | None:
        """What is wrong with the TLS files: a certificate without its key, files that do not parse."""
        cert, key = self.ssl_certificate_location, self.ssl_key_location
        if (cert is None) != (key is None):
            missing = "FILTER_KAFKA__SSL_KEY_LOCATION" if key is None else "FILTER_KAFKA__SSL_CERTIFICATE_LOCATION"
            return f"mutual TLS needs both FILTER_KAFKA__SSL_CERTIFICATE_LOCATION and its key: {missing} is missing"
        if self.ssl_key_password is not None and key is None:
            return "FILTER_KAFKA__SSL_KEY_PASSWORD is set without FILTER_KAFKA__SSL_KEY_LOCATION"
        for variable, path in (
            ("FILTER_KAFKA__SSL_CA_LOCATION", self.ssl_ca_location),
            ("FILTER_KAFKA__SSL_CERTIFICATE_LOCATION", cert),
        ):
            problem = tls.certificates_problem(path) if path is not None else None
            if problem:
                return f"{variable}: {problem}"
        if cert is None or key is None:
            return None
        password = self.ssl_key_password.get_secret_value() if self.ssl_key_password else None
        return tls.key_problem(cert, key, password)

    # Errors of these validators concern several variables, so their messages name them all.
    @model_validator(mode="after")
    def _owned_properties(self) -> KafkaSettings:
        for field in ("properties", "consumer_properties", "producer_properties"):
            for key in getattr(self, field):
                if key in OWNED_PROPERTIES:
                    instead = OWNED_PROPERTIES[key]
                    advice = f"set {instead} instead" if instead else "the worker's own value is the only safe one"
                    raise ValueError(
                        f"FILTER_KAFKA__{field.upper()} must not set {key!r}: the worker sets it because its "
                        f"delivery guarantees depend on it; {advice}"
                    )
        return self

    @model_validator(mode="after")
    def _poll_interval(self) -> KafkaSettings:
        if self.max_poll_interval_ms < self.session_timeout_ms:  # librdkafka refuses it, less clearly
            raise ValueError(
                f"FILTER_KAFKA__MAX_POLL_INTERVAL_MS ({self.max_poll_interval_ms}) must be at least "
                f"FILTER_KAFKA__SESSION_TIMEOUT_MS ({self.session_timeout_ms})"
            )
        return self

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        protocol = self.security_protocol
        if not protocol.startswith("SASL"):
            return self
        if self.sasl_mechanism is None:
            raise ValueError(
                f"FILTER_KAFKA__SASL_MECHANISM is required when FILTER_KAFKA__SECURITY_PROTOCOL is {protocol}"
            )
        if self.sasl_mechanism in _PASSWORD_MECHANISMS:
            # The credentials may also come as librdkafka properties (FILTER_KAFKA__PROPERTIES).
            missing = [
                f"FILTER_KAFKA__SASL_{name.upper()}"
                for name, value in (("username", self.sasl_username), ("password", self.sasl_password))
                if value is None and f"sasl.{name}" not in self.properties
            ]
            if missing:
                raise ValueError(
                    f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required with "
                    f"FILTER_KAFKA__SASL_MECHANISM={self.sasl_mechanism}"
                )
        return self

    def client_properties(self) -> dict[str, str]:
        """librdkafka properties shared by consumer, producer and admin client (secrets included)."""
        props: dict[str, str] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            props["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username is not None:
            props["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            props["sasl.password"] = self.sasl_password.get_secret_value()
        for key, (_, value) in self._tls_settings().items():
            if value is not None:
                props[key] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        props.update({k: v.get_secret_value() for k, v in self.properties.items()})
        return props

    def redacted_properties(self) -> dict[str, str]:
        """The same properties, safe to log: secret values replaced."""
        return {k: ("***" if _SECRET_PROPERTY.search(k) else v) for k, v in self.client_properties().items()}

    def secret_values(self) -> list[str]:
        """What no log line or message may show: every value ``redacted_properties`` hides, of every client."""
        every = {
            **self.client_properties(),
            **{k: v.get_secret_value() for k, v in self.consumer_properties.items()},
            **{k: v.get_secret_value() for k, v in self.producer_properties.items()},
        }
        return [value for key, value in every.items() if _SECRET_PROPERTY.search(key)]


def _split_topics(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class TopicSettings(_Section):
    input: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["messages"], min_length=1)
    allow: Topic = "messages.allow"
    quarantine: Topic = "messages.quarantine"
    drop: Topic = "messages.drop"
    dead_letter: Topic = "messages.dlq"
    # Create missing output topics at start-up (with the input's partition count and the broker's
    # default replication). Input topics are never created: a missing one is a typo or a wrong cluster.
    create: bool = False

    _split = field_validator("input", mode="before")(_split_topics)

    @field_validator("input")
    @classmethod
    def _input_names(cls, value: list[str]) -> list[str]:
        # "^..." subscribes to every topic matching the regular expression (librdkafka's convention).
        return [name if name.startswith("^") and len(name) > 1 else _topic_name(name) for name in value]

    @model_validator(mode="after")
    def _no_loops(self) -> TopicSettings:
        outputs = {self.allow, self.quarantine, self.drop, self.dead_letter}
        looped = outputs.intersection(self.input)
        if looped:
            raise ValueError(f"input topics must not also be output topics: {sorted(looped)}")
        return self

    def outputs(self) -> dict[str, str]:
        return {"allow": self.allow, "quarantine": self.quarantine, "drop": self.drop, "dead_letter": self.dead_letter}


def looks_like_path(name: str) -> bool:
    """A model name that can only be a directory: hub ids are ``NAME`` or ``ORG/NAME`` and never start with '.'."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def _model_name(name: str) -> str:
    if looks_like_path(name) and not Path(name).is_dir():
        problem = "it is a file, not a model directory" if Path(name).exists() else "there is no such directory"
        raise ValueError(f"{name!r} looks like a path but {problem} (a hub id is NAME or ORG/NAME)")
    return name


class ModelSettings(_Section):
    name: Annotated[Text, AfterValidator(_model_name)] = DEFAULT_MODEL
    revision: Text | None = None
    device: str = "auto"
    max_length: int = Field(512, ge=8)
    trust_remote_code: bool = False
    # Check a local model directory against its lock file (``filter-worker model pull``) before loading:
    # "auto" when the directory has one, True to require one, False to skip.
    verify: bool | Literal["auto"] = "auto"

    @field_validator("verify", mode="before")
    @classmethod
    def _verify(cls, value: Any) -> Any:
        # One clear message instead of one per member of the union.
        if isinstance(value, str):
            text = value.strip().lower()
            choices: dict[str, bool | str] = {"auto": "auto", "true": True, "1": True, "false": False, "0": False}
            if text not in choices:
                raise ValueError("must be auto, true or false")
            return choices[text]
        return value

    # auto: ``run`` and ``bench`` measure the precisions and engines this machine runs natively (AMX or
    # AVX-512 BF16: bfloat16; VNNI: int8; CUDA: float16, bfloat16) against float32 on a check set and
    # run the fastest that decides as float32 does (model/precision.py); float32 when none does, and
    # for the one-off commands. int8 is dynamic quantization of the Linear layers, a CPU technique; the
    # combinations a device cannot run are refused at load time with the reason (model.resolve_dtype).
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = "auto"
    # What runs the forward pass: eager PyTorch, ONNX Runtime on a graph exported from the same
    # safetensors weights (``filter-worker model export``; needs the ``onnx`` extra), or OpenVINO on the
    # same module converted in memory at start-up (CPU; float32 or bfloat16; needs the ``openvino``
    # extra). auto: torch, or with FILTER_MODEL__DTYPE=auto whichever engine the measurement chooses.
    backend: Literal["auto", "torch", "onnx", "openvino"] = "auto"
    # Forward passes at once, each on a model thread of its own: the openvino engine compiles this many
    # streams and splits its threads between them (OpenVINO's throughput mode). One pass on every
    # thread waits at each step for the slowest of them, so when the Kafka loop takes a core for a
    # moment the whole pass waits; streams run on. On 2 vCPUs with AMX two streams moved 1.14x the
    # records end to end in alternated rounds, keep-up 0.953 against 0.847 (docs/performance.md).
    # auto: 2 on the openvino engine where the model has two threads or more, else 1; 1: one pass on
    # all threads.
    streams: int | Literal["auto"] = "auto"
    # The check set of FILTER_MODEL__DTYPE=auto: one text per line. Default: the model directory's
    # check-texts.txt, else a built-in multilingual mix.
    precision_check_file: Text | None = None
    # Where the measurement is cached (keyed by CPU capabilities, weights, candidates and check set);
    # default $XDG_CACHE_HOME/filter-worker/precision. A model directory's precision/ is read first.
    precision_cache_dir: Text | None = None
    # The function from logits to scores: auto follows the model's config as transformers' pipeline does
    # (sigmoid per label for multi-label heads and single outputs, softmax otherwise, none for
    # regression); set it for a multi-label model whose config leaves problem_type unset.
    score_function: Literal["auto", "softmax", "sigmoid", "none"] = "auto"
    # Names for the model's outputs, in output order (a JSON list or comma-separated), replacing its
    # id2label: a model whose labels are LABEL_0, LABEL_1, ... cannot be routed by name without them.
    labels: Annotated[list[str] | None, NoDecode] = None

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [part.strip() for part in text.split(",")]
        if isinstance(value, list) and (
            not value or any(not isinstance(v, str) or not v.strip() for v in value) or len(set(value)) < len(value)
        ):
            raise ValueError("must name every output once, in output order: a JSON list or comma-separated names")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("streams", mode="before")
    @classmethod
    def _stream_count(cls, value: Any) -> Any:
        # One clear message instead of one per member of the union.
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if not re.fullmatch(r"[0-9]+", text) or not 1 <= int(text) <= 64:
            raise ValueError("must be auto or a whole number from 1 to 64")
        return int(text)

    @model_validator(mode="after")
    def _streams(self) -> ModelSettings:
        if self.streams != "auto" and self.streams > 1 and self.backend != "openvino":
            raise ValueError(
                f"FILTER_MODEL__STREAMS={self.streams} runs on the openvino engine only: "
                "set FILTER_MODEL__BACKEND=openvino, or FILTER_MODEL__STREAMS to 1 or auto"
            )
        return self


class BatchSettings(_Section):
    max_size: int = Field(32, ge=1, le=4096)
    max_wait_ms: int = Field(50, ge=0)
    max_tokens: int = Field(16_384, ge=8)


class CacheSettings(_Section):
    # Decisions of recent texts (by normalized-text hash) kept to skip inference for repeats: spam
    # campaigns send one text thousands of times. 0 turns the cache off. About 200 bytes an entry.
    size: int = Field(0, ge=0)


class MessageSettings(_Section):
    format: Literal["json", "text"] = "json"
    text_field: str = "text"

    @field_validator("text_field")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value or any(not part for part in value.split(".")):
            raise ValueError("must be a dotted path such as 'text' or 'payload.body'")
        return value


class Rule(_Section):
    """One routing rule: if the score of ``labels`` reaches ``min_score``, take ``action``. The score is
    their sum under a softmax head, the highest of them under a sigmoid head (``model/head.py``)."""

    action: Literal["drop", "quarantine", "allow"]
    labels: list[str] = Field(min_length=1)
    min_score: float = Field(ge=0.0, le=1.0)
    name: str | None = None


def rule_names(rules: list[Rule]) -> list[str]:
    """What ``filter.rule`` and the metrics call each rule: its name, else ``rules[N]`` by its place."""
    return [rule.name or f"rules[{position}]" for position, rule in enumerate(rules)]


def _unique_rule_names(rules: list[Rule]) -> list[Rule]:
    # A name is a metric label and a verdict's key: two rules sharing one could not be told apart.
    names = rule_names(rules)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"rule names must be unique within a rule list; repeated: {repeated}")
    return rules


# Defaults for abuse filtering with the default (sentiment) model: only confident, very hostile text is
# dropped; clearly negative text is held for review; everything else flows. Sentiment is a proxy for
# abuse, so the cost of a wrong drop (a lost legitimate message) is kept low with a high threshold.
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(action="drop", labels=["Very Negative"], min_score=0.9, name="very-negative"),
    Rule(action="quarantine", labels=["Very Negative", "Negative"], min_score=0.75, name="negative"),
)


# Scope names travel in the filter.scope header and label metrics, so they are short and plain.
SCOPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_SCOPE = "default"


class ScopeMatch(_Section):
    """Which records a scope takes: those read from one of ``topics``, or whose header or JSON field has
    one of ``values``.

    Exactly one of ``topics`` (input topics), ``header`` (a Kafka header name; its value as UTF-8) and
    ``field`` (a dotted path into the JSON value, like ``message.text_field``; the value must be a
    string) is given. A header or a field is whatever the sender wrote, so a scope on one is a scope
    the sender can choose; the input topic is the pipeline's (``Router`` warns about laxer scopes that
    a sender can choose).
    """

    topics: list[Topic] | None = Field(None, min_length=1)
    header: str | None = Field(None, min_length=1)
    field: str | None = None
    values: list[str] | None = Field(None, min_length=1)

    @field_validator("field")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(not part for part in value.split("."))):
            raise ValueError("must be a dotted path such as 'lang' or 'meta.lang'")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ScopeMatch:
        if sum(source is not None for source in (self.topics, self.header, self.field)) != 1:
            raise ValueError("give exactly one of 'topics', 'header' and 'field'")
        if self.topics is not None and self.values is not None:
            raise ValueError("'values' goes with 'header' or 'field'; 'topics' lists the topics themselves")
        if self.topics is None and self.values is None:
            raise ValueError("'values' is needed with 'header' or 'field'")
        return self


class Scope(_Section):
    """Rules for the records ``match`` selects (a tenant, a language). An empty rule list allows everything."""

    name: str
    match: ScopeMatch
    rules: list[Rule]

    _rule_names = field_validator("rules")(_unique_rule_names)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not SCOPE_NAME.fullmatch(value):
            raise ValueError("must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        if value == DEFAULT_SCOPE:
            raise ValueError(f"'{DEFAULT_SCOPE}' is the scope of records no scope matches (FILTER_ROUTING__RULES)")
        return value


class RoutingSettings(_Section):
    """Reloaded from the config file on SIGHUP (the only settings that are): thresholds get tuned live."""

    rules: list[Rule] = Field(default_factory=lambda: [r.model_copy() for r in DEFAULT_RULES])
    # Evaluated in order; the first scope matching a record decides which rules apply to it, and a
    # record no scope matches gets ``rules`` (scope "default").
    scopes: list[Scope] = Field(default_factory=list)
    # Decide as usual but publish every classified record to the allow topic, marked with the decision
    # it would have had: watch a new model or new thresholds before they act on anyone's messages.
    shadow: bool = False

    _rule_names = field_validator("rules")(_unique_rule_names)

    @field_validator("scopes")
    @classmethod
    def _unique(cls, scopes: list[Scope]) -> list[Scope]:
        names = [scope.name for scope in scopes]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"scope names must be unique; repeated: {repeated}")
        return scopes


class DeadLetterSettings(_Section):
    """When dead letters stop being "some bad input" and become "this deploy is broken".

    A worker that can classify nothing (wrong text field, broken model) would otherwise move the whole
    stream into the dead-letter topic. Crossing either limit stops it (exit code 5) instead.
    """

    max_consecutive: int = Field(1000, ge=0)  # 0: no limit
    max_ratio: float = Field(0.95, gt=0.0, le=1.0)  # 1.0: no limit
    window: int = Field(1000, ge=1)  # records the ratio is taken over (evaluated once the window is full)
    # A record too large for the outputs and for the dead-letter topic: "cut" dead-letters it with its
    # value cut to fit (or left out) and goes on; "stop" exits 1 before committing it.
    oversized: Literal["cut", "stop"] = "cut"


class BudgetSettings(_Section):
    """Records from consume to their output's acknowledgement; fetching pauses while either bound is spent."""

    max_records: int = Field(10_000, ge=1)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024)


class OutputSettings(_Section):
    embed: bool = False


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"
    include_text: bool = False


class MetricsSettings(_Section):
    enabled: bool = True
    port: int = Field(8470, ge=0, le=65535)  # 0 picks a free port (tests)


# Fewest verdicts a precision window may hold: below about 50 a window's confidence interval is too
# wide to tell a failing rule from a sound one (the alerts page on a CUSUM, not on the window).
MIN_FEEDBACK_WINDOW = 50


class FeedbackSettings(_Section):
    """``filter-worker feedback``: reviewers' verdicts in, precision per scope, rule and model out."""

    topic: Topic = "messages.verdicts"
    # Default "<FILTER_KAFKA__GROUP_ID>-feedback": its own group, so it never takes the worker's partitions.
    group_id: Text | None = None
    # Verdicts per (scope, rule, action, model) that the precision is taken over: the most recent ones.
    window: int = Field(200, ge=MIN_FEEDBACK_WINDOW)
    # Verdicts on randomly drawn records (FILTER_REVIEW__*) per (scope, model) that recall and
    # prevalence are estimated from: abuse is rare among allowed records, so many more are needed.
    sample_window: int = Field(5000, ge=100)
    # The filter.model values whose verdicts count, each a metric label: a full identity
    # ("name@revision#sha256:..."), or a model name matching every identity of that name. Empty: the
    # name in FILTER_MODEL__NAME. Verdicts on other models are skipped (unknown_model), so a review
    # tool cannot invent label values.
    models: list[Text] = Field(default_factory=list)
    # A model with no verdict for this long is forgotten, its series with it (a rolled-back or replaced
    # model). Verdicts on older decisions keep arriving for a while after a rollout: days, not minutes.
    model_idle_s: float = Field(2 * 24 * 3600.0, gt=0)
    # Verdicts per partition read again at start-up to refill the windows (the window lives in memory;
    # without this a restart would empty every precision gauge until reviewers catch up). 0: none.
    replay: int = Field(10_000, ge=0)
    metrics_port: int = Field(8471, ge=0, le=65535)  # 0 picks a free port (tests)
    # The precision each action's rules must keep: a wrong drop silences someone for good, a wrong
    # quarantine costs a reviewer a look. The precision alerts page on a CUSUM against these
    # (moderation/sequential.py), tuned to see the floor minus half its error (0.85, 0.25) at once.
    drop_floor: float = Field(0.9, gt=0.0, lt=1.0)
    quarantine_floor: float = Field(0.5, gt=0.0, lt=1.0)
    # The false-page budget: on average one false page per this many verdicts on a rule exactly at its
    # floor (the CUSUM's in-control run length), however often Prometheus looks. At 100 verdicts a day
    # 20 000 is a page in about 2 % of weeks; raise it for rules with many more verdicts a day.
    false_page_verdicts: int = Field(20_000, ge=1_000, le=10_000_000)

    def group(self, kafka: KafkaSettings) -> str:
        return self.group_id or f"{kafka.group_id}-feedback"


# Below these sizes the drift index is mostly noise: with 100-record windows it crossed the 0.2 alert
# line in about 45 % of windows without any drift (docs/moderation.md, "Score drift").
MIN_DRIFT_WINDOW = 500
MIN_DRIFT_REFERENCE = 1000


class DriftSettings(_Section):
    """Score drift against a reference written by ``filter-worker drift snapshot``."""

    reference: Annotated[Path, BeforeValidator(_not_blank)] | None = None
    # Records per scope the live distribution is taken over; the index appears once the window is full.
    window: int = Field(1000, ge=MIN_DRIFT_WINDOW)
    # A scope without a record for this long loses its index and take rates (it went quiet or was
    # removed): an index on traffic that stopped describes nothing that is happening.
    expire_s: float = Field(900.0, gt=0)


class ReviewSettings(_Section):
    """Random review sampling: decided records drawn with a known probability and published for review.

    Off while both rates are 0; a near rate needs a uniform rate above 0. See ``pipeline/sampling.py``
    and docs/moderation.md.
    """

    topic: Topic = "messages.review"
    # Every decided record (allowed, quarantined, dropped) is drawn with this probability.
    rate: float = Field(0.0, ge=0.0, le=1.0)
    # An allowed record whose score for some rule of its scope is less than near_margin below that
    # rule's min_score is drawn with this probability instead (at least rate).
    near_rate: float = Field(0.0, ge=0.0, le=1.0)
    near_margin: float = Field(0.1, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _near_at_least_uniform(self) -> ReviewSettings:
        # Inverse-probability weights stand for the records that could have been drawn: with a near
        # rate alone, most records (every one away from a threshold) never can, and prevalence and
        # recall came out 0.265 for a truth of 0.088 and 0.000 for 0.281 (docs/moderation.md).
        if self.near_rate > 0.0 and self.rate <= 0.0:
            raise ValueError(
                f"FILTER_REVIEW__RATE is 0 while FILTER_REVIEW__NEAR_RATE is {self.near_rate}: records away from a "
                "threshold could never be drawn, so recall and prevalence would be wrong; set a RATE above 0 too"
            )
        if 0.0 < self.near_rate < self.rate:
            raise ValueError(
                f"FILTER_REVIEW__NEAR_RATE ({self.near_rate}) must be 0 or at least FILTER_REVIEW__RATE ({self.rate})"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.rate > 0.0 or self.near_rate > 0.0


class CandidateSettings(_Section):
    """A second model run in shadow on the same batches: compared with the live one, never acted on.

    Off without ``name``. ``routing`` is the candidate's own rules (a retrained model has other labels);
    without it the candidate is decided under the routing in force, which then must name only labels
    the candidate has. ``sample_rate``: the share of disagreements copied to FILTER_REVIEW__TOPIC with
    both decisions in headers. See ``pipeline/candidate.py`` and docs/learning.md.
    """

    name: Annotated[Text, AfterValidator(_model_name)] | None = None
    routing: RoutingSettings | None = None
    sample_rate: float = Field(0.0, ge=0.0, le=1.0)

    def model_settings(self, live: ModelSettings) -> ModelSettings:
        """The candidate loads as the live model does (device, dtype, backend, lock), from its own name.

        One stream: its passes run on the Kafka loop's thread, one at a time (FILTER_MODEL__STREAMS
        would give each of them a share of the threads only).
        """
        return live.model_copy(update={"name": self.name, "revision": None, "streams": 1})


class HealthSettings(_Section):
    # /healthz fails when the Kafka loop has not turned for this long; the loop turns at least every
    # 100 ms while healthy, so the window only has to cover GC pauses and a slow rebalance callback.
    liveness_window_s: float = Field(60.0, gt=0)


class Settings(BaseSettings):
    """All settings. Sources, strongest first: environment, TOML file (``--config``), defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    message: MessageSettings = Field(default_factory=MessageSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    dead_letter: DeadLetterSettings = Field(default_factory=DeadLetterSettings)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    candidate: CandidateSettings = Field(default_factory=CandidateSettings)
    shutdown_timeout_s: float = Field(30.0, gt=0)
    # A FILTER_ variable that is no setting is almost always a typo (one underscore for two), and
    # pydantic-settings would ignore it: refused by default, only warned about with "warn".
    unknown_variables: Literal["refuse", "warn"] = "refuse"

    @model_validator(mode="after")
    def _fields_need_json(self) -> Settings:
        # A field scope can never match a plain-text record: refuse it rather than route by the default rules.
        if self.message.format == "text":
            by_field = [scope.name for scope in self.routing.scopes if scope.match.field is not None]
            if by_field:
                raise ValueError(
                    f"FILTER_ROUTING__SCOPES: scope(s) {by_field} match on a JSON field, but "
                    "FILTER_MESSAGE__FORMAT is text; match on a header instead"
                )
        return self

    @model_validator(mode="after")
    def _scope_topics_are_inputs(self) -> Settings:
        # A topic scope on a topic the worker does not read never matches: a typo, refused. With a
        # pattern subscription ("^...") the topics are only known at run time.
        if any(topic.startswith("^") for topic in self.topics.input):
            return self
        for scope in self.routing.scopes:
            unknown = [t for t in scope.match.topics or [] if t not in self.topics.input]
            if unknown:
                raise ValueError(
                    f"FILTER_ROUTING__SCOPES: scope '{scope.name}' matches topic(s) {unknown} that are not input "
                    f"topics (FILTER_TOPICS__INPUT: {self.topics.input})"
                )
        return self

    @model_validator(mode="after")
    def _feedback_apart(self) -> Settings:
        if self.feedback.topic in {*self.topics.input, *self.topics.outputs().values()}:
            raise ValueError("FILTER_FEEDBACK__TOPIC must not be an input or output topic of the worker")
        if self.review.topic in {*self.topics.input, *self.topics.outputs().values(), self.feedback.topic}:
            raise ValueError("FILTER_REVIEW__TOPIC must not be an input or output topic, nor FILTER_FEEDBACK__TOPIC")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def env_name(loc: tuple[int | str, ...]) -> str:
    """``("batch", "max_size")`` -> ``FILTER_BATCH__MAX_SIZE``: the variable an operator sets.

    Deeper parts (a rule's index and field) live inside that variable's JSON value, so they are
    shown in the dotted location instead.
    """
    names: list[str] = []
    for part in loc:
        if not isinstance(part, str) or len(names) == 2:
            break
        names.append(part.upper())
    return ENV_PREFIX + "__".join(names)


def _is_json_field(field: Any) -> bool:
    """Whether pydantic-settings parses the field's environment variable as JSON (lists, objects, sections)."""
    if NoDecode in field.metadata:
        return False
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return typing.get_origin(annotation) in (list, dict)


def json_variables() -> dict[str, str]:
    """Every FILTER_ variable whose value is JSON, with what it must hold ("list", "object")."""
    names: dict[str, str] = {}
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names[f"{ENV_PREFIX}{name.upper()}"] = "object"
            for sub, subfield in annotation.model_fields.items():
                if _is_json_field(subfield):
                    kind = "list" if typing.get_origin(subfield.annotation) is list else "object"
                    names[f"{ENV_PREFIX}{name.upper()}__{sub.upper()}"] = kind
        elif _is_json_field(field):
            names[f"{ENV_PREFIX}{name.upper()}"] = "object"
    return names


def _bad_json_variables() -> list[str]:
    """The JSON variables that are set but do not parse, each with what it must hold."""
    expected = json_variables()
    bad = []
    for key, value in os.environ.items():
        kind = expected.get(key.upper())
        if kind is None:
            continue
        try:
            json.loads(value)
        except ValueError:
            bad.append(f"{key} is not valid JSON (it must be a JSON {kind})")
        except RecursionError:
            bad.append(f"{key} nests lists or objects too deeply")
    return sorted(bad)


# Variables of the test suite that share the prefix (docs/development.md); no setting reads them.
_NOT_SETTINGS = frozenset({"FILTER_TEST_BOOTSTRAP_SERVERS", "FILTER_FUZZ_PROFILE"})


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds, directly, in a list or as an optional value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        model = _model_of(arg)
        if model is not None:
            return model
    return None


def _section_fields(loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the model found at ``loc`` inside ``Settings`` (list indexes skipped)."""
    model: type[BaseModel] | None = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model is not None else None
        model = _model_of(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _closest(name: str, candidates: typing.Iterable[str]) -> str | None:
    # Compared without underscores too: one underscore for two is the commonest slip.
    squashed = {c.replace("_", ""): c for c in candidates}
    if name.replace("_", "") in squashed:
        return squashed[name.replace("_", "")]
    found = difflib.get_close_matches(name, list(squashed.values()), n=1, cutoff=0.7)
    return found[0] if found else None


def variable_names() -> tuple[set[str], set[str]]:
    """(every settings variable, the prefixes ``NAME__`` under which pydantic-settings reads deeper names)."""
    names: set[str] = set()
    deeper: set[str] = set()
    for name, field in Settings.model_fields.items():
        top = ENV_PREFIX + name.upper()
        names.add(top)
        section = _model_of(field.annotation)
        if section is None:
            continue
        deeper.add(top + "__")
        for sub, subfield in section.model_fields.items():
            names.add(f"{top}__{sub.upper()}")
            if typing.get_origin(subfield.annotation) is dict:  # FILTER_KAFKA__PROPERTIES__LINGER.MS
                deeper.add(f"{top}__{sub.upper()}__")
    return names, deeper


def unknown_variables(environ: typing.Mapping[str, str]) -> list[str]:
    """One sentence per ``FILTER_`` variable that no setting reads, naming the closest real one."""
    names, deeper = variable_names()
    problems = []
    for key in sorted(environ):
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX) or upper in names or upper in _NOT_SETTINGS:
            continue
        # Deeper names under a section are checked by the section itself (and get a suggestion there).
        if any(upper.startswith(prefix) for prefix in deeper) and "__" in upper.removeprefix(ENV_PREFIX):
            continue
        closest = _closest(upper, names)
        hint = f"did you mean {closest}?" if closest else "docs/configuration.md lists every setting"
        problems.append(f"{key} is not a setting ({hint})")
    return problems


def _toml_keys(config_file: str | Path | None) -> dict[str, Any]:
    if config_file is None:
        return {}
    try:
        with open(config_file, "rb") as handle:
            return tomllib.load(handle)
    except (OSError, ValueError, RecursionError):  # already read once by the settings source
        return {}


def _from_file(loc: tuple[int | str, ...], data: dict[str, Any]) -> bool:
    """Whether the value at ``loc`` is the file's (its variable is not set, and the file has the key)."""
    names = [p for p in loc if isinstance(p, str)][:2]
    variables = {ENV_PREFIX + "__".join(n.upper() for n in names[:i]) for i in (1, 2) if len(names) >= i}
    if any(key.upper() in variables for key in os.environ):
        return False
    node: Any = data
    for part in loc:
        in_dict = isinstance(part, str) and isinstance(node, dict) and part in node
        in_list = isinstance(part, int) and isinstance(node, list) and part < len(node)
        if not (in_dict or in_list):
            return False
        node = node[part]
    return True


def _key(loc: tuple[int | str, ...]) -> str:
    """A TOML key path as written in the file; odd characters (a newline, a dot) quoted and escaped."""
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            text = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)
            parts.append(f".{text}")
    return "".join(parts).lstrip(".")


def _describe(error: ValidationError, config_file: str | Path | None = None) -> str:
    # Input values are left out on purpose: they may be secrets.
    data = _toml_keys(config_file)
    problems = []
    for item in error.errors():
        loc = tuple(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "value_error" and len(loc) <= 1:
            problems.append(message)  # a check across several settings: its message names them
            continue
        in_file = _from_file(loc, data)
        if item["type"] == "extra_forbidden":
            message = "not a setting"
            closest = _closest(str(loc[-1]), _section_fields(loc[:-1]))
            if closest is not None:
                suggestion = _key((*loc[:-1], closest)) if in_file else env_name((*loc[:-1], closest))
                if len(loc) > 2 and not in_file:  # inside a variable's JSON value: the field's name
                    suggestion = repr(closest)
                message += f" (did you mean {suggestion}?)"
        if in_file:
            problems.append(f"{config_file}, key {_key(loc)}: {message}")
            continue
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        problems.append(f"{env_name(loc)} ({where}): {message}")
    return "invalid configuration: " + "; ".join(problems)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build validated settings or raise ``ConfigError`` naming every bad setting.

    ``overrides`` are for programmatic callers (tests, the demo) and win over everything.
    """
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"--config {config_file}: no such file")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    try:
        settings = _FileSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_file)) from None
    except SettingsError as exc:
        bad = _bad_json_variables()
        if bad:
            raise ConfigError(f"invalid configuration: {'; '.join(bad)}") from None
        raise ConfigError(f"invalid configuration: {exc}") from None
    except ValueError as exc:  # malformed TOML
        raise ConfigError(f"invalid configuration in {config_file}: {exc}") from None
    except RecursionError:  # Python's TOML and JSON parsers recurse per level of nesting
        bad = _bad_json_variables()
        where = "; ".join(bad) if bad else f"{config_file} nests tables or arrays too deeply"
        raise ConfigError(f"invalid configuration: {where}") from None
    redaction.register(settings.kafka.secret_values())  # before anything can log them
    unknown = unknown_variables(os.environ)
    if unknown and settings.unknown_variables == "refuse":
        raise ConfigError(f"invalid configuration: {'; '.join(unknown)}; FILTER_UNKNOWN_VARIABLES=warn starts anyway")
    for problem in unknown:  # before logging is configured, and whatever its format: plainly on stderr
        print(f"filter-worker: warning: {problem}; ignored", file=sys.stderr)
    return settings
