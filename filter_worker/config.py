"""Settings: environment variables (``FILTER_`` prefix, ``__`` between levels) over an optional TOML file.

Everything is validated before the worker touches Kafka or loads a model, and every error names the
environment variable to fix, because the person reading it is an operator looking at a pod's log.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "FILTER_"
DEFAULT_MODEL = "tabularisai/multilingual-sentiment-analysis"

# librdkafka properties whose values are secrets: never logged, never echoed in errors.
_SECRET_PROPERTY = re.compile(r"(password|secret|token|private\.key|\.pem$|jaas)", re.IGNORECASE)


class ConfigError(Exception):
    """A setting is wrong; the message names it. Start-up stops with exit code 2."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KafkaSettings(_Section):
    """Connection and group settings; ``properties`` passes any librdkafka property through."""

    bootstrap_servers: str = "localhost:9092"
    group_id: str = "filter-worker"
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
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # Kafka transactions: outputs and consumed offsets commit atomically, so read_committed consumers
    # of the output topics see every input exactly once, crashes included.
    exactly_once: bool = False
    # Stable per worker and unique among running workers; a restarted worker with the same id fences
    # its previous incarnation and aborts its open transaction. Default: "<group_id>-<hostname>".
    transactional_id: str | None = None
    # Exactly-once: transactions aborted in a row (each followed by a backoff and a re-read from the
    # last commit) before the worker gives up with exit code 1. A record refused for its size needs
    # up to three (its dead letter, cut, then left out), so keep it above 3.
    max_aborts: int = Field(5, ge=1)
    properties: dict[str, SecretStr] = Field(default_factory=dict)
    consumer_properties: dict[str, SecretStr] = Field(default_factory=dict)
    producer_properties: dict[str, SecretStr] = Field(default_factory=dict)

    @field_validator("properties", "consumer_properties", "producer_properties", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): v if isinstance(v, SecretStr) else str(v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _poll_interval(self) -> KafkaSettings:
        if self.max_poll_interval_ms < self.session_timeout_ms:  # librdkafka refuses it, less clearly
            raise ValueError("max_poll_interval_ms must be at least session_timeout_ms")
        return self

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError("sasl_mechanism is required when security_protocol is SASL_*")
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
        props.update({k: v.get_secret_value() for k, v in self.properties.items()})
        return props

    def redacted_properties(self) -> dict[str, str]:
        """The same properties, safe to log: secret values replaced."""
        return {k: ("***" if _SECRET_PROPERTY.search(k) else v) for k, v in self.client_properties().items()}


def _split_topics(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class TopicSettings(_Section):
    input: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["messages"], min_length=1)
    allow: str = "messages.allow"
    quarantine: str = "messages.quarantine"
    drop: str = "messages.drop"
    dead_letter: str = "messages.dlq"
    # Create missing output topics at start-up (with the input's partition count and the broker's
    # default replication). Input topics are never created: a missing one is a typo or a wrong cluster.
    create: bool = False

    _split = field_validator("input", mode="before")(_split_topics)

    @model_validator(mode="after")
    def _no_loops(self) -> TopicSettings:
        outputs = {self.allow, self.quarantine, self.drop, self.dead_letter}
        looped = outputs.intersection(self.input)
        if looped:
            raise ValueError(f"input topics must not also be output topics: {sorted(looped)}")
        return self

    def outputs(self) -> dict[str, str]:
        return {"allow": self.allow, "quarantine": self.quarantine, "drop": self.drop, "dead_letter": self.dead_letter}


class ModelSettings(_Section):
    name: str = DEFAULT_MODEL
    revision: str | None = None
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

    # auto: float16 on CUDA (tensor cores, half the memory traffic), float32 elsewhere. int8 is dynamic
    # quantization of the Linear layers, a CPU technique; the combinations a device cannot run are
    # refused at load time with the reason (model.resolve_dtype).
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = "auto"
    # What runs the forward pass: eager PyTorch, or ONNX Runtime on a graph exported from the same
    # safetensors weights (``filter-worker model export``; needs the ``onnx`` extra).
    backend: Literal["torch", "onnx"] = "torch"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value


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
    """One routing rule: if the summed probability of ``labels`` reaches ``min_score``, take ``action``."""

    action: Literal["drop", "quarantine", "allow"]
    labels: list[str] = Field(min_length=1)
    min_score: float = Field(ge=0.0, le=1.0)
    name: str | None = None


# Defaults for abuse filtering with the default (sentiment) model: only confident, very hostile text is
# dropped; clearly negative text is held for review; everything else flows. Sentiment is a proxy for
# abuse, so the cost of a wrong drop (a lost legitimate message) is kept low with a high threshold.
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(action="drop", labels=["Very Negative"], min_score=0.9, name="very-negative"),
    Rule(action="quarantine", labels=["Very Negative", "Negative"], min_score=0.75, name="negative"),
)


class RoutingSettings(_Section):
    """Reloaded from the config file on SIGHUP (the only settings that are): thresholds get tuned live."""

    rules: list[Rule] = Field(default_factory=lambda: [r.model_copy() for r in DEFAULT_RULES])
    # Decide as usual but publish every classified record to the allow topic, marked with the decision
    # it would have had: watch a new model or new thresholds before they act on anyone's messages.
    shadow: bool = False


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
    """Every record between consume and commit counts against these; fetching pauses while either is spent."""

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
    port: int = Field(9100, ge=0, le=65535)  # 0 picks a free port (tests)


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
    shutdown_timeout_s: float = Field(30.0, gt=0)

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


def _bad_json_variables() -> list[str]:
    """Names of FILTER_ variables that look like JSON but do not parse."""
    bad = []
    for key, value in os.environ.items():
        if key.startswith(ENV_PREFIX) and value.lstrip()[:1] in ("[", "{"):
            try:
                json.loads(value)
            except ValueError:
                bad.append(key)
    return sorted(bad)


def _describe(error: ValidationError) -> str:
    # Input values are left out on purpose: they may be secrets.
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        lines.append(f"{env_name(loc)} ({where}): {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build validated settings or raise ``ConfigError`` naming every bad setting.

    ``overrides`` are for programmatic callers (tests, the demo) and win over everything.
    """
    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"--config {config_file}: no such file")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    try:
        return _FileSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except SettingsError as exc:
        bad = _bad_json_variables()
        if bad:
            raise ConfigError(f"invalid configuration: {', '.join(bad)} is not valid JSON") from None
        raise ConfigError(f"invalid configuration: {exc}") from None
    except ValueError as exc:  # malformed TOML
        raise ConfigError(f"invalid configuration in {config_file}: {exc}") from None
