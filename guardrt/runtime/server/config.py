"""The server's settings: one frozen config, built once from flags (and the environment)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from guardrt.runtime.batching import POLICIES
from guardrt.runtime.engine import EngineOptions
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.server.image_urls import Origin
from guardrt.runtime.server.server_policy import ServerPolicy, check_decode

# One image (32 MiB encoded, the decoder's own limit) plus text and framing.
DEFAULT_MAX_MESSAGE_BYTES = 40 * 1024 * 1024
MIN_MESSAGE_BYTES = 1024
AUTH_TOKENS_ENV = "GUARDRT_AUTH_TOKENS"  # comma-separated static bearer tokens


@dataclass(frozen=True)
class TlsConfig:
    cert: Path  # PEM server certificate chain
    key: Path  # PEM private key
    client_ca: Path | None = None  # PEM CA bundle: when set, clients must present a cert (mTLS)

    def credentials(self) -> tuple[bytes, bytes, bytes | None]:
        try:
            ca = self.client_ca.read_bytes() if self.client_ca else None
            return self.key.read_bytes(), self.cert.read_bytes(), ca
        except OSError as exc:
            raise ConfigError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from exc


@dataclass(frozen=True)
class ServerConfig:
    """Everything `guardrt serve` is configured with (the engine's settings included)."""

    model: str = "tiny-random"  # a checkpoint directory, or tiny-random (meaningless verdicts)
    device: str = "auto"  # the back end's GPU when it has one, else the CPU
    dtype: str | None = None  # None: float32 on the CPU, the checkpoint's dtype elsewhere
    semantics: str | None = None  # None: "meta" for a checkpoint, an engine's own
    decode: str = "constrained"
    max_seq: int = 8192  # prompt + verdict tokens: the model was fine-tuned on 8,192
    max_streams: int = 4  # cache slots kept for ModerateStream sessions
    cuda_graphs: bool = True  # the torch back end on a GPU: replay small steps as CUDA graphs
    warmup_max_batch: int = 4  # warm-up captures the common steps of batches up to this size
    quantize: str | None = None  # a checkpoint's weights as int8 / fp8 (the torch back end)
    int8_compute: str = "weight-only"  # or "weight+activation" (large int8 steps on _int_mm)
    host: str = "0.0.0.0"
    grpc_port: int = 50051  # 0 = any free port (tests)
    http_port: int = 8000  # the OpenAI-compatible HTTP API; 0 = any free port, -1 = off
    max_batch_size: int = 4
    max_wait_ms: float = 5.0  # a batch closes when full or when its first request waited this
    batching: str = "cost"  # which queued requests share a batch: "cost" or "fifo" (batching.py)
    max_queue: int = 256  # queued requests beyond this are refused (RESOURCE_EXHAUSTED)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_text_chars: int = 200_000
    max_in_flight_per_caller: int = 0  # per named bearer token's caller; 0: no limit
    max_rate_per_caller: float = 0.0  # requests a second per caller (rates.py); 0: no limit
    rate_burst_per_caller: int = 0  # a quiet caller's requests at once; 0: a second's worth
    verdict_cache: int = 0  # verdicts of distinct inputs kept to answer repeats (0: off)
    # The policy of requests that send no categories (--policy FILE; server_policy.py); None:
    # the model's S1-S13.
    policy: ServerPolicy | None = None
    grace_s: float = 30.0  # SIGTERM: time to answer in-flight and queued work
    # SIGTERM: keep taking calls this long while reporting NOT_SERVING, for load balancers
    # (a Kubernetes Service's endpoints) to stop sending here before the ports close.
    drain_delay_s: float = 0.0
    # A batch running longer is taken for a stuck engine (a hung GPU): the server answers
    # what waits UNAVAILABLE and exits for a restart. 0: never.
    engine_timeout_s: float = 300.0
    workers: int = 4  # preparation threads (tokenizing, image tiling)
    # Bind the ports before the model loads: alive, not ready, every call refused (loading.py).
    listen_while_loading: bool = False
    # Where the HTTP API may fetch images given by URL (none: data: URLs only), and how long a
    # fetch may take (image_urls.py).
    image_url_origins: tuple[Origin, ...] = ()
    image_url_timeout_s: float = 10.0
    tls: TlsConfig | None = None
    auth_tokens: frozenset[str] = field(default_factory=frozenset)
    auth_token_file: str | None = None  # where auth_tokens came from: read again on SIGHUP

    def engine_options(self, directory: Path) -> EngineOptions:
        return EngineOptions(
            model=directory,
            device=self.device,
            dtype=self.dtype,
            semantics=self.semantics,
            decode=self.decode,
            max_batch=self.max_batch_size,
            max_seq=self.max_seq,
            max_sessions=self.max_streams,
            cuda_graphs=self.cuda_graphs,
            warmup_max_batch=self.warmup_max_batch,
            quantize=self.quantize,
            int8_compute=self.int8_compute,
        )

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_message_bytes", "max_text_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_message_bytes < MIN_MESSAGE_BYTES:  # every call would be refused
            raise ConfigError(
                f"max_message_bytes must be at least {MIN_MESSAGE_BYTES} (a call's framing and "
                f"a short text), not {self.max_message_bytes}"
            )
        if not 0 <= self.grpc_port < 65536:
            raise ConfigError(f"grpc port {self.grpc_port} is not a port number")
        if not -1 <= self.http_port < 65536:
            raise ConfigError(f"http port {self.http_port} is not a port number (or -1: off)")
        if self.http_port == self.grpc_port != 0:
            raise ConfigError(f"http port {self.http_port} is the grpc port too: give each its own")
        if self.warmup_max_batch < 1:
            raise ConfigError(f"warmup_max_batch must be at least 1, not {self.warmup_max_batch}")
        if self.batching not in POLICIES:
            raise ConfigError(f"batching {self.batching!r} is not one of {', '.join(POLICIES)}")
        for name in ("max_wait_ms", "grace_s", "engine_timeout_s", "drain_delay_s"):  # NaN too
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be a finite number ≥ 0, not {getattr(self, name)}")
        if not 0 < self.image_url_timeout_s < math.inf:
            raise ConfigError(
                f"image_url_timeout_s must be a finite number > 0, not {self.image_url_timeout_s}"
            )
        self._check_caller_limits()
        check_decode(self.policy, self.decode)
        if self.verdict_cache < 0:
            raise ConfigError(f"verdict_cache must be ≥ 0 (0: off), not {self.verdict_cache}")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, not {self.workers}")
        if self.max_streams < 0:
            raise ConfigError(
                f"max_streams must be ≥ 0 (0: no cache slots), not {self.max_streams}"
            )

    def _check_caller_limits(self) -> None:
        """The per-caller bounds: in flight, and a rate with its burst."""
        if self.max_in_flight_per_caller < 0:
            raise ConfigError(
                "max_in_flight_per_caller must be ≥ 0 (0: no limit), not "
                f"{self.max_in_flight_per_caller}"
            )
        if not 0 <= self.max_rate_per_caller < math.inf:  # NaN too
            raise ConfigError(
                "max_rate_per_caller must be a finite number ≥ 0 (0: no limit), not "
                f"{self.max_rate_per_caller}"
            )
        if self.rate_burst_per_caller < 0:
            raise ConfigError(
                "rate_burst_per_caller must be ≥ 0 (0: one second's worth), not "
                f"{self.rate_burst_per_caller}"
            )
        if self.rate_burst_per_caller and not self.max_rate_per_caller:
            raise ConfigError("rate_burst_per_caller needs max_rate_per_caller (the rate)")
