"""Prometheus metrics: the `Telemetry` the domain calls and the sampled values
(`telemetry`), a gRPC interceptor that counts calls and their latency (`interceptor`),
the HTTP `/metrics` endpoint (`endpoint`), and the files `--workers` share
(`multiprocess`). Import them from here.

Which process imports what, and when
------------------------------------
prometheus-client chooses how metric values are stored once, when `prometheus_client`
is first imported: in memory, or (if the environment variable PROMETHEUS_MULTIPROC_DIR
is set at that moment) in per-process mmap files in that directory, which any process
can sum. So the variable must be in a process's environment before anything imports
this package or prometheus_client, and only a process started afterwards (`exec`, not
`fork`) can rely on that.

* One process (`authsvc serve`, and the tests): the variable is not set; values live in
  memory. Build one `PrometheusTelemetry()`, hand it to the domain, add
  `MetricsInterceptor(telemetry)` to `grpc.aio.server(interceptors=...)`, run
  `sample_forever(...)` as a task, and serve `telemetry.registry` with
  `MetricsEndpoint.start(listen, telemetry.registry)`; `close()` it on the way out.

* The `--workers` supervisor: it records nothing itself, it only reads the workers'
  files, and `MultiProcessCollector` reads them whatever value class the supervisor's
  own prometheus_client chose. So its own import order does not matter; what matters
  is that, before the first worker is spawned, it has
    1. `path = prepare_multiprocess_dir(<a directory private to this supervisor>)`,
    2. set `os.environ[MULTIPROC_DIR_VARIABLE] = str(path)` (workers copy os.environ),
  then it serves `MetricsEndpoint.start(listen, multiprocess_registry(path))`, calls
  `worker_exited(pid, path)` for every worker that exits (so that worker's gauges drop
  out of the totals; its counters stay counted), and closes the endpoint on exit.
  It must not create a `PrometheusTelemetry` (that would add a process to the totals).

* A worker (`serve --worker`): a fresh interpreter started with the variable already
  in its environment, so its first import of prometheus_client chooses the mmap files
  (`multiprocess_enabled()` says so). It builds exactly one `PrometheusTelemetry` (two
  in one process would share, and overwrite, the same file entries) and wires it like
  the single process, but starts no `MetricsEndpoint`: the supervisor owns that port.
"""

from __future__ import annotations

from service.metrics.endpoint import DEFAULT_ENDPOINT_LIMITS, EndpointLimits, MetricsEndpoint
from service.metrics.interceptor import MetricsInterceptor
from service.metrics.multiprocess import (
    MULTIPROC_DIR_VARIABLE,
    OwnedMultiprocessDir,
    multiprocess_enabled,
    multiprocess_registry,
    prepare_multiprocess_dir,
    remove_abandoned_multiprocess_dirs,
    worker_exited,
)
from service.metrics.telemetry import (
    DURATION_BUCKETS,
    ProcessSample,
    PrometheusTelemetry,
    RpcMetrics,
    sample_forever,
)

__all__ = [
    "DEFAULT_ENDPOINT_LIMITS",
    "DURATION_BUCKETS",
    "MULTIPROC_DIR_VARIABLE",
    "EndpointLimits",
    "MetricsEndpoint",
    "MetricsInterceptor",
    "OwnedMultiprocessDir",
    "ProcessSample",
    "PrometheusTelemetry",
    "RpcMetrics",
    "multiprocess_enabled",
    "multiprocess_registry",
    "prepare_multiprocess_dir",
    "remove_abandoned_multiprocess_dirs",
    "sample_forever",
    "worker_exited",
]
