"""OpenTelemetry: one transfer is one trace across both nodes; metrics count it."""

from __future__ import annotations

import os
from pathlib import Path

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.cluster import InProcessNode, wait_for
from tests.outbound_files import clean_pdf


def test_one_trace_id_across_both_nodes(
    pair: tuple[InProcessNode, InProcessNode], tmp_path: Path
) -> None:
    hospital, factory = pair
    spans_h, spans_f = InMemorySpanExporter(), InMemorySpanExporter()
    hospital.node.telemetry.add_span_processor(SimpleSpanProcessor(spans_h))
    factory.node.telemetry.add_span_processor(SimpleSpanProcessor(spans_f))
    src = tmp_path / "x.bin"
    src.write_bytes(clean_pdf(os.urandom(300_000)))  # what a hospital may send
    with hospital.self_client() as client:
        tid = client.submit(src, ["factory-1"]).queued[0].transfer_id
    wait_for(lambda: hospital.node.catalog.get_transfer(tid, "outbound").status == "done")
    wait_for(lambda: any(s.name.endswith("/Push") for s in spans_f.get_finished_spans()))

    (send,) = wait_for(  # the send span ends just after the transfer is marked done
        lambda: [s for s in spans_h.get_finished_spans() if s.name == "yigong.transfer.send"]
    )
    assert send.attributes is not None and send.attributes["yigong.transfer_id"] == tid
    assert send.attributes["yigong.outcome"] == "done"
    trace_id = send.context.trace_id
    client_calls = [
        s for s in spans_h.get_finished_spans() if s.name.startswith("/yigong.v1.Transfer/")
    ]
    assert {s.name for s in client_calls} >= {
        "/yigong.v1.Transfer/Identify",
        "/yigong.v1.Transfer/Offer",
        "/yigong.v1.Transfer/Push",
    }
    server = [s for s in spans_f.get_finished_spans() if s.name.startswith("/yigong.v1.Transfer/")]
    assert {s.name for s in server} >= {"/yigong.v1.Transfer/Offer", "/yigong.v1.Transfer/Push"}
    # The factory's spans continue the hospital's trace: same trace id, remote parents.
    for span in server:
        assert span.context.trace_id == trace_id
        assert span.parent is not None and span.parent.is_remote
    assert {s.resource.attributes["yigong.node.id"] for s in server} == {"factory-1"}
    assert send.resource.attributes["yigong.node.id"] == "hospital-1"


def test_transfer_metrics(federation, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from gateway.telemetry import Telemetry

    reader = InMemoryMetricReader()
    tel = Telemetry("node-x", "hospital", metric_readers=[reader])
    tel.transferred("outbound", 1234, 0.5)
    tel.transferred("outbound", 766, 0.25)
    tel.failed("outbound", "attempt")
    data = reader.get_metrics_data()
    assert data is not None
    metrics = {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    (bytes_point,) = metrics["yigong.transfer.bytes"].data.data_points
    assert bytes_point.value == 2000 and bytes_point.attributes == {"direction": "outbound"}
    (objects_point,) = metrics["yigong.transfer.objects"].data.data_points
    assert objects_point.value == 2
    (fail_point,) = metrics["yigong.transfer.failures"].data.data_points
    assert fail_point.value == 1 and fail_point.attributes["kind"] == "attempt"
    (duration,) = metrics["yigong.transfer.duration"].data.data_points
    assert duration.count == 2 and abs(duration.sum - 0.75) < 1e-9
    tel.shutdown()


def test_dicom_association_has_a_span(
    pair: tuple[InProcessNode, InProcessNode], tmp_path: Path
) -> None:
    """A PACS association is one span, with the instances stored on it."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from tests.dicom_factory import SeriesInfo, StudyInfo, ct_series

    hospital, _ = pair
    spans = InMemorySpanExporter()
    hospital.node.telemetry.add_span_processor(SimpleSpanProcessor(spans))
    ae = AE(ae_title="PACS1")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", hospital.node.hooks.dicom_port, ae_title="YIGONG")  # type: ignore[attr-defined]
    assert assoc.is_established
    statuses = [
        assoc.send_c_store(ds).Status for ds in ct_series(3, study=StudyInfo(), series=SeriesInfo())
    ]
    assoc.release()
    assert statuses == [0, 0, 0]
    (span,) = wait_for(
        lambda: [s for s in spans.get_finished_spans() if s.name == "yigong.dicom.association"],
        what="the association span",
    )
    assert span.attributes is not None
    assert span.attributes["yigong.calling_ae"] == "PACS1"
    assert span.attributes["yigong.instances_stored"] == 3
    assert span.attributes["yigong.instances_refused"] == 0
