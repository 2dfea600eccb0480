"""OpenTelemetry traces and metrics: the one home of telemetry.

Each node has its own tracer and meter providers (so several nodes can run
in one process, as in the tests) with resource attributes naming the node.
A transfer is one trace across both nodes: the sender's ``yigong.transfer``
span is active while it calls the peer, the official gRPC client
interceptor carries the context in gRPC metadata (W3C ``traceparent``) and
the server interceptor continues it on the receiver. DICOM associations get
spans of their own. Exporting is off by default; ``[telemetry]
otlp_endpoint`` turns on OTLP/gRPC export of spans and metrics.

Metrics: ``yigong.transfer.bytes`` and ``yigong.transfer.objects`` (by
direction), ``yigong.transfer.failures`` (by kind) and
``yigong.transfer.duration`` (seconds, by direction).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import (
    client_interceptor,
    intercept_channel,
    server_interceptor,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from gateway import __version__

log = logging.getLogger(__name__)


class Telemetry:
    """Tracer, meter and instruments of one node."""

    def __init__(
        self,
        node_id: str,
        role: str,
        *,
        otlp_endpoint: str = "",
        otlp_insecure: bool = False,
        metrics_interval_seconds: float = 60.0,
        metric_readers: list[MetricReader] | None = None,
    ) -> None:
        self.node_id = node_id
        resource = Resource.create(
            {
                "service.name": f"yigong-{role}",
                "service.version": __version__,
                "service.instance.id": node_id,
                "yigong.node.id": node_id,
                "yigong.node.role": role,
            }
        )
        self.tracer_provider = TracerProvider(resource=resource)
        readers = list(metric_readers or [])
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            self.tracer_provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=otlp_insecure))
            )
            readers.append(
                PeriodicExportingMetricReader(
                    OTLPMetricExporter(endpoint=otlp_endpoint, insecure=otlp_insecure),
                    export_interval_millis=int(metrics_interval_seconds * 1000),
                )
            )
            log.info("telemetry: exporting OTLP to %s", otlp_endpoint)
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        self.tracer = self.tracer_provider.get_tracer("yigong.gateway", __version__)
        meter = self.meter_provider.get_meter("yigong.gateway", __version__)
        self.bytes = meter.create_counter("yigong.transfer.bytes", unit="By")
        self.objects = meter.create_counter("yigong.transfer.objects")
        self.failures = meter.create_counter("yigong.transfer.failures")
        self.duration = meter.create_histogram("yigong.transfer.duration", unit="s")

    # -- gRPC --------------------------------------------------------------
    def server_interceptor(self) -> grpc.ServerInterceptor:
        """Continues the caller's trace (from gRPC metadata) in a server span."""
        return server_interceptor(tracer_provider=self.tracer_provider)

    def instrument_channel(self, channel: grpc.Channel) -> grpc.Channel:
        """A channel whose calls carry the current trace context to the peer."""
        wrapped: grpc.Channel = intercept_channel(
            channel, client_interceptor(tracer_provider=self.tracer_provider)
        )
        return wrapped

    # -- spans and metrics -------------------------------------------------
    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[trace.Span]:
        attrs = {f"yigong.{k}": v for k, v in attributes.items() if v is not None}
        with self.tracer.start_as_current_span(name, attributes=attrs) as span:
            yield span

    def start_span(self, name: str, **attributes: Any) -> trace.Span:
        """A span the caller ends itself (for lifetimes that are not one block, e.g. a
        DICOM association from acceptance to close)."""
        attrs = {f"yigong.{k}": v for k, v in attributes.items() if v is not None}
        return self.tracer.start_span(name, attributes=attrs)

    def transferred(self, direction: str, size: int, seconds: float) -> None:
        labels = {"direction": direction}
        self.bytes.add(size, labels)
        self.objects.add(1, labels)
        self.duration.record(seconds, labels)

    def failed(self, direction: str, kind: str) -> None:
        self.failures.add(1, {"direction": direction, "kind": kind})

    def add_span_processor(self, processor: SpanProcessor) -> None:
        self.tracer_provider.add_span_processor(processor)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
